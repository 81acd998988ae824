"""Full fine-tuning: a Hugging Face model folder whose task vector is θ_ft − θ_base by hand."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import tiny_train_recipe
from workbench.methods import get_method
from workbench.models import load_model
from workbench.recipes import ModelSpec
from workbench.stages import run_train


@pytest.mark.slow
def test_full_finetune_saves_a_model_and_its_dense_task_vector(workspace):
    run = run_train(tiny_train_recipe(adapter={"method": "full"}, train__lr=1e-3,
                                      train__checkpoint_every=0), workspace)
    assert run.info["outputs"]["model"] == "model"
    tuned, tokenizer, source = load_model(ModelSpec(path=f"run:{run.id}"), workspace)
    stock = AutoModelForCausalLM.from_pretrained(run.path("model"))
    ids = tokenizer(["The capital of"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(tuned(input_ids=ids).logits, stock(input_ids=ids).logits)

    base_folder = load_model(ModelSpec(path=run.info["outputs"]["base"]), workspace)[2].folder
    vector = get_method("full").task_vector(run.path("model"), base_folder).deltas
    tuned_sd = load_file(run.path("model", "model.safetensors"))
    base_sd = load_file(base_folder / "model.safetensors")
    assert set(vector) == set(base_sd)
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(vector[name], tuned_sd[name].float() - base_sd[name].float())
    assert vector[name].abs().max() > 0, "full fine-tuning changes every layer"
