"""The workspace: a folder of runs, each with its recipe, status, metrics, outputs and log.

Layout: `<workspace>/runs/<run-id>/` holding `recipe.yaml`, `run.json` (kind, status, parents,
versions, seed, timings, summary), `metrics.jsonl`, `run.log` and the outputs. Every JSON/YAML file
is written atomically (temporary file + rename); a run is only marked `done` by `Run.finish`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import secrets
import shutil
import socket
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .io import WriteFailed, write_atomic, write_json
from .io import cut_torn_tail, read_jsonl
from .resolver import RUN_ID

ENV_HOME = "WORKBENCH_HOME"


class RunNotFound(LookupError):
    """No run matches the id or prefix given."""


# ----------------------------------------------------------------------------------------------
# JSONL files (one JSON object a line)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide a run's numbers."""
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("adapter-workbench", "torch", "transformers", "peft", "accelerate", "safetensors"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def pid_alive(pid: int | None) -> bool:
    """True while `pid` runs (a zombie, ended but not yet reaped, counts as ended)."""
    if not pid or pid < 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Run:
    """One run folder. Status moves running → done | failed | stopped; never back to done."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.id = self.folder.name

    # -- reading ---------------------------------------------------------------------------
    @property
    def info(self) -> dict:
        return json.loads((self.folder / "run.json").read_text(encoding="utf-8"))

    @property
    def status(self) -> str:
        """The recorded status; a `running` run whose process is gone reads as `interrupted`."""
        info = self.info
        status = info.get("status", "unknown")
        if status == "running" and info.get("host") == socket.gethostname():
            if not pid_alive(int(info.get("pid", -1))):
                return "interrupted"
        return status

    def path(self, *parts: str) -> Path:
        return self.folder.joinpath(*parts)

    def metrics(self) -> list[dict]:
        """The rows of metrics.jsonl. A torn last line (a write cut short) is skipped and noted in
        run.log; a bad line before it is a JsonlError naming the file and the line."""
        path = self.folder / "metrics.jsonl"
        if not path.exists():
            return []
        return read_jsonl(path, on_torn_tail=self.note_torn_line)

    def note_torn_line(self, message: str) -> None:
        """Say once in run.log that a torn last line was skipped, unless another live process of
        this run may be writing that line right now (then it is not torn, only unfinished)."""
        if self._written_by_another_process():
            return
        log = self.folder / "run.log"
        try:
            if log.is_file() and message in log.read_text(encoding="utf-8", errors="replace"):
                return
            self.log(message)
        except OSError:
            pass  # a run folder that cannot be written (read-only copy): the rows are still read

    def _written_by_another_process(self) -> bool:
        """Whether the run is `running` in a live process other than this one."""
        try:
            info = self.info
        except (OSError, ValueError):
            return False
        if info.get("status") != "running":
            return False
        pid = int(info.get("pid") or -1)
        if info.get("host") != socket.gethostname():
            return True  # alive or not, it cannot be told from here
        return pid != os.getpid() and pid_alive(pid)

    # -- writing ---------------------------------------------------------------------------
    def update(self, **fields: Any) -> None:
        info = self.info
        info.update(fields)
        write_json(self.folder / "run.json", info)

    def log(self, message: str) -> None:
        with open(self.folder / "run.log", "a", encoding="utf-8") as f:
            f.write(f"{_now()} {message}\n")

    def append_metrics(self, row: dict) -> None:
        """Append one row to metrics.jsonl, first cutting a torn last line an interrupted write
        left (so the row is never glued to it)."""
        path = self.folder / "metrics.jsonl"
        if path.exists():
            torn = cut_torn_tail(path)
            if torn:
                self.log(f"{path}: cut its torn last line ({len(torn)} bytes) before appending")
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric rows past `after_step` (used when resuming from a checkpoint)."""
        rows = [r for r in self.metrics() if r.get("step", 0) <= after_step]
        write_atomic(self.folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def mark_running(self) -> None:
        self.update(status="running", pid=os.getpid(), host=socket.gethostname(),
                    started=self.info.get("started") or _now(), error=None)

    def finish(self, summary: dict | None = None, outputs: dict | None = None) -> None:
        fields: dict[str, Any] = {"status": "done", "finished": _now()}
        if summary is not None:
            fields["summary"] = summary
        if outputs is not None:
            fields["outputs"] = outputs
        self.update(**fields)
        self.log("run done")

    def fail(self, error: BaseException) -> None:
        status = "stopped" if isinstance(error, KeyboardInterrupt) else "failed"
        message = str(error) or type(error).__name__
        self.update(status=status, finished=_now(), error=f"{type(error).__name__}: {message}")
        self.log(f"run {status}: {type(error).__name__}: {message}\n{traceback.format_exc()}")


class Workspace:
    """A folder of runs. Default `./workspace`, or `--workspace`, or $WORKBENCH_HOME."""

    def __init__(self, root: str | Path | None = None):
        root = root or os.environ.get(ENV_HOME) or "workspace"
        self.root = Path(root).expanduser().resolve()
        self.runs_dir = self.root / "runs"

    def create_run(self, kind: str, name: str, recipe_yaml: str, seed: int,
                   parents: list[str] | None = None) -> Run:
        """Make a new run folder with its recipe and a `created` run.json. If that fails part way
        (a full disk), the folder is removed and the error names the file it could not write."""
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40]
        run_id = f"{stamp}-{kind}-{safe}-{secrets.token_hex(2)}"
        folder = self.runs_dir / run_id
        try:
            folder.mkdir(parents=True)
        except OSError as err:
            raise WriteFailed.of(err, folder) from err
        try:
            write_atomic(folder / "recipe.yaml", recipe_yaml)
            write_json(folder / "run.json", {
                "id": run_id, "kind": kind, "name": name, "status": "created", "seed": seed,
                "parents": parents or [], "created": _now(), "versions": library_versions(),
            })
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # no half-made run is left behind
            raise
        return Run(folder)

    @contextmanager
    def running(self, run: Run) -> Iterator[Run]:
        """Mark a run running; on any exception mark it failed (or stopped) and re-raise. Progress
        events inside the block go to the run's progress.jsonl (`workbench.progress`)."""
        from .progress import recording

        run.mark_running()
        try:
            with recording(run.folder):
                yield run
        except BaseException as err:  # noqa: BLE001 - recorded, then re-raised
            run.fail(err)
            raise

    def runs(self) -> list[Run]:
        if not self.runs_dir.is_dir():
            return []
        return [Run(p) for p in sorted(self.runs_dir.iterdir()) if (p / "run.json").exists()]

    def get(self, ref: str) -> Run:
        """A run by id, unique prefix, or `run:<id>`; nothing else (no path leads out of runs/)."""
        ref = ref.removeprefix("run:") if isinstance(ref, str) else ""
        if not RUN_ID.fullmatch(ref):
            raise RunNotFound(f"no run {ref!r}: a run reference is a run id or a unique prefix of "
                              "one, as `workbench runs` lists them")
        exact = self.runs_dir / ref
        if (exact / "run.json").exists():
            return Run(exact)
        matches = [r for r in self.runs() if r.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise RunNotFound(f"no run '{ref}' in workspace {self.root}")
        raise RunNotFound(f"'{ref}' matches several runs: {', '.join(r.id for r in matches)}")

    def latest(self, kind: str, name: str) -> Run | None:
        """The most recent finished run of this kind and name."""
        done = [r for r in self.runs() if r.info.get("kind") == kind
                and r.info.get("name") == name and r.info.get("status") == "done"]
        return done[-1] if done else None


def headline(info: dict) -> str:
    """A run's result in one line (from its run.json): gain and forgetting, or its perplexity,
    or its error."""
    summary = info.get("summary") or {}
    if "domain_gain_pct" in summary:
        return (f"gain {summary['domain_gain_pct']:+.1f}%  "
                f"forgetting {summary['general_forgetting_pct']:+.1f}%")
    if "general_ppl" in summary:
        return f"general ppl {summary['general_ppl']:.2f}"
    if info.get("kind") == "export" and "folder" in summary:
        return f"{summary.get('format')} → {summary['folder']}"
    return info.get("error") or ""
