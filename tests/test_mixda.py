"""MixDA (adapters.mixda): identity at init, the mixing equation, L_S, save/load, stage 2, errors,
task vectors. Tiny models built from configs; no downloads."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as nnf
from safetensors.torch import load_file
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification)

from adapters.mixda import (MixdaError, MixdaMethod, MixdaTaskVector, consistency_per_row, load,
                            mixda_layers, set_recording)
from adapters.lora import LoraSpec
from adapters.mixda import MixdaSpec

METHOD = MixdaMethod()
SEQ = "sequence-classification"


def llama_config(hidden: int = 32) -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=0, num_labels=3)


def build(kind: str, seed: int = 0, hidden: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        return LlamaForCausalLM(llama_config(hidden)).eval()
    if kind == "llama-cls":
        return LlamaForSequenceClassification(llama_config(hidden)).eval()
    config = BertConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_labels=3)
    return BertForSequenceClassification(config).eval()


def task_of(kind: str) -> str:
    return "causal-lm" if kind == "llama" else SEQ


def batch() -> torch.Tensor:
    return torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch()).logits


def perturb(model, seed: int = 3) -> None:
    """Make every trainable tensor non-zero (so K ≠ 0 and LoRA B ≠ 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in METHOD.trainable_parameters(model).values():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))


def stage1_folder(kind: str, path, layers=None, seed: int = 5, hidden: int = 32):
    model = METHOD.attach(build(kind, hidden=hidden), MixdaSpec(stage=1, layers=layers, bottleneck=8),
                          task=task_of(kind))
    perturb(model, seed)
    METHOD.save(model, None, path, base_ref="tiny")
    return path


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("layers", [None, [1]])
def test_identity_at_init(kind, layers):
    model = build(kind)
    expected = logits(model)
    model = METHOD.attach(model, MixdaSpec(stage=1, layers=layers, bottleneck=8), task=task_of(kind))
    assert [m.index for m in mixda_layers(model)] == (layers or [0, 1])
    assert torch.equal(logits(model), expected)
    # the backbone's weight names are unchanged; only the inserted modules are new
    new = {n for n in model.state_dict() if ".mixda." not in n}
    assert new == set(build(kind).state_dict())


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_mixed_minus_f_is_gated_adapter_sum(kind):
    model = METHOD.attach(build(kind), MixdaSpec(stage=1, bottleneck=8), task=task_of(kind))
    expected = logits(build(kind))
    perturb(model)
    assert not torch.equal(logits(model), expected)
    layer = mixda_layers(model)[1]
    seen = {}
    layer.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    logits(model)
    h, z, f = seen["args"]
    if kind == "llama":  # the inputs come from the real FFN: z is the input of down_proj
        mlp = model.model.layers[1].mlp
        assert torch.equal(f, nnf.linear(z, mlp.down_proj.weight))
        torch.testing.assert_close(z, nnf.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T))
    g = torch.softmax(h @ layer.gate.weight.T + layer.gate.bias, dim=-1)
    assert g.shape[-1] == 2
    k = layer.adapters["K_0"]
    k_out = nnf.gelu(z @ k.down.weight.T + k.down.bias) @ k.up.weight.T + k.up.bias
    torch.testing.assert_close(seen["out"] - f, g[..., :1] * k_out, rtol=1e-5, atol=1e-6)


def test_consistency_per_row_and_gradients():
    model = METHOD.attach(build("llama"), MixdaSpec(stage=1, bottleneck=8))
    perturb(model)
    deltas = []
    for layer in mixda_layers(model):
        layer.register_forward_hook(lambda m, args, out: deltas.append(out - args[2]))
    set_recording(model, True)
    model(input_ids=batch())
    set_recording(model, False)
    per_row = consistency_per_row(model)
    hand = torch.stack([d.pow(2).sum(-1).mean(-1) for d in deltas]).mean(0)
    assert per_row.shape == (2,) and per_row.dtype == torch.float32
    torch.testing.assert_close(per_row, hand.detach())
    with pytest.raises(MixdaError):  # read once: the values are cleared
        consistency_per_row(model)
    per_row.mean().backward()
    for name, p in model.named_parameters():
        if ".mixda." in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "gate.weight" in n)

    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4])
    deltas.clear()
    set_recording(model, True, attention_mask=mask)
    with torch.no_grad():
        model(input_ids=batch(), attention_mask=mask)
    sq = torch.stack([d.pow(2).sum(-1) for d in deltas])  # layers × B × T
    hand = ((sq * mask).sum(-1) / mask.sum(-1)).mean(0)
    torch.testing.assert_close(consistency_per_row(model), hand)


class StubTokenizer:
    def save_pretrained(self, folder):
        (folder / "tokenizer.json").write_text("{}")


@pytest.mark.parametrize("kind,stage", [("llama", 1), ("bert", 1), ("llama-cls", 2), ("bert", 2)])
def test_save_load_identical_logits(kind, stage, tmp_path):
    base = build(kind)
    fresh = copy.deepcopy(base)
    if stage == 1:
        spec = MixdaSpec(stage=1, bottleneck=8)
    else:
        spec = MixdaSpec(stage=2, domain_adapters=[str(stage1_folder(kind, tmp_path / "d1"))],
                         task_lora=LoraSpec(r=2, alpha=4))
    model = METHOD.attach(base, spec, task=task_of(kind))
    perturb(model)
    folder = tmp_path / "out"
    METHOD.save(model, StubTokenizer(), folder, base_ref="tiny-base")
    config = json.loads((folder / "mixda_config.json").read_text())
    assert config["stage"] == stage and config["base_model_name_or_path"] == "tiny-base"
    assert (folder / "tokenizer.json").is_file() and (folder / "mixda.safetensors").is_file()
    assert (folder / "task_lora" / "adapter_config.json").is_file() == (stage == 2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    reloaded = load(fresh, folder).eval()
    assert torch.equal(logits(reloaded), logits(model))
    assert not METHOD.trainable_parameters(reloaded)
    assert set(METHOD.trainable_parameters(load(build(kind), folder, trainable=True))) \
        == set(METHOD.trainable_parameters(model))


@pytest.mark.parametrize("kind,lora", [("llama", True), ("llama-cls", True), ("bert", False)])
def test_stage2_two_domain_adapters(kind, lora, tmp_path):
    from peft.tuners.lora import LoraLayer

    folders = {"a": stage1_folder(kind, tmp_path / "a", seed=5),
               "b": stage1_folder(kind, tmp_path / "b", seed=6)}
    spec = MixdaSpec(stage=2, domain_adapters=["a", "b"],
                     task_lora=LoraSpec(r=2, alpha=4) if lora else None)
    model = METHOD.attach(build(kind), spec, task=task_of(kind), locate=lambda ref: folders[ref])
    trainable = METHOD.trainable_parameters(model)
    for layer in mixda_layers(model):
        assert list(layer.adapters) == ["K_1", "K_2"] and layer.gate.out_features == 3
        assert layer.gate.weight.requires_grad
        assert not any(p.requires_grad for p in layer.adapters.parameters())
    a_vec = METHOD.task_vector(folders["a"]).tensors
    assert torch.equal(mixda_layers(model)[0].adapters["K_1"].up.weight,
                       a_vec["layers.0.adapters.K_0.up.weight"])
    lora_names = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert bool(lora_names) == lora
    assert not [n for n in lora_names
                if ".mixda." in n or n.split(".")[-1] in ("lm_head", "score", "classifier")]
    head = {"llama": "lm_head", "llama-cls": "score", "bert": "classifier"}[kind]
    expected = {n for n in trainable if "lora_" not in n and ".gate." not in n}
    assert bool(expected) == (kind != "llama")
    assert expected == ({n for n in trainable if f"{head}." in n} if kind != "llama" else set())
    assert any("lora_" in n for n in trainable) == lora


def test_bad_inputs(tmp_path):
    with pytest.raises(MixdaError, match=r"5.*2 layers"):
        METHOD.attach(build("llama"), MixdaSpec(stage=1, layers=[5]))
    with pytest.raises(MixdaError, match="twice"):
        METHOD.attach(build("llama"), MixdaSpec(stage=1, layers=[1, 1]))
    with pytest.raises(MixdaError, match="gpt2.*llama"):
        gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16))
        METHOD.attach(gpt2, MixdaSpec(stage=1))
    other = stage1_folder("llama", tmp_path / "wide", hidden=48)
    with pytest.raises(MixdaError, match=r"wide.*hidden_size=48"):
        METHOD.attach(build("llama"), MixdaSpec(stage=2, domain_adapters=[str(other)], task_lora=None))
    with pytest.raises(MixdaError, match="wide"):
        load(build("llama"), other)
    all_layers = stage1_folder("llama", tmp_path / "all")
    one_layer = stage1_folder("llama", tmp_path / "one", layers=[1])
    with pytest.raises(MixdaError, match="share their layers"):
        METHOD.attach(build("llama"), MixdaSpec(stage=2, domain_adapters=[str(all_layers), str(one_layer)]))


def test_task_vector_arithmetic(tmp_path):
    a, b, c = (METHOD.task_vector(stage1_folder("llama", tmp_path / n, seed=s))
               for n, s in [("a", 1), ("b", 2), ("c", 3)])
    combined = (a + b * 0.5 - c).to_state_dict()
    assert set(combined) == set(a.tensors) and a.layers == [0, 1]
    for name, value in combined.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, a.tensors[name] + 0.5 * b.tensors[name] - c.tensors[name])
    torch.testing.assert_close((-a).tensors["layers.1.gate.weight"], -a.tensors["layers.1.gate.weight"])
    one = METHOD.task_vector(stage1_folder("llama", tmp_path / "one", layers=[1]))
    with pytest.raises(MixdaError, match="layers"):
        a + one
    assert isinstance(2 * one, MixdaTaskVector)


# ---------------------------------------------------------------------------------------------
# Runs: stage 1 on the embedded world's domain text, stage 2 on its instruction data


@pytest.mark.slow
def test_stage_1_learns_the_domain_and_stage_2_trains_gate_and_task_lora(workspace):
    from helpers import tiny_train_recipe
    from workbench.models import load_model
    from workbench.recipes import EvalSpec, ModelSpec
    from workbench.stages import run_train

    small_eval = EvalSpec(max_tokens=1024, questions=[])
    stage1 = run_train(tiny_train_recipe(
        name="mixda-1", adapter={"method": "mixda", "bottleneck": 16}, data__replay_ratio=0.5,
        train__lr=1e-2, train__max_steps=12, train__checkpoint_every=0, eval=small_eval), workspace)
    lora = run_train(tiny_train_recipe(
        name="lora-no-replay", data__replay_ratio=0.0, train__lr=1e-2, train__max_steps=12,
        train__checkpoint_every=0, eval=small_eval), workspace)
    mixda_report = json.loads(stage1.path("report.json").read_text())
    lora_report = json.loads(lora.path("report.json").read_text())
    assert mixda_report["domain_gain_pct"] > 0
    assert mixda_report["general_forgetting_pct"] < lora_report["general_forgetting_pct"]
    assert (stage1.path("adapter", "mixda_config.json")).is_file()

    stage2 = run_train(tiny_train_recipe(
        name="mixda-2", adapter={"method": "mixda", "stage": 2, "domain_adapters": [f"run:{stage1.id}"],
                                 "task_lora": {"r": 4, "alpha": 8}},
        data__train="world:instruct_train", data__format="instruct", data__replay_ratio=0.0,
        train__lr=1e-2, train__max_steps=4, train__checkpoint_every=0), workspace)
    model, tokenizer, _ = load_model(ModelSpec(path=f"run:{stage2.id}"), workspace)
    frozen = load_file(stage1.path("adapter", "mixda.safetensors"))
    layer = mixda_layers(model)[0]
    assert torch.equal(layer.adapters["K_1"].up.weight, frozen["layers.0.adapters.K_0.up.weight"])
    assert any("lora_B" in n for n, _ in model.named_parameters())
