"""Bad merge inputs are refused or stopped with a message naming the file or tensor, and nothing on
disk is half-written: adapters from other bases, shape and vocab mismatches (found from configs and
safetensors headers before any weight is read), a missing shard, NaN or inf in a tensor, a full
disk during export, an existing output folder, and a kill during export."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from peft import RoadConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from merge.dense import merge_folders
from workbench.models import ModelLoadError
from helpers import folder_tensors, save_random_lora

ROOT = Path(__file__).resolve().parents[1]


def tiny(hidden: int = 32, vocab: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False))


def save_model(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


def lora_on(base: Path, model, folder: Path, seed: int = 1) -> Path:
    return save_random_lora(model, folder, r=2, alpha=4, seed=seed, base=base)


def road_on(base: Path, folder: Path) -> Path:
    model = get_peft_model(tiny(), RoadConfig(group_size=8, target_modules="all-linear"))
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(folder)
    return folder



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    base = save_model(tiny(), root / "base")
    full = tiny()
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.01)
    return {"root": root, "base": base, "full": save_model(full, root / "full"),
            "lora": lora_on(base, tiny(), root / "lora")}


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Make every way the merge reads a weight fail loudly: a check that passes this was made from
    configs and headers alone."""
    import adapters.mixda
    import adapters.prompt
    import adapters.road
    import workbench.io
    import workbench.task_vector

    def refuse(*args, **kwargs):
        raise AssertionError(f"a weight was read before the pre-flight checks: {args[:1]}")

    monkeypatch.setattr(workbench.io.ShardReader, "__call__", refuse)
    monkeypatch.setattr(workbench.task_vector, "safe_open", refuse)
    for module in (adapters.road, adapters.prompt, adapters.mixda):
        monkeypatch.setattr(module, "load_file", refuse)


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    assert not out.with_name(f".{out.name}.partial").exists(), "a partial folder remains"


# ----------------------------------------------------------------------------------------------
# Different bases, shapes, vocabularies: pre-flight, before any weight is read


def test_adapters_trained_on_different_bases_are_refused(world, tmp_path):
    """Bases of one architecture pass the pre-flight checks; the refusal then measures how far
    apart they are, which reads their weights (tests/test_merge_bases.py checks the measure)."""
    from workbench.recipes import MergeInput, MergeRecipe
    from workbench.stages import run_merge
    from workbench.workspace import Workspace

    other_base = save_model(tiny(seed=1), tmp_path / "other_base")
    other_lora = tmp_path / "other_lora"
    shutil.copytree(world["lora"], other_lora)
    config = json.loads((other_lora / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(other_base)
    (other_lora / "adapter_config.json").write_text(json.dumps(config))
    ws = Workspace(tmp_path / "ws")
    recipe = MergeRecipe(inputs=[MergeInput(path=str(world["lora"])), MergeInput(path=str(other_lora))])
    with pytest.raises(ModelLoadError, match=r"the inputs come from different bases .*other_base"):
        run_merge(recipe, ws)
    assert not ws.runs(), "no run was started"


def test_adapters_trained_on_a_base_of_another_architecture_are_refused(world, tmp_path, no_weight_reads):
    from workbench.recipes import MergeInput, MergeRecipe, ModelSpec
    from workbench.stages import run_merge
    from workbench.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    # onto an explicit base of another architecture: the adapter's own base config says so
    wide_base = save_model(tiny(hidden=48), tmp_path / "wide_base")
    wide_lora = lora_on(wide_base, tiny(hidden=48), tmp_path / "wide_lora")
    recipe = MergeRecipe(base=ModelSpec(path=str(world["base"])), inputs=[MergeInput(path=str(wide_lora))])
    with pytest.raises(ValueError, match=r"wide_base/config.json: hidden_size 48, but the base .*has 32"):
        run_merge(recipe, ws)
    # without `base:`, next to an adapter of the other architecture: the same, before any weight is read
    recipe = MergeRecipe(inputs=[MergeInput(path=str(world["lora"])), MergeInput(path=str(wide_lora))])
    with pytest.raises(ValueError, match=r"wide_base/config.json: hidden_size 48, but the base .*has 32"):
        run_merge(recipe, ws)
    assert not ws.runs(), "no run was started"


def test_shape_mismatch_names_the_tensor_before_any_weight_is_read(world, tmp_path, no_weight_reads):
    base, out = world["base"], tmp_path / "out"
    # a full model whose config matches but one tensor's header does not
    bad = tmp_path / "bad_full"
    shutil.copytree(world["full"], bad)
    tensors = load_file(world["full"] / "model.safetensors")  # the test's own (unpatched) reader
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:60]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor model.layers.1.mlp.up_proj.weight: shape \(60, 32\) in "
                                         r".*bad_full but \(64, 32\) in the base"):
        merge_folders(base, [(bad, 1.0)], out)
    assert_nothing_written(out)
    # a LoRA adapter whose factors fit another shape
    wide = lora_on(base, tiny(hidden=48), tmp_path / "wide_lora")
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.down_proj.weight: shape \(32, 64\) "
                                         r"in the base but the adapter .*wide_lora updates shape \(48, 64\)"):
        merge_folders(base, [(world["lora"], 1.0), (wide, 1.0)], out)
    assert_nothing_written(out)
    # a RoAd adapter whose rotation has another width than the layer it rotates
    road = road_on(base, tmp_path / "road")
    header_tensors = {}
    for key, value in load_file(road / "adapter_model.safetensors").items():
        header_tensors[key] = torch.cat([value, value]) if "layers.0.mlp.down_proj" in key else value
    save_file(header_tensors, road / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.down_proj.weight: 32 outputs in "
                                         r"the base, but .*down_proj.road_alpha in .*road has shape \(32,\)"):
        merge_folders(base, [(road, 1.0), (world["full"], 1.0)], out)
    assert_nothing_written(out)


def test_vocab_mismatch_is_refused_from_config_and_headers(world, tmp_path, no_weight_reads):
    base, out = world["base"], tmp_path / "out"
    bigger = save_model(tiny(vocab=80), tmp_path / "vocab80")
    with pytest.raises(ValueError, match=r"vocab80/config.json: vocab_size 80, but the base .*has 64"):
        merge_folders(base, [(bigger, 1.0)], out)
    config = json.loads((bigger / "config.json").read_text())
    config["vocab_size"] = 64  # a config that lies: the embedding's header still has 80 rows
    (bigger / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor (model.embed_tokens|lm_head).weight: shape \(80, 32\)"):
        merge_folders(base, [(bigger, 1.0)], out)
    assert_nothing_written(out)


# ----------------------------------------------------------------------------------------------
# Missing shard, NaN or inf


def test_missing_shard_is_named(world, tmp_path):
    sharded = save_model(tiny(), tmp_path / "sharded_base", max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    (sharded / shards[1]).unlink()
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=rf"shard {shards[1]} is listed in "
                                                r"model.safetensors.index.json but missing"):
        merge_folders(sharded, [(world["lora"], 1.0)], out)
    assert_nothing_written(out)
    # a sharded input model with a missing shard, merged onto an intact base
    model_in = save_model(tiny(), tmp_path / "sharded_input", max_shard_size="20KB")
    (model_in / shards[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"sharded_input: shard {shards[-1]} is listed"):
        merge_folders(world["base"], [(model_in, 1.0)], out)
    assert_nothing_written(out)


def test_nan_or_inf_in_a_tensor_is_named_and_nothing_is_written(world, tmp_path):
    base, out = world["base"], tmp_path / "out"
    broken = tmp_path / "nan_full"
    shutil.copytree(world["full"], broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.self_attn.v_proj.weight"][3, 4] = float("nan")
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor model.layers.1.self_attn.v_proj.weight: NaN or inf in "
                                         r".*nan_full/model.safetensors"):
        merge_folders(base, [(broken, 0.5), (world["lora"], 1.0)], out, max_shard_bytes=8_000)
    assert_nothing_written(out)
    road = road_on(base, tmp_path / "inf_road")
    tensors = load_file(road / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.up_proj.road_theta"
    tensors[key][2] = float("inf")
    save_file(tensors, road / "adapter_model.safetensors")
    with pytest.raises(ValueError,
                       match=r"tensor .*layers.0.mlp.up_proj.road_theta: NaN or inf in .*inf_road"):
        merge_folders(base, [(road, 1.0)], out)
    with pytest.raises(ValueError, match=r"layers.0.mlp.up_proj.road_theta in .*inf_road holds NaN or inf"):
        merge_folders(base, [(road, 1.0), (world["full"], 1.0)], out, method="ties")
    assert_nothing_written(out)
    # a merge that overflows the base's dtype is stopped too
    with pytest.raises(ValueError, match=r"tensor .*: NaN or inf in the merged result \(from values "
                                         r"beyond the range of torch.float16\)"):
        half = save_model(tiny().half(), tmp_path / "half_base")
        merge_folders(half, [(world["lora"], 1e6)], out)
    assert_nothing_written(out)


# ----------------------------------------------------------------------------------------------
# Disk full, existing output, kill during export


def test_disk_full_during_export_stops_cleanly(world, tmp_path, monkeypatch):
    import workbench.io as wio

    written = []
    real_write = wio.write_shard

    def filling_disk(path, specs, tensors, metadata=None):
        if written:  # the second shard does not fit: it fails half-way through its tensors
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, specs, tensors, metadata=metadata)
        written.append(Path(path).name)

    monkeypatch.setattr(wio, "write_shard", filling_disk)
    out, n = tmp_path / "out", _shard_count(world["base"])
    with pytest.raises(OSError, match=rf"writing model-00002-of-{n:05d}.safetensors \(shard 2 of {n}\) "
                                      r"failed: No space left on device") as info:
        merge_folders(world["base"], [(world["lora"], 1.0), (world["full"], 0.3)], out,
                      max_shard_bytes=20_000)
    assert info.value.errno == errno.ENOSPC
    assert written == [f"model-00001-of-{n:05d}.safetensors"], "one shard was on disk when it failed"
    assert_nothing_written(out)


def test_existing_output_folder_is_refused_and_untouched(world, tmp_path):
    road = road_on(world["base"], tmp_path / "road")
    for inputs, output in (([world["lora"]], "model"), ([world["lora"]], "adapter"),
                           ([road], "adapter"), ([world["lora"], world["full"]], "model")):
        out = tmp_path / "taken"
        out.mkdir(exist_ok=True)
        (out / "keep.txt").write_text("mine")
        with pytest.raises(FileExistsError, match=r"taken: output folder already exists"):
            merge_folders(world["base"], [(f, 1.0) for f in inputs], out, output=output)
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
        assert not (tmp_path / ".taken.partial").exists()


KILLED_EXPORT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import workbench.io as wio

    real_write = wio.write_shard

    def write_then_pause(path, specs, tensors, metadata=None):
        real_write(path, specs, tensors, metadata=metadata)
        time.sleep(120)  # after each shard: the parent kills the export here, mid-way

    wio.write_shard = write_then_pause
    from merge.dense import merge_folders

    base, lora, full, out = map(Path, sys.argv[1:5])
    merge_folders(base, [(lora, 1.0), (full, 0.3)], out, max_shard_bytes=20_000)
""")


def test_kill_during_export_leaves_the_target_untouched_and_a_rerun_succeeds(world, tmp_path):
    base, lora, full = world["base"], world["lora"], world["full"]
    out = tmp_path / "merged"
    partial = tmp_path / ".merged.partial"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", KILLED_EXPORT, str(base), str(lora), str(full), str(out)],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(partial.glob("*.safetensors")):  # bounded poll for the first written shard
            assert child.poll() is None, child.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the export wrote no shard in 120 s"
            time.sleep(0.05)
        first = sorted(partial.glob("*.safetensors"))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert [p.name for p in first] == [f"model-00001-of-{_shard_count(base):05d}.safetensors"]
    assert not out.exists(), "the target must not appear from a killed export"
    assert partial.exists(), "the killed export's partial folder is left for the next export to clear"
    merge_folders(base, [(lora, 1.0), (full, 0.3)], out, max_shard_bytes=20_000)  # the rerun
    assert not partial.exists()
    reference = merge_folders(base, [(lora, 1.0), (full, 0.3)], tmp_path / "clean",
                              max_shard_bytes=20_000)
    got, expected = folder_tensors(out), folder_tensors(reference)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}


def _shard_count(base: Path) -> int:
    from workbench.io import model_layout, plan_shards

    return len(plan_shards(((name, entry[3]) for name, entry in model_layout(base).items()), 20_000))
