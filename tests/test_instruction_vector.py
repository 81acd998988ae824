"""Instruction-vector merging θ = θ_domain + α(θ_inst − θ_base): every combination of full models
and LoRA adapters against the formula by hand, and the merge stage's cosine and side-by-side
report of base, instruct, domain and merged."""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import add_noise, random_lora_adapter, tiny_train_recipe
from workbench.methods import get_method
from merge.instruction_vector import instruction_vector_plan
from workbench.evaluate import evaluate_model
from workbench.models import ModelSource, build_model_from_config, load_model
from workbench.recipes import EvalSpec, MergeInput, MergeRecipe, ModelSpec, load_recipe
from workbench.stages import run_merge, run_train

VOCAB = 64
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "instruction-vector-merge.yaml"


def _save_perturbed(folder: Path, seed: int) -> Path:
    add_noise(build_model_from_config("llama-tiny", vocab_size=VOCAB), seed, 0.05).save_pretrained(
        folder, safe_serialization=True)
    return folder



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruction-vector")
    base = root / "base"
    build_model_from_config("llama-tiny", vocab_size=VOCAB).save_pretrained(base, safe_serialization=True)
    theta_base = load_file(base / "model.safetensors")
    lora = get_method("lora")
    sides = {}
    for role, seed, r in (("domain", 1, 2), ("instruct", 2, 4)):
        full = _save_perturbed(root / f"{role}-full", seed)
        adapter = random_lora_adapter(root / f"{role}-lora", r=r, alpha=2 * r, seed=seed + 10,
                                      vocab_size=VOCAB)
        update = lora.task_vector(adapter).dense()
        dense = {k: v + update[k] if k in update else v for k, v in theta_base.items()}
        sides[role] = {"full": (ModelSource(str(full), full), load_file(full / "model.safetensors")),
                       "lora": (ModelSource(str(adapter), base, adapter), dense)}
    return root, base, theta_base, sides


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("instruct_kind", ["full", "lora"])
@pytest.mark.parametrize("domain_kind", ["full", "lora"])
def test_merged_tensors_equal_the_formula(tiny, domain_kind, instruct_kind, alpha):
    root, base, theta_base, sides = tiny
    domain, theta_domain = sides["domain"][domain_kind]
    instruct, theta_inst = sides["instruct"][instruct_kind]
    out = root / f"merged-{domain_kind}-{instruct_kind}-{alpha}"
    with ExitStack() as stack:
        plan = instruction_vector_plan(base, domain, instruct, alpha, stack)
        plan.write(out)
    if (domain_kind, instruct_kind, alpha) == ("lora", "full", 1.0):
        assert plan.anchor == instruct.folder  # θ_inst + s·B·A: the base is not read
    if domain_kind == "full":
        assert plan.anchor == domain.folder  # the domain model is streamed, never rebuilt
    merged = load_file(out / "model.safetensors")
    assert set(merged) == set(theta_base)
    for name, value in theta_base.items():
        by_hand = theta_domain[name] + alpha * (theta_inst[name] - value)
        torch.testing.assert_close(merged[name], by_hand, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_road_domain_adapter_enters_as_its_merged_rotation(tiny, alpha):
    """θ_domain of a RoAd adapter is PEFT's own merge_and_unload of it (W ← R·W)."""
    from peft import PeftModel, RoadConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root, base, theta_base, sides = tiny
    road = root / f"road-{alpha}"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                RoadConfig(variant="road_1", group_size=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "road_theta" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
            elif "road_alpha" in name:
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
    peft_model.save_pretrained(road, safe_serialization=True)
    theta_domain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), road) \
        .merge_and_unload().state_dict()
    instruct, theta_inst = sides["instruct"]["full"]
    out = root / f"merged-road-{alpha}"
    with ExitStack() as stack:
        instruction_vector_plan(base, ModelSource(str(road), base, road), instruct, alpha, stack).write(out)
    merged = load_file(out / "model.safetensors")
    for name, value in theta_base.items():
        by_hand = theta_domain[name] + alpha * (theta_inst[name] - value)
        torch.testing.assert_close(merged[name], by_hand, atol=1e-5, rtol=0, msg=name)


def test_recipe_needs_both_roles_and_alpha_not_weights():
    def recipe(**changes):
        data = {"method": "instruction_vector", "inputs": [{"path": "a", "role": "domain"},
                                                            {"path": "b", "role": "instruct"}]}
        data.update(changes)
        return MergeRecipe.model_validate(data)

    assert recipe().parameters == {}
    assert recipe(parameters={"alpha": 0.5}).parameters == {"alpha": 0.5}
    with pytest.raises(ValueError, match="one with role: domain and one with role: instruct"):
        recipe(inputs=[{"path": "a", "role": "domain"}, {"path": "b", "role": "domain"}])
    with pytest.raises(ValueError, match="one with role: domain and one with role: instruct"):
        recipe(inputs=[{"path": "a", "role": "domain"}])
    with pytest.raises(ValueError, match="leave the inputs' weights at 1 and set parameters.alpha"):
        recipe(inputs=[{"path": "a", "role": "domain"}, {"path": "b", "role": "instruct", "weight": 2}])
    with pytest.raises(ValueError, match="instruction_vector: unknown parameter\\(s\\) scale"):
        recipe(parameters={"scale": 2.0})
    with pytest.raises(ValueError, match="instruction_vector: alpha must be a finite number"):
        recipe(parameters={"alpha": "much"})
    with pytest.raises(ValueError, match="inputs.role is for method instruction_vector, not ties"):
        MergeRecipe(method="ties", inputs=[MergeInput(path="a", role="domain")])


def test_example_pipeline_validates():
    pipeline = load_recipe(EXAMPLE)
    train = [s for s in pipeline.stages if s.kind == "train"]
    merge = pipeline.stages[-1]
    assert [s.data.format for s in train] == ["text", "instruct"]
    assert all(s.model.path == "default" and s.train.max_steps <= 150 for s in train)
    assert merge.method == "instruction_vector" and merge.output == "model" and merge.eval is not None
    assert {i.role: i.path for i in merge.inputs} == {"domain": "stage:domain", "instruct": "stage:instruct"}


@pytest.mark.slow
def test_merge_stage_reports_cosine_and_four_columns(workspace, capsys):
    domain = run_train(tiny_train_recipe(name="domain", train__checkpoint_every=0), workspace)
    instruct = run_train(tiny_train_recipe(
        name="instruct", adapter={"method": "full"}, data__train="world:instruct_train",
        data__format="instruct", train__lr=1e-3, train__checkpoint_every=0), workspace)
    eval_spec = EvalSpec(max_tokens=512, max_questions=4)
    recipe = MergeRecipe(method="instruction_vector", parameters={"alpha": 0.8}, eval=eval_spec,
                         inputs=[MergeInput(path=f"run:{instruct.id}", role="instruct"),
                                 MergeInput(path=f"run:{domain.id}", role="domain")],
                         world={"size": "tiny"}, seq_len=64)
    run = run_merge(recipe, workspace)
    summary = run.info["summary"]

    base_folder = load_model(ModelSpec(path="default"), workspace)[2].folder
    theta_base = load_file(base_folder / "model.safetensors")
    theta_inst = load_file(instruct.path("model", "model.safetensors"))
    lora_update = get_method("lora").task_vector(domain.path("adapter")).dense()
    merged = load_file(run.path("model", "model.safetensors"))
    for name, value in theta_base.items():
        by_hand = value + lora_update.get(name, 0.0) + 0.8 * (theta_inst[name] - value)
        torch.testing.assert_close(merged[name], by_hand, atol=1e-6, rtol=0, msg=name)

    names = sorted(theta_base)
    tau_domain = torch.cat([lora_update[n].flatten() if n in lora_update
                            else torch.zeros(theta_base[n].numel()) for n in names]).double()
    tau_inst = torch.cat([(theta_inst[n].double() - theta_base[n].double()).flatten() for n in names])
    cosine = float(tau_domain @ tau_inst / (tau_domain.norm() * tau_inst.norm()))
    assert summary["instruction_vector_cosine"] == pytest.approx(cosine, abs=1e-9)

    report = json.loads(run.path("report.json").read_text())
    side = report["side_by_side"]
    assert list(side["columns"]) == ["base", "instruct", "domain", "merged"]
    for metrics in side["columns"].values():
        assert {"domain_ppl", "general_ppl", "acc_general_qa_eval"} <= set(metrics)
    assert side["columns"]["merged"] == summary["merged"] == report["model"]
    assert side["domain_gain_pct"]["base"] == 0.0 and len(side["general_forgetting_pct"]) == 4
    instruct_model, tokenizer, _ = load_model(ModelSpec(path=f"run:{instruct.id}"), workspace)
    assert side["columns"]["instruct"] == evaluate_model(instruct_model, tokenizer, eval_spec, 64, 0, "tiny")
    assert side["columns"]["domain"]["domain_ppl"] < side["columns"]["base"]["domain_ppl"]
    printed = capsys.readouterr().out
    assert re.search(r"metric\s+base\s+instruct\s+domain\s+merged", printed)
    assert "accuracy general_qa_eval" in printed and "domain vector and the instruction vector" in printed
