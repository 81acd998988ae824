"""The merge stage: exact task arithmetic over LoRA runs, as a model folder or one adapter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adapters import get_method
from conftest import tiny_train_recipe
from workbench.models import ModelLoadError, load_model
from workbench.recipes import MergeInput, MergeRecipe, ModelSpec
from workbench.stages import run_merge, run_train


@pytest.fixture
def two_adapters(workspace):
    domain = run_train(tiny_train_recipe(name="domain", train__checkpoint_every=0), workspace)
    general = run_train(tiny_train_recipe(name="general", seed=1, train__checkpoint_every=0,
                                          data__train="world:general_train"), workspace)
    return domain, general


def test_merged_model_is_base_plus_weighted_lora_updates(workspace, two_adapters):
    domain, general = two_adapters
    recipe = MergeRecipe(adapters=[MergeInput(path=f"run:{domain.id}", weight=0.7),
                                   MergeInput(path=f"run:{general.id}", weight=-0.3)],
                         eval={"max_tokens": 512, "max_questions": 2}, world={"size": "tiny"},
                         seq_len=64)
    run = run_merge(recipe, workspace)
    assert run.info["status"] == "done" and set(run.info["parents"]) >= {domain.id, general.id}
    merged = load_file(run.path("model", "model.safetensors"))
    base_folder = load_model(ModelSpec(path="default"), workspace)[2].folder
    base = load_file(base_folder / "model.safetensors")
    lora = get_method("lora")
    d = lora.task_vector(domain.path("adapter")).dense()
    g = lora.task_vector(general.path("adapter")).dense()
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(merged[name], base[name] + 0.7 * d[name] - 0.3 * g[name], atol=1e-6)
    assert "domain_gain_pct" in json.loads(run.path("summary.json").read_text())


def test_merged_adapter_has_the_summed_rank_and_the_same_update(workspace, two_adapters):
    domain, general = two_adapters
    recipe = MergeRecipe(output="adapter", adapters=[MergeInput(path=f"run:{domain.id}"),
                                                     MergeInput(path=f"run:{general.id}")])
    run = run_merge(recipe, workspace)
    config = json.loads(run.path("adapter", "adapter_config.json").read_text())
    assert config["r"] == 8  # 4 + 4
    concat, tokenizer, _ = load_model(ModelSpec(path=f"run:{run.id}"), workspace)
    model_run = run_merge(MergeRecipe(adapters=recipe.adapters), workspace)
    full, _, _ = load_model(ModelSpec(path=f"run:{model_run.id}"), workspace)
    ids = tokenizer(["Every crystal on the planet"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(concat(input_ids=ids).logits, full(input_ids=ids).logits, atol=1e-5)


def test_a_model_is_not_an_adapter(workspace):
    with pytest.raises(ModelLoadError, match="adapters.0.path 'default' is a model, not a LoRA adapter"):
        run_merge(MergeRecipe(adapters=[MergeInput(path="default")]), workspace)
