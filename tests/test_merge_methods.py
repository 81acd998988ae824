"""Merge methods against small hand-computed examples: 3 task vectors of 6 entries."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from merge.methods import METHODS, merge_tensors

# Three task vectors; with density 0.5 each keeps its 3 largest magnitudes (every trimmed entry is
# smaller than every kept one, and no two magnitudes in a row tie at the cut).
TAU = [
    torch.tensor([4.0, -1.0, 0.5, -3.0, 0.25, -0.5]),
    torch.tensor([-2.0, 6.0, 1.0, -0.5, -4.0, 1.5]),
    torch.tensor([1.0, -2.0, -5.0, 0.5, -0.75, 0.25]),
]
WEIGHTS = [1.0, 0.5, 2.0]
# Trimmed (density 0.5, k = 3):
#   τ̂1 = [ 4, -1,  0, -3,  0, 0]
#   τ̂2 = [-2,  6,  0,  0, -4, 0]
#   τ̂3 = [ 1, -2, -5,  0,  0, 0]
# Weighted contributions c_i = w_i τ̂_i:
#   c1 = [ 4, -1,   0, -3,  0, 0]
#   c2 = [-1,  3,   0,  0, -2, 0]
#   c3 = [ 2, -4, -10,  0,  0, 0]
# Unweighted vote Σ τ̂ = [3, 3, -5, -3, -4, 0] → signs [+, +, -, -, -, +]
# Weighted vote   Σ c = [5, -2, -10, -3, -2, 0] → signs [+, -, -, -, -, +] (entry 1 differs)
#
# Entry 0 (+ either way): models 1 and 3 agree, Σc = 4 + 2 = 6; count 2 → 3; weight sum 1 + 2 = 3 → 2.
# Entry 1 unweighted (+): model 2 agrees, Σc = 3; count → 3; weight sum 0.5 → 6.
# Entry 1 weighted (-): models 1 and 3 agree, Σc = -1 - 4 = -5; count → -2.5; weight sum 3 → -5/3.
# Entry 2 (-): model 3, Σc = -10; count → -10; weight sum 2 → -5.
# Entry 3 (-): model 1, Σc = -3; count → -3; weight sum 1 → -3.
# Entry 4 (-): model 2, Σc = -2; count → -2; weight sum 0.5 → -4.
# Entry 5: every model was trimmed there, nothing agrees → 0.
TIES_EXPECTED = {
    ("unweighted", "count"): [3.0, 3.0, -10.0, -3.0, -2.0, 0.0],
    ("unweighted", "weight_sum"): [2.0, 6.0, -5.0, -3.0, -4.0, 0.0],
    ("weighted", "count"): [3.0, -2.5, -10.0, -3.0, -2.0, 0.0],
    ("weighted", "weight_sum"): [2.0, -5.0 / 3.0, -5.0, -3.0, -4.0, 0.0],
    ("weighted", "none"): [6.0, -5.0, -10.0, -3.0, -2.0, 0.0],
}


def test_registry_lists_the_four_methods():
    assert sorted(METHODS) == ["dare", "dare_ties", "task_arithmetic", "ties"]


def test_task_arithmetic_with_a_negative_weight_subtracts():
    # Δ = 2 · (τ1 − τ2 + 0.5 τ3):
    #   e0: 4 + 2 + 0.5 = 6.5       → 13
    #   e1: -1 - 6 - 1 = -8         → -16
    #   e2: 0.5 - 1 - 2.5 = -3      → -6
    #   e3: -3 + 0.5 + 0.25 = -2.25 → -4.5
    #   e4: 0.25 + 4 - 0.375 = 3.875 → 7.75
    #   e5: -0.5 - 1.5 + 0.125 = -1.875 → -3.75
    merged = merge_tensors("task_arithmetic", TAU, [1.0, -1.0, 0.5], name="w", seed=0, scale=2.0)
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, torch.tensor([13.0, -16.0, -6.0, -4.5, 7.75, -3.75]))


@pytest.mark.parametrize(("sign_vote", "ties_divisor"), sorted(TIES_EXPECTED))
def test_ties_trims_elects_signs_and_merges_disjointly(sign_vote, ties_divisor):
    merged = merge_tensors("ties", TAU, WEIGHTS, name="w", seed=0, density=0.5,
                           sign_vote=sign_vote, ties_divisor=ties_divisor)
    torch.testing.assert_close(merged, torch.tensor(TIES_EXPECTED[(sign_vote, ties_divisor)]))


def test_ties_defaults_are_weighted_vote_and_count_divisor_scaled_by_lambda():
    merged = merge_tensors("ties", TAU, WEIGHTS, name="w", seed=0, density=0.5, scale=0.5)
    expected = 0.5 * torch.tensor(TIES_EXPECTED[("weighted", "count")])
    torch.testing.assert_close(merged, expected)


def test_ties_keeps_at_least_one_entry_per_task_vector():
    # density 0.1 of 6 entries → ⌊0.6⌋ = 0, raised to 1: only each vector's largest entry survives.
    # τ̂1 = [4,0,0,0,0,0], τ̂2 = [0,6,0,0,0,0], τ̂3 = [0,0,-5,0,0,0]; one model per entry.
    merged = merge_tensors("ties", TAU, WEIGHTS, name="w", seed=0, density=0.1)
    torch.testing.assert_close(merged, torch.tensor([4.0, 3.0, -10.0, 0.0, 0.0, 0.0]))


def _mergekit_delta(method: str, **parameters) -> torch.Tensor:
    """mergekit's merge of TAU over a zero base, through its public method registry."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    base = torch.zeros(6)
    group = TensorGroup.from_tensors([base, *TAU], base_index=0)
    (theirs,) = registry.get(method)([group], parameters={"weight": WEIGHTS, **parameters})
    return theirs - base


def test_ties_matches_mergekit_with_weighted_vote_and_weight_sum():
    ours = merge_tensors("ties", TAU, WEIGHTS, name="w", seed=0, density=0.5,
                         sign_vote="weighted", ties_divisor="weight_sum")
    torch.testing.assert_close(ours, _mergekit_delta("ties", density=0.5))


def test_ties_matches_peft_with_unweighted_vote_and_count():
    spec = importlib.util.find_spec("peft")
    assert spec is not None and spec.origin is not None, "peft (a dependency) is not installed"
    # Load only peft's merge utilities (pure tensor code) without importing the whole package.
    path = Path(spec.origin).parent / "utils" / "merge_utils.py"
    module_spec = importlib.util.spec_from_file_location("peft_merge_utils", path)
    merge_utils = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(merge_utils)

    theirs = merge_utils.ties(TAU, torch.tensor(WEIGHTS), density=0.5, majority_sign_method="total")
    ours = merge_tensors("ties", TAU, WEIGHTS, name="w", seed=0, density=0.5,
                         sign_vote="unweighted", ties_divisor="count")
    torch.testing.assert_close(ours, theirs)


def test_dare_ties_without_dropping_matches_mergekit_dare_ties_defaults():
    # mergekit's dare_ties does not normalize by default: our ties_divisor="none".
    ours = merge_tensors("dare_ties", TAU, WEIGHTS, name="w", seed=0, p=0.0,
                         sign_vote="weighted", ties_divisor="none")
    torch.testing.assert_close(ours, _mergekit_delta("dare_ties", density=1.0))


@pytest.mark.parametrize("dare_rescale", ["inverse_keep", "l1_norm"])
def test_dare_without_dropping_is_task_arithmetic(dare_rescale):
    merged = merge_tensors("dare", TAU, [1.0, -1.0, 0.5], name="w", seed=7, p=0.0,
                           dare_rescale=dare_rescale, scale=2.0)
    torch.testing.assert_close(merged, torch.tensor([13.0, -16.0, -6.0, -4.5, 7.75, -3.75]))


@pytest.mark.parametrize(("sign_vote", "ties_divisor"), sorted(TIES_EXPECTED))
def test_dare_ties_without_dropping_is_ties_without_trimming(sign_vote, ties_divisor):
    options = dict(sign_vote=sign_vote, ties_divisor=ties_divisor)
    dare_ties = merge_tensors("dare_ties", TAU, WEIGHTS, name="w", seed=7, p=0.0, **options)
    ties = merge_tensors("ties", TAU, WEIGHTS, name="w", seed=7, density=1.0, **options)
    torch.testing.assert_close(dare_ties, ties)


def test_dare_mask_is_seeded_per_tensor_name_and_independent_of_order():
    ones = [torch.ones(64)]
    # One vector of ones, weight 1, p = 0.5: every entry is 0 (dropped) or 1/(1 − 0.5) = 2 (kept).
    first = merge_tensors("dare", ones, [1.0], name="layers.0.q.weight", seed=3, p=0.5)
    assert set(first.tolist()) == {0.0, 2.0}

    def merge_in_order(names):
        torch.manual_seed(len(names))  # the global generator must play no part
        return {n: merge_tensors("dare", ones, [1.0], name=n, seed=3, p=0.5) for n in names}

    names = ["layers.0.q.weight", "layers.0.k.weight", "layers.1.q.weight"]
    forward, backward = merge_in_order(names), merge_in_order(names[::-1])
    for n in names:
        torch.testing.assert_close(forward[n], backward[n])
    torch.testing.assert_close(forward["layers.0.q.weight"], first)
    assert not torch.equal(forward["layers.0.q.weight"], forward["layers.0.k.weight"])
    other_seed = merge_tensors("dare", ones, [1.0], name="layers.0.q.weight", seed=4, p=0.5)
    assert not torch.equal(first, other_seed)


def test_dare_inverse_keep_rescale_preserves_the_expectation():
    # E[m/(1−p)] = 1, so the mean over seeds approaches Σ w_i τ_i:
    #   τ1 + 0.5 τ2 + 2 τ3 = [4 - 1 + 2, -1 + 3 - 4, 0.5 + 0.5 - 10, -3 - 0.25 + 1, 0.25 - 2 - 1.5,
    #                         -0.5 + 0.75 + 0.5] = [5, -2, -9, -2.25, -3.25, 0.75].
    # The largest per-entry variance is (2·5)²·p/(1−p) = 100; over 4000 seeds its sd is 0.16.
    runs = torch.stack([merge_tensors("dare", TAU, WEIGHTS, name="w", seed=s, p=0.5)
                        for s in range(4000)])
    expected = torch.tensor([5.0, -2.0, -9.0, -2.25, -3.25, 0.75])
    torch.testing.assert_close(runs.mean(dim=0), expected, atol=0.8, rtol=0.0)


def test_dare_l1_norm_rescale_keeps_each_vectors_l1_norm():
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0])  # ‖τ‖₁ = 36
    merged = merge_tensors("dare", [tau], [1.0], name="w", seed=1, p=0.5, dare_rescale="l1_norm")
    kept = merged != 0
    assert 0 < kept.sum() < len(tau)
    # Survivors are τ_j · 36 / Σ_kept |τ_j|, the dropped ones 0.
    factor = 36.0 / tau[kept].abs().sum()
    torch.testing.assert_close(merged, tau * kept * factor)
    torch.testing.assert_close(merged.abs().sum(), torch.tensor(36.0))


def test_dare_l1_norm_rescale_matches_mergekit_on_the_same_mask():
    from mergekit import sparsify

    tau = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0])
    merged = merge_tensors("dare", [tau], [1.0], name="w", seed=1, p=0.5, dare_rescale="l1_norm")
    mask = (merged != 0).float()
    theirs = sparsify.rescaled_masked_tensor(tau, mask, sparsify.RescaleNorm.l1)
    torch.testing.assert_close(merged, theirs)


@pytest.mark.parametrize(("method", "params"), [
    ("task_arithmetic", {"scale": 0.7}),
    ("ties", {"density": 0.5}),
    ("dare", {"p": 0.3}),
    ("dare_ties", {"p": 0.3, "dare_rescale": "l1_norm", "ties_divisor": "weight_sum"}),
])
def test_float16_inputs_give_the_float32_result(method, params):
    half = [t.half() for t in TAU]  # every entry is exact in float16
    merged_half = merge_tensors(method, half, WEIGHTS, name="w", seed=5, **params)
    merged_full = merge_tensors(method, TAU, WEIGHTS, name="w", seed=5, **params)
    assert merged_half.dtype == torch.float32
    torch.testing.assert_close(merged_half, merged_full, rtol=0.0, atol=0.0)


@pytest.mark.parametrize(("method", "deltas", "weights", "params", "message"), [
    ("slerp", TAU, WEIGHTS, {}, "unknown merge method 'slerp'"),
    ("ties", TAU, WEIGHTS, {"density": 0.0}, r"ties: density .* must be in \(0, 1\], got 0.0"),
    ("ties", TAU, WEIGHTS, {"density": 1.5}, r"density .* must be in \(0, 1\], got 1.5"),
    ("dare", TAU, WEIGHTS, {"p": 1.0}, r"dare: p .* must be in \[0, 1\), got 1.0"),
    ("dare_ties", TAU, WEIGHTS, {"p": -0.1}, r"p .* must be in \[0, 1\), got -0.1"),
    ("ties", TAU, WEIGHTS, {"sign_vote": "frequency"}, "sign_vote must be one of 'weighted', 'unweighted'"),
    ("dare", TAU, WEIGHTS, {"dare_rescale": "l2"}, "dare_rescale must be one of"),
    ("dare", TAU, WEIGHTS, {"density": 0.5}, "dare: unknown parameter.* density"),
    ("ties", TAU, WEIGHTS, {"density": "half"}, "density must be a finite number"),
    ("task_arithmetic", [TAU[0], torch.zeros(5)], [1.0, 1.0], {},
     r"tensor 'w': task vector 1 has shape \(5,\) but task vector 0 has shape \(6,\)"),
    ("task_arithmetic", TAU, [1.0, 1.0], {}, "tensor 'w': 3 task vectors but 2 weights"),
    ("task_arithmetic", [], [], {}, "tensor 'w': no task vectors"),
    ("task_arithmetic", TAU, [1.0, float("nan"), 1.0], {}, "weight 1 must be a finite number"),
])
def test_bad_inputs_raise_clear_errors(method, deltas, weights, params, message):
    with pytest.raises(ValueError, match=message):
        merge_tensors(method, deltas, weights, name="w", seed=0, **params)
