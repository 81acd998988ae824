"""Shared fixtures: a tiny embedded base built once per test session, and tiny recipes."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from workbench.base import DEFAULT_BASE_NAME, run_pretrain  # noqa: E402
from workbench.recipes import (DataSpec, EvalSpec, LoraSpec, ModelSpec, PretrainRecipe,  # noqa: E402
                               TrainRecipe, TrainSpec, WorldSpec)
from workbench.workspace import Workspace  # noqa: E402

TINY_PRETRAIN = PretrainRecipe(
    name=DEFAULT_BASE_NAME, world=WorldSpec(size="tiny"), vocab_size=1024,
    architecture="llama-small", seq_len=64,
    train=TrainSpec(lr=3e-3, batch_size=16, max_steps=40, checkpoint_every=0, warmup_ratio=0.05),
    eval=EvalSpec(max_tokens=1024, max_questions=8),
)


def tiny_train_recipe(**changes) -> TrainRecipe:
    """A LoRA training recipe that runs in seconds on the tiny base."""
    recipe = TrainRecipe(
        name="tiny-lora", model=ModelSpec(path="default"),
        data=DataSpec(world_size="tiny", seq_len=64, replay_ratio=0.25),
        adapter=LoraSpec(r=4, alpha=8),
        train=TrainSpec(lr=5e-3, batch_size=8, max_steps=6, checkpoint_every=3, warmup_ratio=0.0),
        eval=None,
    )
    data = recipe.model_dump()
    for key, value in changes.items():
        node = data
        *parents, last = key.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    return TrainRecipe.model_validate(data)


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
