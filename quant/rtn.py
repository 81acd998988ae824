"""Round-to-nearest (RTN) weight quantization: the baseline FlexRound starts from.

A weight W of shape [out, in] is cut into groups along the input dimension: one group per tensor
(`tensor`), per output row (`channel`) or per `group_size` consecutive inputs of a row (`group`).
Each group g gets a grid size s_g and an integer zero point z_g in [0, 2ᵇ − 1]; the codes are

    q = clamp(round(W / s) + z, 0, 2ᵇ − 1)        Ŵ = s · (q − z)

(written as FlexRound writes it, Ŵ = s · clamp(round(W / s), −z, 2ᵇ − 1 − z), the same numbers).

Grid from a range [lo, hi] that always contains 0 (so 0 is exactly representable):

- asymmetric: s = (hi − lo) / (2ᵇ − 1), z = clamp(round(−lo / s), 0, 2ᵇ − 1);
- symmetric:  s = 2·max(|lo|, |hi|) / (2ᵇ − 1), z = 2ᵇ⁻¹ (codes −2ᵇ⁻¹ .. 2ᵇ⁻¹ − 1 around z).

These are the conventions of FlexRound's reference code and of compressed-tensors, so the codes
export without re-quantization. The range is the group's min and max (`minmax`), or is searched
(`search`): the range shrunk by p = 1, 0.99, ..., 0.21 (GPTQ's grid: 100 steps, shrink up to 0.8)
keeping, per group, the p with the smallest Σ|W − Ŵ|^2.4 (the norm GPTQ's and FlexRound's searches
use). Grids are computed in float32 whatever the weight's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import ConfigDict, Field, field_validator

from workbench.io import nonfinite_counts
from workbench.progress import phase as progress_phase
from workbench.sections import Strict

Granularity = Literal["tensor", "channel", "group"]
Clipping = Literal["minmax", "search"]

SEARCH_GRID = 100
SEARCH_MAX_SHRINK = 0.8
SEARCH_NORM = 2.4
MIN_SCALE = 1e-8  # grid size of an all-zero group (any positive value reproduces zeros)


class QuantError(ValueError):
    """Quantization asked for something impossible; the message names the setting or tensor."""


class WeightQuantSpec(Strict):
    """The weight grid, one definition for recipes (`quantize.weights`) and Python callers:
    Ŵ = s·(q − z), q ∈ [0, 2ᵇ − 1], one (s, z) per group. Built directly, a bad value raises
    pydantic's ValidationError (a ValueError) naming the field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(4, ge=2, le=8)
    symmetric: bool = Field(
        True, description="z = 2ᵇ⁻¹ (compressed-tensors' W4A16). Asymmetric per-channel or group "
        "grids export in the format compressed-tensors writes, but the installed transformers + "
        "compressed-tensors cannot load those folders back (see quant/export.py).")
    granularity: Granularity = "channel"
    group_size: int = Field(128, ge=1, description="Inputs per group (granularity: group).")
    clipping: Clipping = "minmax"

    @field_validator("bits", mode="before")
    @classmethod
    def _integer_bits(cls, bits):
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"bits must be an integer from 2 to 8 (got {bits!r})")
        return bits

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1

    def groups(self, in_features: int) -> int:
        """Groups per output row."""
        return in_features // self.group_size if self.granularity == "group" else 1


@dataclass
class QuantizedWeight:
    """Integer codes, grid sizes and zero points of one weight: Ŵ = scale · (codes − zero_point).

    codes: uint8 [out, in] in 0..2ᵇ−1; scale: float32 [rows, groups]; zero_point: uint8 [rows,
    groups], rows = out (channel, group) or 1 (tensor); each group covers in/groups inputs.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    spec: WeightQuantSpec

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ in `dtype`, computed from the scale as stored in `dtype` (what an export holds)."""
        out, cols = self.shape
        scale = self.scale.to(dtype).float().unsqueeze(-1)
        codes = self.codes.view(out, self.scale.shape[1], -1).float()
        weight = (codes - self.zero_point.float().unsqueeze(-1)) * scale
        return weight.reshape(out, cols).to(dtype)


def check_weight(weight: torch.Tensor, spec: WeightQuantSpec, name: str = "weight") -> None:
    """A weight that can be quantized with `spec`: 2-D, finite, input width divisible by groups."""
    if weight.dim() != 2:
        raise QuantError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    found = nonfinite_counts([(name, weight)])
    if found:
        raise QuantError(f"{name}: {found[0][1]} NaN or infinite value(s) in the weight; "
                         "quantization needs finite weights")
    if spec.granularity == "group" and weight.shape[1] % spec.group_size:
        raise QuantError(f"{name}: group_size={spec.group_size} does not divide the input width "
                         f"{weight.shape[1]}")


def grouped(weight: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    """W as float32 [out, groups, group width]."""
    out, cols = weight.shape
    return weight.float().reshape(out, spec.groups(cols), -1)


def _reduce_dims(spec: WeightQuantSpec) -> tuple[int, ...]:
    return (0, 1, 2) if spec.granularity == "tensor" else (2,)


def grid_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: WeightQuantSpec
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) as float32 for ranges [lo, hi]; 0 is always inside the range."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if spec.symmetric:
        scale = 2 * torch.maximum(-lo, hi) / spec.qmax
        scale = scale.clamp_min(MIN_SCALE)
        zero = torch.full_like(scale, 2 ** (spec.bits - 1))
    else:
        scale = ((hi - lo) / spec.qmax).clamp_min(MIN_SCALE)
        zero = torch.round(-lo / scale).clamp(0, spec.qmax)
    return scale, zero


def integer_codes(ratio: torch.Tensor, zero: torch.Tensor, bits: int,
                  rounding: Callable[[torch.Tensor], torch.Tensor] = torch.round) -> torch.Tensor:
    """clamp(round(ratio) + z, 0, 2ᵇ − 1), as float; `ratio` is W / grid, `zero` broadcasts."""
    return torch.clamp(rounding(ratio) + zero, 0, 2 ** bits - 1)


def _fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (integer_codes(w / scale, zero, bits) - zero) * scale


def quant_grid(weight: torch.Tensor, spec: WeightQuantSpec, name: str = "weight"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The RTN grid of a weight: (scale, zero point), float32 [rows, groups] (see module doc)."""
    check_weight(weight, spec, name)
    w = grouped(weight, spec)
    dims = _reduce_dims(spec)
    lo, hi = w.amin(dim=dims, keepdim=True), w.amax(dim=dims, keepdim=True)
    scale, zero = grid_from_range(lo, hi, spec)
    if spec.clipping == "search":
        best = torch.full_like(scale, math.inf)
        for i in range(int(SEARCH_MAX_SHRINK * SEARCH_GRID)):
            p = 1 - i / SEARCH_GRID
            s, z = grid_from_range(lo * p, hi * p, spec)
            err = (_fake_quantize(w, s, z, spec.bits) - w).abs().pow(SEARCH_NORM).sum(dim=dims, keepdim=True)
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale.squeeze(-1), zero.squeeze(-1)


def quantize_rtn(weight: torch.Tensor, spec: WeightQuantSpec, name: str = "weight") -> QuantizedWeight:
    """Round-to-nearest codes of `weight` on its RTN grid."""
    scale, zero = quant_grid(weight, spec, name)
    codes = integer_codes(grouped(weight, spec) / scale.unsqueeze(-1), zero.unsqueeze(-1), spec.bits)
    return QuantizedWeight(codes=codes.reshape(weight.shape).to(torch.uint8), scale=scale,
                           zero_point=zero.to(torch.uint8), spec=spec)


# ----------------------------------------------------------------------------------------------
# Models: which linear layers are quantized, and RTN over all of them

BLOCK_LIST_SUFFIXES = ("layers", "encoder.layer")


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's transformer blocks: Llama-family decoder layers (`model.layers`) or BERT-family
    encoder layers (`encoder.layer`). Embeddings and heads live outside them."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and (
                name.split(".")[-1] == "layers" or name == "encoder.layer" or name.endswith(".encoder.layer")):
            return name, module
    raise QuantError(f"{type(model).__name__}: no transformer blocks found (decoder layers "
                     "'model.layers' or encoder layers 'encoder.layer'); quantization supports "
                     "Llama-family decoders and BERT-family encoders")


def _matches(relative: str, layers) -> bool:
    return layers == "all-linear" or any(relative == t or relative.endswith("." + t) for t in layers)


def block_linears(block: torch.nn.Module, layers="all-linear") -> dict[str, torch.nn.Linear]:
    """The linear layers of one block to quantize, by name inside the block: all of them for
    'all-linear', else those whose name is or ends with one of `layers` ('q_proj', 'mlp.up_proj')."""
    return {name: m for name, m in block.named_modules()
            if isinstance(m, torch.nn.Linear) and _matches(name, layers)}


def quantizable_layers(model: torch.nn.Module, layers="all-linear") -> dict[str, torch.nn.Linear]:
    """Full name → linear layer for every layer quantization will touch, block by block.

    Raises QuantError when the model has no blocks, or when `layers` matches none of their linear
    layers (the message lists the names it could have used)."""
    prefix, blocks = find_blocks(model)
    found = {f"{prefix}.{i}.{name}": m for i, block in enumerate(blocks)
             for name, m in block_linears(block, layers).items()}
    if not found:
        names = sorted({name for name, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear)})
        raise QuantError(f"{type(model).__name__}: no supported linear layers to quantize in "
                         f"'{prefix}' (layers={layers!r}; the blocks' linear layers are: "
                         f"{', '.join(names) or 'none'})")
    return found


def check_model(model: torch.nn.Module, spec: WeightQuantSpec, layers="all-linear") -> dict[str, torch.nn.Linear]:
    """Every weight to quantize, checked (finite, group size divides) before anything changes."""
    found = quantizable_layers(model, layers)
    for name, module in found.items():
        check_weight(module.weight.detach(), spec, f"{name}.weight")
    return found


@torch.no_grad()
def quantize_model_rtn(model: torch.nn.Module, spec: WeightQuantSpec, layers="all-linear"
                       ) -> dict[str, QuantizedWeight]:
    """RTN on every selected linear layer; the model's weights become Ŵ (in place, same dtype).
    Progress: one event per layer ("quantizing layers")."""
    found = check_model(model, spec, layers)
    result = {}
    with progress_phase("quantizing layers", len(found), "layer") as events:
        for name, module in found.items():
            result[name] = quantize_rtn(module.weight.detach(), spec, f"{name}.weight")
            module.weight.copy_(result[name].dequantize(module.weight.dtype))
            events.advance()
    return result
