"""LoRA adapters: saved in PEFT's format, loaded by plain PEFT with the workbench's logits, and
expressed as a task vector equal to (α/r)·B·A computed by hand."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import tiny_train_recipe
from workbench.models import load_model
from workbench.recipes import ModelSpec
from workbench.stages import run_train


def _trained_run(workspace, **changes):
    return run_train(tiny_train_recipe(train__max_steps=4, train__checkpoint_every=0, **changes),
                     workspace)


@pytest.mark.slow
def test_adapter_loads_in_plain_peft_with_identical_logits(workspace):
    run = _trained_run(workspace)
    ours, tokenizer, source = load_model(ModelSpec(path=f"run:{run.id}"), workspace)
    ids = tokenizer(["The capital of a country is", "Every crystal"], return_tensors="pt",
                    padding=True)["input_ids"]
    config = json.loads(run.path("adapter", "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    plain = PeftModel.from_pretrained(base, run.path("adapter")).eval()
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        got = ours(input_ids=ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(source.folder)(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(got, base_logits, atol=1e-4), "training must have changed the model"


def test_task_vector_is_scaled_product_of_factors(workspace):
    run = _trained_run(workspace, adapter__use_rslora=True)
    folder = run.path("adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"] ** 0.5  # rsLoRA: α/√r
    raw = load_file(folder / "adapter_model.safetensors")
    from workbench.methods import get_method

    vector = get_method("lora").task_vector(folder).dense()
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    by_hand = scale * raw[f"{key}.lora_B.weight"] @ raw[f"{key}.lora_A.weight"]
    assert torch.allclose(vector["model.layers.0.self_attn.q_proj.weight"], by_hand, atol=1e-7)
    # and the base plus every update equals PEFT's own merge
    model, _, source = load_model(ModelSpec(path=f"run:{run.id}"), workspace)
    merged = model.merge_and_unload().state_dict()
    base = AutoModelForCausalLM.from_pretrained(source.folder).state_dict()
    assert len(vector) == 7 * 3  # all-linear: q, k, v, o, gate, up, down in each of 3 layers
    for name, delta in vector.items():
        assert torch.allclose(merged[name], base[name] + delta, atol=1e-6), name
