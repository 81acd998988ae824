"""The mergekit bridge: the same merges through mergekit and through our engine, tensor by tensor;
our merges exported as mergekit YAML and run back through mergekit; a mergekit YAML as a stage of a
pipeline; readable errors for bad YAML.

Tolerance. DESIGN.md's target for full-model task arithmetic and TIES is fp32 max abs diff ≤ 1e-6,
and that is what these tests assert for float32 models. Both engines take the deltas, weights, sign
vote, divisor and λ in float32 with the same operations in the same order, add them to the base in
float32 and cast once to the storage dtype, so the measured difference is 0 (bit for bit). A
bfloat16 base is checked with the same 1e-6 bound on the float32 view of the stored values, which
then also means bit for bit: two bfloat16 values of these weights' size differ by at least 2^-14.
LoRA inputs differ by float32 rounding only: mergekit's `base+lora` has PEFT store W + s·B·A and
then subtracts W again, so each entry moves by at most an ulp of |W| (about 1e-7 here); 1e-6 holds.
DARE with p > 0 cannot be compared tensor for tensor (see test_dare_draws_different_masks_...).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import mergekit  # noqa: F401  (in the test extra: these tests fail, not skip, without it)
import pytest
import torch
import yaml

from helpers import add_noise, folder_tensors, save_random_lora
from merge.mergekit_bridge import (MergekitConfigError, MergekitRunError, MergekitUnsupported,
                                   check_mergekit_config, mergekit_parameters, run_mergekit_config,
                                   to_mergekit_yaml)
from workbench.task_vector import LoraTaskVector
from workbench.cli import main
from workbench.models import ModelLoadError, ModelSource
from workbench.recipes import MergeInput, MergeRecipe, ModelSpec, RecipeError, parse_recipe
from workbench.stages import run_merge
from workbench.workspace import Workspace

TOLERANCE = 1e-6
VOCAB = 96


def _llama(seed: int, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _save(model, folder: Path, dtype=torch.float32) -> Path:
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    return folder


def _family(root: Path, dtype=torch.float32, n: int = 3) -> tuple[Path, list[Path]]:
    """A tiny Llama base and n fine-tunes of it (the base plus seeded noise of different sizes)."""
    base = _llama(0)
    base_folder = _save(base, root / "base", dtype)
    tuned = []
    for i in range(n):
        model = add_noise(_llama(0), seed=100 + i, scale=0.01 * (i + 1))
        tuned.append(_save(model, root / f"tuned-{i}", dtype))
    return base_folder, tuned


def _lora(base_folder: Path, folder: Path, seed: int) -> Path:
    """A PEFT LoRA adapter of the base with random (non-zero) A and B."""
    from transformers import AutoModelForCausalLM

    return save_random_lora(AutoModelForCausalLM.from_pretrained(base_folder), folder, r=4, alpha=8,
                            seed=seed, scale=0.1, target_modules=["q_proj", "v_proj", "up_proj"])


def _max_diff(ours: Path, theirs: Path) -> float:
    """Max abs difference over every tensor, in float32; names and dtypes must match."""
    a, b = folder_tensors(ours), folder_tensors(theirs)
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    worst = 0.0
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        worst = max(worst, (a[name].float() - b[name].float()).abs().max().item())
    return worst


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return _family(tmp_path_factory.mktemp("mergekit-family"))


# Our recipe and the mergekit YAML a user would write for the same merge (mergekit's docs' keys).
CASES = {
    "task_arithmetic": (
        "task_arithmetic", {"scale": 1.5}, [0.7, -0.3, 0.5],
        {"merge_method": "task_arithmetic", "parameters": {"lambda": 1.5}}, {}),
    "ties_weight_sum": (
        "ties", {"density": 0.4, "ties_divisor": "weight_sum", "scale": 0.8}, [1.0, 0.5, 2.0],
        {"merge_method": "ties", "parameters": {"lambda": 0.8}}, {"density": 0.4}),
    "ties_paper_defaults_unit_weights": (  # count divisor = mergekit's normalize when every w = 1
        "ties", {"density": 0.3}, [1.0, 1.0, 1.0],
        {"merge_method": "ties", "parameters": {"normalize": True}}, {"density": 0.3}),
    "ties_no_divisor": (
        "ties", {"density": 0.5, "ties_divisor": "none"}, [0.6, 0.9, 0.3],
        {"merge_method": "ties", "parameters": {"normalize": False}}, {"density": 0.5}),
    "dare_ties_without_drop": (
        "dare_ties", {"p": 0.0, "ties_divisor": "none"}, [0.6, 0.9, 0.3],
        {"merge_method": "dare_ties"}, {"density": 1.0}),
}


def _hand_yaml(base: Path, tuned: list[Path], weights, shared: dict, per_model: dict) -> dict:
    return {**shared, "base_model": str(base), "dtype": "float32",
            "models": [{"model": str(m), "parameters": {"weight": w, **per_model}}
                       for m, w in zip(tuned, weights)]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_merge_through_mergekit_and_ours_is_identical(family, tmp_path, case):
    base, tuned = family
    method, params, weights, shared, per_model = CASES[case]
    ws = Workspace(tmp_path / "ws")
    recipe = MergeRecipe(name=case, base=ModelSpec(path=str(base)), method=method, parameters=params,
                         inputs=[MergeInput(path=str(m), weight=w) for m, w in zip(tuned, weights)])
    run = run_merge(recipe, ws)
    ours = run.path("model")

    theirs = tmp_path / "mergekit-hand"
    run_mergekit_config(_hand_yaml(base, tuned, weights, shared, per_model), theirs)
    assert _max_diff(ours, theirs) <= TOLERANCE

    exported = run.path("mergekit.yaml")  # written by the merge run itself
    assert exported.is_file(), run.path("run.log").read_text() if run.path("run.log").exists() else ""
    round_trip = tmp_path / "mergekit-exported"
    run_mergekit_config(exported, round_trip)
    assert _max_diff(ours, round_trip) <= TOLERANCE
    assert json.loads((round_trip / "config.json").read_text())["num_hidden_layers"] == 2


def _tie_at_the_cut(taus: list[torch.Tensor], density: float) -> torch.Tensor:
    """Entries where some task vector's magnitude equals its k-th largest and that magnitude is
    shared by entries on both sides of the top-k cut (so which of them TIES keeps is arbitrary)."""
    flags = torch.zeros_like(taus[0], dtype=torch.bool)
    for tau in taus:
        magnitude = tau.abs().flatten()
        k = max(1, int(density * magnitude.numel()))
        kth = magnitude.sort(descending=True).values[k - 1]
        if int((magnitude >= kth).sum()) > k:
            flags |= (tau.abs() == kth)
    return flags


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_bfloat16_storage_matches_bit_for_bit_except_ties_at_the_cut(tmp_path, method):
    """bfloat16 has 8 significant bits, so many deltas share a magnitude and TIES's top-k cut often
    falls among equal magnitudes; we keep the earlier entries (stable sort), mergekit's argsort is
    not stable. Everything else is bit for bit."""
    base, tuned = _family(tmp_path / "bf16", dtype=torch.bfloat16, n=2)
    params = {"density": 0.5, "ties_divisor": "weight_sum"} if method == "ties" else {}
    run = run_merge(MergeRecipe(base=ModelSpec(path=str(base)), method=method, parameters=params,
                                inputs=[MergeInput(path=str(m), weight=w)
                                        for m, w in zip(tuned, [0.8, 0.4])]), Workspace(tmp_path / "ws"))
    exported = yaml.safe_load(run.path("mergekit.yaml").read_text())
    assert exported["dtype"] == "float32" and exported["out_dtype"] == "bfloat16"
    theirs = tmp_path / "theirs"
    run_mergekit_config(run.path("mergekit.yaml"), theirs)
    ours, mk, b = folder_tensors(run.path("model")), folder_tensors(theirs), folder_tensors(base)
    t = [folder_tensors(m) for m in tuned]
    assert sorted(ours) == sorted(mk)
    differing = 0
    for name in ours:
        assert ours[name].dtype == mk[name].dtype == torch.bfloat16
        differs = ours[name] != mk[name]
        if method == "ties":
            taus = [m[name].float() - b[name].float() for m in t]
            assert not (differs & ~_tie_at_the_cut(taus, 0.5)).any(), name
        else:
            assert not differs.any(), name
        differing += int(differs.sum())
    if method == "ties":
        assert differing < 100, "only a few entries sit at a cut among equal magnitudes"


def test_lora_inputs_are_exported_as_base_plus_lora(family, tmp_path):
    base, _ = family
    adapters = [_lora(base, tmp_path / f"lora-{i}", seed=i) for i in range(2)]
    ws = Workspace(tmp_path / "ws")
    for method, params in (("task_arithmetic", {"scale": 0.9}),  # our exact factored LoRA path
                           ("ties", {"density": 0.5, "ties_divisor": "weight_sum"})):
        run = run_merge(MergeRecipe(name=method, method=method, parameters=params,
                                    inputs=[MergeInput(path=str(a), weight=w)
                                            for a, w in zip(adapters, [0.7, 0.4])]), ws)
        exported = yaml.safe_load(run.path("mergekit.yaml").read_text())
        assert [m["model"] for m in exported["models"]] == [f"{base}+{a}" for a in adapters]
        theirs = tmp_path / f"theirs-{method}"
        run_mergekit_config(run.path("mergekit.yaml"), theirs)
        assert _max_diff(run.path("model"), theirs) <= TOLERANCE, method
    # And by hand: base + 0.9·Σ w_i s_i B_i A_i on an adapted weight.
    name = "model.layers.1.self_attn.q_proj.weight"
    dense = [LoraTaskVector.from_peft_folder(a).dense()[name] for a in adapters]
    by_hand = folder_tensors(base)[name] + 0.9 * (0.7 * dense[0] + 0.4 * dense[1])
    assert (folder_tensors(tmp_path / "theirs-task_arithmetic")[name] - by_hand).abs().max() <= TOLERANCE


def _command_in_comment(mergekit_yaml: Path) -> list[str]:
    """The one `mergekit-yaml ...` command the file's comments tell the user to run."""
    commands = [line.lstrip("#").strip() for line in mergekit_yaml.read_text().splitlines()
                if line.startswith("#") and line.lstrip("# ").startswith("mergekit-yaml ")]
    assert len(commands) == 1, mergekit_yaml.read_text()
    return shlex.split(commands[0])


@pytest.mark.slow
def test_the_command_written_beside_a_lora_merge_runs_and_gives_our_model(family, tmp_path):
    """mergekit-yaml merges `base+lora` references only with --lora-merge-cache; the command in the
    comment is run as written (from the run folder, with mergekit's own CLI) and must give our model."""
    base, _ = family
    adapters = [_lora(base, tmp_path / f"lora-{i}", seed=10 + i) for i in range(2)]
    run = run_merge(MergeRecipe(name="cli", parameters={"scale": 0.9},
                                inputs=[MergeInput(path=str(a), weight=w)
                                        for a, w in zip(adapters, [0.7, -0.4])]), Workspace(tmp_path / "ws"))
    command = _command_in_comment(run.path("mergekit.yaml"))
    assert command[:2] == ["mergekit-yaml", "mergekit.yaml"] and "--lora-merge-cache" in command
    cli = Path(sys.executable).with_name("mergekit-yaml")  # mergekit's entry point in this environment
    done = subprocess.run([str(cli), *command[1:]], cwd=run.folder, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _max_diff(run.path("model"), run.folder / command[2]) <= TOLERANCE


def test_instruction_vector_is_exported_as_task_arithmetic(family, tmp_path):
    base, (domain, instruct, _) = family
    recipe = MergeRecipe(method="instruction_vector", parameters={"alpha": 0.6},
                         base=ModelSpec(path=str(base)),
                         inputs=[MergeInput(path=str(domain), role="domain"),
                                 MergeInput(path=str(instruct), role="instruct")])
    sources = [ModelSource(ref=str(domain), folder=domain), ModelSource(ref=str(instruct), folder=instruct)]
    text = to_mergekit_yaml(recipe, sources, ModelSource(ref=str(base), folder=base))
    config = yaml.safe_load(text)
    assert [m["parameters"]["weight"] for m in config["models"]] == [1.0, 0.6]
    run_mergekit_config(config, tmp_path / "theirs")
    theirs, b, d, i = (folder_tensors(f) for f in (tmp_path / "theirs", base, domain, instruct))
    for name in theirs:  # θ_domain + α(θ_inst − θ_base), up to float32 rounding
        assert (theirs[name] - (d[name] + 0.6 * (i[name] - b[name]))).abs().max() <= TOLERANCE, name


def test_dare_draws_different_masks_but_follows_the_same_law(family, tmp_path):
    """mergekit draws DARE's masks with torch.bernoulli from the global generator in its execution
    order; we draw them per tensor from a generator seeded by (seed, tensor name), so the two
    masks differ. What must agree is the law: survivors kept with probability 1 − p and rescaled to
    the task vector's L1 norm (our dare_rescale: l1_norm = mergekit's rescale: true). We check that
    law on each side's own mask, and that p = 0 is exact (test above)."""
    base, (tuned, *_) = family
    p, weight = 0.3, 0.8
    ws = Workspace(tmp_path / "ws")
    run = run_merge(MergeRecipe(base=ModelSpec(path=str(base)), method="dare", seed=3,
                                parameters={"p": p, "dare_rescale": "l1_norm"},
                                inputs=[MergeInput(path=str(tuned), weight=weight)]), ws)
    text = run.path("mergekit.yaml").read_text()
    assert "in distribution, not tensor for tensor" in text
    config = yaml.safe_load(text)
    assert config["merge_method"] == "dare_linear" and config["parameters"]["rescale"] is True
    assert config["models"][0]["parameters"]["density"] == pytest.approx(1 - p)
    run_mergekit_config(config, tmp_path / "theirs", seed=3)

    b, t = folder_tensors(base), folder_tensors(tuned)
    kept_fraction = {}
    for side, folder in (("ours", run.path("model")), ("mergekit", tmp_path / "theirs")):
        merged, kept, total = folder_tensors(folder), 0, 0
        for name in b:
            tau = t[name] - b[name]
            delta = merged[name] - b[name]
            mask = delta != 0
            # Rescale law: survivors = w · τ · ‖τ‖₁ / ‖m ⊙ τ‖₁.
            expected = weight * tau * mask * (tau.abs().sum() / (tau * mask).abs().sum())
            assert (delta - expected).abs().max() <= TOLERANCE, (side, name)
            kept, total = kept + int(mask.sum()), total + mask.numel()
        kept_fraction[side] = kept / total
    # ~27k entries: the kept fraction's standard deviation is about 0.003.
    assert kept_fraction["ours"] == pytest.approx(1 - p, abs=0.02)
    assert kept_fraction["mergekit"] == pytest.approx(1 - p, abs=0.02)
    name = "model.embed_tokens.weight"  # same seed, different generators: different masks
    ours_mask = folder_tensors(run.path("model"))[name] != b[name]
    assert not torch.equal(ours_mask, folder_tensors(tmp_path / "theirs")[name] != b[name])


@pytest.mark.parametrize(("method", "params", "weights", "message"), [
    ("ties", {}, [1.0, 0.5], r"ties_divisor: 'count' has no mergekit equivalent unless every weight is 1"),
    ("ties", {"sign_vote": "unweighted", "ties_divisor": "weight_sum"}, [2.0, 1.0],
     r"sign_vote: 'unweighted' has no mergekit equivalent"),
    ("dare", {"p": 0.2}, [1.0, 1.0], r"dare_rescale: 'inverse_keep' .* has no mergekit equivalent"),
    ("dare_ties", {"p": 0.2, "dare_rescale": "inverse_keep", "ties_divisor": "none"}, [1.0, 1.0],
     r"dare_rescale: 'inverse_keep'"),
])
def test_options_without_a_mergekit_equivalent_are_refused(method, params, weights, message):
    with pytest.raises(MergekitUnsupported, match=message):
        mergekit_parameters(method, params, weights)


def test_mapped_options(family):
    assert mergekit_parameters("ties", {"ties_divisor": "weight_sum", "density": 0.2}, [2.0, 1.0])[:3] == (
        "ties", {"lambda": 1.0, "normalize": True, "rescale": False}, {"density": 0.2})
    assert mergekit_parameters("dare", {"p": 0.25, "dare_rescale": "l1_norm"}, [1.0]) == (
        "dare_linear", {"lambda": 1.0, "normalize": False, "rescale": True}, {"density": 0.75}, False)
    assert mergekit_parameters("dare", {"p": 0.0}, [1.0])[3] is True  # no drop: exact


def test_merge_runs_without_an_equivalent_write_no_yaml_and_say_why(family, tmp_path):
    base, tuned = family
    ws = Workspace(tmp_path / "ws")
    run = run_merge(MergeRecipe(base=ModelSpec(path=str(base)), method="ties",
                                inputs=[MergeInput(path=str(tuned[0]), weight=1.0),
                                        MergeInput(path=str(tuned[1]), weight=0.5)]), ws)
    assert run.info["status"] == "done" and not run.path("mergekit.yaml").exists()
    assert "no mergekit.yaml: ties_divisor: 'count'" in run.path("run.log").read_text()


def test_lora_that_mergekit_cannot_merge_exactly_is_refused(family, tmp_path):
    base, _ = family
    adapter = _lora(base, tmp_path / "dora", seed=0)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    recipe = MergeRecipe(inputs=[MergeInput(path=str(adapter))])
    source = ModelSource(ref=str(adapter), folder=base, adapter=adapter)
    with pytest.raises(MergekitUnsupported, match="no exact mergekit `model\\+lora` equivalent: .*DoRA"):
        to_mergekit_yaml(recipe, [source], ModelSource(ref=str(base), folder=base))
    with pytest.raises(MergekitUnsupported, match="output: adapter"):
        to_mergekit_yaml(recipe.model_copy(update={"output": "adapter"}), [source],
                         ModelSource(ref=str(base), folder=base))


# ----------------------------------------------------------------------------------------------
# mergekit YAML as a stage


@pytest.mark.slow
def test_mergekit_stage_in_a_pipeline_with_stage_refs(workspace, tmp_path, capsys):
    """`workbench run` of a pipeline: train a LoRA, then a mergekit YAML file that refers to it as
    `stage:lora` (a LoRA run stands for mergekit's base+lora) and to the embedded base."""
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": "default", "dtype": "float32",
        "models": [{"model": "stage:lora", "parameters": {"weight": 0.5}}]}))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"kind": "pipeline", "name": "lora-then-mergekit", "stages": [
        {"kind": "train", "name": "lora", "model": {"path": "default"},
         "data": {"world_size": "tiny", "seq_len": 64, "replay_ratio": 0.25},
         "adapter": {"method": "lora", "r": 4, "alpha": 8},
         "train": {"lr": 5e-3, "batch_size": 8, "max_steps": 6, "checkpoint_every": 0,
                   "warmup_ratio": 0.0}, "eval": None},
        {"kind": "mergekit", "name": "merged", "config": str(config), "world": {"size": "tiny"},
         "seq_len": 64, "eval": {"max_tokens": 512, "max_questions": 2}},
    ]}, sort_keys=False))
    assert main(["run", str(pipeline), "-w", str(workspace.root)]) == 0
    assert "merged" in capsys.readouterr().out

    runs = {r.info["kind"]: r for r in workspace.runs()}
    lora, merged = runs["train"], runs["mergekit"]
    assert merged.info["status"] == "done" and lora.id in merged.info["parents"]
    recipe = yaml.safe_load(merged.path("recipe.yaml").read_text())
    assert recipe["config"]["models"][0]["model"] == f"run:{lora.id}", "the file was read and bound"
    ran = yaml.safe_load(merged.path("mergekit.yaml").read_text())
    base_folder = Path(ran["base_model"])
    assert ran["models"][0]["model"] == f"{base_folder}+{lora.path('adapter')}"
    summary = json.loads(merged.path("summary.json").read_text())
    assert "domain_gain_pct" in summary and summary["base"] == "default"
    assert merged.info["outputs"]["base"].startswith("run:"), "a later merge finds its base"

    base = folder_tensors(base_folder)
    out = folder_tensors(merged.path("model"))
    update = LoraTaskVector.from_peft_folder(lora.path("adapter")).dense()
    assert sorted(out) == sorted(base)
    for name in base:  # base + 0.5·s·B·A where adapted, the base elsewhere
        expected = base[name] + 0.5 * update[name] if name in update else base[name]
        assert (out[name] - expected).abs().max() <= TOLERANCE, name
    assert (merged.path("model") / "tokenizer.json").is_file()


def test_bad_mergekit_yaml_gives_a_readable_error(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"kind": "mergekit", "config": {
        "merge_methd": "ties", "models": [{"model": "a", "parameters": {"weight": 1.0}}]}}))
    assert main(["run", str(recipe), "-w", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: config:" in err
    assert "merge_methd: unknown key 'merge_methd'; did you mean 'merge_method'?" in err
    assert not (tmp_path / "ws" / "runs").exists(), "a bad recipe creates no run"

    cases = [
        ({"merge_method": "tie", "models": [{"model": "a"}]},
         "merge_method: unknown method 'tie'; did you mean 'ties'?"),
        ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"densty": 0.5}}]},
         "models.0.parameters.densty: unknown parameter of ties; did you mean 'density'?"),
        ({"merge_method": "ties", "models": [{"model": "a"}], "slices": [{"sources": []}]},
         "Exactly one of 'models', 'slices', or 'modules' must be present"),
        ({"merge_method": "linear", "models": [{"model": "a", "layer_range": [0, 2]}]},
         "models.0.layer_range: unknown key 'layer_range'"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "dtype": 16},
         "dtype: Input should be a valid string (got 16)"),
    ]
    for config, message in cases:
        with pytest.raises(MergekitConfigError) as info:
            check_mergekit_config(config)
        assert message in str(info.value), str(info.value)
    with pytest.raises(RecipeError, match="r.yaml: config: Value error, mergekit YAML file '.*nothing.yaml' "
                       "not found"):
        parse_recipe({"kind": "mergekit", "config": str(tmp_path / "nothing.yaml")}, "r.yaml")


def test_missing_model_and_failed_merge_leave_nothing(family, tmp_path):
    base, tuned = family
    out = tmp_path / "out"
    with pytest.raises(ModelLoadError, match=r"models.1.model: model '/no/such/model' not found"):
        run_mergekit_config({"merge_method": "linear", "models": [
            {"model": str(tuned[0]), "parameters": {"weight": 1.0}},
            {"model": "/no/such/model", "parameters": {"weight": 1.0}}]}, out)
    wider = _save(_llama(1, hidden=48), tmp_path / "wider")
    with pytest.raises(MergekitRunError, match="mergekit failed"):
        run_mergekit_config({"merge_method": "linear", "models": [
            {"model": str(base), "parameters": {"weight": 1.0}},
            {"model": str(wider), "parameters": {"weight": 1.0}}]}, out)
    assert not out.exists() and not list(tmp_path.glob(".out*")), "no output, no partial folder"
    out.mkdir()
    with pytest.raises(FileExistsError):
        run_mergekit_config({"merge_method": "linear", "models": [
            {"model": str(base), "parameters": {"weight": 1.0}}]}, out)


def test_any_mergekit_method_runs_and_random_state_is_kept(family, tmp_path):
    """A method we do not have (SLERP), from workspace-relative folders; the caller's random
    stream is the same after the merge (mergekit reseeds the global generators)."""
    base, tuned = family
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir(parents=True)
    (ws.root / "models").symlink_to(base.parent, target_is_directory=True)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    run_mergekit_config({"merge_method": "slerp", "base_model": f"models/{base.name}",
                         "models": [{"model": f"models/{base.name}"}, {"model": f"models/{tuned[0].name}"}],
                         "parameters": {"t": 0.5}, "dtype": "float32"}, tmp_path / "slerp", ws, seed=9)
    assert torch.equal(torch.rand(3), expected)
    out, a, b = (folder_tensors(f) for f in (tmp_path / "slerp", base, tuned[0]))
    for name in out:  # mergekit's SLERP of each whole tensor at t = 0.5, by hand in float64
        x, y = a[name].double(), b[name].double()
        dot = float((x / x.norm()).flatten() @ (y / y.norm()).flatten())
        if abs(dot) > 0.9995:  # nearly parallel: mergekit interpolates linearly
            by_hand = 0.5 * x + 0.5 * y
        else:
            theta = math.acos(dot)
            by_hand = (math.sin(0.5 * theta) * x + math.sin(0.5 * theta) * y) / math.sin(theta)
        assert (out[name].double() - by_hand).abs().max() <= TOLERANCE, name
