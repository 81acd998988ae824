"""The embedded base: far below the unigram baseline, built once per workspace, reproducible,
and the same training pipeline on any Hugging Face model folder."""

from __future__ import annotations

import shutil

import pytest

from helpers import tiny_train_recipe
from workbench.base import DEFAULT_BASE_NAME, run_pretrain
from workbench.models import resolve_source
from workbench.recipes import EvalSpec, ModelSpec, PretrainRecipe, TrainSpec, WorldSpec
from workbench.stages import run_train
from workbench.workspace import Workspace


def test_base_beats_the_unigram_baseline(base_workspace):
    summary = base_workspace.latest("pretrain", DEFAULT_BASE_NAME).info["summary"]
    assert summary["general_ppl"] < 0.6 * summary["unigram_general_ppl"]


def test_default_resolves_to_the_cached_base(workspace):
    before = len(workspace.runs())
    first = resolve_source("default", workspace)
    second = resolve_source("default", workspace)
    assert first.folder == second.folder and len(workspace.runs()) == before


@pytest.mark.slow
def test_same_pretrain_recipe_gives_identical_weights(tmp_path):
    recipe = PretrainRecipe(
        name="repro", world=WorldSpec(size="tiny"), vocab_size=512, architecture="llama-tiny",
        seq_len=32, train=TrainSpec(lr=3e-3, batch_size=8, max_steps=5, checkpoint_every=0),
        eval=EvalSpec(max_tokens=256, max_questions=2, questions=["world:general_cloze_eval"]),
    )
    ws = Workspace(tmp_path)
    a, b = run_pretrain(recipe, ws), run_pretrain(recipe, ws)
    for name in ("model.safetensors", "tokenizer.json"):
        assert a.path("model", name).read_bytes() == b.path("model", name).read_bytes(), name


@pytest.mark.slow
def test_training_on_a_plain_model_folder(workspace, tmp_path):
    folder = tmp_path / "some-hf-model"
    shutil.copytree(resolve_source("default", workspace).folder, folder)
    run = run_train(tiny_train_recipe(model=ModelSpec(path=str(folder)).model_dump()), workspace)
    assert run.info["status"] == "done"
    assert run.info["outputs"]["base"] == str(folder.resolve()) and run.info["parents"] == []
