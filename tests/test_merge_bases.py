"""Which base a merge goes onto: how far apart two bases are, ‖θ_a − θ_b‖ / ‖θ_b‖."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import folder_tensors
from merge.dense import relative_difference
from workbench.models import build_model_from_config

VOCAB = 64


def _base(folder: Path, seed: int, **save_options) -> Path:
    """A tiny Llama base (llama-tiny, seeded) saved as a model folder."""
    build_model_from_config("llama-tiny", vocab_size=VOCAB, seed=seed).save_pretrained(
        folder, safe_serialization=True, **save_options)
    return folder


def _relative_difference_by_hand(a: Path, b: Path) -> float:
    """‖θ_a − θ_b‖ / ‖θ_b‖ over every tensor, from whole tensors in float64."""
    ta, tb = folder_tensors(a), folder_tensors(b)
    squared_difference = sum(float((ta[k].double() - tb[k].double()).square().sum()) for k in tb)
    return math.sqrt(squared_difference / sum(float(tb[k].double().square().sum()) for k in tb))


def test_relative_difference_is_streamed_over_shards_and_equals_the_hand_computation(tmp_path):
    a = _base(tmp_path / "a", seed=3, max_shard_size="20KB")  # several shards, several row blocks
    b = _base(tmp_path / "b", seed=4)
    assert len(list(a.glob("*.safetensors"))) > 2
    assert relative_difference(a, b) == pytest.approx(_relative_difference_by_hand(a, b), rel=1e-5)
    assert relative_difference(b, a) == pytest.approx(_relative_difference_by_hand(b, a), rel=1e-5)
    assert relative_difference(a, a) == 0.0
