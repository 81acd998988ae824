"""Writing quantized models: compressed-tensors `pack-quantized` folders and dequantized float ones.

compressed-tensors `pack-quantized` (the format llm-compressor writes and vLLM serves; stock
`transformers` loads it when the `compressed-tensors` package is installed). Each quantized
linear layer `<name>` stores, instead of `<name>.weight`:

- `weight_packed` int32 [out, ⌈in·b/32⌉]: the codes, 32/b per word, element j of a row in bits
  (j mod 32/b)·b of word ⌊j / (32/b)⌋, each as the unsigned value c + 2ᵇ⁻¹ of the signed code
  c ∈ [−2ᵇ⁻¹, 2ᵇ⁻¹ − 1] — which is exactly our code q ∈ [0, 2ᵇ − 1];
- `weight_scale` [1] (tensor), [out, 1] (channel) or [out, in/group] (group), in the model dtype;
- `weight_zero_point` (asymmetric only): the signed zero point z − 2ᵇ⁻¹, packed like the codes
  along the output dimension ([⌈out·b/32⌉, groups] int32) for channel and group grids, a plain
  int8 [1] for a per-tensor grid;
- `weight_shape` int64 [2].

Dequantization is (c − zp) · scale = (q − z) · s, the same numbers as `QuantizedWeight.dequantize`.
`config.json` gets the `quantization_config` compressed-tensors writes (`quant_method:
compressed-tensors`, `format: pack-quantized`, one config group targeting `Linear` with the weight
arguments, every linear layer left in full precision listed in `ignore`). Only 4 and 8 bits are
written: for those widths every compressed-tensors version and vLLM agree on the layout (other
widths changed packing between compressed-tensors versions); export those dequantized instead.

On a CPU, stock `transformers` has no int4 kernels: it unpacks the weights to float on the first
forward pass (compressed-tensors' decompression hook), so memory there is that of the float model.
Symmetric grids (compressed-tensors' W4A16 / W8A16 presets) and asymmetric per-tensor grids load
that way with exactly our logits. Asymmetric per-channel and group grids are written as
compressed-tensors' own compressor writes them (checked tensor for tensor in the tests), but
transformers 5.23 with compressed-tensors 0.20 cannot load such folders, theirs included: its
load path builds an unpacked `weight_zero_point` and refuses the packed one in the checkpoint.

The dequantized export is an ordinary Hugging Face folder of Ŵ in the model dtype: it loads
anywhere and gives the same logits. Both are written atomically (`workbench.io.atomic_folder`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from workbench.export import save_model_folder
from workbench.io import atomic_folder, write_tensors_sharded

from .rtn import QuantError, QuantizedWeight, WeightQuantSpec

PACKED_BITS = (4, 8)
QUANT_METHOD = "compressed-tensors"  # the name transformers and vLLM dispatch on; never invent one
FORMAT = "pack-quantized"


# ----------------------------------------------------------------------------------------------
# Packing


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned b-bit values [rows, n] → int32 words [rows, ⌈n·b/32⌉], 32/b values per word."""
    per_word = 32 // bits
    rows, n = values.shape
    padded = torch.zeros(rows, math.ceil(n / per_word) * per_word, dtype=torch.int64)
    padded[:, :n] = values.to(torch.int64)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (padded.view(rows, -1, per_word) << shifts).sum(-1)
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32)


def _unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 words [rows, w] → unsigned b-bit values [rows, n] (uint8)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    values = (words.to(torch.int64).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return values.flatten(1)[:, :n].to(torch.uint8)


def _check_packable(spec: WeightQuantSpec) -> None:
    if spec.bits not in PACKED_BITS:
        raise QuantError(f"compressed-tensors export: bits={spec.bits} cannot be packed (supported: "
                         f"{', '.join(map(str, PACKED_BITS))}); write the dequantized export instead")


def pack_weight(qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one layer (local names: weight_packed, ...)."""
    spec = qw.spec
    _check_packable(spec)
    out, cols = qw.shape
    scale = qw.scale.reshape(1) if spec.granularity == "tensor" else qw.scale
    tensors = {"weight_packed": _pack_rows(qw.codes, spec.bits),
               "weight_scale": scale.to(dtype).contiguous(),
               "weight_shape": torch.tensor([out, cols], dtype=torch.int64)}
    if not spec.symmetric:
        if spec.granularity == "tensor":
            tensors["weight_zero_point"] = (qw.zero_point.reshape(1).to(torch.int16)
                                            - 2 ** (spec.bits - 1)).to(torch.int8)
        else:
            tensors["weight_zero_point"] = _pack_rows(qw.zero_point.t(), spec.bits).t().contiguous()
    return tensors


def unpack_weight(tensors: dict[str, torch.Tensor], spec: WeightQuantSpec) -> QuantizedWeight:
    """The inverse of `pack_weight`: codes, float32 scales and zero points of one layer."""
    out, cols = (int(v) for v in tensors["weight_shape"])
    codes = _unpack_rows(tensors["weight_packed"], spec.bits, cols)
    scale = tensors["weight_scale"].float()
    scale = scale.reshape(1, 1) if spec.granularity == "tensor" else scale.reshape(out, -1)
    if spec.symmetric:
        zero = torch.full(scale.shape, 2 ** (spec.bits - 1), dtype=torch.uint8)
    elif spec.granularity == "tensor":
        zero = (tensors["weight_zero_point"].to(torch.int16) + 2 ** (spec.bits - 1)).to(torch.uint8).reshape(1, 1)
    else:
        zero = _unpack_rows(tensors["weight_zero_point"].t(), spec.bits, out).t().contiguous()
    return QuantizedWeight(codes=codes, scale=scale, zero_point=zero, spec=spec)


# ----------------------------------------------------------------------------------------------
# quantization_config


def weight_args(spec: WeightQuantSpec) -> dict:
    """compressed-tensors QuantizationArgs of the weights (fields every version knows)."""
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric,
            "group_size": spec.group_size if spec.granularity == "group" else None,
            "strategy": spec.granularity, "dynamic": False}


def quantization_config(spec: WeightQuantSpec, ignore: list[str]) -> dict:
    """config.json's `quantization_config`, as compressed-tensors' ModelCompressor writes it."""
    config = {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weight_args(spec),
                                      "input_activations": None, "output_activations": None}},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }
    try:
        import compressed_tensors

        config["version"] = compressed_tensors.__version__
    except ImportError:
        pass
    return config


def spec_from_config(config: dict) -> WeightQuantSpec:
    """The weight spec back from a `quantization_config` this module wrote."""
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != QUANT_METHOD or q.get("format") != FORMAT:
        raise QuantError(f"not a compressed-tensors {FORMAT} config (quant_method="
                         f"{q.get('quant_method')!r}, format={q.get('format')!r})")
    args = next(iter(q["config_groups"].values()))["weights"]
    return WeightQuantSpec(bits=args["num_bits"], symmetric=args["symmetric"],
                           granularity=args["strategy"], group_size=args["group_size"] or 128)


# ----------------------------------------------------------------------------------------------
# Folders


def unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors kept once (the first name), as transformers saves it."""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor
    return state


def compressed_state(model: torch.nn.Module, quantized: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """Every tensor of the export: quantized layers packed, the rest as they are."""
    state = unique_state(model)
    for name, qw in quantized.items():
        if f"{name}.weight" not in state:
            raise QuantError(f"compressed-tensors export: the model has no tensor '{name}.weight'")
        weight = state.pop(f"{name}.weight")
        if tuple(weight.shape) != qw.shape:
            raise QuantError(f"compressed-tensors export: {name}.weight has shape {tuple(weight.shape)}, "
                             f"its codes {qw.shape}")
        for key, tensor in pack_weight(qw, weight.dtype).items():
            state[f"{name}.{key}"] = tensor
    return state


def export_compressed(model: torch.nn.Module, tokenizer, quantized: dict[str, QuantizedWeight],
                      folder: Path, max_shard_bytes: int = 2**31, overwrite: bool = False) -> Path:
    """Write a compressed-tensors pack-quantized folder (see the module doc); atomic."""
    if not quantized:
        raise QuantError("compressed-tensors export: no quantized layers")
    specs = {qw.spec for qw in quantized.values()}
    if len(specs) > 1:
        raise QuantError("compressed-tensors export: all quantized layers must share one spec")
    spec = specs.pop()
    _check_packable(spec)
    state = compressed_state(model, quantized)
    ignore = [name for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name not in quantized]
    with atomic_folder(Path(folder), overwrite) as tmp:
        write_tensors_sharded(state, tmp, max_shard_bytes, metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config["quantization_config"] = quantization_config(spec, ignore)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(folder)


def read_compressed(folder: Path) -> dict[str, QuantizedWeight]:
    """The codes, scales and zero points of a folder written by `export_compressed`."""
    folder = Path(folder)
    spec = spec_from_config(json.loads((folder / "config.json").read_text()))
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name, _, local = key.rpartition(".")
                if local.startswith("weight_"):
                    layers.setdefault(name, {})[local] = f.get_tensor(key)
    return {name: unpack_weight(tensors, spec) for name, tensors in layers.items()}


def export_dequantized(model: torch.nn.Module, tokenizer, folder: Path, max_shard_size: str = "2GB",
                       overwrite: bool = False) -> Path:
    """Write the model as it is in memory (weights already Ŵ) as a plain float folder; atomic."""
    return save_model_folder(model, tokenizer, Path(folder), max_shard_size=max_shard_size,
                             overwrite=overwrite)


def weights_size(folder: Path) -> int:
    """Bytes of the safetensors files in a folder (the model's size on disk)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
