"""Shared fixtures: a tiny embedded base built once per test session, and a fresh workspace per
test that shares it. Plain helpers live in helpers.py."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import TINY_PRETRAIN  # noqa: E402
from workbench.base import DEFAULT_BASE_NAME, run_pretrain  # noqa: E402
from workbench.workspace import Workspace  # noqa: E402


@pytest.fixture(scope="session")
def base_workspace(tmp_path_factory) -> Workspace:
    """A workspace whose `default` model is a tiny pretrained base (built once per session)."""
    ws = Workspace(tmp_path_factory.mktemp("base-ws"))
    run_pretrain(TINY_PRETRAIN, ws)
    return ws


@pytest.fixture
def workspace(base_workspace, tmp_path) -> Workspace:
    """A fresh workspace per test that shares the session's tiny base run."""
    ws = Workspace(tmp_path / "ws")
    ws.runs_dir.mkdir(parents=True)
    base = base_workspace.latest("pretrain", DEFAULT_BASE_NAME)
    (ws.runs_dir / base.id).symlink_to(base.folder, target_is_directory=True)
    return ws
