"""Merging LoRA adapters (and other deltas) into a base model block by block, without loading it.

`merge_lora_into_base` writes the exact merged model

    θ = θ_base + Σ_i w_i · s_i · B_i · A_i

for every adapted weight (s_i = α_i/r_i, or α_i/√r_i with rsLoRA), the other tensors unchanged.
The update of each weight is the product B·A computed in float32 and added to the base tensor in
float32, then cast back to the base tensor's dtype; A and B are never merged separately.

Memory stays bounded and the merge fast: tensors are merged in blocks of rows (`_merged_blocks`,
about a million elements each) wherever the merge acts element by element (LoRA updates, task
arithmetic over full models), read from the shards block by block (`ShardReader`; the base once,
however many inputs subtract it) and written to the output shard as they come, on a second thread
(`workbench.io.write_sharded`). So the merge holds a few blocks plus the adapters' factors, whatever the
size of a tensor, and its passes (convert, subtract, add, check, cast) run on data in the CPU's
cache. Output shards hold at most `max_shard_bytes` each. The shard layout follows transformers:
a single `model.safetensors` when everything fits, else `model-0000k-of-0000N.safetensors` plus
`model.safetensors.index.json`. The config, generation config and tokenizer files are copied.

The write is atomic: everything goes into a hidden sibling folder `.<name>.partial`, renamed to
the target at the end. An existing target is refused, and a failure half-way removes the partial
folder. All checks that can be made from the file headers (every adapted weight exists in the
base with the adapter's shape, factors are finite, the adapter format is one this merge handles)
run before any weight is read or any output is written.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import platform
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

from adapters.lora import check_adapter_format
from workbench.io import FLOAT_DTYPES, ShardReader, all_finite, atomic_folder, model_layout, write_sharded
from workbench.progress import phase as progress_phase
from workbench.task_vector import LoraTaskVector


COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "tokenizer.model",
                "added_tokens.json")

DeltaReader = Callable[[str], "torch.Tensor | None"]  # tensor name → a delta to add, or None


def merge_lora_into_base(base_folder: Path, adapters: list[tuple[Path, float]], out_folder: Path,
                         max_shard_bytes: int = 2**31,
                         extra_deltas: DeltaReader | None = None) -> Path:
    """Write base + Σ w_i·s_i·B_i·A_i (+ `extra_deltas(name)` where given) to `out_folder`.

    `adapters` holds (PEFT LoRA folder, weight) pairs; a negative weight subtracts an adapter.
    `extra_deltas`, if given, is called with every tensor name and returns a float32 delta of the
    tensor's shape to add as well, or None. If it has `by_rows = True`, it is called as
    `extra_deltas(name, (start, stop))` for blocks of rows instead (see `_merged_blocks`).
    Returns the output folder.

    Raises FileExistsError if `out_folder` exists, ValueError (naming the tensor, and the adapter
    folder where one is at fault) if an adapter does not fit the base or holds non-finite values.
    """
    base_folder, out_folder = Path(base_folder), Path(out_folder)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if out_folder.exists():
        raise FileExistsError(f"{out_folder}: output folder already exists")

    # Pre-flight: headers and factors only, no base weight is read.
    layout = model_layout(base_folder)  # name → (shard path, dtype, shape, nbytes), in file order
    updates = _load_adapters(adapters, layout)  # name → [(B, A, w·s)]

    with atomic_folder(out_folder) as tmp:
        _write_shards(layout, updates, extra_deltas, tmp, max_shard_bytes)
        for name in COPIED_FILES:
            if (base_folder / name).is_file():
                shutil.copy2(base_folder / name, tmp / name)
    return out_folder


def merged_tensors(base_folder: Path, adapters: list[tuple[Path, float]],
                   extra_deltas: DeltaReader | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor `merge_lora_into_base` would write, in storage order, with
    the same checks and the same arithmetic, without writing anything (to evaluate a merge in
    memory). One merged tensor is alive at a time unless the caller keeps them."""
    layout = model_layout(Path(base_folder))
    updates = _load_adapters(adapters, layout)
    with freed_memory_kept(), contextlib.closing(ShardReader(layout)) as read:
        for name in layout:
            blocks = list(_merged_blocks(name, read, updates.get(name, ()), extra_deltas))
            yield name, blocks[0] if len(blocks) == 1 else torch.cat(blocks)


# ----------------------------------------------------------------------------------------------
# Pre-flight


def _load_adapters(adapters: list[tuple[Path, float]],
                   layout: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name → (B, A) stacked over the adapters that update the weight: B = [c₁B₁ | c₂B₂ | …] and
    A = [A₁; A₂; …] with cᵢ = wᵢ·sᵢ, so that B·A = Σ cᵢ·Bᵢ·Aᵢ is one matrix product (one pass over
    the full-size update instead of one per adapter), all in float32."""
    updates: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for folder, weight in adapters:
        folder = Path(folder)
        check_adapter_format(folder)
        vector = LoraTaskVector.from_peft_folder(folder)
        for name, (b, a, scale) in vector.factors.items():
            if name not in layout:
                raise ValueError(f"tensor {name}: adapted by {folder} but not in the base model")
            _, dtype, shape, _ = layout[name]
            if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
                raise ValueError(f"tensor {name}: LoRA factors in {folder} do not chain "
                                 f"(B {tuple(b.shape)}, A {tuple(a.shape)})")
            if shape != [b.shape[0], a.shape[1]]:
                raise ValueError(f"tensor {name}: shape {tuple(shape)} in the base but the adapter "
                                 f"{folder} updates shape {(b.shape[0], a.shape[1])}")
            if dtype not in FLOAT_DTYPES:
                raise ValueError(f"tensor {name}: base dtype {dtype} cannot take a LoRA update")
            for part, t in (("lora_B", b), ("lora_A", a)):
                if not all_finite(t):
                    raise ValueError(f"tensor {name}: {part} in {folder} holds NaN or inf")
            if not math.isfinite(weight * scale):
                raise ValueError(f"tensor {name}: non-finite weight·scale for {folder}")
            updates.setdefault(name, []).append((b, a, float(weight) * scale))
    return {name: (torch.cat([b.float() * c for b, _, c in parts], dim=1),
                   torch.cat([a.float() for _, a, _ in parts], dim=0))
            for name, parts in updates.items()}


# ----------------------------------------------------------------------------------------------
# Writing


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@contextlib.contextmanager
def freed_memory_kept():
    """While inside, memory the merge frees stays in the process for its next tensor.

    A merge allocates and frees blocks and tensors of megabytes one after the other. glibc serves an
    allocation above its mmap threshold with fresh pages from the kernel and unmaps them on free,
    and returns the top of its heap to the kernel once more than its trim threshold is free, so a
    new tensor keeps paying a page fault per 4 KiB page on first touch. On the benchmark's machine
    a read into a fresh buffer ran 10x slower than into a reused one and element-wise passes over
    whole tensors 4-7x slower; with blocks of rows, merge (a) of `bench/merge_speed.py` took
    1.8-3.3 s without this and 1.5-1.6 s with it. Inside, allocations up to 64 MiB (the blocks,
    and all but the largest whole tensors of TIES or DARE) come from the heap and freed memory
    stays there for the next ones. On the way out the thresholds go to 32 / 64 MiB (where glibc's
    own dynamic thresholds end up in a process that frees large tensors) and the freed memory is
    returned to the system (malloc_trim). No-op where the C library is not glibc.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
        libc.malloc_trim(0)


@functools.cache
def _glibc():
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        return libc
    except OSError:
        return None


def _write_shards(layout: dict, updates: dict, extra_deltas: DeltaReader | None, folder: Path,
                  max_shard_bytes: int) -> dict[str, str]:
    """Every merged tensor, in the base's storage order, into shards in `folder` (`write_sharded`)."""
    read = ShardReader(layout)
    # progress: one event per tensor written (a copy without updates is "writing shards")
    events = progress_phase("merging tensors" if updates or extra_deltas is not None else "writing shards",
                            len(layout), "tensor")
    with freed_memory_kept(), contextlib.closing(read), events:
        specs = [(name, dtype, shape) for name, (_, dtype, shape, _) in layout.items()]
        merged = _counted((_merged_blocks(name, read, updates.get(name, ()), extra_deltas)
                           for name in layout), events.update)
        weight_map = write_sharded(folder, specs, merged, max_shard_bytes, metadata={"format": "pt"})
        events.update(len(layout))  # the last tensor is written once write_sharded returns
        return weight_map


def _counted(items: Iterator, update: Callable[[int], None]) -> Iterator:
    """The items, calling `update(k)` when the k-th is asked for (the k before it are written)."""
    for k, item in enumerate(items):
        update(k)
        yield item


BLOCK_ELEMENTS = 1 << 20  # merge rows in blocks of about this many elements (4 MiB in float32)


def _merged_blocks(name: str, read: ShardReader, factors, extra_deltas) -> Iterator[torch.Tensor]:
    """The merged tensor `name` as consecutive blocks of rows (`_merged_tensor` of each block).

    Merging by blocks of about `BLOCK_ELEMENTS` keeps the few passes of a merge (read, convert,
    subtract, add, check, cast) over data that stays in the CPU's cache instead of streaming
    full-size float32 tensors through memory once per pass; it also bounds the merge's memory by
    the block size rather than the largest tensor. Every operation acts row by row, so the result
    is the same merge. Used when `extra_deltas` is None or reads by rows (`by_rows`); otherwise
    (TIES, DARE, RoAd deltas need the whole tensor) the tensor is one block.
    """
    by_rows = extra_deltas is None or getattr(extra_deltas, "by_rows", False)
    for rows in row_blocks(read.layout[name][2]) if by_rows else [None]:
        yield _merged_tensor(name, read(name, rows), factors, extra_deltas, rows)


def row_blocks(shape: list[int]) -> Iterator[tuple[int, int] | None]:
    """Consecutive blocks of rows (start, stop) of about `BLOCK_ELEMENTS` elements covering a
    tensor of `shape`; a single None (the whole tensor) for a scalar or a tensor of one row."""
    if not shape or shape[0] <= 1:
        yield None
        return
    step = max(1, BLOCK_ELEMENTS // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], step):
        yield start, min(start + step, shape[0])


def _merged_tensor(name: str, base: torch.Tensor, factors, extra_deltas,
                   rows: tuple[int, int] | None = None) -> torch.Tensor:
    """base + B·A + extra in float32, cast back to the base's dtype, where `factors` is the stacked
    (B, A) of `_load_adapters` (B·A = Σ cᵢ·Bᵢ·Aᵢ) or empty. With `rows` = (start, stop), `base`
    holds only those rows of the tensor, and so does the result.

    Everything runs in place on one float32 tensor: the extra delta itself when `extra_deltas.fresh`
    is true (it hands over a new tensor per call, as `merge.dense`'s do), else a copy; the product
    is added by the matrix product itself (extra += B·A), then the base.
    """
    extra = None
    if extra_deltas is not None:
        extra = extra_deltas(name) if rows is None else extra_deltas(name, rows)
        if extra is not None:
            if tuple(extra.shape) != tuple(base.shape):
                raise ValueError(f"tensor {name}: extra delta has shape {tuple(extra.shape)}, "
                                 f"the base tensor {tuple(base.shape)}")
            if not base.is_floating_point():
                raise ValueError(f"tensor {name}: base dtype {base.dtype} cannot take a delta")
    delta = None
    if extra is not None:
        fresh = getattr(extra_deltas, "fresh", False) and extra.dtype == torch.float32
        delta = extra if fresh else extra.to(torch.float32, copy=True)
    if factors:
        b, a = factors
        if rows is not None:
            b = b[rows[0]:rows[1]]
        delta = torch.mm(b, a) if delta is None else delta.addmm_(b, a)
    if delta is None:
        return base.contiguous()
    merged = delta.add_(base)  # = base + delta
    if not all_finite(merged, torch.finfo(base.dtype).max):
        source = ("the base tensor" if not all_finite(base) else
                  "the merged delta" if not all_finite(merged) else
                  f"values beyond the range of {base.dtype}")
        raise ValueError(f"tensor {name}: NaN or inf in the merged result (from {source}); "
                         "nothing is written")
    return merged.to(base.dtype).contiguous()


# ----------------------------------------------------------------------------------------------
# Rank concatenation


def lora_concat_adapter(adapters: list[tuple[Path, float]], out_folder: Path,
                        base_model: str | None = None) -> Path:
    """One LoRA adapter whose update is exactly Σ w_i·s_i·B_i·A_i, by stacking ranks.

    For each adapted weight, A = [A_1; A_2; …] and B = [w_1 s_1 B_1 | w_2 s_2 B_2 | …] with rank
    r = Σ r_i and scale 1 (lora_alpha = r, no rsLoRA), so B·A is the weighted sum of the updates.
    A weight that some adapter does not adapt gets zero factors for that adapter's block, so every
    weight has the same rank. The result is a plain PEFT folder (`PeftModel.from_pretrained`
    loads it); it is written atomically like `merge_lora_into_base`. `base_model` is recorded as
    its `base_model_name_or_path` (by default the first adapter's).
    """
    out_folder = Path(out_folder)
    if out_folder.exists():
        raise FileExistsError(f"{out_folder}: output folder already exists")
    stacked, total_rank, template = stacked_lora_factors(adapters)
    return write_lora_adapter(stacked, total_rank, out_folder, template, base_model)


def stacked_lora_factors(adapters: list[tuple[Path, float]]
                         ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, Path]:
    """Per adapted weight, (B, A) = ([w_1 s_1 B_1 | …], [A_1; …]) in float32, so B·A = Σ w_i s_i B_i A_i.

    Returns the stacked factors, their rank Σ r_i and the first adapter's folder. Each adapter is
    checked (format, finite factors, one rank for all its weights, the same shapes as the others)
    before anything is stacked.
    """
    if not adapters:
        raise ValueError("no adapters to concatenate")
    vectors = []
    for folder, weight in adapters:
        folder = Path(folder)
        check_adapter_format(folder)
        vector = LoraTaskVector.from_peft_folder(folder)
        for name, (b, a, _) in vector.factors.items():
            for part, t in (("lora_B", b), ("lora_A", a)):
                if not all_finite(t):
                    raise ValueError(f"tensor {name}: {part} in {folder} holds NaN or inf")
        ranks = {a.shape[0] for b, a, _ in vector.factors.values()}
        if len(ranks) != 1:
            raise ValueError(f"{folder}: adapted weights have different ranks {sorted(ranks)}")
        vectors.append((folder, float(weight), vector, ranks.pop()))
    names = sorted(set().union(*(v.factors for _, _, v, _ in vectors)))
    total_rank = sum(r for *_, r in vectors)
    stacked = {}
    for name in names:
        shape = None
        for folder, _, vector, _ in vectors:
            if name in vector.factors:
                b, a, _ = vector.factors[name]
                if shape is not None and shape != (b.shape[0], a.shape[1]):
                    raise ValueError(f"tensor {name}: shape {(b.shape[0], a.shape[1])} in {folder} "
                                     f"differs from {shape} in another adapter")
                shape = (b.shape[0], a.shape[1])
        a_blocks, b_blocks = [], []
        for _, weight, vector, r in vectors:
            if name in vector.factors:
                b, a, scale = vector.factors[name]
                a_blocks.append(a)
                b_blocks.append(weight * scale * b)
            else:
                a_blocks.append(torch.zeros(r, shape[1]))
                b_blocks.append(torch.zeros(shape[0], r))
        stacked[name] = (torch.cat(b_blocks, dim=1), torch.cat(a_blocks, dim=0))
    return stacked, total_rank, vectors[0][0]


def write_lora_adapter(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int,
                       out_folder: Path, template: Path, base_model: str | None = None,
                       extra_files: dict[str, str] | None = None) -> Path:
    """Write weight name → (B, A) as a PEFT LoRA folder of rank `rank` and scale 1, atomically.

    The config is `template`'s adapter_config.json with r = lora_alpha = rank, no rsLoRA, no
    per-module patterns and the adapted modules as target_modules. `extra_files` (file name →
    text) are written into the folder as well.
    """
    tensors = {}
    for name, (b, a) in factors.items():
        key = "base_model.model." + name.removesuffix(".weight")
        tensors[f"{key}.lora_A.weight"] = a.contiguous()
        tensors[f"{key}.lora_B.weight"] = b.contiguous()
    config = json.loads((Path(template) / "adapter_config.json").read_text())
    config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
                  target_modules=[n.removesuffix(".weight") for n in factors])
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    with atomic_folder(Path(out_folder)) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for file_name, text in (extra_files or {}).items():
            (tmp / file_name).write_text(text)
    return Path(out_folder)
