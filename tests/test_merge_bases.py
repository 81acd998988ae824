"""Which base a merge goes onto: inputs trained on other bases than the one merged onto are refused
with how far apart the bases are (‖θ_a − θ_b‖ / ‖θ_b‖), unless the recipe allows it; an explicit
`base:` wins over the base an adapter records, which is then neither resolved nor downloaded."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from helpers import folder_tensors, lora_updates, random_lora_adapter
from merge.dense import relative_difference
from workbench.models import ModelLoadError, build_model_from_config
from workbench.recipes import MergeInput, MergeRecipe, ModelSpec
from workbench.stages import run_merge
from workbench.workspace import Workspace

VOCAB = 64
MEASURE = re.compile(r"‖θ_a − θ_b‖ / ‖θ_b‖ = ([0-9.eE+-]+) for a = ([^\s,]+), b = ([^\s;)]+)")


def _base(folder: Path, seed: int, **save_options) -> Path:
    """A tiny Llama base (llama-tiny, seeded) saved as a model folder."""
    build_model_from_config("llama-tiny", vocab_size=VOCAB, seed=seed).save_pretrained(
        folder, safe_serialization=True, **save_options)
    return folder


def _lora_on(base: str, folder: Path, seed: int) -> Path:
    """A LoRA adapter of llama-tiny's shapes with a non-zero update, recording `base` as its base."""
    return random_lora_adapter(folder, r=2, alpha=4, seed=seed, vocab_size=VOCAB, base=base)


def _relative_difference_by_hand(a: Path, b: Path) -> float:
    """‖θ_a − θ_b‖ / ‖θ_b‖ over every tensor, from whole tensors in float64."""
    ta, tb = folder_tensors(a), folder_tensors(b)
    squared_difference = sum(float((ta[k].double() - tb[k].double()).square().sum()) for k in tb)
    return math.sqrt(squared_difference / sum(float(tb[k].double().square().sum()) for k in tb))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two bases of one architecture (different seeds) and a LoRA adapter trained on each."""
    root = tmp_path_factory.mktemp("bases")
    a, b = _base(root / "base_a", seed=0), _base(root / "base_b", seed=1)
    return {"a": a.resolve(), "b": b.resolve(),
            "lora_a": _lora_on(str(a), root / "lora_a", seed=1),
            "lora_b": _lora_on(str(b), root / "lora_b", seed=2)}


def _measured(message: str) -> tuple[float, str, str]:
    """(relative difference, a, b) as a refusal or the run log states them."""
    found = MEASURE.search(message)
    assert found, message
    return float(found.group(1)), found.group(2), found.group(3)


def test_relative_difference_is_streamed_over_shards_and_equals_the_hand_computation(tmp_path):
    a = _base(tmp_path / "a", seed=3, max_shard_size="20KB")  # several shards, several row blocks
    b = _base(tmp_path / "b", seed=4)
    assert len(list(a.glob("*.safetensors"))) > 2
    assert relative_difference(a, b) == pytest.approx(_relative_difference_by_hand(a, b), rel=1e-5)
    assert relative_difference(b, a) == pytest.approx(_relative_difference_by_hand(b, a), rel=1e-5)
    assert relative_difference(a, a) == 0.0


def test_adapters_of_different_bases_are_refused_with_how_far_apart_the_bases_are(bases, tmp_path):
    ws = Workspace(tmp_path / "ws")
    inputs = [MergeInput(path=str(bases["lora_a"]), weight=0.6),
              MergeInput(path=str(bases["lora_b"]), weight=0.4)]
    by_hand = _relative_difference_by_hand(bases["b"], bases["a"])  # a = B trained on, b = A merged onto
    assert by_hand > 0.1

    with pytest.raises(ModelLoadError, match="the inputs come from different bases") as info:
        run_merge(MergeRecipe(inputs=inputs), ws)
    value, trained_on, onto = _measured(str(info.value))
    assert "allow_different_bases" in str(info.value)
    assert (trained_on, onto) == (str(bases["b"]), str(bases["a"]))
    assert value == pytest.approx(by_hand, rel=1e-3)  # printed with 4 significant digits

    onto_a = MergeRecipe(base=ModelSpec(path=str(bases["a"])), inputs=inputs)
    with pytest.raises(ModelLoadError, match=r"inputs 1 were trained on other bases than base: "
                                             r".*base_a .*allow_different_bases: true") as info:
        run_merge(onto_a, ws)
    assert _measured(str(info.value)) == (pytest.approx(by_hand, rel=1e-3), str(bases["b"]), str(bases["a"]))

    allowed = MergeRecipe(inputs=inputs, allow_different_bases=True)
    with pytest.raises(ModelLoadError, match=r"different bases .*set `base:` to the one to merge onto"):
        run_merge(allowed, ws)  # allowed, but which of the two bases to merge onto is the user's call
    assert not ws.runs(), "no run was started"

    run = run_merge(onto_a.model_copy(update={"allow_different_bases": True}), ws)
    [difference] = json.loads(run.path("summary.json").read_text())["different_bases"]
    assert difference["base"] == str(bases["a"]) and difference["trained_on"] == str(bases["b"])
    assert difference["inputs"] == [1]
    assert difference["relative_difference"] == pytest.approx(by_hand, rel=1e-5)
    logged = run.path("run.log").read_text()
    assert _measured(logged) == (pytest.approx(by_hand, rel=1e-3), str(bases["b"]), str(bases["a"]))
    merged, base = folder_tensors(run.path("model")), folder_tensors(bases["a"])
    updates = [lora_updates([(bases[k], 1.0)], torch.float32) for k in ("lora_a", "lora_b")]
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(merged[name], base[name] + 0.6 * updates[0][name] + 0.4 * updates[1][name],
                          atol=1e-6), "merged onto base: A"


def test_a_copy_of_the_base_in_another_folder_is_the_same_base(bases, tmp_path):
    copy = Path(shutil.copytree(bases["a"], tmp_path / "copy_of_a"))
    adapter = _lora_on(str(copy), tmp_path / "lora_on_copy", seed=5)
    inputs = [MergeInput(path=str(adapter)), MergeInput(path=str(bases["lora_a"]))]
    ws = Workspace(tmp_path / "ws")
    for base in (None, ModelSpec(path=str(bases["a"]))):  # the two inputs' own bases, or `base:` A
        run = run_merge(MergeRecipe(base=base, inputs=inputs), ws)
        assert run.info["status"] == "done" and "different_bases" not in run.info["summary"]


def test_explicit_base_wins_over_a_hub_id_the_adapter_records(bases, tmp_path, monkeypatch):
    """An adapter from the hub records a hub id as its base; `base:` names the local copy. The
    merge works offline, equals W + s·B·A, and never asks the hub for the recorded base."""
    import huggingface_hub

    import workbench.models

    adapter = Path(shutil.copytree(bases["lora_a"], tmp_path / "from_hub"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "someorg/some-model"}))
    recipe = MergeRecipe(base=ModelSpec(path=str(bases["a"])),
                         inputs=[MergeInput(path=str(adapter), weight=0.5)])
    ws = Workspace(tmp_path / "ws")

    offline = run_merge(recipe, ws)  # the tests run with HF_HUB_OFFLINE=1
    base, update = folder_tensors(bases["a"]), lora_updates([(adapter, 1.0)], torch.float32)
    merged = folder_tensors(offline.path("model"))
    assert sorted(merged) == sorted(base) and len(update) == 14
    for name in base:
        expected = base[name] + 0.5 * update[name] if name in update else base[name]
        assert torch.allclose(merged[name], expected, atol=1e-6), name
    log = offline.path("run.log").read_text()
    assert "'someorg/some-model' is not available on this machine" in log and "not checked" in log

    asked = []

    def hub_without_the_model(repo_id, **options):
        asked.append((repo_id, options.get("local_files_only")))
        raise FileNotFoundError(f"{repo_id}: not in the local cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_without_the_model)
    monkeypatch.setattr(workbench.models, "_hub_offline", lambda: False)  # as if the hub were reachable
    online = run_merge(recipe, ws)
    assert asked == [("someorg/some-model", True)], "only the local cache was looked at: nothing fetched"
    assert all(torch.equal(t, folder_tensors(offline.path("model"))[k])
               for k, t in folder_tensors(online.path("model")).items())
