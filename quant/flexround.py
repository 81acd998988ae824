"""FlexRound: learnable rounding by element-wise division (Lee et al. 2023, "FlexRound: Learnable
Rounding based on Element-wise Division for Post-Training Quantization", ICML).

Each quantized weight W (grouped as in `quant.rtn`) becomes

    Ŵ = s₁ · clamp(round(W ⊘ (s₁ ⊙ S₂ ⊙ s₃)), −z, 2ᵇ − 1 − z)

with s₁ the grid size (per group: per output channel, per input group, or per tensor), S₂ a
per-weight scale, s₃ a per-output-channel scale, all positive through learned logarithms, and z
the RTN zero point, kept fixed. Rounding passes gradients straight through. The learned values
are log s₁ relative to the RTN grid (s₁ = s₁ᴿᵀᴺ · exp(δ₁)), log S₂ and log s₃, all starting at 0,
so training starts exactly at round-to-nearest: exp(0) = 1 exactly, and the first codes are
RTN's codes bit for bit (learning log s₁ from log s₁ᴿᵀᴺ gives the same gradients and Adam steps).
After learning only the integer codes, s₁ and z remain (S₂ and s₃ only decided the rounding).

Block-wise reconstruction, as the reference code does it: blocks are learned in order; block k
gets the already-quantized model's activations (the output of quantized blocks 0..k−1) as input
and minimises the mean squared error between its output and the full-precision block's output on
the full-precision model's activations. Adam, learning rate decayed by a cosine to 0, one
calibration batch per iteration; only the log-scales train (norms, biases, embeddings and the head
stay as they are). (The reference sums the squared error over positions before averaging; that
is the mean times a constant, which Adam's steps do not see.) A block whose learned rounding ends
with a higher error than RTN on the calibration data keeps RTN's (reported as `kept: rtn`).
Blocks are Llama-family decoder layers or BERT-family encoder layers (`quant.rtn.find_blocks`);
each block's extra inputs (attention mask, positions, rotary embeddings) are captured once per
calibration batch at the first block and reused for every block.

Official Llama-2 W4A16 recipe (first author's code): asymmetric min-max per-channel grid, 5000
iterations per block, 512 calibration samples of 1024 tokens, batch 2, lr 3e-3 — the `reference`
preset. `fast` is a CPU setting for small models.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from workbench.io import atomic_file, write_json
from workbench.progress import phase as progress_phase

from .rtn import (QuantError, QuantizedWeight, WeightQuantSpec, block_linears, check_model,
                  find_blocks, grouped, integer_codes, quant_grid)


@dataclass(frozen=True)
class FlexRoundConfig:
    """Reconstruction settings: iterations per block, calibration rows × tokens, batch, lr."""

    iterations: int
    samples: int
    seq_len: int
    batch_size: int
    lr: float

    def __post_init__(self):
        for key in ("iterations", "samples", "seq_len", "batch_size"):
            if getattr(self, key) < 1:
                raise QuantError(f"flexround.{key} must be at least 1 (got {getattr(self, key)})")
        if self.samples % self.batch_size:
            raise QuantError(f"flexround.samples ({self.samples}) must be a multiple of "
                             f"flexround.batch_size ({self.batch_size})")
        if not self.lr > 0:
            raise QuantError(f"flexround.lr must be positive (got {self.lr})")


PRESETS = {
    # Llama-2 W4A16 in the first author's scripts: iters_w=5000, num_samples=512, block_size 1024,
    # batch max(1, 2) = 2, w_lr=3e-3.
    "reference": FlexRoundConfig(iterations=5000, samples=512, seq_len=1024, batch_size=2, lr=3e-3),
    # Small models on a CPU: the embedded base's four blocks in about 30 s on one busy core.
    "fast": FlexRoundConfig(iterations=250, samples=64, seq_len=128, batch_size=4, lr=3e-3),
}


def resolve_config(preset: str, **overrides) -> FlexRoundConfig:
    """A preset with the given (non-None) fields replaced."""
    if preset not in PRESETS:
        raise QuantError(f"flexround.preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    values = {**asdict(PRESETS[preset]), **{k: v for k, v in overrides.items() if v is not None}}
    return FlexRoundConfig(**values)


# ----------------------------------------------------------------------------------------------
# The learnable rounding of one linear layer


class RoundSTE(torch.autograd.Function):
    """round() forward, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class FlexRoundLinear(torch.nn.Module):
    """A linear layer whose weight is Ŵ = s₁ · (codes − z), codes from the learned division."""

    def __init__(self, linear: torch.nn.Linear, spec: WeightQuantSpec, name: str = "weight"):
        super().__init__()
        weight = linear.weight.detach()
        scale, zero = quant_grid(weight, spec, name)
        self.spec, self.shape = spec, tuple(weight.shape)
        self.register_buffer("w", grouped(weight, spec))                   # [out, groups, width]
        self.register_buffer("s1_rtn", scale.unsqueeze(-1))                # [rows, groups, 1]
        self.register_buffer("zero", zero.unsqueeze(-1))
        self.log_s1 = torch.nn.Parameter(torch.zeros_like(self.s1_rtn))   # log s₁ − log s₁ᴿᵀᴺ
        self.log_S2 = torch.nn.Parameter(torch.zeros_like(self.w))
        self.log_s3 = torch.nn.Parameter(torch.zeros(self.w.shape[0], 1, 1, device=weight.device))
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def grid(self) -> torch.Tensor:
        return self.s1_rtn * torch.exp(self.log_s1)

    def codes(self, rounding=torch.round) -> torch.Tensor:
        divisor = self.grid() * torch.exp(self.log_S2 + self.log_s3)
        return integer_codes(self.w / divisor, self.zero, self.spec.bits, rounding)

    def weight(self) -> torch.Tensor:
        return (self.grid() * (self.codes(RoundSTE.apply) - self.zero)).reshape(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(codes=self.codes().reshape(self.shape).to(torch.uint8),
                               scale=self.grid().squeeze(-1).clone(),
                               zero_point=self.zero.squeeze(-1).to(torch.uint8), spec=self.spec)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the RTN starting point."""
        for p in (self.log_s1, self.log_S2, self.log_s3):
            p.zero_()


def _set_module(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


# ----------------------------------------------------------------------------------------------
# Calibration data and block inputs


def calibration_batches(texts: list[str], tokenizer, seq_len: int, samples: int, batch_size: int,
                        seed: int = 0, source: str = "calibration") -> list[dict[str, torch.Tensor]]:
    """Batches of `batch_size` rows of exactly `seq_len` tokens cut from the documents joined by
    the end-of-text token (the separator token for encoders), `samples` rows drawn with `seed`."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += ids + ([sep] if sep is not None else [])
    rows = len(stream) // seq_len
    if rows == 0:
        raise QuantError(f"{source}: calibration data has {len(stream)} tokens, shorter than one "
                         f"sequence of seq_len={seq_len}; add data or lower seq_len")
    if rows < batch_size:
        raise QuantError(f"{source}: {rows} calibration rows of {seq_len} tokens, fewer than one "
                         f"batch of batch_size={batch_size}")
    n = min(samples, rows) // batch_size * batch_size
    data = torch.tensor(stream[:rows * seq_len], dtype=torch.long).view(rows, seq_len)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))[:n]
    return [{"input_ids": data[order[i:i + batch_size]]} for i in range(0, n, batch_size)]


class _StopForward(Exception):
    pass


def _move(value, device: torch.device, dtype: torch.dtype | None = None):
    """Tensors (inside tuples, lists, dicts) moved to `device`; floating ones cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if dtype is not None and value.is_floating_point() else value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device, dtype) for k, v in value.items()}
    return value


@dataclass
class BlockInput:
    """What one calibration batch feeds a block: hidden states plus the other arguments (masks,
    positions, rotary embeddings), which are the same for every block."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict


@torch.no_grad()
def capture_block_inputs(model: torch.nn.Module, first_block: torch.nn.Module,
                         batches: list[dict[str, torch.Tensor]], cache_device: torch.device
                         ) -> list[BlockInput]:
    """Run the model up to its first block on every batch and keep that block's inputs."""
    device = next(model.parameters()).device
    captured: list[BlockInput] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(BlockInput(_move(hidden, cache_device, torch.float32),
                                   _move(tuple(args[1:]), cache_device), _move(kwargs, cache_device)))
        raise _StopForward

    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**_move(batch, device), **extra)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _run_block(block, hidden: torch.Tensor, item: BlockInput, device) -> torch.Tensor:
    out = block(hidden.to(device), *_move(item.args, device, torch.float32),
                **_move(item.kwargs, device, torch.float32))
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _block_outputs(block, inputs: list[torch.Tensor], items: list[BlockInput], device, cache_device):
    return [_run_block(block, h, item, device).float().to(cache_device) for h, item in zip(inputs, items)]


@torch.no_grad()
def block_error(block, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                items: list[BlockInput], device) -> float:
    """Mean squared error between the block's outputs on `inputs` and `targets`, over all batches."""
    total, count = 0.0, 0
    for h, t, item in zip(inputs, targets, items):
        out = _run_block(block, h, item, device).float()
        total += float(((out - t.to(device)) ** 2).sum())
        count += t.numel()
    return total / count


# ----------------------------------------------------------------------------------------------
# Block-by-block reconstruction


@dataclass
class FlexRoundResult:
    """Codes and grids of every quantized layer, and each block's reconstruction error (MSE to the
    full-precision block output) with RTN's rounding and with the learned one."""

    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    blocks: list[dict] = field(default_factory=list)


def _learn_block(block, wrappers: dict[str, FlexRoundLinear], q_in, fp_out, items, config: FlexRoundConfig,
                 seed: int, device, label: str, progress: bool) -> None:
    params = [p for w in wrappers.values() for p in (w.log_s1, w.log_S2, w.log_s3)]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.iterations, eta_min=0.0)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    bar = tqdm(range(config.iterations), desc=label, unit="it", disable=not progress,
               mininterval=1.0)
    for step in bar:
        if not order:  # one pass over the batches in a fresh random order
            order = torch.randperm(len(q_in), generator=generator).tolist()
        b = order.pop()
        out = _run_block(block, q_in[b], items[b], device).float()
        loss = F.mse_loss(out, fp_out[b].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 25 == 0:
            bar.set_postfix(mse=f"{loss.item():.3e}")
    bar.close()


def _reconstruct_block(block, names: dict[str, str], spec: WeightQuantSpec, config: FlexRoundConfig,
                       q_in, fp_out, items, device, seed: int, label: str, progress: bool) -> dict:
    """Learn one block's rounding (its linear layers swapped for FlexRoundLinear meanwhile) and
    return its codes and errors; the block comes back with its own layers, weights untouched."""
    started = time.time()
    trainable = {p: p.requires_grad for p in block.parameters()}
    block.requires_grad_(False)
    originals = {full: block.get_submodule(rel) for full, rel in names.items()}
    wrappers = {full: FlexRoundLinear(originals[full], spec, f"{full}.weight") for full in names}
    for full, rel in names.items():
        _set_module(block, rel, wrappers[full])
    try:
        rtn_mse = block_error(block, q_in, fp_out, items, device)
        _learn_block(block, wrappers, q_in, fp_out, items, config, seed, device, label, progress)
        learned_mse = block_error(block, q_in, fp_out, items, device)
        kept = "flexround" if learned_mse <= rtn_mse else "rtn"
        if kept == "rtn":
            for w in wrappers.values():
                w.reset()
        quantized = {full: w.quantized() for full, w in wrappers.items()}
    finally:
        for full, rel in names.items():
            _set_module(block, rel, originals[full])
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    return {"rtn_mse": rtn_mse, "flexround_mse": learned_mse, "kept": kept,
            "seconds": round(time.time() - started, 2), "quantized": quantized}


def flexround_quantize(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                       spec: WeightQuantSpec, config: FlexRoundConfig, layers="all-linear",
                       seed: int = 0, progress: bool = True, cache_device: str = "cpu",
                       done: FlexRoundResult | None = None,
                       on_block: Callable[[int, FlexRoundResult], None] | None = None) -> FlexRoundResult:
    """Quantize the selected linear layers of every block with FlexRound, in place.

    `batches` are model inputs (`input_ids`, optionally `attention_mask`), all the same batch
    size. The model's weights end as Ŵ in their own dtype; the result holds the codes. `done`
    (a result of an interrupted run) skips blocks it already holds; `on_block(k, result)` is called
    after each block, e.g. to save a checkpoint. Each block's learning is seeded by (seed, k), so a
    resumed run ends with the same codes as an uninterrupted one. An exception leaves the model
    part-quantized: work on a copy when the original is still needed. Progress: one event per
    block ("quantizing blocks", `workbench.progress`).
    """
    if not batches:
        raise QuantError("no calibration batches")
    check_model(model, spec, layers)
    prefix, blocks = find_blocks(model)
    device, cache = next(model.parameters()).device, torch.device(cache_device)
    was_training = model.training
    model.eval()
    result = FlexRoundResult(dict(done.quantized), list(done.blocks)) if done else FlexRoundResult()
    items = capture_block_inputs(model, blocks[0], batches, cache)
    fp_in = [item.hidden for item in items]
    q_in = fp_in
    events = progress_phase("quantizing blocks", len(blocks), "block")  # block k + 1 of n done
    for k, block in enumerate(blocks):
        names = {f"{prefix}.{k}.{n}": n for n in block_linears(block, layers)}
        dtype = next(block.parameters()).dtype
        block.float()
        fp_out = _block_outputs(block, fp_in, items, device, cache)
        if names and not all(full in result.quantized for full in names):
            row = _reconstruct_block(block, names, spec, config, q_in, fp_out, items, device,
                                     seed * 100_003 + k, f"FlexRound block {k + 1}/{len(blocks)}", progress)
            result.quantized.update(row.pop("quantized"))
            result.blocks.append({"block": k, **row})
        with torch.no_grad():
            for full, rel in names.items():
                block.get_submodule(rel).weight.copy_(result.quantized[full].dequantize(dtype).float())
        q_in = _block_outputs(block, q_in, items, device, cache)
        fp_in = fp_out
        block.to(dtype)
        if names and on_block is not None:
            on_block(k, result)
        events.update(k + 1)
    model.train(was_training)
    return result


def format_block_errors(blocks: list[dict]) -> str:
    """Per-block reconstruction error, RTN vs FlexRound, as a small table."""
    lines = [f"{'block':>5}  {'RTN mse':>11}  {'FlexRound mse':>13}  {'change':>8}  kept"]
    for row in blocks:
        rel = 100.0 * (row["flexround_mse"] / row["rtn_mse"] - 1.0) if row["rtn_mse"] > 0 else math.nan
        lines.append(f"{row['block']:>5}  {row['rtn_mse']:>11.4e}  {row['flexround_mse']:>13.4e}  "
                     f"{rel:>+7.1f}%  {row['kept']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Checkpoints: a killed run resumes after its last finished block

CHECKPOINT_TENSORS = "quantized.safetensors"
CHECKPOINT_INFO = "blocks.json"


def save_checkpoint(result: FlexRoundResult, folder: Path) -> None:
    """The finished blocks' codes and errors; each file replaced atomically, tensors first (the
    info file lists what is complete, so a kill between the two loses at most one block)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{key}": getattr(qw, key).contiguous()
               for name, qw in result.quantized.items() for key in ("codes", "scale", "zero_point")}
    with atomic_file(folder / CHECKPOINT_TENSORS) as tmp:
        save_file(tensors, str(tmp))
    write_json(folder / CHECKPOINT_INFO, {"layers": sorted(result.quantized), "blocks": result.blocks})


def load_checkpoint(folder: Path, spec: WeightQuantSpec) -> FlexRoundResult | None:
    """What `save_checkpoint` wrote, or None when there is no checkpoint."""
    from safetensors.torch import load_file

    if not (folder / CHECKPOINT_INFO).is_file():
        return None
    info = json.loads((folder / CHECKPOINT_INFO).read_text(encoding="utf-8"))
    tensors = load_file(str(folder / CHECKPOINT_TENSORS))
    quantized = {name: QuantizedWeight(tensors[f"{name}.codes"], tensors[f"{name}.scale"],
                                       tensors[f"{name}.zero_point"], spec) for name in info["layers"]}
    return FlexRoundResult(quantized, info["blocks"])
