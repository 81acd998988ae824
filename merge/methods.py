"""Merge methods: small, named, per-tensor merges of task vectors with typed parameters.

Every method takes the task vectors τ_1..τ_n of one tensor (dense deltas from the same base), their
weights w_1..w_n and its own parameters, and returns the merged delta Δ; the caller adds Δ to the
base tensor. All arithmetic is in float32 whatever the storage dtype of the inputs. Randomness
(DARE's drop mask) comes from a `torch.Generator` seeded from the merge seed and the tensor's name,
so a tensor's result does not depend on which tensors were merged before it.

Methods (`merge_tensors(method, ...)`):

- `task_arithmetic` (Ilharco et al. 2023): Δ = λ Σ w_i τ_i. A negative weight subtracts (forgets).
- `ties` (Yadav et al. 2023, "TIES-Merging"): trim each τ_i to its top-k magnitudes (`density` =
  fraction kept), elect a sign per entry, then a disjoint merge of the entries whose sign agrees
  with the elected one, scaled by λ.
- `dare` (Yu et al. 2023, "Language Models are Super Mario"): drop each entry of each τ_i with
  probability p, rescale the survivors, then task arithmetic.
- `dare_ties`: DARE's drop and rescale, then TIES's sign election and disjoint merge.

Options and the libraries they match (read from mergekit 0.1.5 and PEFT 0.21.2):

- `sign_vote="weighted"` (default): elected sign s = sign(Σ_i w_i τ̂_i) (0 counts as +), and entry i
  agrees when sign(w_i τ̂_i) = s. This is mergekit's (`merge_methods/generalized_task_arithmetic.py`,
  `GeneralizedTaskArithmeticMerge.merge_group` multiplies the deltas by their weights before
  `get_mask(method="sum")`, which keeps `sign == majority_sign`, `majority_sign = sum >= 0`).
- `sign_vote="unweighted"`: s = sign(Σ_i τ̂_i) and entry i agrees when sign(τ̂_i) = s; the weights
  only enter the merge. This is PEFT's (`peft/utils/merge_utils.py`, `ties` and `dare_ties` with
  the default `majority_sign_method="total"`: `calculate_majority_sign_mask` runs on the unweighted
  trimmed tensors). Neither library's sign-count vote (PEFT "frequency", mergekit `count`) is offered.
- `ties_divisor="count"` (default, the paper's "disjoint mean"): Δ = λ Σ_i a_i w_i τ̂_i / max(1, Σ_i a_i)
  with a_i ∈ {0, 1} the agreement mask. This is PEFT's `disjoint_merge` (divides by
  `clamp(majority_sign_mask.sum(0), min=1)`).
- `ties_divisor="weight_sum"`: Δ = λ Σ_i a_i w_i τ̂_i / Σ_i a_i w_i (a zero sum counts as 1). This is
  mergekit's `ties`, whose default `normalize: true` divides by `(weights * mask).sum(0)`.
- `ties_divisor="none"`: Δ = λ Σ_i a_i w_i τ̂_i. This is mergekit's `dare_ties`, whose default is
  `normalize: false`.
- `dare_rescale="inverse_keep"` (default, the paper's): survivors × 1/(1−p), so E[τ'] = τ. This is
  PEFT's `dare_linear`/`dare_ties` (`random_pruning(..., rescale=True)` divides by the density 1−p).
- `dare_rescale="l1_norm"`: survivors × ‖τ_i‖₁ / ‖m_i ⊙ τ_i‖₁ per task vector and tensor, so the
  dropped vector keeps its L1 norm (no rescale when either norm is below 1e-7). This is mergekit's
  `dare_linear`/`dare_ties` (default `rescale: true` → `sparsify.bernoulli` with `RescaleNorm.l1`,
  `sparsify.rescaled_masked_tensor`). mergekit's `density` is our 1 − p.

Trimming keeps k = max(1, ⌊density · numel⌋) entries per task vector and tensor, as mergekit's
`sparsify.magnitude` (PEFT's `magnitude_based_pruning` uses ⌊density · numel⌋ without the minimum);
among equal magnitudes the earlier entry is kept. PEFT has no λ (it is 1 there).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

L1_EPSILON = 1e-7  # below this L1 norm, "l1_norm" rescaling leaves a vector as it is (as mergekit)


@dataclass(frozen=True)
class Parameter:
    """A typed merge parameter: a number within a range, or one of a few named choices."""

    name: str
    default: float | str
    meaning: str
    choices: tuple[str, ...] = ()
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def check(self, method: str, value: object) -> float | str:
        if self.choices:
            if value not in self.choices:
                allowed = ", ".join(repr(c) for c in self.choices)
                raise ValueError(f"{method}: {self.name} must be one of {allowed}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{method}: {self.name} must be a finite number, got {value!r}")
        too_low = value <= self.low if self.low_open else value < self.low
        too_high = value >= self.high if self.high_open else value > self.high
        if too_low or too_high:
            interval = (f"{'(' if self.low_open else '['}{self.low:g}, "
                        f"{self.high:g}{')' if self.high_open else ']'}")
            raise ValueError(f"{method}: {self.name} ({self.meaning}) must be in {interval}, got {value!r}")
        return float(value)


@dataclass(frozen=True)
class MergeMethod:
    """A named merge: `merge(deltas, weights, generator, **params)` → merged delta.

    `deltas` is float32 with the task vectors stacked on dim 0; `weights` is float32 of shape
    (n, 1, ..., 1) so that it broadcasts against `deltas`.
    """

    name: str
    reference: str
    parameters: tuple[Parameter, ...]
    merge: Callable[..., Tensor]


SCALE = Parameter("scale", 1.0, "λ, the factor on the merged delta")
DENSITY = Parameter("density", 1.0, "fraction of entries each task vector keeps", low=0.0, high=1.0,
                    low_open=True)
DROP = Parameter("p", 0.0, "probability of dropping an entry", low=0.0, high=1.0, high_open=True)
SIGN_VOTE = Parameter("sign_vote", "weighted", "how the sign of each entry is elected",
                      choices=("weighted", "unweighted"))
TIES_DIVISOR = Parameter("ties_divisor", "count", "what the agreeing entries' sum is divided by",
                         choices=("count", "weight_sum", "none"))
DARE_RESCALE = Parameter("dare_rescale", "inverse_keep", "how the surviving entries are rescaled",
                         choices=("inverse_keep", "l1_norm"))


def trim_to_top_magnitudes(deltas: Tensor, density: float) -> Tensor:
    """Keep the k = max(1, ⌊density·numel⌋) largest-magnitude entries of each task vector."""
    if density >= 1:
        return deltas
    flat = deltas.reshape(len(deltas), -1)
    k = max(1, int(density * flat.shape[1]))
    order = torch.sort(flat.abs(), dim=1, descending=True, stable=True).indices[:, :k]
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True)
    return (flat * keep).reshape(deltas.shape)


def drop_and_rescale(deltas: Tensor, p: float, rescale: str, generator: torch.Generator) -> Tensor:
    """Drop each entry with probability p (mask m ~ Bernoulli(1−p)) and rescale the survivors.

    The mask is drawn on the CPU from `generator`, so it is the same on every device.
    """
    keep = (torch.rand(deltas.shape, generator=generator) >= p).to(deltas.device)
    dropped = deltas * keep
    if rescale == "inverse_keep":
        return dropped / (1.0 - p)
    dims = tuple(range(1, deltas.dim()))
    before = deltas.abs().sum(dim=dims, keepdim=True)
    after = dropped.abs().sum(dim=dims, keepdim=True)
    small = (before < L1_EPSILON) | (after < L1_EPSILON)
    factor = torch.where(small, torch.ones_like(before), before / torch.where(small, 1.0, after))
    return dropped * factor


def elect_sign_and_merge(deltas: Tensor, weights: Tensor, sign_vote: str, ties_divisor: str) -> Tensor:
    """TIES's sign election and disjoint merge of the (trimmed or dropped) task vectors."""
    contributions = deltas * weights
    voters = contributions if sign_vote == "weighted" else deltas
    elected = torch.where(voters.sum(dim=0) >= 0, 1.0, -1.0)
    agrees = voters.sign() == elected  # entries that are exactly 0 never agree
    total = (contributions * agrees).sum(dim=0)
    if ties_divisor == "none":
        return total
    if ties_divisor == "count":
        return total / agrees.sum(dim=0).clamp(min=1)
    divisor = (weights * agrees).sum(dim=0)
    return total / torch.where(divisor == 0, 1.0, divisor)


def _task_arithmetic(deltas: Tensor, weights: Tensor, generator: torch.Generator, *, scale: float) -> Tensor:
    return scale * (deltas * weights).sum(dim=0)


def _ties(deltas: Tensor, weights: Tensor, generator: torch.Generator, *, density: float, sign_vote: str,
          ties_divisor: str, scale: float) -> Tensor:
    trimmed = trim_to_top_magnitudes(deltas, density)
    return scale * elect_sign_and_merge(trimmed, weights, sign_vote, ties_divisor)


def _dare(deltas: Tensor, weights: Tensor, generator: torch.Generator, *, p: float, dare_rescale: str,
          scale: float) -> Tensor:
    dropped = drop_and_rescale(deltas, p, dare_rescale, generator)
    return scale * (dropped * weights).sum(dim=0)


def _dare_ties(deltas: Tensor, weights: Tensor, generator: torch.Generator, *, p: float, dare_rescale: str,
               sign_vote: str, ties_divisor: str, scale: float) -> Tensor:
    dropped = drop_and_rescale(deltas, p, dare_rescale, generator)
    return scale * elect_sign_and_merge(dropped, weights, sign_vote, ties_divisor)


METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("task_arithmetic", "https://arxiv.org/abs/2212.04089", (SCALE,), _task_arithmetic),
    MergeMethod("ties", "https://arxiv.org/abs/2306.01708",
                (DENSITY, SIGN_VOTE, TIES_DIVISOR, SCALE), _ties),
    MergeMethod("dare", "https://arxiv.org/abs/2311.03099", (DROP, DARE_RESCALE, SCALE), _dare),
    MergeMethod("dare_ties", "https://arxiv.org/abs/2311.03099",
                (DROP, DARE_RESCALE, SIGN_VOTE, TIES_DIVISOR, SCALE), _dare_ties),
)}


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, tensor name) through SHA-256, stable across runs."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def check_parameters(method: str, params: dict) -> dict[str, float | str]:
    """Every parameter of `method`, given or default, checked; unknown ones are refused."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; known methods: {', '.join(sorted(METHODS))}")
    spec = METHODS[method]
    known = {p.name: p for p in spec.parameters}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"{method}: unknown parameter(s) {', '.join(unknown)}; "
                         f"its parameters are {', '.join(known)}")
    return {p.name: p.check(method, params.get(p.name, p.default)) for p in spec.parameters}


def merge_tensors(method: str, deltas: list[Tensor], weights: list[float], name: str, seed: int = 0,
                  **params: float | str) -> Tensor:
    """Merge the task vectors `deltas` of tensor `name` with `method`; returns the float32 delta.

    Parameters a method does not list are refused; those not given take their defaults.
    """
    values = check_parameters(method, params)
    spec = METHODS[method]

    if not deltas:
        raise ValueError(f"tensor {name!r}: no task vectors to merge")
    if len(weights) != len(deltas):
        raise ValueError(f"tensor {name!r}: {len(deltas)} task vectors but {len(weights)} weights")
    for i, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"tensor {name!r}: weight {i} must be a finite number, got {weight!r}")
    for i, delta in enumerate(deltas[1:], start=1):
        if delta.shape != deltas[0].shape:
            raise ValueError(f"tensor {name!r}: task vector {i} has shape {tuple(delta.shape)} "
                             f"but task vector 0 has shape {tuple(deltas[0].shape)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")

    stacked = torch.stack([d.to(torch.float32) for d in deltas])
    w = torch.tensor(weights, dtype=torch.float32, device=stacked.device)
    w = w.reshape(len(weights), *([1] * (stacked.dim() - 1)))
    return spec.merge(stacked, w, tensor_generator(seed, name), **values)
