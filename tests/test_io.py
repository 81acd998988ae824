"""The file layer every writer and reader goes through (`workbench.io`): atomic writes, sharded
safetensors folders, header checks and the NaN / inf check."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from workbench.io import (INDEX_NAME, SINGLE_NAME, ModelLoadError, WriteFailed, all_finite, atomic_file,
                          atomic_folder, model_layout, nonfinite_counts, peft_adapter_header,
                          read_safetensors_header, write_atomic, write_json, write_sharded,
                          write_tensors_sharded)


def test_a_failed_atomic_write_keeps_the_old_content_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    write_json(target, {"step": 1})
    real_write = os.write

    def disk_full(fd, data):
        real_write(fd, bytes(data)[:3])  # part of the new content reaches the temporary file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", disk_full)
        with pytest.raises(WriteFailed) as raised:
            write_atomic(target, '{"step": 2}\n')
    assert raised.value.errno == errno.ENOSPC
    assert str(raised.value) == (f"cannot write {target}: the disk is full (no space left on device); "
                                 "free some space and try again")
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_writer_that_fails_inside_atomic_file_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="stopped"):
        with atomic_file(target) as tmp:
            save_file({"w": torch.zeros(2)}, tmp)
            raise RuntimeError("stopped")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    with atomic_file(target) as tmp:  # and a write that completes replaces it whole
        save_file({"w": torch.zeros(2)}, tmp)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    with safe_open(str(target), "pt") as f:
        assert torch.equal(f.get_tensor("w"), torch.zeros(2))


def test_a_failed_folder_write_leaves_the_old_folder_and_no_partial_folder(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_folder(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_folder(target, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("killed half-way")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_folder(target, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"embed.weight": torch.randn(40, 8, generator=gen),                     # 1280 bytes
            "layers.0.weight": torch.randn(16, 8, generator=gen).to(torch.bfloat16),  # 256
            "layers.0.bias": torch.randn(16, generator=gen),                         # 64
            "layers.1.weight": torch.randn(30, 8, generator=gen),                    # 960
            "layers.1.count": torch.tensor(3, dtype=torch.int64),                    # 8
            "head.weight": torch.randn(8, 8, generator=gen).to(torch.float16)}       # 128


def test_sharded_index_lists_every_tensor_once_and_shards_keep_the_size_limit(tmp_path):
    tensors = _tensors()
    limit = 1300
    weight_map = write_tensors_sharded(tensors, tmp_path, limit, metadata={"format": "pt"})
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert index["weight_map"] == weight_map
    assert sorted(index["weight_map"]) == sorted(tensors)  # every tensor, once (a JSON object's keys)
    assert set(index["weight_map"].values()) == set(shards) and len(shards) > 1
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    seen = []
    for shard in shards:
        with safe_open(str(tmp_path / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            names = list(f.keys())
            assert all(index["weight_map"][name] == shard for name in names)
            assert sum(tensors[n].numel() * tensors[n].element_size() for n in names) <= limit
            for name in names:
                assert torch.equal(f.get_tensor(name), tensors[name])
            seen += names
    assert sorted(seen) == sorted(tensors)
    layout = model_layout(tmp_path)  # what the readers see: storage order is the order written
    assert list(layout) == list(tensors)


def test_a_tensor_larger_than_the_limit_gets_a_shard_of_its_own_and_one_shard_needs_no_index(tmp_path):
    tensors = _tensors()
    (tmp_path / "small").mkdir(), (tmp_path / "one").mkdir()
    write_tensors_sharded(tensors, tmp_path / "small", 300, metadata={"format": "pt"})
    index = json.loads((tmp_path / "small" / INDEX_NAME).read_text())["weight_map"]
    assert sum(1 for f in index.values() if f == index["embed.weight"]) == 1
    write_tensors_sharded(tensors, tmp_path / "one", 2**31, metadata={"format": "pt"})
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [SINGLE_NAME]


def test_shards_come_from_a_producer_one_tensor_or_one_block_of_rows_at_a_time(tmp_path):
    big = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    specs = [("a", "F32", [6, 4]), ("b", "F32", [3])]
    produced = iter([(big[i:i + 2] for i in range(0, 6, 2)), torch.ones(3)])
    write_sharded(tmp_path, specs, produced, 2**20, metadata={"format": "pt"})
    with safe_open(str(tmp_path / SINGLE_NAME), "pt") as f:
        assert torch.equal(f.get_tensor("a"), big) and torch.equal(f.get_tensor("b"), torch.ones(3))


def test_a_shard_that_cannot_be_written_is_named(tmp_path):
    with pytest.raises(OSError, match=r"writing model.safetensors \(shard 1 of 1\) failed"):
        write_sharded(tmp_path / "missing-folder", [("a", "F32", [2])], [torch.ones(2)], 2**20)


def test_the_finite_check_names_each_tensor_with_nan_or_inf_and_counts_them():
    ok = torch.ones(4)
    bad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")], dtype=torch.bfloat16)
    integers = torch.arange(4)
    assert nonfinite_counts([("ok", ok), ("layers.0.weight", bad), ("ids", integers),
                             ("empty", torch.empty(0))]) == [("layers.0.weight", 3)]
    assert all_finite(ok) and not all_finite(bad) and all_finite(integers)
    assert not all_finite(torch.tensor([70000.0]), limit=torch.finfo(torch.float16).max)


def test_headers_are_checked_and_a_damaged_file_is_named(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(4)}, path, metadata={"format": "pt"})
    header = read_safetensors_header(path)
    assert header["w"]["shape"] == [4] and header["__metadata__"] == {"format": "pt"}
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ModelLoadError, match=f"{path}: truncated or corrupt safetensors file"):
        read_safetensors_header(path)


def test_a_peft_adapter_folder_needs_its_config_and_safetensors_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        peft_adapter_header(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        peft_adapter_header(tmp_path)
    save_file({"x.lora_A.weight": torch.ones(2, 3)}, tmp_path / "adapter_model.safetensors")
    assert list(peft_adapter_header(tmp_path)) == ["x.lora_A.weight"]
