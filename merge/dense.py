"""Dense task vectors read tensor by tensor, for merges that need every entry (TIES, DARE, ...).

An input is a full model (τ[name] = θ_input[name] − θ_base[name], read memory-mapped from both
folders) or a LoRA adapter (τ[name] = s·B·A). `merged_deltas` combines the inputs' τ of one tensor
with a method from `merge.methods`; an input that does not touch a tensor counts as zeros there.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from .methods import merge_tensors
from .streaming import model_layout
from .task_vectors import LoraTaskVector

DeltaReader = Callable[[str], "torch.Tensor | None"]


class FullModelDelta:
    """τ[name] = θ_model[name] − θ_base[name] in float32, read lazily; checked against the base first."""

    def __init__(self, folder: Path, base_layout: dict, stack: ExitStack):
        self.folder, self.base_layout, self.stack = Path(folder), base_layout, stack
        self.layout = model_layout(self.folder)
        for name, (_, _, shape, _) in base_layout.items():
            if name not in self.layout:
                raise ValueError(f"tensor {name}: in the base but not in {self.folder}")
            if self.layout[name][2] != shape:
                raise ValueError(f"tensor {name}: shape {tuple(self.layout[name][2])} in {self.folder} "
                                 f"but {tuple(shape)} in the base")
        extra = sorted(set(self.layout) - set(base_layout))
        if extra:
            raise ValueError(f"tensor {extra[0]}: in {self.folder} but not in the base")
        self._handles: dict[Path, object] = {}

    def _read(self, shard: Path, name: str) -> torch.Tensor:
        if shard not in self._handles:
            self._handles[shard] = self.stack.enter_context(safe_open(shard, framework="pt"))
        return self._handles[shard].get_tensor(name)

    def __call__(self, name: str) -> torch.Tensor | None:
        if not self.base_layout[name][1].startswith(("F", "BF")):
            return None  # integer buffers are not merged
        return self._read(self.layout[name][0], name).float() - \
            self._read(self.base_layout[name][0], name).float()


class LoraDelta:
    """τ[name] = s·B·A for the weights a LoRA adapter adapts, None elsewhere."""

    def __init__(self, folder: Path, base_layout: dict):
        self.factors = LoraTaskVector.from_peft_folder(folder).factors
        for name, (b, a, _) in self.factors.items():
            if name not in base_layout:
                raise ValueError(f"tensor {name}: adapted by {folder} but not in the base model")
            if base_layout[name][2] != [b.shape[0], a.shape[1]]:
                raise ValueError(f"tensor {name}: shape {tuple(base_layout[name][2])} in the base but "
                                 f"the adapter {folder} updates shape {(b.shape[0], a.shape[1])}")

    def __call__(self, name: str) -> torch.Tensor | None:
        if name not in self.factors:
            return None
        b, a, scale = self.factors[name]
        return scale * (b @ a)


def merged_deltas(readers: list[DeltaReader], weights: list[float], method: str, seed: int,
                  params: dict) -> DeltaReader:
    """name → the merged delta of all inputs for that tensor (None where no input touches it)."""

    def delta(name: str) -> torch.Tensor | None:
        parts = [read(name) for read in readers]
        present = [p for p in parts if p is not None]
        if not present:
            return None
        parts = [p if p is not None else torch.zeros_like(present[0]) for p in parts]
        return merge_tensors(method, parts, weights, name, seed, **params)

    return delta


def pairwise_cosines(readers: list[DeltaReader], names: list[str]) -> list[list[float]]:
    """cos(τ_i, τ_j) over whole task vectors, accumulated tensor by tensor in float64.

    An input that does not touch a tensor counts as zeros there; a zero vector has cosine 0.
    """
    n = len(readers)
    dots = torch.zeros(n, n, dtype=torch.float64)
    for name in names:
        parts = [read(name) for read in readers]
        present = [p for p in parts if p is not None]
        if not present:
            continue
        flat = torch.stack([(p if p is not None else torch.zeros_like(present[0])).flatten()
                            for p in parts]).double()
        dots += flat @ flat.T
    norms = dots.diagonal().sqrt()
    denominator = torch.outer(norms, norms)
    cosines = torch.where(denominator > 0, dots / denominator.clamp_min(1e-300), torch.zeros_like(dots))
    return cosines.tolist()
