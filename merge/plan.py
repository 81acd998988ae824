"""A merge as the streaming writer runs it, so the same merge can be written or evaluated in memory.

θ[name] = θ_anchor[name] + Σ_j c_j·s_j·B_j·A_j + extra(name), in float32, cast back to the anchor's
dtype. The anchor is usually the base; a merge that starts from another model (the domain model of
an instruction-vector merge) streams that model instead, so it never has to be rebuilt from deltas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .streaming import DeltaReader, merge_lora_into_base, merged_tensors


@dataclass
class MergePlan:
    """Stream `anchor`'s tensors, adding the LoRA updates of `adapters` ((folder, c) pairs) and
    `extra(name)` where it is not None."""

    anchor: Path
    adapters: list[tuple[Path, float]] = field(default_factory=list)
    extra: DeltaReader | None = None

    def write(self, out_folder: Path, max_shard_bytes: int = 2**31) -> Path:
        """The merged model as a sharded Hugging Face folder (atomic; see `merge.streaming`)."""
        return merge_lora_into_base(self.anchor, self.adapters, out_folder,
                                    max_shard_bytes=max_shard_bytes, extra_deltas=self.extra)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The merged tensors one by one, exactly as `write` would store them."""
        return merged_tensors(self.anchor, self.adapters, self.extra)


def scaled(reader: DeltaReader, factor: float) -> DeltaReader:
    """name → factor·reader(name) (None stays None); by blocks of rows when `reader` reads so."""

    def read(name: str, *rows) -> torch.Tensor | None:
        delta = reader(name, *rows)
        return None if delta is None else factor * delta

    read.fresh = True  # a new tensor per call
    read.by_rows = getattr(reader, "by_rows", False)
    return read
