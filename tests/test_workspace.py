"""Workspace: atomic files, run status that never lies, run lookup."""

from __future__ import annotations

import pytest

from workbench.workspace import RunNotFound, Workspace, write_atomic


def test_failed_run_is_marked_failed_with_its_error(tmp_path):
    ws = Workspace(tmp_path)
    run = ws.create_run("train", "x", "kind: train\n", seed=3)
    with pytest.raises(ValueError):
        with ws.running(run):
            raise ValueError("boom")
    info = run.info
    assert info["status"] == "failed" and info["error"] == "ValueError: boom"
    assert info["seed"] == 3 and "torch" in info["versions"]
    assert "boom" in run.path("run.log").read_text()


def test_dead_running_run_reads_interrupted(tmp_path):
    ws = Workspace(tmp_path)
    run = ws.create_run("train", "x", "kind: train\n", seed=0)
    run.mark_running()
    assert run.status == "running"
    run.update(pid=2**22 + 12345)  # no such process
    assert run.status == "interrupted"


def test_atomic_write_replaces_whole_files(tmp_path):
    target = tmp_path / "a.json"
    write_atomic(target, "old")
    write_atomic(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_lookup_by_prefix_and_errors(tmp_path, monkeypatch):
    ws = Workspace(tmp_path)
    run = ws.create_run("eval", "x", "kind: eval\n", seed=0)
    assert ws.get(run.id[:-2]).id == run.id
    assert ws.get(f"run:{run.id}").id == run.id
    with pytest.raises(RunNotFound, match="no run 'zzz'"):
        ws.get("zzz")
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    assert Workspace().root == (tmp_path / "home").resolve()
