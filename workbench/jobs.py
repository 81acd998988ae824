"""Jobs: recipes run by worker processes, one at a time, recorded in the workspace.

A job is `workbench run RECIPE --workspace WS` (or `workbench resume RUN`, or an export of a
finished run: `workbench export RUN --format FORMAT --name NAME`) in its own process and its own
session: a browser refresh, an app restart or Ctrl-C in the app's terminal leaves it running.
The queue is the folder `<workspace>/jobs/`, per job:

    <id>.json   the record: kind, name, recipe, status, pid, command, run ids, log, times
    <id>.yaml   the recipe as submitted (later edits of the source file do not change the job)
    <id>.log    the worker's output (stdout and stderr)

Status moves queued → running → done | failed | stopped | cancelled. At most one job runs at a
time: `JobQueue.tick()` finishes the records of workers that ended and starts the oldest queued
job when none is running, under a lock file, so two apps on one workspace do not start two jobs.
Every state is read back from these files, so a new `JobQueue` (an app restart) picks up running
and finished jobs where the last one left them.

Stopping: `stop(job)` sends SIGINT to the worker, as Ctrl-C would. The run is marked `stopped`
and keeps its checkpoints (every `train.checkpoint_every` steps); `resume(run)` queues
`workbench resume RUN`, which continues from the last one. `cancel(job)` kills the worker
(SIGKILL); its run is marked `stopped` with the error "cancelled".

Progress: `view(job)` reads the phase, step / total and the time left from the progress events
of the run the job is on (`<run>/progress.jsonl`, `workbench.progress`), and the loss curve from
its metrics.

Workers run at a lower CPU priority than the app (nice +10, or $WORKBENCH_WORKER_NICE), so the
page stays responsive while a job keeps every core busy; alone on the machine a job still gets
all of it.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import progress
from .recipes import RecipeError, parse_recipe
from .resolver import Resolver, using
from .workspace import Run, RunNotFound, Workspace, pid_alive, write_atomic, write_json
from .yamlio import YamlRefused, load_yaml

QUEUED, RUNNING, DONE, FAILED, STOPPED, CANCELLED = (
    "queued", "running", "done", "failed", "stopped", "cancelled")
FINISHED = (DONE, FAILED, STOPPED, CANCELLED)
SECRET_ENV = ("WORKBENCH_AUTH",)  # never handed to a worker (it could print its environment)
ENV_NICE = "WORKBENCH_WORKER_NICE"
DEFAULT_NICE = 10


class JobError(ValueError):
    """A job that does not exist or cannot do what was asked (stop a finished job, ...)."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _epoch(stamp: str | None) -> float:
    return _dt.datetime.fromisoformat(stamp).timestamp() if stamp else 0.0


def _is_worker(job: dict) -> bool:
    """The job's worker is still running: its pid is alive and, where /proc tells, runs the
    workbench CLI on this job's recipe (or run), so a later process that reused the pid is not
    taken for it."""
    pid = job.get("pid")
    if job.get("host") != socket.gethostname() or not pid_alive(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():
        return True
    try:
        text = cmdline.read_bytes().decode(errors="replace")
    except OSError:
        return False
    marker = job["id"] if job.get("action") in ("run", "export") else (job.get("run") or job["id"])
    return "workbench." in text and marker in text


def tail(path: Path, max_bytes: int = 8192, max_lines: int = 40) -> str:
    """The last lines of a text file; progress bars' carriage returns count as line ends."""
    path = Path(path)
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - max_bytes))
        data = f.read().decode("utf-8", errors="replace")
    lines = [line for line in re.split(r"\r\n|\r|\n", data) if line.strip()]
    if size > max_bytes and lines:
        lines = lines[1:]  # the first one is probably cut
    return "\n".join(lines[-max_lines:])


class JobQueue:
    """The job queue of one workspace (see the module docstring)."""

    def __init__(self, ws: Workspace, python: str = sys.executable, resolver: Resolver | None = None):
        self.ws = ws
        # the policy recipes are validated under here and run under in the workers (which run
        # in the workspace folder: relative paths mean the workspace's files in both places)
        self.resolver = resolver or Resolver(base=ws.root)
        self.dir = ws.root / "jobs"
        self.python = python
        self._workers: dict[str, subprocess.Popen] = {}  # the workers this object started
        self._lock = threading.Lock()

    # -- records ---------------------------------------------------------------------------
    def path(self, job_id: str, suffix: str = ".json") -> Path:
        if not re.fullmatch(r"[0-9]{8}-[0-9]{6}-[0-9]{3}[0-9a-f]{4}", job_id or ""):
            raise JobError(f"no job {job_id!r} (job ids look like 20250101-120000-123abcd)")
        return self.dir / f"{job_id}{suffix}"

    def get(self, job_id: str) -> dict:
        path = self.path(job_id)
        if not path.is_file():
            raise JobError(f"no job {job_id!r} in {self.dir}")
        return json.loads(path.read_text(encoding="utf-8"))

    def jobs(self) -> list[dict]:
        """All jobs, oldest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                found.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError):
                continue  # being replaced right now; the next read sees it
        return found

    def _save(self, job: dict) -> dict:
        write_json(self.path(job["id"]), job)
        return job

    def _update(self, job_id: str, **fields) -> dict:
        job = self.get(job_id)
        job.update(fields)
        return self._save(job)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One process and one thread at a time changes the queue."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.dir / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- submitting ------------------------------------------------------------------------
    def _new_id(self) -> str:
        """Time to the millisecond, then random: ids sort in submission order (the queue's order;
        submissions are serialised by the lock)."""
        now = _dt.datetime.now()
        return f"{now:%Y%m%d-%H%M%S}-{now.microsecond // 1000:03d}{secrets.token_hex(2)}"

    def submit(self, recipe_text: str, source: str = "") -> dict:
        """Validate a YAML recipe and queue it; raise RecipeError (nothing queued) if it is bad."""
        try:
            data = load_yaml(recipe_text, source or "recipe")
        except YamlRefused as err:
            raise RecipeError(str(err)) from None
        with using(self.resolver):  # as the worker will see it
            recipe = parse_recipe(data, source or "recipe")
        with self._locked():
            job_id = self._new_id()
            recipe_file = self.path(job_id, ".yaml")
            write_atomic(recipe_file, recipe_text)
            job = {
                "id": job_id, "action": "run", "kind": recipe.kind, "name": recipe.name,
                "source": source, "recipe": str(recipe_file.relative_to(self.ws.root)),
                "status": QUEUED, "submitted": _now(), "started": None, "finished": None,
                "pid": None, "host": None, "returncode": None, "stop_requested": None,
                "command": self._command(["run", str(recipe_file)]),
                "log": str(self.path(job_id, ".log").relative_to(self.ws.root)),
                "run": None, "runs": [], "error": None,
            }
            self._save(job)
        self.tick()
        return self.get(job_id)

    def resume(self, run_ref: str) -> dict:
        """Queue `workbench resume RUN` for an interrupted, failed or stopped run."""
        run = self.ws.get(run_ref)
        if run.info.get("status") == DONE:
            raise JobError(f"run {run.id} is already done")
        if run.status == "running":
            raise JobError(f"run {run.id} is still running (pid {run.info.get('pid')})")
        if run.info.get("kind") == "export":
            raise JobError(f"run {run.id} is an export; an export is not resumed: export the run "
                           "again (a failed export leaves nothing at its target)")
        busy = [j for j in self.jobs() if j["status"] in (QUEUED, RUNNING) and j.get("run") == run.id]
        if busy:
            raise JobError(f"run {run.id} already has job {busy[0]['id']} ({busy[0]['status']})")
        with self._locked():
            job_id = self._new_id()
            job = {
                "id": job_id, "action": "resume", "kind": run.info.get("kind"),
                "name": run.info.get("name"), "source": f"run:{run.id}",
                "recipe": str(run.path("recipe.yaml").relative_to(self.ws.root)),
                "status": QUEUED, "submitted": _now(), "started": None, "finished": None,
                "pid": None, "host": None, "returncode": None, "stop_requested": None,
                "command": self._command(["resume", run.id]),
                "log": str(self.path(job_id, ".log").relative_to(self.ws.root)),
                "run": run.id, "runs": [run.id], "error": None,
            }
            self._save(job)
        self.tick()
        return self.get(job_id)

    def submit_export(self, run_id: str, kind: str, name: str, max_shard_mb: int,
                      source: str = "") -> dict:
        """Queue an export of a finished run to exports/<name> (`workbench export`, see
        `workbench.exporting`; the caller checks the run, the kind and the name first)."""
        with self._locked():
            busy = [j for j in self.jobs() if j.get("action") == "export" and j["name"] == name
                    and j["status"] in (QUEUED, RUNNING)]
            if busy:
                raise JobError(f"job {busy[0]['id']} is already exporting to exports/{name}")
            job_id = self._new_id()
            job = {
                "id": job_id, "action": "export", "kind": "export", "name": name,
                "source": source, "recipe": None, "export": {"run": run_id, "kind": kind,
                                                             "max_shard_mb": int(max_shard_mb)},
                "output": f"exports/{name}",
                "status": QUEUED, "submitted": _now(), "started": None, "finished": None,
                "pid": None, "host": None, "returncode": None, "stop_requested": None,
                "command": [*self._command(["export", run_id, "--format", kind, "--name", name,
                                            "--max-shard-mb", str(int(max_shard_mb))]),
                            "--job", job_id],
                "log": str(self.path(job_id, ".log").relative_to(self.ws.root)),
                "run": None, "runs": [], "error": None,
            }
            self._save(job)
        self.tick()
        return self.get(job_id)

    def _command(self, args: list[str]) -> list[str]:
        """The worker's argv: the `workbench` CLI in this Python, run in the workspace folder."""
        return [self.python, "-m", "workbench.cli", *args, "--workspace", str(self.ws.root)]

    # -- the scheduler ---------------------------------------------------------------------
    def tick(self) -> None:
        """Finish the records of workers that ended; start the oldest queued job if none runs."""
        with self._locked():
            jobs = self.jobs()
            running = [j for j in jobs if j["status"] == RUNNING]
            for job in running:
                self._follow(job)
            if any(self.get(j["id"])["status"] == RUNNING for j in running):
                return
            queued = [j for j in jobs if j["status"] == QUEUED]
            if queued:
                self._start(queued[0])

    def _start(self, job: dict) -> None:
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        env.update(PYTHONUNBUFFERED="1", TQDM_MININTERVAL="1")
        log = open(self.ws.root / job["log"], "ab")
        try:
            # the worker runs under this queue's policy (the app's: --workspace-only and its flags)
            command = [*job["command"], *self.resolver.worker_flags()] if job.get("action") != "export" \
                else job["command"]
            worker = subprocess.Popen(command, cwd=self.ws.root, env=env, stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as err:
            self._update(job["id"], status=FAILED, finished=_now(), error=f"could not start: {err}")
            return
        finally:
            log.close()
        self._workers[job["id"]] = worker
        _lower_priority(worker.pid)
        self._update(job["id"], status=RUNNING, started=_now(), pid=worker.pid,
                     host=socket.gethostname())

    def _follow(self, job: dict) -> None:
        """Record the runs of a running job; finish its record when its worker has ended."""
        runs = self._runs_of(job)
        if runs and runs != job.get("runs"):
            job = self._update(job["id"], runs=runs, run=job.get("run") or self._main_run(job, runs))
        worker = self._workers.get(job["id"])
        if worker is not None:
            returncode = worker.poll()
            if returncode is None:
                return
            self._workers.pop(job["id"], None)
        else:
            if job.get("host") not in (None, socket.gethostname()):
                return  # a worker on another machine sharing this workspace: not ours to judge
            if _is_worker(job):
                return
            returncode = None
        self._finish(job, returncode)

    def _finish(self, job: dict, returncode: int | None) -> None:
        runs = self._runs_of(job)
        main = job.get("run") or self._main_run(job, runs)
        run = self._run(main)
        run_status = run.status if run is not None else None
        stop = job.get("stop_requested")
        error = None
        if stop == "cancel":
            status = CANCELLED
            if run is not None and run_status in ("running", "interrupted"):
                run.update(status=STOPPED, finished=_now(), error="cancelled (worker killed)")
                run.log("run stopped: cancelled from a job (worker killed)")
        elif returncode == 0 or (returncode is None and (run_status == DONE or self._exported(job))):
            status = DONE
        elif stop == "save" or returncode in (130, -signal.SIGINT) or \
                (returncode is None and run_status == STOPPED):
            status = STOPPED
        else:
            status = FAILED
            error = self._error_of(job, run) or (
                f"worker exited with code {returncode}" if returncode is not None
                else "worker ended without finishing its run")
        self._update(job["id"], status=status, finished=_now(), returncode=returncode,
                     runs=runs or job.get("runs", []), run=main, error=error)

    def _exported(self, job: dict) -> bool:
        """An export job's folder is in place (written by this job: its manifest names the run and
        the kind); how a queue that did not start the worker (another app) tells it succeeded."""
        if job.get("action") != "export" or not job.get("output"):
            return False
        try:
            manifest = json.loads((self.ws.root / job["output"] / "export.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
        wanted = job.get("export") or {}
        return manifest.get("source_run") == wanted.get("run") and manifest.get("kind") == wanted.get("kind") \
            and manifest.get("created", "") >= (job.get("started") or "")

    def _error_of(self, job: dict, run: Run | None) -> str | None:
        if run is not None and run.info.get("error"):
            return run.info["error"]
        lines = [l for l in tail(self.ws.root / job["log"], 16384, 400).splitlines()
                 if l.startswith("error:")]
        return lines[-1].removeprefix("error:").strip() if lines else None

    def _runs_of(self, job: dict) -> list[str]:
        """Ids of the runs the job's worker marked running (one per stage, plus the default base
        if it had to be built), oldest first."""
        found = list(job.get("runs") or [])
        if not job.get("pid") or not self.ws.runs_dir.is_dir():
            return found
        since = _epoch(job.get("started")) - 2
        for folder in sorted(self.ws.runs_dir.iterdir()):
            if folder.name in found or not (folder / "run.json").exists():
                continue
            try:
                if folder.stat().st_mtime < since:
                    continue
                info = json.loads((folder / "run.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if info.get("pid") == job["pid"] and info.get("host") == job.get("host") \
                    and _epoch(info.get("started")) >= since:
                found.append(folder.name)
        return found

    def _main_run(self, job: dict, runs: list[str]) -> str | None:
        """The run of the job's own recipe (not the default base it may have built first)."""
        for run_id in runs:
            run = self._run(run_id)
            if run is not None and run.info.get("kind") == job.get("kind") \
                    and run.info.get("name") == job.get("name"):
                return run_id
        return None

    def _run(self, run_id: str | None) -> Run | None:
        if not run_id:
            return None
        try:
            return self.ws.get(run_id)
        except RunNotFound:
            return None

    # -- stopping --------------------------------------------------------------------------
    def stop(self, job_id: str) -> dict:
        """Stop a job: a queued one is taken off the queue; a running worker gets SIGINT (its run
        is marked stopped and keeps its checkpoints; resume it later)."""
        return self._signal(job_id, "save", signal.SIGINT)

    def cancel(self, job_id: str) -> dict:
        """Cancel a job: a queued one is taken off the queue; a running worker is killed."""
        return self._signal(job_id, "cancel", signal.SIGKILL)

    def _signal(self, job_id: str, mode: str, sig: int) -> dict:
        with self._locked():
            job = self.get(job_id)
            if job["status"] == QUEUED:  # never started: nothing to save
                return self._update(job_id, status=CANCELLED, finished=_now(), stop_requested=mode)
            if job["status"] != RUNNING:
                raise JobError(f"job {job_id} is {job['status']}; only a queued or running job stops")
            job = self._update(job_id, stop_requested=mode)
            if job["id"] in self._workers or _is_worker(job):
                try:
                    os.killpg(job["pid"], sig)  # the worker leads its own process group
                except ProcessLookupError:
                    pass
        return job

    def wait(self, job_id: str, timeout: float, poll: float = 0.5) -> dict:
        """Tick until the job has finished or `timeout` seconds have passed; return its record."""
        deadline = time.monotonic() + timeout
        while True:
            self.tick()
            job = self.get(job_id)
            if job["status"] in FINISHED or time.monotonic() > deadline:
                return job
            time.sleep(poll)

    def run_forever(self, interval: float = 1.0, stop: threading.Event | None = None) -> None:
        """Tick every `interval` seconds (the app runs this in a background thread)."""
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                self.tick()
            except Exception as err:  # noqa: BLE001 - keep scheduling; say what went wrong
                print(f"job queue: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            stop.wait(interval)

    # -- reading ---------------------------------------------------------------------------
    def view(self, job_id: str, log_lines: int = 40) -> dict:
        """A job with what a watcher wants: queue position, progress of the run it is on (`phase`,
        `step` of `total` `unit`s, `eta_s` while it runs, from the run's progress events), its loss
        curve, the log's tail and, once done, the run's summary."""
        job = self.get(job_id)
        view = dict(job)
        view["display_command"] = display_command(job, self.ws)
        if job["status"] == QUEUED:
            ahead = [j for j in self.jobs() if j["status"] in (QUEUED, RUNNING)
                     and j["submitted"] <= job["submitted"] and j["id"] != job_id]
            view["queue_position"] = len(ahead) + 1
        current = self._run(job["runs"][-1] if job.get("runs") else job.get("run"))
        main = self._run(job.get("run"))
        view["current_run"] = current.id if current is not None else None
        view["run_status"] = main.status if main is not None else None
        view["loss"] = loss_curve(current) if current is not None else []
        where = progress.state(progress.read_events(current.folder) if current is not None else [])
        if job["status"] != RUNNING:
            where["eta_s"] = None
        view.update(where)
        view["log_tail"] = tail(self.ws.root / job["log"], max_lines=log_lines)
        if main is not None and main.info.get("status") == DONE:
            view["summary"] = main.info.get("summary")
        return view


def _lower_priority(pid: int) -> None:
    """Renice a worker (and, through inheritance, its children) below the app."""
    try:
        nice = int(os.environ.get(ENV_NICE, DEFAULT_NICE))
    except ValueError:
        nice = DEFAULT_NICE
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, pid) + nice))
    except (OSError, AttributeError):
        pass  # the worker already ended, or the platform has no priorities


def display_command(job: dict, ws: Workspace) -> str:
    """The job as a command a user can type (same recipe, same workspace)."""
    command = job["command"]
    if job.get("action") == "export":  # without the job id it passes for the job queue
        cut = command.index("--job") if "--job" in command else len(command)
        command = command[:cut] + command[cut + 2:]
    if command[1:3] != ["-m", "workbench.cli"]:  # an export queued by an older version
        return f"cd {shlex.quote(str(ws.root))} && python " + " ".join(shlex.quote(a) for a in command[1:])
    args = command[3:]
    if job.get("action") == "run":
        args = ["run", job["recipe"], *args[2:]]
    return f"cd {shlex.quote(str(ws.root))} && workbench " + " ".join(shlex.quote(a) for a in args)


def loss_curve(run: Run) -> list[dict]:
    """[{step, loss}] from a run's metrics, read while they may still be written: a last line not
    yet complete is left for the next read (see `Run.metrics`)."""
    return [{"step": row["step"], "loss": row["loss"]} for row in run.metrics() if "loss" in row]

