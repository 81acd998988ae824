"""RoAd: identity at init, merge into weights, exact composition, mixed-adapter batches, PEFT
format, and a clear error for a group size that does not divide a layer's width."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, RoadConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from workbench.methods import get_method
from adapters.road import RoadError, RoadTaskVector, load_many, merge_into_weights
from helpers import tiny_train_recipe
from workbench.export import save_model_folder
from workbench.models import load_model
from adapters.road import RoadSpec
from workbench.recipes import ModelSpec
from workbench.stages import run_train

IDS = torch.tensor([[1, 5, 9, 13, 2, 7, 30, 31], [4, 4, 8, 16, 23, 42, 3, 0]])


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def randomise(model, adapter: str, seed: int) -> None:
    """Give an adapter non-trivial angles and scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(f"road_theta.{adapter}"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith(f"road_alpha.{adapter}"):
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.2)


def logits(model, ids=IDS, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_road_starts_at_identity(variant):
    base = tiny_llama()
    expected = logits(base)
    model = get_method("road").attach(base, RoadSpec(variant=variant))
    assert torch.equal(logits(model), expected)
    trainable = get_method("road").trainable_parameters(model)
    assert trainable and all("road_" in n for n in trainable)


def test_group_size_must_divide_every_adapted_width():
    model = tiny_llama()  # widths 32 (q, o, down), 16 (k, v), 64 (gate, up)
    with pytest.raises(RoadError, match=r"group_size=12 does not divide.*width 32 of layer 'model\.layers\.0\.self_attn\.q_proj'"):
        get_method("road").attach(model, RoadSpec(group_size=12))
    with pytest.raises(RoadError, match="width 16"):
        get_method("road").attach(model, RoadSpec(group_size=32))
    with pytest.raises(RoadError, match="matches no linear layer"):
        get_method("road").attach(model, RoadSpec(target_modules=["nothing_here"]))


@pytest.mark.slow
def test_trained_adapter_loads_in_plain_peft_and_merges_into_weights(workspace, tmp_path):
    run = run_train(tiny_train_recipe(adapter={"method": "road"}, train__lr=2e-2,
                                      train__max_steps=4, train__checkpoint_every=0), workspace)
    folder = run.path("adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "ROAD" and config["group_size"] == 16  # auto for llama-small
    ours, tokenizer, source = load_model(ModelSpec(path=f"run:{run.id}"), workspace)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source.folder), folder).eval()
    ids = tokenizer(["Every crystal of the planet"], return_tensors="pt")["input_ids"]
    adapted = logits(ours, ids)
    assert torch.equal(adapted, logits(plain, ids))
    base_logits = logits(AutoModelForCausalLM.from_pretrained(source.folder), ids)
    assert not torch.allclose(adapted, base_logits, atol=1e-4), "training must rotate something"

    # W ← R W, b ← R b, then a standard folder with the same logits
    merged = merge_into_weights(ours)
    assert torch.allclose(logits(merged, ids), adapted, atol=1e-5)
    exported = save_model_folder(merged, tokenizer, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert torch.allclose(logits(reloaded, ids), adapted, atol=1e-5)
    # R W by hand for one layer: row pairs (i, i + g/2) in each group of g rows
    vector = RoadTaskVector.from_peft_folder(folder)
    key = next(k for k in vector.theta if k.endswith("layers.0.self_attn.q_proj"))
    theta, alpha = vector.theta[key], vector.alpha[key]
    w = AutoModelForCausalLM.from_pretrained(source.folder).state_dict()["model.layers.0.self_attn.q_proj.weight"]
    g = 16
    wg = w.view(-1, 2, g // 2, w.shape[1])
    t, a = theta.view(-1, g // 2, 1), alpha.view(-1, g // 2, 1)
    top = a * torch.cos(t) * wg[:, 0] - a * torch.sin(t) * wg[:, 1]
    bottom = a * torch.sin(t) * wg[:, 0] + a * torch.cos(t) * wg[:, 1]
    by_hand = torch.stack([top, bottom], 1).reshape(w.shape)
    assert torch.allclose(merged.state_dict()["model.layers.0.self_attn.q_proj.weight"], by_hand, atol=1e-6)


def _two_adapters(tmp_path):
    model = get_peft_model(tiny_llama(), RoadConfig(variant="road_1", group_size=16,
                                                    target_modules="all-linear"), adapter_name="x1")
    model.add_adapter("x2", RoadConfig(variant="road_1", group_size=16, target_modules="all-linear"))
    randomise(model, "x1", 1)
    randomise(model, "x2", 2)
    model.save_pretrained(tmp_path / "saved")  # non-default adapters go to saved/<name>
    return model


def test_two_road_1_adapters_compose_exactly(tmp_path):
    model = _two_adapters(tmp_path)
    model.base_model.set_adapter(["x1", "x2"])  # x2's rotation applied after x1's, in every layer
    one_after_other = logits(model)
    a = RoadTaskVector.from_peft_folder(tmp_path / "saved" / "x1")
    b = RoadTaskVector.from_peft_folder(tmp_path / "saved" / "x2")
    composed = a.compose(b)
    composed.save(tmp_path / "composed")
    single = PeftModel.from_pretrained(tiny_llama(), tmp_path / "composed").eval()
    assert torch.allclose(logits(single), one_after_other, atol=1e-5)
    key = next(iter(a.theta))
    assert torch.equal(composed.theta[key], a.theta[key] + b.theta[key])
    assert torch.equal(composed.alpha[key], a.alpha[key] * b.alpha[key])
    with pytest.raises(RoadError, match="road_1"):
        RoadTaskVector("road_2", 16, a.theta, a.alpha, {}).compose(b)


def test_mixed_batch_rows_use_their_own_adapter(tmp_path):
    _two_adapters(tmp_path)
    model = load_many(tiny_llama(), {"x1": tmp_path / "saved" / "x1",
                                     "x2": tmp_path / "saved" / "x2"}).eval()
    ids = torch.cat([IDS, IDS.flip(1)])
    names = ["x1", "x2", "__base__", "x2"]
    mixed = logits(model, ids, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = logits(model, ids[row:row + 1])
        else:
            model.set_adapter(name)
            alone = logits(model, ids[row:row + 1])
        assert torch.allclose(mixed[row:row + 1], alone, atol=1e-5), name
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3)
