"""Streaming merge of LoRA adapters into a base: exact weights, loadable output, shards, atomicity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge.streaming import merge_lora_into_base
from workbench.models import build_model_from_config
from helpers import folder_tensors, lora_updates, random_lora_adapter

VOCAB = 64
INPUT_IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 63, 7]])



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    base = root / "base"
    build_model_from_config("llama-tiny", vocab_size=VOCAB).save_pretrained(
        base, safe_serialization=True)
    first = random_lora_adapter(root / "first", r=2, alpha=4, use_rslora=False, seed=1)
    second = random_lora_adapter(root / "second", r=4, alpha=8, use_rslora=True, seed=2)
    return root, base, first, second


def _logits(folder_or_model) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = folder_or_model
    if isinstance(folder_or_model, Path):
        model = AutoModelForCausalLM.from_pretrained(folder_or_model)
    model.eval()
    with torch.no_grad():
        return model(INPUT_IDS).logits



def test_merged_weights_match_hand_computation(setup):
    root, base, first, second = setup
    adapters = [(first, 0.7), (second, -0.3)]
    out = merge_lora_into_base(base, adapters, root / "merged_weights")
    merged, original = folder_tensors(out), load_file(base / "model.safetensors")
    updates = lora_updates(adapters, torch.float32)
    assert set(merged) == set(original)
    assert len(updates) == 14  # 7 linear layers × 2 decoder layers
    for name, tensor in original.items():
        assert merged[name].dtype == tensor.dtype
        if name in updates:
            assert not torch.equal(merged[name], tensor)
            torch.testing.assert_close(merged[name], tensor + updates[name], atol=1e-6, rtol=0)
        else:
            assert torch.equal(merged[name], tensor)
    assert (out / "config.json").read_text() == (base / "config.json").read_text()
    assert (out / "generation_config.json").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    assert not (root / ".merged_weights.partial").exists()


def test_merged_folder_loads_with_expected_logits(setup):
    from transformers import AutoModelForCausalLM

    root, base, first, second = setup
    adapters = [(first, 0.7), (second, -0.3)]
    out = merge_lora_into_base(base, adapters, root / "merged_logits")
    reference = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for name, update in lora_updates(adapters, torch.float32).items():
            reference.get_parameter(name).add_(update)
    torch.testing.assert_close(_logits(out), _logits(reference), atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["first", "second"])
def test_single_adapter_matches_peft_merge_and_unload(setup, which):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, base, first, second = setup
    adapter = first if which == "first" else second
    out = merge_lora_into_base(base, [(adapter, 1.0)], root / f"merged_single_{which}")
    peft_merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    torch.testing.assert_close(_logits(out), _logits(peft_merged), atol=1e-5, rtol=0)


def test_sharded_output_has_index_and_same_logits(setup):
    root, base, first, second = setup
    adapters = [(first, 0.7), (second, -0.3)]
    single = merge_lora_into_base(base, adapters, root / "merged_unsharded")
    max_bytes = 20_000
    sharded = merge_lora_into_base(base, adapters, root / "merged_sharded", max_shard_bytes=max_bytes)
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 2
    assert [s.name for s in shards] == [f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                                        for k in range(1, len(shards) + 1)]
    assert all(s.stat().st_size <= max_bytes + 4096 for s in shards)  # data ≤ limit, plus header
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    tensors = folder_tensors(sharded)
    assert set(index["weight_map"]) == set(tensors) == set(load_file(single / "model.safetensors"))
    for name, file_name in index["weight_map"].items():
        assert name in load_file(sharded / file_name)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in tensors.values())
    assert torch.equal(_logits(sharded), _logits(single))


def test_existing_output_is_refused_and_untouched(setup):
    root, base, first, _ = setup
    target = root / "existing"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="existing"):
        merge_lora_into_base(base, [(first, 1.0)], target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "mine"
    assert not (root / ".existing.partial").exists()


def test_failure_half_way_leaves_no_output(setup, monkeypatch):
    import workbench.io as wio

    root, base, first, _ = setup
    seen, written = [], []
    write = wio.write_shard

    def recording_write(path, specs, tensors, metadata=None):
        written.append(path.name)
        write(path, specs, tensors, metadata=metadata)

    monkeypatch.setattr(wio, "write_shard", recording_write)

    def failing(name):
        seen.append(name)
        if len(seen) == 3:
            raise RuntimeError("delta source failed")
        return None

    with pytest.raises(RuntimeError, match="delta source failed"):
        merge_lora_into_base(base, [(first, 1.0)], root / "failed", max_shard_bytes=4096,
                             extra_deltas=failing)
    assert len(seen) == 3
    assert written  # shards were already on disk when the failure came
    assert not (root / "failed").exists()
    assert not (root / ".failed.partial").exists()


def test_extra_deltas_are_added(setup):
    root, base, first, _ = setup
    name = "model.layers.1.mlp.down_proj.weight"
    original = load_file(base / "model.safetensors")
    extra = torch.full(original[name].shape, 0.25)
    out = merge_lora_into_base(base, [(first, 0.5)], root / "merged_extra",
                               extra_deltas=lambda n: extra if n == name else None)
    expected = original[name] + lora_updates([(first, 0.5)], torch.float32)[name] + extra
    torch.testing.assert_close(load_file(out / "model.safetensors")[name], expected, atol=1e-6, rtol=0)


def test_shape_mismatch_is_refused_before_writing(setup):
    root, base, first, _ = setup
    wide = random_lora_adapter(root / "wide", r=2, alpha=4, use_rslora=False, seed=3,
                         hidden_size=48, intermediate_size=96)
    with pytest.raises(ValueError) as excinfo:
        merge_lora_into_base(base, [(first, 1.0), (wide, 1.0)], root / "merged_wide")
    message = str(excinfo.value)
    assert "tensor model.layers." in message and ".weight" in message and str(wide) in message
    assert not (root / "merged_wide").exists()
    assert not (root / ".merged_wide.partial").exists()


def test_non_finite_factor_is_refused(setup):
    root, base, first, _ = setup
    broken = root / "broken"
    shutil.copytree(first, broken)
    raw = load_file(broken / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    raw[key][0, 0] = float("nan")
    save_file(raw, broken / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight"):
        merge_lora_into_base(base, [(broken, 1.0)], root / "merged_broken")
    assert not (root / "merged_broken").exists()
    assert not (root / ".merged_broken.partial").exists()


def test_bfloat16_base_keeps_its_dtype(setup, tmp_path):
    root, _, first, _ = setup
    base = tmp_path / "base_bf16"
    build_model_from_config("llama-tiny", vocab_size=VOCAB).to(torch.bfloat16).save_pretrained(
        base, safe_serialization=True)
    out = merge_lora_into_base(base, [(first, 1.0)], tmp_path / "merged_bf16")
    merged, original = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    updates = lora_updates([(first, 1.0)], torch.float32)
    for name, tensor in original.items():
        assert merged[name].dtype == torch.bfloat16
        expected = (tensor.float() + updates[name]).to(torch.bfloat16) if name in updates else tensor
        assert torch.equal(merged[name], expected)


def test_concatenated_adapter_equals_weighted_sum(setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from merge.streaming import lora_concat_adapter

    root, base, first, second = setup
    adapters = [(first, 0.7), (second, -0.3)]
    concat = lora_concat_adapter(adapters, root / "concat")
    config = json.loads((concat / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 6 and not config["use_rslora"]
    expected, got = lora_updates(adapters, torch.float32), lora_updates([(concat, 1.0)], torch.float32)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)
    merged = merge_lora_into_base(base, adapters, root / "merged_for_concat")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), concat)
    torch.testing.assert_close(_logits(peft_model), _logits(merged), atol=1e-5, rtol=0)
    with pytest.raises(FileExistsError):
        lora_concat_adapter(adapters, concat)


def test_shard_writer_matches_safetensors_byte_for_byte_in_content(tmp_path):
    """`write_shard` writes what safetensors reads back: every dtype, a scalar and an empty tensor,
    with metadata, and a producer that yields the wrong shape is refused."""
    from safetensors import safe_open

    from workbench.io import write_shard

    tensors = {"a.weight": torch.randn(3, 5, dtype=torch.float16),
               "b.weight": torch.randn(4, dtype=torch.bfloat16),
               "c.bias": torch.randn(2, 2, dtype=torch.float32),
               "d.count": torch.tensor(7, dtype=torch.int64),
               "e.empty": torch.zeros(0, 3, dtype=torch.float32),
               "f.mask": torch.tensor([True, False, True])}
    names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64",
             torch.bool: "BOOL"}
    specs = [(k, names[v.dtype], list(v.shape)) for k, v in tensors.items()]
    write_shard(tmp_path / "x.safetensors", specs, iter(tensors.values()), metadata={"format": "pt"})
    back = folder_tensors(tmp_path)
    assert list(back) == sorted(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    with pytest.raises(ValueError, match="a.weight: produced torch.float16 \\[5, 3\\]"):
        write_shard(tmp_path / "y.safetensors", specs[:1], iter([tensors["a.weight"].T.contiguous()]))


def test_readers_share_a_tensor_while_it_is_alive_and_never_serve_a_changed_file(setup, tmp_path):
    """Two readers of one file hand out the same tensor while it is alive (a merge reads its base
    once, not once per input); a block of rows is its own entry; once the tensor is gone, or the
    file is replaced, the data is read again."""
    import gc
    import weakref

    from workbench.io import ShardReader, model_layout

    _, base, _, _ = setup
    folder = tmp_path / "model"
    shutil.copytree(base, folder)
    layout = model_layout(folder)
    name = "model.layers.0.mlp.down_proj.weight"
    original = load_file(folder / "model.safetensors")
    first, second = ShardReader(layout), ShardReader(layout)
    tensor = first(name)
    assert second(name) is tensor and torch.equal(tensor, original[name])
    rows = second(name, (1, 3))
    assert rows is not tensor and torch.equal(rows, original[name][1:3])
    assert first(name, (1, 3)) is rows
    alive = weakref.ref(tensor)
    del tensor, rows
    gc.collect()
    assert alive() is None  # the readers' memo does not keep it
    again = second(name)
    assert torch.equal(again, original[name])

    changed = {k: v + 1 if k == name else v for k, v in original.items()}
    (folder / "model.safetensors").unlink()
    save_file(changed, folder / "model.safetensors", metadata={"format": "pt"})
    fresh = ShardReader(model_layout(folder))
    assert torch.equal(fresh(name), original[name] + 1)
    assert torch.equal(again, original[name])  # the tensor handed out earlier is untouched
    first.close(), second.close(), fresh.close()
