"""The quantization report: full precision vs round-to-nearest vs FlexRound (vs NF4 where
bitsandbytes runs), side by side.

Per model: held-out perplexity and bits per byte on general and domain text and exact-match
accuracy on held-out questions (language models, `workbench.evaluate`), or the mean cosine between
its and the full-precision model's sentence embeddings (encoders); weight storage in bytes; the
seconds quantization took. Plus FlexRound's per-block reconstruction error (MSE to the
full-precision block output) with RTN's rounding and with the learned one, and how much of RTN's
perplexity gap to full precision FlexRound closes: 100·(ppl_RTN − ppl_FlexRound)/(ppl_RTN − ppl_FP).

NF4 is the QLoRA base format (bitsandbytes 4-bit NormalFloat, blocks of 64, double-quantized
absmax), computed without calibration on the same layers: the weights are bitsandbytes' NF4 values
(`quantize_4bit` then `dequantize_4bit`), which is what a 4-bit base computes with. Where
bitsandbytes cannot run, the report says so and leaves NF4 out.
"""

from __future__ import annotations

import math
import time

import torch

from workbench.evaluate import comparison_report, format_comparison

from .export import unique_state
from .flexround import format_block_errors
from .rtn import QuantizedWeight, quantizable_layers

LABELS = {"full_precision": "full precision", "rtn": "RTN", "flexround": "FlexRound", "nf4": "NF4"}
NF4_BLOCK = 64


class NF4Unavailable(RuntimeError):
    """bitsandbytes' NF4 cannot run on this machine."""


# ----------------------------------------------------------------------------------------------
# Storage


def float_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors as stored in their dtype (tied tensors once)."""
    return sum(t.numel() * t.element_size() for t in unique_state(model).values())


def packed_layer_bytes(qw: QuantizedWeight, scale_bytes: int) -> int:
    """Bytes one layer takes in the pack-quantized export: codes in int32 words, scales in the
    model dtype, packed zero points (asymmetric), the int64 shape."""
    out, cols = qw.shape
    spec = qw.spec
    size = out * math.ceil(cols * spec.bits / 32) * 4 + qw.scale.numel() * scale_bytes + 16
    if not spec.symmetric:
        rows, groups = qw.zero_point.shape
        size += 1 if spec.granularity == "tensor" else math.ceil(rows * spec.bits / 32) * 4 * groups
    return size


def quantized_bytes(model: torch.nn.Module, quantized: dict[str, QuantizedWeight]) -> int:
    """Bytes of the model with `quantized` layers packed and every other tensor as it is."""
    total = 0
    for name, tensor in unique_state(model).items():
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and layer in quantized:
            total += packed_layer_bytes(quantized[layer], tensor.element_size())
        else:
            total += tensor.numel() * tensor.element_size()
    return total


# ----------------------------------------------------------------------------------------------
# NF4 through bitsandbytes


def _nf4_functions():
    try:
        import bitsandbytes.functional as bnbf

        probe = torch.linspace(-1, 1, NF4_BLOCK * 2).reshape(2, NF4_BLOCK)
        packed, state = bnbf.quantize_4bit(probe, blocksize=NF4_BLOCK, quant_type="nf4",
                                           compress_statistics=True)
        bnbf.dequantize_4bit(packed, state)
    except Exception as err:  # noqa: BLE001 - any failure means NF4 does not run here
        raise NF4Unavailable(f"bitsandbytes NF4 does not run on this machine "
                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    return bnbf


@torch.no_grad()
def quantize_model_nf4(model: torch.nn.Module, layers="all-linear") -> int:
    """Replace the selected layers' weights by their NF4 values (in place); return the model's
    storage bytes in NF4 (4-bit codes, 8-bit absmax per block with its second-level constants)."""
    bnbf = _nf4_functions()
    found = quantizable_layers(model, layers)
    total = float_bytes(model)
    for module in found.values():
        weight = module.weight
        device = weight.device if weight.device.type == "cuda" else torch.device("cpu")
        packed, state = bnbf.quantize_4bit(weight.detach().to(device), blocksize=NF4_BLOCK,
                                           quant_type="nf4", compress_statistics=True)
        weight.copy_(bnbf.dequantize_4bit(packed, state).to(weight.device, weight.dtype))
        stats = [state.absmax] + ([state.state2.absmax] if state.nested else [])
        total += (packed.numel() * packed.element_size() + sum(t.numel() * t.element_size() for t in stats)
                  - weight.numel() * weight.element_size())
    return total


# ----------------------------------------------------------------------------------------------
# The report


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call."""
    started = time.time()
    out = fn(*args, **kwargs)
    return out, time.time() - started


def gap_closed(fp: float, rtn: float, flexround: float) -> float | None:
    """Percent of RTN's gap to full precision that FlexRound closes (None without a gap)."""
    gap = rtn - fp
    return 100.0 * (rtn - flexround) / gap if gap > 0 else None


def build_report(rows: dict[str, dict], blocks: list[dict], setup: dict, nf4_note: str | None) -> dict:
    """report.json: setup, one row per model (metrics, bytes, seconds), block errors, gap closed.

    `rows` maps full_precision / rtn / flexround / nf4 to {"metrics", "weights_bytes", "seconds"}.
    """
    report: dict = {"setup": setup, "rows": rows, "blocks": blocks, "nf4": nf4_note or "included"}
    metrics = {LABELS[k]: row["metrics"] for k, row in rows.items()}
    if all("general_ppl" in m for m in metrics.values()):
        report["comparison"] = comparison_report(metrics, reference=LABELS["full_precision"])
        if "flexround" in rows:
            ppl = {k: rows[k]["metrics"] for k in ("full_precision", "rtn", "flexround")}
            report["gap_closed_pct"] = {kind: gap_closed(*(m[f"{kind}_ppl"] for m in ppl.values()))
                                        for kind in ("general", "domain")}
    return report


def format_quant_report(report: dict) -> str:
    """The report as terminal tables."""
    rows = report["rows"]
    labels = [LABELS[k] for k in rows]
    parts = []
    if "comparison" in report:
        parts.append(format_comparison(report["comparison"]))
    else:
        table = [("metric", *labels)]
        keys = sorted({k for row in rows.values() for k in row["metrics"]})
        for key in keys:
            table.append((key.replace("_", " "),
                          *(f"{row['metrics'].get(key, math.nan):.4f}" for row in rows.values())))
        parts.append(_table(table))
    parts.append(_table([("", *labels),
                         ("weights (MiB)", *(f"{row['weights_bytes'] / 2**20:.3f}" for row in rows.values())),
                         ("quantization time (s)", *(f"{row['seconds']:.1f}" for row in rows.values()))]))
    if report.get("gap_closed_pct"):
        parts.append("\n".join(
            f"{kind} text: " + ("RTN has no perplexity gap to full precision" if closed is None else
                                f"FlexRound closes {closed:.0f}% of RTN's perplexity gap to full precision")
            for kind, closed in report["gap_closed_pct"].items()))
    if report["blocks"]:
        parts.append("Per-block reconstruction error (MSE to the full-precision block output):\n"
                     + format_block_errors(report["blocks"]))
    if report["nf4"] != "included":
        parts.append(f"NF4: not in this report: {report['nf4']}")
    return "\n\n".join(parts)


def _table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i])
                       for i, c in enumerate(row)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
