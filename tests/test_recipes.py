"""Recipes: strict schema, readable errors, examples valid, YAML round trip, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from workbench.demo import demo_recipe
from workbench.recipes import RecipeError, TrainRecipe, load_recipe, parse_recipe, recipe_to_yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_validates(path):
    load_recipe(path)


def test_demo_example_is_the_demo_recipe():
    assert load_recipe(EXAMPLES / "demo-lora-cpt.yaml") == demo_recipe()


def test_yaml_round_trip_is_exact():
    recipe = demo_recipe(quick=True)
    assert parse_recipe(yaml.safe_load(recipe_to_yaml(recipe))) == recipe


@pytest.mark.parametrize("data, message", [
    ({"kind": "train", "train": {"lrr": 1}},
     "x.yaml: train.lrr: unknown key 'lrr'; did you mean 'lr'?"),
    ({"kind": "train", "adapter": {"method": "lora", "alpah": 4}},
     "adapter.alpah: unknown key 'alpah'; did you mean 'alpha'?"),
    ({"kind": "train", "train": {"schedule": "linear"}},
     "train.schedule: Input should be 'cosine', 'wsd' or 'constant' (got 'linear')"),
    ({"kind": "train", "data": {"replay_ratio": 1.5}}, "data.replay_ratio: Input should be less than 1 (got 1.5)"),
    ({"kind": "train", "train": {"batch_size": 6, "grad_accum": 4}}, "must be divisible by"),
    ({"kind": "trian"}, "unknown kind 'trian' (one of: pretrain, train, eval, merge, mergekit, quantize, pipeline)"),
    ({"name": "x"}, "missing key 'kind'"),
    ({"kind": "pipeline", "stages": [{"kind": "eval", "name": "a", "modle": {}}]},
     "stages.0.modle: unknown key 'modle'; did you mean 'model'?"),
    ({"kind": "pipeline", "stages": [{"kind": "eval", "name": "a"}, {"kind": "eval", "name": "a"}]},
     "stage names must be unique; repeated: a"),
])
def test_bad_recipes_name_key_value_and_allowed(data, message):
    with pytest.raises(RecipeError) as err:
        parse_recipe(data, "x.yaml")
    assert message in str(err.value)


def test_file_errors_and_overrides(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "none.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: train\n  bad: [indent\n")
    with pytest.raises(RecipeError, match="broken.yaml: not valid YAML"):
        load_recipe(broken)
    path = tmp_path / "r.yaml"
    path.write_text("kind: train\n")
    recipe = load_recipe(path, ["train.max_steps=7", "adapter.target_modules=[q_proj, v_proj]"])
    assert isinstance(recipe, TrainRecipe)
    assert recipe.train.max_steps == 7 and recipe.adapter.target_modules == ["q_proj", "v_proj"]
