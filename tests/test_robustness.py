"""What a full disk, a power loss, a kill or damaged files leave behind, and how the workbench
copes."""

from __future__ import annotations

import errno
import os

import pytest

from workbench.workspace import Workspace


# ----------------------------------------------------------------------------------------------
# A full disk when a run is created


@pytest.mark.parametrize("failing_write, file_name", [(1, "recipe.yaml"), (2, "run.json")])
def test_full_disk_at_run_creation_leaves_no_run_folder_and_names_the_file(
        tmp_path, monkeypatch, failing_write, file_name):
    ws = Workspace(tmp_path)
    ws.runs_dir.mkdir(parents=True)
    real_write = os.write
    calls = {"n": 0}

    def disk_fills_up(fd, data):
        calls["n"] += 1
        if calls["n"] >= failing_write:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", disk_fills_up)
        with pytest.raises(OSError) as raised:
            ws.create_run("train", "full-disk", "kind: train\n", seed=0)
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC
    assert f"cannot write {ws.runs_dir}" in message and f"{file_name}: the disk is full" in message
    assert list(ws.runs_dir.iterdir()) == []
