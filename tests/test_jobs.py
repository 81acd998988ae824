"""The job queue: real `workbench run` workers, one at a time, stop / cancel / resume, restarts,
export jobs, and workers running below the app's CPU priority."""

from __future__ import annotations

import json
import os
import time

import pytest

from helpers import folder_tensors, tiny_train_recipe
from workbench.jobs import ENV_NICE, JobQueue, display_command, loss_curve
from workbench.workspace import pid_alive
from workbench.recipes import RecipeError, recipe_to_yaml

LONG = 100_000  # steps: a job that only ends when it is stopped


@pytest.fixture(autouse=True)
def full_priority(monkeypatch):
    """Workers at the test's own priority: on a shared machine a reniced worker would only slow
    the tests down (one test checks the default)."""
    monkeypatch.setenv(ENV_NICE, "0")


def _yaml(**changes) -> str:
    return recipe_to_yaml(tiny_train_recipe(**changes))


def _until(condition, timeout: float, queue: JobQueue, what: str):
    """Tick the queue until `condition()` is true (bounded), return its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue.tick()
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _steps(queue: JobQueue, job_id: str) -> int:
    return queue.view(job_id)["step"]


@pytest.mark.slow
def test_one_job_at_a_time_stop_resume_cancel_and_restart(workspace):
    queue = JobQueue(workspace)
    long_job = queue.submit(_yaml(name="long", train__max_steps=LONG, train__checkpoint_every=2),
                            source="test")
    short_job = queue.submit(_yaml(name="short"), source="test")
    assert long_job["status"] == "running" and short_job["status"] == "queued"
    recipe_file = workspace.root / long_job["recipe"]
    assert recipe_file.read_text() == _yaml(name="long", train__max_steps=LONG,
                                            train__checkpoint_every=2), "the recipe as submitted"

    # the long job trains; the short one waits its turn
    _until(lambda: _steps(queue, long_job["id"]) >= 3, 120, queue, "the long job's third step")
    view = queue.view(long_job["id"])
    assert view["run"] and view["run_status"] == "running" and view["total"] == LONG
    assert [p["step"] for p in view["loss"]][:3] == [1, 2, 3]
    assert queue.get(short_job["id"])["status"] == "queued"
    assert queue.view(short_job["id"])["queue_position"] == 2
    assert queue.get(short_job["id"])["pid"] is None, "a queued job has no worker"

    # stop (SIGINT): the run is marked stopped and keeps its checkpoints
    queue.stop(long_job["id"])
    stopped = _until(lambda: (j := queue.get(long_job["id"]))["status"] != "running" and j, 60, queue,
                     "the long job to stop")
    assert stopped["status"] == "stopped" and stopped["returncode"] not in (0, None)
    assert not pid_alive(stopped["pid"])
    run = workspace.get(stopped["run"])
    assert run.status == "stopped" and run.info["error"], "the run records why it stopped"
    assert sorted(run.path("checkpoints").glob("step-*")), "its checkpoints are kept for resume"
    assert stopped["runs"] == [run.id], "the default base existed: the job made one run"

    # the short job starts only now; an app restart (a new queue object) follows it to the end
    started = _until(lambda: (j := queue.get(short_job["id"]))["status"] != "queued" and j, 30, queue,
                     "the short job to start")
    assert started["started"] >= stopped["finished"]
    restarted = JobQueue(workspace)
    done = restarted.wait(short_job["id"], timeout=120)
    assert done["status"] == "done", done.get("error")
    short_run = workspace.get(done["run"])
    assert short_run.info["status"] == "done" and short_run.info["name"] == "short"
    assert (short_run.path("adapter") / "adapter_model.safetensors").is_file()
    assert restarted.view(short_job["id"])["step"] == 6

    # resume the stopped run: it continues from its checkpoint; then cancel (kill) it
    resumed = restarted.resume(run.id)
    assert resumed["action"] == "resume" and resumed["run"] == run.id
    before = loss_curve(run)[-1]["step"]
    _until(lambda: "resumed from step-" in run.path("run.log").read_text()
           and _steps(restarted, resumed["id"]) > before, 120, restarted, "the resumed run's next step")
    steps = [p["step"] for p in loss_curve(run)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > before, \
        "resumed metrics continue the curve without repeating or skipping steps"
    restarted.cancel(resumed["id"])
    cancelled = _until(lambda: (j := restarted.get(resumed["id"]))["status"] != "running" and j, 30,
                       restarted, "the resumed job to be cancelled")
    assert cancelled["status"] == "cancelled" and not pid_alive(cancelled["pid"])
    assert workspace.get(run.id).status == "stopped"
    assert "cancelled" in workspace.get(run.id).info["error"]

    # every record is plain JSON in the workspace
    records = sorted(p.name for p in (workspace.root / "jobs").glob("*.json"))
    assert len(records) == 3
    for name in records:
        json.loads((workspace.root / "jobs" / name).read_text())


@pytest.mark.slow
def test_bad_recipe_is_not_queued_and_a_failure_is_reported(workspace):
    queue = JobQueue(workspace)
    with pytest.raises(RecipeError, match=r"train\.lr: Input should be greater than 0"):
        queue.submit("kind: train\ntrain: {lr: 0}\n")
    assert queue.jobs() == []
    job = queue.submit("kind: train\nmodel: {path: no/such/model}\ndata: {world_size: tiny}\n")
    failed = queue.wait(job["id"], timeout=120)
    assert failed["status"] == "failed" and failed["returncode"] == 1
    assert "model 'no/such/model' not found" in failed["error"]
    assert "model 'no/such/model' not found" in queue.view(job["id"])["log_tail"]


def test_queued_job_can_be_cancelled_and_secrets_are_not_inherited(workspace, monkeypatch):
    monkeypatch.setenv("WORKBENCH_AUTH", "user:hunter2-secret")
    monkeypatch.delenv(ENV_NICE)  # the default: workers yield the CPU to the app
    queue = JobQueue(workspace)
    first = queue.submit(_yaml(name="first", train__max_steps=LONG), source="test")
    second = queue.submit(_yaml(name="second"), source="test")
    assert os.getpriority(os.PRIO_PROCESS, first["pid"]) == \
        min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10), "the worker runs at nice +10"
    assert queue.cancel(second["id"])["status"] == "cancelled"
    env = (open(f"/proc/{first['pid']}/environ", "rb").read().split(b"\0")
           if os.path.exists(f"/proc/{first['pid']}/environ") else [])
    assert not any(e.startswith(b"WORKBENCH_AUTH=") for e in env), "workers do not get the password"
    queue.cancel(first["id"])
    job = _until(lambda: (j := queue.get(first["id"]))["status"] != "running" and j, 30, queue,
                 "the first job to be cancelled")
    assert job["status"] == "cancelled"
    queue.tick()
    assert queue.get(second["id"])["pid"] is None, "a cancelled queued job never starts"
    for path in workspace.root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 10_000_000:
            assert b"hunter2-secret" not in path.read_bytes(), path


@pytest.mark.slow
def test_export_job_writes_the_folder_or_says_why_not(workspace):
    queue = JobQueue(workspace)
    base = next(r for r in workspace.runs() if r.info["kind"] == "pretrain")
    job = queue.submit_export(base.id, "model", "base-copy", 1, source="test")
    assert job["kind"] == "export" and job["output"] == "exports/base-copy"
    # another app on the workspace sees the worker end (it has no exit code) and finds the export
    _until(lambda: not pid_alive(job["pid"]), 120, JobQueue(workspace), "the export worker to end")
    done = queue.get(job["id"])
    assert done["status"] == "done" and done["returncode"] is None, done.get("error")
    folder = workspace.root / "exports" / "base-copy"
    copied, original = folder_tensors(folder), folder_tensors(base.path("model"))
    assert copied.keys() == original.keys()
    assert all(copied[k].dtype == t.dtype and (copied[k] == t).all() for k, t in original.items())
    ws = workspace.root
    assert display_command(done, workspace) == (
        f"cd {ws} && workbench export {base.id} --format model --name base-copy --max-shard-mb 1 "
        f"--workspace {ws}")
    again = queue.wait(queue.submit_export(base.id, "model", "base-copy", 1)["id"], timeout=120)
    assert again["status"] == "failed" and "exports/base-copy already exists" in again["error"]
    assert sorted(p.name for p in (ws / "exports").iterdir()) == ["base-copy"]
