"""Task vectors: typed differences from a base, in the space where arithmetic is exact.

- `LoraTaskVector`: per adapted weight, the factors (B, A) and scale s; the update is s·B·A and
  stays factored until something asks for it dense.
- `DenseTaskVector`: per tensor, τ = θ_ft − θ_base (Ilharco et al. 2023, "Editing Models with
  Task Arithmetic"), computed tensor by tensor from safetensors in float32.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

PEFT_PREFIX = "base_model.model."


def _weight_name(peft_key: str, part: str) -> str:
    """`base_model.model.x.q_proj.lora_A.weight` → `x.q_proj.weight`."""
    return peft_key.removeprefix(PEFT_PREFIX).replace(f".{part}.weight", ".weight")


@dataclass
class LoraTaskVector:
    """ΔW = scale · B @ A for each adapted weight, kept as factors."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # weight name → (B, A, scale)

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


@dataclass
class DenseTaskVector:
    """τ[name] = θ_ft[name] − θ_base[name] in float32."""

    deltas: dict[str, torch.Tensor]

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
            deltas[name] = a.float() - b.float()
        return cls(deltas)


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
