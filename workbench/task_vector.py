"""Task vectors in weight space, the algebra every method's vector follows, and its checks.

A task vector is a typed difference from a base in the space where arithmetic on it is exact.
Two kinds live in the model's own weight space and mix with each other: `DenseTaskVector`
(per tensor τ = θ_ft − θ_base, Ilharco et al. 2023; a full fine-tune's vector) and
`LoraTaskVector` (per adapted weight the factors (B, A) and scale s of s·B·A, kept factored: a
sum stacks the ranks, so Σ wᵢ sᵢ BᵢAᵢ is exact). Methods with a space of their own (RoAd
rotations, task prompt vectors, MixDA module weights) keep their vectors beside their code and
use `check_weight` and `check_same_space` from here. The foundation holds these because the
methods (adapters/) and the merge (merge/) both build on them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from safetensors import safe_open

from .methods import described

PEFT_PREFIX = "base_model.model."
WEIGHT_SPACE = ("full", "lora")  # kinds whose tensors are deltas of the model's own weights


class TaskVectorError(ValueError):
    """Task vectors that cannot be combined or compared; the message says why."""


class TaskVector(Protocol):
    kind: str

    def names(self) -> list[str]:
        """The tensors this vector holds, sorted."""

    def tensor(self, name: str) -> torch.Tensor:
        """The float32 values of tensor `name` in this kind's own space."""

    def __add__(self, other): ...

    def __mul__(self, weight: float): ...

    def __neg__(self): ...


def lora_weight_name(peft_key: str, part: str) -> str:
    """`base_model.model.x.q_proj.lora_A.weight` → `x.q_proj.weight`."""
    return peft_key.removeprefix(PEFT_PREFIX).replace(f".{part}.weight", ".weight")


def check_weight(weight) -> float:
    """A weight on a task vector: a finite number (as a float)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise TaskVectorError(f"a task vector's weight must be a finite number, got {weight!r}")
    return float(weight)


@dataclass
class LoraTaskVector:
    """ΔW = scale · B @ A for each adapted weight, kept as factors."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # weight name → (B, A, scale)
    kind: ClassVar[str] = "lora"

    @classmethod
    def from_peft_folder(cls, folder: Path) -> "LoraTaskVector":
        folder = Path(folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise ValueError(f"{folder}: per-module rank or alpha patterns are not supported yet")
        r, alpha = config["r"], config["lora_alpha"]
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        with safe_open(folder / "adapter_model.safetensors", framework="pt") as f:
            keys = set(f.keys())
            for key in sorted(k for k in keys if ".lora_A." in k):
                b_key = key.replace(".lora_A.", ".lora_B.")
                if b_key not in keys:
                    raise ValueError(f"{folder}: {key} has no matching lora_B tensor")
                factors[lora_weight_name(key, "lora_A")] = (
                    f.get_tensor(b_key).float(), f.get_tensor(key).float(), scale)
        if not factors:
            raise ValueError(f"{folder}: no LoRA factors in adapter_model.safetensors")
        return cls(factors)

    def dense(self) -> dict[str, torch.Tensor]:
        """The full-size update of every adapted weight, in float32."""
        return {name: scale * (b @ a) for name, (b, a, scale) in self.factors.items()}

    def names(self) -> list[str]:
        return sorted(self.factors)

    def tensor(self, name: str) -> torch.Tensor:
        b, a, scale = self.factors[name]
        return scale * (b @ a)

    def to_dense(self) -> "DenseTaskVector":
        return DenseTaskVector(self.dense())

    def __add__(self, other):
        """Ranks stack: B = [s₁B₁ | s₂B₂], A = [A₁; A₂], scale 1 (exact, still factored)."""
        if isinstance(other, DenseTaskVector):
            return self.to_dense() + other
        check_same_space(self, other)
        factors = dict(self.factors)
        for name, (b2, a2, s2) in other.factors.items():
            if name not in factors:
                factors[name] = (b2, a2, s2)
                continue
            b1, a1, s1 = factors[name]
            if (b1.shape[0], a1.shape[1]) != (b2.shape[0], a2.shape[1]):
                raise TaskVectorError(f"tensor {name}: LoRA updates of shapes {(b1.shape[0], a1.shape[1])} "
                                      f"and {(b2.shape[0], a2.shape[1])} cannot be added")
            factors[name] = (torch.cat([s1 * b1, s2 * b2], dim=1), torch.cat([a1, a2], dim=0), 1.0)
        return LoraTaskVector(factors)

    def __mul__(self, weight: float) -> "LoraTaskVector":
        weight = check_weight(weight)
        return LoraTaskVector({n: (b, a, s * weight) for n, (b, a, s) in self.factors.items()})

    __rmul__ = __mul__

    def __neg__(self) -> "LoraTaskVector":
        return self * -1.0

    def __sub__(self, other):
        return self + (-other)


@dataclass
class DenseTaskVector:
    """τ[name] = θ_ft[name] − θ_base[name] in float32."""

    deltas: dict[str, torch.Tensor]
    kind: ClassVar[str] = "full"

    @classmethod
    def difference(cls, finetuned: Path, base: Path) -> "DenseTaskVector":
        ft, bs = _tensor_locations(Path(finetuned)), _tensor_locations(Path(base))
        if set(ft) != set(bs):
            only = sorted(set(ft) ^ set(bs))[:5]
            raise ValueError(f"{finetuned} and {base} hold different tensors (e.g. {', '.join(only)})")
        deltas = {}
        for name in sorted(ft):
            a, b = _read(ft[name], name), _read(bs[name], name)
            if a.shape != b.shape:
                raise ValueError(f"tensor {name}: shape {tuple(a.shape)} in {finetuned} vs {tuple(b.shape)} in {base}")
            if not a.is_floating_point():
                continue  # integer buffers are not task vectors
            deltas[name] = a.float() - b.float()
        return cls(deltas)

    def names(self) -> list[str]:
        return sorted(self.deltas)

    def tensor(self, name: str) -> torch.Tensor:
        return self.deltas[name]

    def __add__(self, other):
        """Per tensor sum; a tensor that one side lacks counts as zeros there."""
        if isinstance(other, LoraTaskVector):
            other = other.to_dense()
        check_same_space(self, other)
        deltas = dict(self.deltas)
        for name, value in other.deltas.items():
            if name in deltas and deltas[name].shape != value.shape:
                raise TaskVectorError(f"tensor {name}: shapes {tuple(deltas[name].shape)} and "
                                      f"{tuple(value.shape)} cannot be added")
            deltas[name] = deltas[name] + value if name in deltas else value
        return DenseTaskVector(deltas)

    __radd__ = __add__

    def __mul__(self, weight: float) -> "DenseTaskVector":
        weight = check_weight(weight)
        return DenseTaskVector({n: weight * v for n, v in self.deltas.items()})

    __rmul__ = __mul__

    def __neg__(self) -> "DenseTaskVector":
        return self * -1.0

    def __sub__(self, other):
        return self + (-other)


def check_same_space(a, b) -> None:
    """Refuse two vectors whose spaces differ (full and LoRA share weight space)."""
    ka, kb = getattr(a, "kind", None), getattr(b, "kind", None)
    if ka is None or kb is None:
        raise TaskVectorError(f"not a task vector: {type(b if ka else a).__name__}")
    if ka == kb or (ka in WEIGHT_SPACE and kb in WEIGHT_SPACE):
        return
    if "road" in (ka, kb) and {ka, kb} <= {"road", *WEIGHT_SPACE}:
        raise TaskVectorError(f"{described(ka)} and {described(kb)} live in different spaces (RoAd: "
                              "rotation angles and scales); bring the RoAd vector into weight space "
                              "with RoadTaskVector.to_dense(base_folder) first")
    raise TaskVectorError(f"{described(ka)} cannot be combined with {described(kb)}: they live in "
                          "different spaces (task prompt vectors combine only with task prompt "
                          "vectors of the same P_init, MixDA folders only with MixDA folders)")


def _tensor_locations(folder: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file in `folder` that holds it."""
    locations = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                locations[key] = shard
    return locations


def _read(path: Path, name: str) -> torch.Tensor:
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(name)
