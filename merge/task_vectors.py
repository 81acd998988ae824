"""Task vectors: typed differences from a base, in the space where arithmetic is exact.

Kinds (`kind`) and the space each lives in:

- "full", `DenseTaskVector` (`workbench.task_vector`, as the next): per tensor, τ = θ_ft − θ_base (Ilharco et al. 2023, "Editing Models
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

import math
from dataclasses import dataclass
from pathlib import Path


from workbench.methods import method_of_folder
from workbench.task_vector import LoraTaskVector, TaskVectorError, check_same_space



# ----------------------------------------------------------------------------------------------
# One interface over every kind


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


