"""The training loop: plain code, read top to bottom (in the spirit of nanoGPT / torchtune).

One optimizer step = one global batch from the `BatchPlan`, split into `grad_accum` micro-batches,
each split across processes (rank r takes every world_size-th row). The loss is the summed token
cross-entropy divided by the number of target tokens in the whole global batch, so one process and
N processes compute the same number, padding-free and mask-aware.

Runs on `accelerate` (`accelerate launch` / `torchrun` give DDP; gloo on CPU). bf16 autocast on a
GPU, optional gradient checkpointing, fused AdamW where torch has it. Checkpoints hold the
trainable tensors, the optimizer state and every RNG state, all as safetensors, so a resumed run
repeats the uninterrupted run's loss curve.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
import shutil
import signal
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import IGNORE, BatchPlan
from .io import atomic_folder, partial_folder
from .progress import phase as progress_phase
from .sections import TrainSpec
from .workspace import Run, write_json


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stopped before applying that step."""


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules


def warmup_steps(spec: TrainSpec, total: int) -> int:
    return math.ceil(spec.warmup_ratio * total) if spec.warmup_ratio > 0 else 0


def lr_at(step: int, spec: TrainSpec, total: int) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warmup over ceil(warmup_ratio·total) steps (re-warming a pretrained model), then:
    cosine: min + (peak − min)·½(1 + cos(π·p)), p the progress after warmup;
    wsd: constant until the last ceil(decay_ratio·total) steps, then linear to min;
    constant: peak ("infinite" schedule, anneal separately before export).
    min = min_lr_ratio · peak.
    """
    peak, warm = spec.lr, warmup_steps(spec, total)
    low = peak * spec.min_lr_ratio
    if step < warm:
        return peak * (step + 1) / warm
    if spec.schedule == "constant":
        return peak
    if spec.schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_start = max(warm, total - math.ceil(spec.decay_ratio * total))
    if step < decay_start:
        return peak
    progress = (step - decay_start + 1) / max(1, total - decay_start)
    return peak + (low - peak) * progress


# ----------------------------------------------------------------------------------------------
# Checkpoints (all safetensors: no pickles anywhere)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for idx, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                meta["scalars"][f"{idx}.{key}"] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class TrainingStopped(KeyboardInterrupt):
    """A stop request (Ctrl-C, SIGINT or SIGTERM) honoured after a step and its checkpoint."""


class StopRequest:
    """While active, the first SIGINT or SIGTERM only asks the loop to stop: the step in flight
    finishes, a checkpoint of it is written, then `TrainingStopped` is raised (so `workbench
    resume` loses nothing). A second signal interrupts at once. Signal handlers can only be set
    from the main thread; elsewhere the default behaviour stays.
    """

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@dataclass
class Progress:
    step: int = 0        # optimizer steps done
    tokens: int = 0      # training tokens seen
    elapsed: float = 0.0  # seconds spent in training steps


def save_checkpoint(folder: Path, trainable: dict[str, torch.nn.Parameter], optimizer,
                    progress: Progress, rank: int, is_main: bool, keep: int) -> Path:
    """Write checkpoints/step-NNNNNN atomically (hidden temp folder, then rename: `atomic_folder`,
    made and renamed by the main process; every process writes its RNG state into it)."""
    target = folder / f"step-{progress.step:06d}"
    writing = atomic_folder(target, overwrite=True) if is_main else nullcontext(partial_folder(target))
    with writing as tmp:
        if is_main:
            save_file({n: p.detach().cpu().contiguous() for n, p in trainable.items()},
                      tmp / "trainable.safetensors")
            tensors, meta = _flatten_optimizer(optimizer.state_dict())
            save_file(tensors, tmp / "optimizer.safetensors")
            write_json(tmp / "optimizer.json", meta)
            write_json(tmp / "progress.json", progress.__dict__)
        _barrier()
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, tmp / f"rng-{rank}.safetensors")
        _barrier()
    if is_main:
        for old in sorted(folder.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    _barrier()
    return target


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(p for p in folder.glob("step-*") if (p / "progress.json").exists())
    return found[-1] if found else None


def load_checkpoint(path: Path, trainable: dict[str, torch.nn.Parameter], optimizer,
                    rank: int) -> Progress:
    saved = load_file(path / "trainable.safetensors")
    missing = sorted(set(trainable) - set(saved))
    if missing:
        raise RuntimeError(f"{path}: checkpoint lacks trainable tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name].to(param.device, param.dtype))
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_unflatten_optimizer(load_file(path / "optimizer.safetensors"), meta))
    rng_file = path / f"rng-{rank}.safetensors"
    rng = load_file(rng_file if rng_file.exists() else path / "rng-0.safetensors")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return Progress(**json.loads((path / "progress.json").read_text()))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------
# The loop


def process_state():
    """The process group of this run: DDP under `torchrun` / `accelerate launch` (gloo on CPU)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def make_accelerator(precision: str):
    """Accelerator with bf16 autocast on a capable GPU when precision is auto or bf16."""
    from accelerate import Accelerator

    use_bf16 = precision == "bf16" or (  # on CPU, bf16 autocast only when asked for
        precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    process_state()
    return Accelerator(mixed_precision="bf16" if use_bf16 else "no", cpu=not torch.cuda.is_available())


def make_optimizer(params: list[torch.nn.Parameter], spec: TrainSpec):
    """AdamW, fused where torch supports it for this device."""
    kwargs = dict(lr=spec.lr, weight_decay=spec.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def next_token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ −log p(labels[t+1] | ≤ t) over target positions (-100 ignored), in float32.

    The labels are shifted left (the last position gets -100) instead of slicing the logits, so
    no logits-sized copy is made in the forward or the backward pass. Logits longer than the
    labels (soft prompt tuning prepends virtual tokens) are aligned on their last positions.
    """
    if logits.shape[1] > labels.shape[1]:
        logits = logits[:, -labels.shape[1]:]
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           ignore_index=IGNORE, reduction="sum")


def token_loss_sum(model, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's summed next-token loss on one micro-batch."""
    return next_token_nll_sum(model(input_ids=inputs, use_cache=False).logits, labels)


class LanguageModelObjective:
    """Next-token loss: Σ token NLL / target tokens of the whole global batch.

    An objective has two parts: `totals` counts what the step normalises by over the whole global
    batch (before it is split into micro-batches and processes), and `__call__` returns one
    micro-batch's share, so that the shares of all micro-batches and processes sum to the step's
    loss. Methods with their own training signal (MixDA, classification) provide their own.
    """

    def totals(self, inputs: torch.Tensor, labels: torch.Tensor, replay: torch.Tensor) -> dict:
        return {"tokens": int((labels[:, 1:] != IGNORE).sum())}

    def __call__(self, model, inputs, labels, replay, totals: dict) -> torch.Tensor:
        return token_loss_sum(model, inputs, labels) / max(1, totals["tokens"])


class ClassificationObjective:
    """Sequence classification: Σ cross-entropy over rows / labelled rows of the global batch.

    Rows are single examples right-padded with `pad_id` (the attention mask leaves the padding
    out); the class id sits in label column 0.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def totals(self, inputs: torch.Tensor, labels: torch.Tensor, replay: torch.Tensor) -> dict:
        return {"rows": int((labels[:, 0] != IGNORE).sum())}

    def __call__(self, model, inputs, labels, replay, totals: dict) -> torch.Tensor:
        logits = model(input_ids=inputs, attention_mask=(inputs != self.pad_id).long()).logits
        return F.cross_entropy(logits.float(), labels[:, 0], ignore_index=IGNORE,
                               reduction="sum") / max(1, totals["rows"])


class TokenMasker:
    """BERT's masked-LM corruption (Devlin et al. 2019): about `prob` of the non-special tokens of
    a row are chosen; of those 80% become the mask token, 10% a random token, 10% stay. Returns
    (corrupted inputs, labels) with labels = the original token at chosen positions, -100 elsewhere.

    Deterministic per row: the draw comes from a generator seeded by (seed, the row's tokens), so
    the global-batch count in an objective's `totals` and each micro-batch's corruption agree, a
    resumed run corrupts as before, and evaluation sees the same masks for base and adapted model.
    """

    def __init__(self, tokenizer, seed: int = 0, prob: float = 0.15):
        if tokenizer.mask_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no mask token; masked-LM training "
                             "needs an encoder tokenizer (BERT, RoBERTa)")
        self.mask_id, self.vocab, self.seed, self.prob = tokenizer.mask_token_id, len(tokenizer), seed, prob
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    def _row(self, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(row.numpy().tobytes()))
        chosen = (torch.rand(row.shape, generator=g) < self.prob) & ~torch.isin(row, self.special)
        action = torch.rand(row.shape, generator=g)
        random_tokens = torch.randint(self.vocab, row.shape, generator=g)
        corrupted = torch.where(chosen & (action < 0.8), self.mask_id, row)
        corrupted = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, corrupted)
        return corrupted, torch.where(chosen, row, IGNORE)

    def __call__(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self._row(row) for row in inputs.detach().long().cpu()]
        if not pairs:
            return inputs, torch.full_like(inputs, IGNORE)
        corrupted, labels = (torch.stack(x).to(inputs.device) for x in zip(*pairs))
        return corrupted, labels


def masked_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ −log p(original token) over the masked positions (labels ≠ -100), in float32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                           reduction="sum")


class MaskedLMObjective:
    """Masked-LM loss (encoders): Σ NLL of the masked tokens / masked tokens of the global batch."""

    def __init__(self, masker: TokenMasker):
        self.masker = masker

    def totals(self, inputs: torch.Tensor, labels: torch.Tensor, replay: torch.Tensor) -> dict:
        return {"masked": int((self.masker(inputs)[1] != IGNORE).sum())}

    def __call__(self, model, inputs, labels, replay, totals: dict) -> torch.Tensor:
        corrupted, targets = self.masker(inputs)
        return masked_nll_sum(model(input_ids=corrupted).logits, targets) / max(1, totals["masked"])


class StepObserver:
    """Called around each optimizer update (e.g. to record a path-integral importance)."""

    def before_update(self) -> None:
        """Gradients are final (clipped); parameters are still the old ones."""

    def after_update(self) -> None:
        """Parameters hold the new values."""


class NonFiniteLoss(ArithmeticError):
    """A step's loss is NaN or infinite; the update was not applied."""

    def __init__(self, value: float):
        super().__init__(f"loss is {value}")
        self.value = value


def optimizer_step(model, optimizer, plan: BatchPlan, step: int, spec: TrainSpec, accelerator,
                   trainable: dict[str, torch.nn.Parameter], objective, penalty=None,
                   observer: StepObserver | None = None, distributed: bool = True
                   ) -> tuple[float, torch.Tensor]:
    """One optimizer step on the global batch of `step`, the one step every loop of the workbench
    takes (training, and the importance recording of the forgetting regularizer).

    The batch is split into `grad_accum` micro-batches and each across processes (rank r takes
    every world_size-th row; `distributed=False`: this process takes every row), under the
    accelerator's autocast, gradients synchronised on the last micro-batch only; the loss summed
    over micro-batches (and processes) is returned with the batch's inputs. NaN or inf raises
    `NonFiniteLoss` before any update; then gradients are clipped to `max_grad_norm`, the observer
    sees the update, and gradients are cleared.
    """
    world, rank = (accelerator.num_processes, accelerator.process_index) if distributed else (1, 0)
    rows_per_micro = spec.batch_size // spec.grad_accum
    inputs, labels = plan.batch(step)
    replay = torch.arange(len(inputs)) >= plan.n_train
    totals = objective.totals(inputs, labels, replay)
    device = accelerator.device
    step_loss = torch.zeros((), device=device)
    for micro in range(spec.grad_accum):
        rows = slice(micro * rows_per_micro, (micro + 1) * rows_per_micro)
        x, y, r = (t[rows][rank::world].to(device) for t in (inputs, labels, replay))
        sync = micro == spec.grad_accum - 1 or world == 1
        with accelerator.autocast(), (accelerator.no_sync(model) if not sync else nullcontext()):
            loss = objective(model, x, y, r, totals)
            if penalty is not None:  # once per step in total, over micro-batches and processes
                loss = loss + penalty() / (spec.grad_accum * world)
            accelerator.backward(loss * world)  # DDP averages gradients over processes
        step_loss += loss.detach()
    step_loss = accelerator.reduce(step_loss, reduction="sum") if world > 1 else step_loss
    value = float(step_loss)
    if not math.isfinite(value):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(value)
    if spec.max_grad_norm > 0:
        accelerator.clip_grad_norm_(list(trainable.values()), spec.max_grad_norm)
    if observer is not None:
        observer.before_update()
    optimizer.step()
    if observer is not None:
        observer.after_update()
    optimizer.zero_grad(set_to_none=True)
    return value, inputs


def train_loop(model, plan: BatchPlan, spec: TrainSpec, total_steps: int, run: Run, accelerator,
               trainable: dict[str, torch.nn.Parameter], resume: bool = False,
               evaluate: Callable[[int], dict] | None = None,
               on_step: Callable[[int, float], None] | None = None,
               objective=None, penalty: Callable[[], torch.Tensor] | None = None,
               phase: str = "training") -> Progress:
    """Train for `total_steps` optimizer steps; checkpoint, log and evaluate along the way.

    `evaluate(step)` returns metrics to log (called at the steps in spec.eval_at); `on_step(step,
    loss)` is called after each step (progress reporting, tests). `objective` is the training
    signal (`LanguageModelObjective` by default); `penalty()` is a term on the parameters added
    once per step (a regularizer). Each optimizer step is a progress
    event of `phase` with its loss in the run's progress.jsonl (`workbench.progress`).
    """
    objective = objective or LanguageModelObjective()
    world, rank = accelerator.num_processes, accelerator.process_index
    if (spec.batch_size // spec.grad_accum) % world:
        raise ValueError(f"train.batch_size / train.grad_accum ({spec.batch_size // spec.grad_accum}) "
                         f"must be divisible by the number of processes ({world})")
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = make_optimizer(list(trainable.values()), spec)
    model, optimizer = accelerator.prepare(model, optimizer)
    ckpt_dir = run.path("checkpoints")
    progress = Progress()
    last_good = None
    if resume and (found := latest_checkpoint(ckpt_dir)) is not None:
        progress = load_checkpoint(found, trainable, optimizer, rank)
        last_good = found.name
        if accelerator.is_main_process:
            run.truncate_metrics(progress.step)
            run.log(f"resumed from {found.name}")
    bar = tqdm(total=total_steps, initial=progress.step, desc=run.info.get("name", "train"),
               unit="step", disable=not accelerator.is_main_process, dynamic_ncols=True)
    events = progress_phase(phase, total_steps, "step", step=progress.step, folder=run.folder,
                            enabled=accelerator.is_main_process)
    with StopRequest() as stop, events:  # Ctrl-C / SIGTERM: finish the step, checkpoint, stop
        for step in range(progress.step, total_steps):
            started = time.perf_counter()
            lr = lr_at(step, spec, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                value, inputs = optimizer_step(model, optimizer, plan, step, spec, accelerator,
                                               trainable, objective, penalty)
            except NonFiniteLoss as err:
                raise TrainingDiverged(
                    f"loss is {err.value} at step {step + 1}; training stopped before applying it. "
                    f"Last good checkpoint: {last_good or 'none'} (in {ckpt_dir}). Lower train.lr or check the data.") from None
            seconds = time.perf_counter() - started
            progress.step, progress.tokens = step + 1, progress.tokens + inputs.numel()
            progress.elapsed += seconds
            row = {"step": progress.step, "loss": round(value, 6), "lr": lr,
                   "tokens_per_s": round(inputs.numel() / seconds, 1),
                   "tokens": progress.tokens, "elapsed": round(progress.elapsed, 3)}
            if accelerator.is_main_process:
                run.append_metrics(row)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            events.update(progress.step, loss=value)
            if spec.checkpoint_every and progress.step % spec.checkpoint_every == 0 \
                    and progress.step < total_steps:
                last_good = save_checkpoint(ckpt_dir, trainable, optimizer, progress, rank,
                                            accelerator.is_main_process, spec.keep_checkpoints).name
            if evaluate is not None and progress.step in spec.eval_at:
                model.eval()
                metrics = evaluate(progress.step)
                model.train()
                if accelerator.is_main_process:
                    run.append_metrics({"step": progress.step, **{f"eval/{k}": v for k, v in metrics.items()}})
            if on_step is not None:
                on_step(progress.step, value)
            if stop.requested and progress.step < total_steps:
                saved = save_checkpoint(ckpt_dir, trainable, optimizer, progress, rank,
                                        accelerator.is_main_process, spec.keep_checkpoints).name
                bar.close()
                if accelerator.is_main_process:
                    run.log(f"stop requested: saved {saved} after step {progress.step}")
                raise TrainingStopped(f"stopped after step {progress.step}; checkpoint {saved} saved")
    bar.close()
    model.eval()
    return progress

