"""Merging inputs of every adapter kind: RoAd (composed rotations, or dense (R − I)·W when mixed),
task prompt vectors (P_init + Σ w·τ), MixDA (module weights), and the task-vector API (weighted
sum, scaling, negation, cosine per tensor and overall), each against a result computed by hand
or by PEFT itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel, RoadConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from adapters.mixda import MixdaMethod, MixdaTaskVector
from adapters.prompt import PromptMethod, TaskPromptVector, initial_prompt_of, set_prompt
from adapters.road import RoadTaskVector, merge_into_weights
from merge.dense import RoadDelta, merge_folders
from workbench.io import model_layout
from merge.task_vectors import Cosine, cosine, load_task_vector, weighted_sum
from workbench.task_vector import DenseTaskVector, LoraTaskVector, TaskVectorError
from adapters.mixda import MixdaSpec
from adapters.prompt import PromptSpec
from helpers import add_noise, folder_tensors, save_random_lora

IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 63, 7]])


def config() -> LlamaConfig:
    # biases on every linear layer, so (R − I)·b is exercised too
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       attention_bias=True, mlp_bias=True, tie_word_embeddings=False)


def load_base(base: Path) -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(base).eval()


def noise(gen: torch.Generator, shape, scale: float) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * scale


def make_road(base: Path, folder: Path, seed: int, variant: str = "road_1", group_size: int = 8,
              targets="all-linear") -> Path:
    model = get_peft_model(load_base(base), RoadConfig(variant=variant, group_size=group_size,
                                                       target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "road_theta" in name:
                p.copy_(noise(gen, p.shape, 0.3))
            elif "road_alpha" in name:
                p.copy_(1 + noise(gen, p.shape, 0.2).clamp(-0.5, 0.5))
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(folder)
    return folder


def make_lora(base: Path, folder: Path, seed: int) -> Path:
    return save_random_lora(load_base(base), folder, r=2, alpha=4, seed=seed, base=base)


def make_full(base: Path, folder: Path, seed: int) -> Path:
    add_noise(load_base(base), seed, 0.01).save_pretrained(folder)
    return folder


def make_prompt(base: Path, folder: Path, seed: int, init_seed: int = 0) -> Path:
    method = PromptMethod()
    model = method.attach(load_base(base), PromptSpec(num_virtual_tokens=4, init_seed=init_seed))
    set_prompt(model, initial_prompt_of(model) + noise(torch.Generator().manual_seed(seed), (4, 32), 0.1))
    method.save(model, None, folder, base_ref=str(base))
    return folder


def make_mixda(base: Path, folder: Path, seed: int, layers=None) -> Path:
    method = MixdaMethod()
    model = method.attach(load_base(base), MixdaSpec(stage=1, layers=layers, bottleneck=8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters(model).values():
            p.add_(noise(gen, p.shape, 0.2))
    method.save(model, None, folder, base_ref=str(base))
    return folder



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    torch.manual_seed(0)
    LlamaForCausalLM(config()).save_pretrained(root / "base")
    base = root / "base"
    return {"root": root, "base": base,
            "road_a": make_road(base, root / "road_a", 1), "road_b": make_road(base, root / "road_b", 2),
            "lora": make_lora(base, root / "lora", 3), "full": make_full(base, root / "full", 4),
            "prompt_a": make_prompt(base, root / "prompt_a", 5),
            "prompt_b": make_prompt(base, root / "prompt_b", 6),
            "mixda_a": make_mixda(base, root / "mixda_a", 7),
            "mixda_b": make_mixda(base, root / "mixda_b", 8)}


def peft_merged(base: Path, *adapters: Path) -> dict[str, torch.Tensor]:
    """The base with each adapter merged into its weights by PEFT, one after the other."""
    model = load_base(base)
    for folder in adapters:
        model = merge_into_weights(PeftModel.from_pretrained(model, folder))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# RoAd


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_road_dense_delta_is_peft_merged_weights_minus_base(world, tmp_path, variant):
    base = world["base"]
    folder = make_road(base, tmp_path / variant, seed=11, variant=variant)
    merged, original = peft_merged(base, folder), folder_tensors(base)
    layout = model_layout(base)
    read = RoadDelta(folder, layout)
    dense = RoadTaskVector.from_peft_folder(folder).to_dense(base)
    touched = [n for n in original if read(n) is not None]
    assert len(touched) == 2 * 7 * 2, "7 linear layers × 2 decoder layers, weight and bias each"
    for name, w in original.items():
        delta = read(name)
        if delta is None:
            assert torch.equal(merged[name], w), f"{name} is not rotated"
            continue
        # (R − I)·W from PEFT's own merge W ← R W (b ← R b)
        torch.testing.assert_close(delta, merged[name] - w, atol=1e-6, rtol=0)
        torch.testing.assert_close(dense.deltas[name], delta, atol=0, rtol=0)


def test_road_only_task_arithmetic_composes_the_rotations(world, tmp_path):
    base, a, b = world["base"], world["road_a"], world["road_b"]
    adapter = merge_folders(base, [(a, 1.0), (b, 1.0)], tmp_path / "composed", output="adapter")
    va, vb = RoadTaskVector.from_peft_folder(a), RoadTaskVector.from_peft_folder(b)
    vc = RoadTaskVector.from_peft_folder(adapter)
    assert set(vc.theta) == set(va.theta)
    for layer in va.theta:  # angles add, scales multiply
        torch.testing.assert_close(vc.theta[layer], va.theta[layer] + vb.theta[layer], atol=0, rtol=0)
        torch.testing.assert_close(vc.alpha[layer], va.alpha[layer] * vb.alpha[layer], atol=0, rtol=0)
    # as a model: exactly the two adapters merged one after the other by PEFT
    model = merge_folders(base, [(a, 1.0), (b, 1.0)], tmp_path / "composed_model")
    expected, got = peft_merged(base, a, b), folder_tensors(model)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=0)
    # and the composed adapter loads in plain PEFT with the same logits as the merged model
    peft_model = PeftModel.from_pretrained(load_base(base), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, load_base(model)(IDS).logits,
                                   atol=1e-5, rtol=0)


def test_road_weights_scale_angles_and_raise_scales_to_the_weight(world, tmp_path):
    base, a, b = world["base"], world["road_a"], world["road_b"]
    out = merge_folders(base, [(a, 0.5), (b, -1.0)], tmp_path / "weighted", output="adapter",
                        parameters={"scale": 2.0})
    va, vb = RoadTaskVector.from_peft_folder(a), RoadTaskVector.from_peft_folder(b)
    vc = RoadTaskVector.from_peft_folder(out)
    for layer in va.theta:  # λ = 2: θ = 2(0.5 θa − θb), α = αa^(2·0.5) · αb^(2·(−1))
        torch.testing.assert_close(vc.theta[layer], va.theta[layer] - 2 * vb.theta[layer])
        torch.testing.assert_close(vc.alpha[layer], va.alpha[layer] / vb.alpha[layer] ** 2)


def test_road_layers_one_adapter_lacks_count_as_identity(world, tmp_path):
    base, a = world["base"], world["road_a"]
    q_only = make_road(base, tmp_path / "q_only", seed=12, targets=["q_proj"])
    model = merge_folders(base, [(a, 1.0), (q_only, 1.0)], tmp_path / "model")
    expected, got = peft_merged(base, a, q_only), folder_tensors(model)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=0)


def test_mixed_road_lora_and_model_merge_is_base_plus_the_dense_deltas(world, tmp_path):
    base, road, lora, full = world["base"], world["road_a"], world["lora"], world["full"]
    weights = (0.7, -0.4, 0.5)
    out = merge_folders(base, [(road, weights[0]), (lora, weights[1]), (full, weights[2])],
                        tmp_path / "mixed", parameters={"scale": 1.5}, max_shard_bytes=30_000)
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    original = folder_tensors(base)
    road_delta = {n: v - original[n] for n, v in peft_merged(base, road).items()}
    lora_delta = {n: v - original[n] for n, v in peft_merged(base, lora).items()}
    full_delta = {n: v - original[n] for n, v in folder_tensors(full).items()}
    got = folder_tensors(out)
    assert set(got) == set(original)
    for name, theta in original.items():
        by_hand = theta + 1.5 * (weights[0] * road_delta[name] + weights[1] * lora_delta[name]
                                 + weights[2] * full_delta[name])
        torch.testing.assert_close(got[name], by_hand, atol=2e-6, rtol=0)


@pytest.mark.slow
def test_mixed_road_and_lora_through_the_merge_stage(world, tmp_path):
    from workbench.recipes import MergeInput, MergeRecipe, ModelSpec
    from workbench.stages import run_merge
    from workbench.workspace import Workspace

    base, road, lora = world["base"], world["road_a"], world["lora"]
    ws = Workspace(tmp_path / "ws")
    recipe = MergeRecipe(base=ModelSpec(path=str(base)), method="ties",
                         parameters={"density": 0.5},
                         inputs=[MergeInput(path=str(road), weight=0.6),
                                 MergeInput(path=str(lora), weight=0.4)])
    run = run_merge(recipe, ws)
    from merge.methods import merge_tensors

    original = folder_tensors(base)
    name = "model.layers.1.mlp.down_proj.weight"
    road_delta = peft_merged(base, road)[name] - original[name]
    lora_delta = peft_merged(base, lora)[name] - original[name]
    expected = original[name] + merge_tensors("ties", [road_delta, lora_delta], [0.6, 0.4], name, 0,
                                              density=0.5)
    torch.testing.assert_close(folder_tensors(run.path("model"))[name], expected, atol=2e-6, rtol=0)
    cos = run.info["summary"]["task_vector_cosine"][0][1]
    flat_r = torch.cat([(peft_merged(base, road)[n] - original[n]).flatten() for n in original]).double()
    flat_l = torch.cat([(peft_merged(base, lora)[n] - original[n]).flatten() for n in original]).double()
    assert cos == pytest.approx(float(flat_r @ flat_l / (flat_r.norm() * flat_l.norm())), abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Task prompt vectors and MixDA


def test_prompt_vectors_merge_into_a_prompt_tuning_adapter(world, tmp_path):
    base, a, b = world["base"], world["prompt_a"], world["prompt_b"]
    out = merge_folders(base, [(a, 0.7), (b, -0.4)], tmp_path / "prompt", output="adapter",
                        parameters={"scale": 2.0})
    tuned_a = load_file(a / "adapter_model.safetensors")["prompt_embeddings"]
    tuned_b = load_file(b / "adapter_model.safetensors")["prompt_embeddings"]
    init = load_file(a / "prompt_init.safetensors")["prompt_init"]
    by_hand = init + 2.0 * (0.7 * (tuned_a - init) - 0.4 * (tuned_b - init))
    got = load_file(out / "adapter_model.safetensors")["prompt_embeddings"]
    torch.testing.assert_close(got, by_hand, atol=1e-6, rtol=0)
    merged = TaskPromptVector.from_folder(out)  # a task prompt vector again, same P_init
    assert torch.equal(merged.init, init)
    merged.check_compatible(TaskPromptVector.from_folder(a))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["base_model_name_or_path"] == str(base)
    peft_model = PeftModel.from_pretrained(load_base(base), out).eval()
    with torch.no_grad():
        assert torch.isfinite(peft_model(input_ids=IDS).logits).all()
    assert torch.allclose(peft_model.prompt_encoder["default"].embedding.weight, by_hand, atol=1e-6)


def test_prompt_and_mixda_merges_through_the_merge_stage(world, tmp_path):
    from workbench.recipes import MergeInput, MergeRecipe
    from workbench.stages import run_merge
    from workbench.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    for a, b, kind in (("prompt_a", "prompt_b", "prompt"), ("mixda_a", "mixda_b", "mixda")):
        recipe = MergeRecipe(output="adapter", inputs=[MergeInput(path=str(world[a]), weight=0.5),
                                                        MergeInput(path=str(world[b]), weight=0.5)])
        run = run_merge(recipe, ws)
        merged, va, vb = (load_task_vector(f) for f in (run.path("adapter"), world[a], world[b]))
        for name in va.names():
            expected = 0.5 * va.tensor(name) + 0.5 * vb.tensor(name)
            torch.testing.assert_close(merged.tensor(name), expected, atol=1e-6, rtol=0)
        assert run.info["summary"]["task_vector_cosine"][0][1] == pytest.approx(
            cosine(va, vb).overall, abs=1e-6), kind
    with pytest.raises(ValueError, match="set output: adapter"):
        run_merge(MergeRecipe(inputs=[MergeInput(path=str(world["prompt_a"]))]), ws)


def test_prompt_vectors_of_another_init_are_refused(world, tmp_path):
    other = make_prompt(world["base"], tmp_path / "other_init", seed=9, init_seed=1)
    with pytest.raises(ValueError, match=r"other_init/prompt_init.safetensors: init_seed '1', but .*'0'"):
        merge_folders(world["base"], [(world["prompt_a"], 1.0), (other, 1.0)], tmp_path / "out",
                      output="adapter")
    assert not (tmp_path / "out").exists()


def test_mixda_merge_is_the_weighted_module_sum(world, tmp_path):
    base, a, b = world["base"], world["mixda_a"], world["mixda_b"]
    out = merge_folders(base, [(a, 0.6), (b, 0.4)], tmp_path / "mixda", output="adapter")
    ta, tb, got = (load_file(f / "mixda.safetensors") for f in (a, b, out))
    assert set(got) == set(ta) and len(got) > 10
    for name in ta:
        torch.testing.assert_close(got[name], 0.6 * ta[name] + 0.4 * tb[name], atol=1e-7, rtol=0)
    config = json.loads((out / "mixda_config.json").read_text())
    assert config["layers"] == [0, 1] and config["merged_from"] == [str(a), str(b)]
    from adapters.mixda import load

    model = load(load_base(base), out)  # reloads as a MixDA folder
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS).logits).all()


def test_mixda_folders_of_other_layers_are_refused(world, tmp_path):
    one = make_mixda(world["base"], tmp_path / "one_layer", seed=3, layers=[1])
    with pytest.raises(ValueError, match=r"one_layer/mixda_config.json: layers \[1\], but .* \[0, 1\]"):
        merge_folders(world["base"], [(world["mixda_a"], 1.0), (one, 1.0)], tmp_path / "out",
                      output="adapter")


# ----------------------------------------------------------------------------------------------
# Kinds that cannot be combined


def test_kinds_that_cannot_be_combined_are_refused_before_anything_is_written(world, tmp_path):
    base, out = world["base"], tmp_path / "out"
    cases = [
        ([world["prompt_a"], world["lora"]], "adapter",
         r"inputs.0 is a task prompt vector and inputs.1 is a LoRA adapter: they cannot be combined"),
        ([world["full"], world["mixda_a"]], "adapter",
         r"inputs.1 is a MixDA folder and inputs.0 is a full model: they cannot be combined"),
        ([world["prompt_a"], world["prompt_b"]], "model", r"set output: adapter"),
        ([world["road_a"], world["lora"]], "adapter", r"output: adapter with RoAd inputs"),
    ]
    for folders, output, message in cases:
        with pytest.raises(ValueError, match=message):
            merge_folders(base, [(f, 1.0) for f in folders], out, output=output)
        assert not out.exists() and not (tmp_path / ".out.partial").exists()
    road_2 = make_road(base, tmp_path / "road_2", seed=4, variant="road_2")
    with pytest.raises(ValueError, match=r"road_2/road_4"):
        merge_folders(base, [(road_2, 1.0), (world["road_a"], 1.0)], out, output="adapter")
    prompt, lora, road = (load_task_vector(world[k]) for k in ("prompt_a", "lora", "road_a"))
    with pytest.raises(TaskVectorError, match="a task prompt vector cannot be combined with a LoRA"):
        cosine(prompt, lora)
    with pytest.raises(TaskVectorError, match=r"to_dense\(base_folder\)"):
        weighted_sum([road, lora], [1.0, 1.0])
    # through the dense space they do mix, and that equals the by-hand sum
    mixed = weighted_sum([road.to_dense(base), lora], [1.0, 2.0])
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(mixed.deltas[name],
                               road.to_dense(base).deltas[name] + 2 * lora.tensor(name), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# The task-vector API on every kind


def by_hand_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    return float(x @ y / (x.norm() * y.norm()))


def pairs(world, tmp_path) -> dict[str, tuple]:
    base = world["base"]
    return {
        "full": (load_task_vector(world["full"], base),
                 load_task_vector(make_full(base, tmp_path / "full_b", 14), base)),
        "lora": (load_task_vector(world["lora"]), load_task_vector(make_lora(base, tmp_path / "lora_b", 15))),
        "road": (load_task_vector(world["road_a"]), load_task_vector(world["road_b"])),
        "prompt": (load_task_vector(world["prompt_a"]), load_task_vector(world["prompt_b"])),
        "mixda": (load_task_vector(world["mixda_a"]), load_task_vector(world["mixda_b"])),
    }


@pytest.mark.slow
def test_cosine_per_tensor_and_overall_equal_the_by_hand_cosine(world, tmp_path):
    for kind, (a, b) in pairs(world, tmp_path).items():
        assert a.kind == b.kind == kind
        result = cosine(a, b)
        assert isinstance(result, Cosine) and set(result.per_tensor) == set(a.names())
        for name in a.names():
            # float32 tensors (LoRA: s·B·A) against float64 sums (LoRA: factored), so 1e-6
            assert result.per_tensor[name] == pytest.approx(
                by_hand_cosine(a.tensor(name), b.tensor(name)), abs=1e-6), (kind, name)
        flat_a = torch.cat([a.tensor(n).flatten() for n in a.names()])
        flat_b = torch.cat([b.tensor(n).flatten() for n in a.names()])
        assert result.overall == pytest.approx(by_hand_cosine(flat_a, flat_b), abs=1e-6), kind
        assert cosine(a, a).overall == pytest.approx(1.0, abs=1e-6)
        assert cosine(a, -a).overall == pytest.approx(-1.0, abs=1e-6)


def test_weighted_sum_scaling_and_negation_on_every_kind(world, tmp_path):
    for kind, (a, b) in pairs(world, tmp_path).items():
        total = weighted_sum([a, b], [0.7, -0.3])
        assert total.kind == kind
        for name in a.names():
            if kind == "road":  # log-polar coordinates: θ and log α add, weights scale them
                expected = 0.7 * a.tensor(name) - 0.3 * b.tensor(name)
                torch.testing.assert_close(total.tensor(name), expected, atol=1e-6, rtol=1e-5)
            else:
                expected = 0.7 * a.tensor(name) - 0.3 * b.tensor(name)
                torch.testing.assert_close(total.tensor(name), expected, atol=1e-6, rtol=0)
            torch.testing.assert_close((-a).tensor(name), -a.tensor(name), atol=1e-7, rtol=0)
            torch.testing.assert_close((2.5 * a).tensor(name), 2.5 * a.tensor(name), atol=1e-6, rtol=1e-6)
    lora_a, lora_b = pairs(world, tmp_path)["lora"]
    stacked = lora_a + lora_b  # ranks stack, still factored
    name = lora_a.names()[0]
    assert stacked.factors[name][1].shape[0] == lora_a.factors[name][1].shape[0] * 2
    road_a, road_b = (RoadTaskVector.from_peft_folder(world[k]) for k in ("road_a", "road_b"))
    composed = road_a + road_b
    layer = next(iter(road_a.theta))
    assert torch.equal(composed.alpha[layer], road_a.alpha[layer] * road_b.alpha[layer])
    inverse = road_a + (-road_a)  # a rotation and its inverse cancel: identity
    torch.testing.assert_close(inverse.theta[layer], torch.zeros_like(road_a.theta[layer]))
    torch.testing.assert_close(inverse.alpha[layer], torch.ones_like(road_a.alpha[layer]))
    assert isinstance(weighted_sum([DenseTaskVector({}), lora_a], [1.0, 1.0]), DenseTaskVector)
    mixda_a, mixda_b = pairs(world, tmp_path)["mixda"]
    assert isinstance(lora_a, LoraTaskVector) and isinstance(mixda_a, MixdaTaskVector)
    assert isinstance(weighted_sum([mixda_a, mixda_b], [0.7, -0.3]), MixdaTaskVector)
    assert math.isfinite(cosine(pairs(world, tmp_path)["full"][0], lora_a).overall)


# ----------------------------------------------------------------------------------------------
# Merging by blocks of rows


def test_task_arithmetic_by_blocks_of_rows_is_the_whole_tensor_merge(world, tmp_path, monkeypatch):
    """With blocks of a few rows (uneven last block), base + λ(w_l·s·B·A + w_f·(θ_full − θ_base))
    equals the merge of whole tensors and the sum by hand."""
    import adapters.full
    import merge.dense
    import merge.streaming

    base, lora, full = world["base"], world["lora"], world["full"]
    inputs = [(lora, -0.4), (full, 0.5)]
    whole = merge_folders(base, inputs, tmp_path / "whole", parameters={"scale": 1.5})
    blocks_read = []
    real_call = adapters.full.FullModelDelta.__call__

    def recording_call(self, name, rows=None):
        blocks_read.append((name, rows))
        return real_call(self, name, rows)

    monkeypatch.setattr(adapters.full.FullModelDelta, "__call__", recording_call)
    monkeypatch.setattr(merge.streaming, "BLOCK_ELEMENTS", 100)
    by_blocks = merge_folders(base, inputs, tmp_path / "blocks", parameters={"scale": 1.5})

    rows_of = [rows for name, rows in blocks_read if name == "model.embed_tokens.weight"]
    assert rows_of[0] == (0, 3) and rows_of[-1] == (63, 64) and len(rows_of) == 22  # 100 // 32 = 3 rows
    original, got, reference = folder_tensors(base), folder_tensors(by_blocks), folder_tensors(whole)
    lora_delta = {n: v - original[n] for n, v in peft_merged(base, lora).items()}
    full_delta = {n: v - original[n] for n, v in folder_tensors(full).items()}
    assert set(got) == set(original)
    for name, theta in original.items():
        torch.testing.assert_close(got[name], reference[name], atol=1e-7, rtol=0)
        by_hand = theta + 1.5 * (-0.4 * lora_delta[name] + 0.5 * full_delta[name])
        torch.testing.assert_close(got[name], by_hand, atol=2e-6, rtol=0)
