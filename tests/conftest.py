"""Shared fixtures: a tiny embedded base built once per test session, and tiny recipes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from workbench.base import DEFAULT_BASE_NAME, run_pretrain  # noqa: E402
from adapters.lora import LoraSpec  # noqa: E402
from workbench.recipes import (DataSpec, EvalSpec, ModelSpec, PretrainRecipe,  # noqa: E402
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


def folder_tensors(folder) -> dict:
    """Every tensor of a model or adapter folder, read shard by shard with plain safetensors (an
    independent reader for checking what our exports wrote)."""
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def random_lora_adapter(folder, r: int, alpha: int, seed: int, use_rslora: bool = False,
                        vocab_size: int = 64, **overrides):
    """A PEFT LoRA folder on a fresh llama-tiny (all linear layers) with B ~ N(0, 0.2²) instead of
    PEFT's zeros, so that its update s·B·A is not zero."""
    import torch
    from peft import LoraConfig, get_peft_model

    from workbench.models import build_model_from_config

    model = build_model_from_config("llama-tiny", vocab_size=vocab_size, **overrides)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear",
                                                  use_rslora=use_rslora, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(folder, safe_serialization=True)
    return folder
