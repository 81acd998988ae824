"""Task prompt vectors: P_init stored beside PEFT's folder, τ = P_tuned − P_init, arithmetic only
within one P_init, a new run started from earlier vectors, and the λ search."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adapters.prompt import PromptVectorError, TaskPromptVector, combine
from helpers import tiny_train_recipe
from workbench.models import load_model
from workbench.recipes import ModelSpec
from workbench.stages import run_train


def prompt_run(workspace, name, train="world:domain_train", steps=6, **adapter):
    return run_train(tiny_train_recipe(
        name=name, adapter={"method": "prompt", "num_virtual_tokens": 4, **adapter},
        data__train=train, data__replay_ratio=0.0, train__lr=3e-2, train__max_steps=steps,
        train__checkpoint_every=0), workspace)


def first_loss(run) -> float:
    return next(m["loss"] for m in run.metrics() if "loss" in m)


@pytest.mark.slow
def test_prompt_vector_run_saves_init_and_loads_in_plain_peft(workspace):
    run = prompt_run(workspace, "p")
    folder = run.path("adapter")
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    vector = TaskPromptVector.from_folder(folder)
    tuned = load_file(folder / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.allclose(vector.init + vector.tau, tuned, atol=1e-6)
    assert vector.tau.abs().max() > 0, "training must move the prompt"
    # P_init = rows of the base's embedding table at seeded token ids
    ours, tokenizer, source = load_model(ModelSpec(path=f"run:{run.id}"), workspace)
    table = AutoModelForCausalLM.from_pretrained(source.folder).get_input_embeddings().weight
    ids = torch.randint(0, table.shape[0], (4,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(vector.init, table[ids].detach())
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source.folder), folder).eval()
    x = tokenizer(["Every crystal"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(ours(input_ids=x).logits, plain(input_ids=x).logits)


@pytest.mark.slow
def test_arithmetic_equals_the_hand_sum_and_refuses_other_inits(workspace):
    a = TaskPromptVector.from_folder(prompt_run(workspace, "a").path("adapter"))
    b = TaskPromptVector.from_folder(prompt_run(workspace, "b", train="world:general_train").path("adapter"))
    combined = combine([a, b], [0.7, -0.4])
    assert torch.allclose(combined.tau, 0.7 * a.tau - 0.4 * b.tau, atol=1e-7)
    assert torch.equal((a - b).tau, a.tau - b.tau) and torch.equal((-a).tau, -a.tau)
    assert torch.allclose(combined.prompt(), a.init + 0.7 * a.tau - 0.4 * b.tau, atol=1e-7)
    other = TaskPromptVector.from_folder(prompt_run(workspace, "c", init_seed=1).path("adapter"))
    with pytest.raises(PromptVectorError, match="different initial prompts.*init_seed 0 vs 1"):
        a + other
    foreign = TaskPromptVector(a.tau, a.init, {**a.meta, "model": "0123456789abcdef", "source": "x"})
    with pytest.raises(PromptVectorError, match="different models"):
        combine([a, foreign], [1.0, 1.0])


@pytest.mark.slow
def test_init_from_a_related_task_starts_lower_and_lambda_search_picks_the_best(workspace):
    source = prompt_run(workspace, "domain", steps=30)
    related = "world:domain_eval"  # the same field, other documents
    cold = prompt_run(workspace, "cold", train=related, steps=1)
    warm = prompt_run(workspace, "warm", train=related, steps=1,
                      init_from=[{"path": f"run:{source.id}", "weight": 1.0}])
    assert first_loss(warm) < first_loss(cold)
    searched = prompt_run(workspace, "search", train=related, steps=1,
                          init_from=[{"path": f"run:{source.id}"}], lambda_grid=[0.0, 0.5, 1.0])
    table = searched.info["summary"]["lambda_search"]
    assert [row["lambdas"] for row in table] == [[0.0], [0.5], [1.0]]
    best = min(table, key=lambda row: row["loss"])
    assert searched.info["summary"]["lambdas"] == best["lambdas"]
    assert best["loss"] < table[0]["loss"]  # λ = 0 is P_init alone: the vector helps here too


@pytest.mark.slow
def test_init_from_a_run_of_another_initial_prompt_is_refused(workspace):
    source = prompt_run(workspace, "seed1", init_seed=1)
    with pytest.raises(PromptVectorError, match="different initial prompts"):
        prompt_run(workspace, "mix", init_from=[{"path": f"run:{source.id}"}])
    runs = [r for r in workspace.runs() if r.info["name"] == "mix"]
    assert runs and runs[0].status == "failed" and not runs[0].path("adapter").exists()
