"""Recipes the workbench wrote before its code was re-laid out (`runs/<id>/recipe.yaml` files,
kept in tests/data/old_recipes as `recipe_to_yaml` wrote them then) still load, keep every value,
and rerun."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from workbench.recipes import load_recipe, recipe_to_yaml
from workbench.stages import run_recipe

OLD = Path(__file__).resolve().parent / "data" / "old_recipes"


def contained(old, new) -> bool:
    """Every key of `old` is in `new` with the same value (new keys with defaults may be added)."""
    if isinstance(old, dict):
        return isinstance(new, dict) and all(k in new and contained(v, new[k]) for k, v in old.items())
    return old == new


@pytest.mark.parametrize("file", sorted(OLD.glob("*.yaml")), ids=lambda f: f.stem)
def test_an_old_recipe_file_loads_with_every_value(file):
    old = yaml.safe_load(file.read_text(encoding="utf-8"))
    recipe = load_recipe(file)
    assert contained(old, yaml.safe_load(recipe_to_yaml(recipe)))


@pytest.mark.slow
def test_an_old_train_recipe_reruns(workspace, tmp_path):
    run = run_recipe(load_recipe(OLD / "train-lora.yaml"), workspace)
    assert run.status == "done" and run.path("adapter", "adapter_model.safetensors").is_file()
