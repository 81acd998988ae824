"""Task vectors: typed differences from a base, in the space where arithmetic is exact.

Kinds (`kind`) and the space each lives in:

- "full", `DenseTaskVector`: per tensor, τ = θ_ft − θ_base (Ilharco et al. 2023, "Editing Models
  with Task Arithmetic"), computed tensor by tensor from safetensors in float32.
- "lora", `LoraTaskVector`: per adapted weight, the factors (B, A) and scale s; the update is s·B·A
  and stays factored: a sum stacks the ranks (B = [s₁B₁ | s₂B₂], A = [A₁; A₂], s = 1), so
  Σ wᵢ sᵢ BᵢAᵢ is exact and nothing is written dense until asked.
- "road", `adapters.road.RoadTaskVector` (road_1): per adapted layer, the log-polar coordinates
  (θ, log α) of its 2-D rotations, zero at init. A sum adds angles and multiplies scales, i.e.
  composes the rotations exactly; w·v is the rotation by w·θ with scale α^w.
- "prompt", `adapters.prompt.TaskPromptVector`: τ = P_tuned − P_init, only for one shared P_init.
- "mixda", `adapters.mixda.MixdaTaskVector`: the MixDA module weights (their base is no module).

One interface on every kind (the `TaskVector` protocol): `kind`, `names()` (its tensors),
`tensor(name)` (float32 values in its own space), and `v + u`, `v − u`, `w·v`, `−v`. On top of it,
`weighted_sum(vectors, weights)` = Σ wᵢ vᵢ and `cosine(a, b)` = the cosine similarity per tensor
and overall (accumulated in float64). Full models and LoRA adapters share weight space and mix
(a LoRA vector turns dense for that); every other pair of kinds is refused with the reason. A RoAd
vector enters weight space through `to_dense(base_folder)` ((R − I)·W per adapted weight, (R − I)·b
per bias): arithmetic that mixes kinds goes through dense deltas, and says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from safetensors import safe_open

from workbench.methods import described, method_of_folder

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


def _weight_name(peft_key: str, part: str) -> str:
    """`base_model.model.x.q_proj.lora_A.weight` → `x.q_proj.weight`."""
    return peft_key.removeprefix(PEFT_PREFIX).replace(f".{part}.weight", ".weight")


def check_weight(weight) -> float:
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
                factors[_weight_name(key, "lora_A")] = (
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


# ----------------------------------------------------------------------------------------------
# One interface over every kind


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


def weighted_sum(vectors: list, weights: list[float]):
    """Σ wᵢ vᵢ in the vectors' own space (full + LoRA: weight space)."""
    if not vectors or len(vectors) != len(weights):
        raise TaskVectorError(f"weighted_sum needs one weight per vector and at least one vector "
                              f"(got {len(vectors)} vectors and {len(weights)} weights)")
    for vector in vectors[1:]:
        check_same_space(vectors[0], vector)
    total = vectors[0] * weights[0]
    for vector, weight in zip(vectors[1:], weights[1:]):
        total = total + vector * weight
    return total


@dataclass
class Cosine:
    """cos(a, b) per tensor (a tensor one vector lacks counts as zeros: cosine 0) and overall."""

    per_tensor: dict[str, float]
    overall: float


def _dot(a, b, name: str) -> float:
    """⟨a[name], b[name]⟩ in float64; LoRA pairs stay factored:
    ⟨s₁B₁A₁, s₂B₂A₂⟩ = s₁s₂ Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ)."""
    if isinstance(a, LoraTaskVector) and isinstance(b, LoraTaskVector):
        b1, a1, s1 = a.factors[name]
        b2, a2, s2 = b.factors[name]
        return float(s1 * s2 * ((b1.double().T @ b2.double()) * (a1.double() @ a2.double().T)).sum())
    x, y = a.tensor(name), b.tensor(name)
    if x.shape != y.shape:
        raise TaskVectorError(f"tensor {name}: shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
    return float((x.double() * y.double()).sum())


def cosine(a, b) -> Cosine:
    """Cosine similarity of two task vectors per tensor and over all their tensors."""
    check_same_space(a, b)
    if hasattr(a, "check_compatible"):
        a.check_compatible(b)  # task prompt vectors: one P_init
    names_a, names_b = set(a.names()), set(b.names())
    per_tensor, dot_total, aa_total, bb_total = {}, 0.0, 0.0, 0.0
    for name in sorted(names_a | names_b):
        aa = _dot(a, a, name) if name in names_a else 0.0
        bb = _dot(b, b, name) if name in names_b else 0.0
        ab = _dot(a, b, name) if name in names_a and name in names_b else 0.0
        per_tensor[name] = ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else 0.0
        dot_total, aa_total, bb_total = dot_total + ab, aa_total + aa, bb_total + bb
    overall = dot_total / math.sqrt(aa_total * bb_total) if aa_total > 0 and bb_total > 0 else 0.0
    return Cosine(per_tensor, overall)


def load_task_vector(folder: Path, base_folder: Path | None = None):
    """The task vector of a saved adapter or model folder, of the kind its config files name.

    A full model needs `base_folder` (τ = θ − θ_base); adapters carry their own base.
    """
    from .preflight import input_kind

    folder = Path(folder)
    kind = input_kind(folder)  # the registered method that saved it, or a clear error
    if kind == "full" and base_folder is None:
        raise TaskVectorError(f"{folder}: a full model's task vector needs its base folder")
    return method_of_folder(folder).task_vector(folder, None if base_folder is None else Path(base_folder))


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
