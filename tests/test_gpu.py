"""GPU paths (skipped without CUDA): bf16 autocast training and QLoRA on a 4-bit NF4 base."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_train_recipe
from workbench.models import load_model
from workbench.recipes import ModelSpec
from workbench.stages import run_train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _losses(run):
    return [m["loss"] for m in run.metrics() if "loss" in m]


def test_bf16_autocast_lora_trains_on_gpu(workspace):
    run = run_train(tiny_train_recipe(train__max_steps=20, train__checkpoint_every=0,
                                      data__replay_ratio=0.0), workspace)
    losses = _losses(run)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    model, _, _ = load_model(ModelSpec(path=f"run:{run.id}"), workspace)
    assert next(model.parameters()).dtype == torch.bfloat16  # dtype auto on a GPU


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_trains_on_a_quantized_base(workspace, bits):
    pytest.importorskip("bitsandbytes")
    recipe = tiny_train_recipe(train__max_steps=20, train__checkpoint_every=0, data__replay_ratio=0.0,
                               model={"path": "default", "load_in": bits})
    run = run_train(recipe, workspace)
    losses = _losses(run)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    model, _, _ = load_model(ModelSpec(path=f"run:{run.id}", load_in=bits), workspace)
    base = model.get_base_model()
    assert getattr(base, f"is_loaded_in_{bits}")
