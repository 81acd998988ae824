"""Hierarchical layer-wise and element-wise regularization (Song et al. 2025, "How to Alleviate
Catastrophic Forgetting in LLMs Finetuning? Hierarchical Layer-Wise and Element-Wise
Regularization"), an option of the training engine for full fine-tuning and every adapter method.

Phase 1, on general data, from the run's initial parameters θ*: the path-integral importance of
Synaptic Intelligence (Zenke et al. 2017),
    ω_i = −Σ_t g_i(t)·Δθ_i(t),      Ω_i = max(0, ω_i) / (Δ_i² + ξ),
with g the gradient of the general-data loss, Δθ(t) each optimizer update and Δ_i the total
change over phase 1. (ω can come out slightly negative where the optimizer moved against the
gradient; those elements get no importance, so the penalty stays a convex quadratic.)

Phase 2, on domain data, restarting from θ*:
    loss = CE + φ · Σ_l c_l · Σ_{i∈l} Ω_i (θ_i − θ*_i)²,     c = softmax_l(‖Ω_l‖₂),
where l runs over the transformer layers (parameters outside a numbered layer, such as the
embeddings or the head, form one group each).

Ω is stored as safetensors (`importance.safetensors`, one tensor per trainable parameter plus the
model's embedding fingerprint in the metadata) and can be reused by later runs. Recording it costs
one extra gradient·update product per step, and storing it one tensor per trainable parameter,
against EWC's per-sample Fisher pass.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from workbench.engine import (LanguageModelObjective, NonFiniteLoss, StepObserver, make_optimizer,
                              optimizer_step)
from workbench.io import atomic_file
from workbench.models import embedding_fingerprint

IMPORTANCE_FILE = "importance.safetensors"
LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")


class ImportanceError(ValueError):
    """An importance file that does not fit the model being trained, or cannot be read."""


class ImportanceRecorder(StepObserver):
    """Accumulates ω_i = −Σ_t g_i(t)·Δθ_i(t) over optimizer updates (float32)."""

    def __init__(self, trainable: dict[str, torch.nn.Parameter]):
        self.trainable = trainable
        self.start = {n: p.detach().float().clone() for n, p in trainable.items()}
        self.omega = {n: torch.zeros_like(v) for n, v in self.start.items()}
        self._grads: dict[str, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}

    def before_update(self) -> None:
        for name, p in self.trainable.items():
            if p.grad is not None:
                self._grads[name] = p.grad.detach().float().clone()
                self._before[name] = p.detach().float().clone()

    def after_update(self) -> None:
        for name, grad in self._grads.items():
            step = self.trainable[name].detach().float() - self._before[name]
            self.omega[name] -= grad * step
        self._grads, self._before = {}, {}

    def importance(self, xi: float) -> dict[str, torch.Tensor]:
        """Ω_i = max(0, ω_i) / (Δ_i² + ξ)."""
        out = {}
        for name, p in self.trainable.items():
            total = p.detach().float() - self.start[name]
            out[name] = self.omega[name].clamp_min(0) / (total.pow(2) + xi)
        return out


def layer_of(name: str) -> str:
    """The group a parameter belongs to: `layer.<n>` for numbered blocks, else its module path."""
    found = LAYER_INDEX.search(name)
    if found:
        return f"layer.{found.group(1)}"
    return name.rsplit(".", 1)[0]


def layer_coefficients(importance: dict[str, torch.Tensor]) -> dict[str, float]:
    """c = softmax over layer groups of ‖Ω_l‖₂ (the norm over every element in the group)."""
    groups: dict[str, float] = {}
    for name, omega in importance.items():
        groups[layer_of(name)] = groups.get(layer_of(name), 0.0) + float(omega.pow(2).sum())
    names = sorted(groups)
    norms = torch.tensor([groups[n] ** 0.5 for n in names], dtype=torch.float64)
    weights = torch.softmax(norms, dim=0)
    return {n: float(w) for n, w in zip(names, weights)}


def save_importance(importance: dict[str, torch.Tensor], path: Path, fingerprint: str,
                    steps: int, xi: float, seconds: float) -> None:
    with atomic_file(path) as tmp:
        save_file({n: t.contiguous() for n, t in importance.items()}, tmp,
                  metadata={"model": fingerprint, "steps": str(steps), "xi": str(xi),
                            "seconds": f"{seconds:.3f}"})


def load_importance(path: Path, trainable: dict[str, torch.nn.Parameter], fingerprint: str
                    ) -> dict[str, torch.Tensor]:
    """Read Ω and check it belongs to this model and these trainable parameters."""
    path = Path(path)
    if not path.is_file():
        raise ImportanceError(f"{path}: importance file not found")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        importance = load_file(path)
    except Exception as err:  # noqa: BLE001 - a corrupt file, named
        raise ImportanceError(f"{path}: not a readable safetensors file ({err})") from None
    if meta.get("model") != fingerprint:
        raise ImportanceError(f"{path}: recorded on another model (embedding fingerprint "
                              f"{meta.get('model')} vs this model's {fingerprint})")
    missing = sorted(set(trainable) - set(importance))
    extra = sorted(set(importance) - set(trainable))
    if missing or extra:
        raise ImportanceError(f"{path}: its parameters differ from this run's trainable ones "
                              f"(missing e.g. {missing[:1]}, unexpected e.g. {extra[:1]}); record "
                              "the importance with the same adapter method and settings")
    for name, p in trainable.items():
        if importance[name].shape != p.shape:
            raise ImportanceError(f"{path}: tensor '{name}' has shape {tuple(importance[name].shape)}, "
                                  f"the model's has {tuple(p.shape)}")
    return importance


def record_importance(model, trainable: dict[str, torch.nn.Parameter], plan, spec, steps: int,
                      xi: float, accelerator, objective=None) -> dict[str, torch.Tensor]:
    """Phase 1: train on general data for `steps` steps recording ω, then restore θ*.

    The training loop's own step (`workbench.engine.optimizer_step`: micro-batches, autocast,
    clipping) at the run's lr and optimizer, one batch of `plan` per step, every process taking
    all of it; the trained
    values are thrown away, only Ω is kept. `objective` is the run's training signal (next-token
    loss by default; a classifier's cross-entropy on labelled data).
    """
    recorder = ImportanceRecorder(trainable)
    optimizer = make_optimizer(list(trainable.values()), spec)
    objective = objective or LanguageModelObjective()
    one_batch = spec.model_copy(update={"batch_size": plan.batch_size, "grad_accum": 1})
    model.train()
    for step in range(steps):
        try:
            optimizer_step(model, optimizer, plan, step, one_batch, accelerator, trainable, objective,
                           observer=recorder, distributed=False)
        except NonFiniteLoss as err:
            raise ImportanceError(f"the loss is {err.value} at step {step + 1} of recording the "
                                  "importance Ω; lower train.lr or check train.regularizer.data") from None
    importance = recorder.importance(xi)
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(recorder.start[name].to(p.dtype))
    return importance


def make_penalty(importance: dict[str, torch.Tensor], trainable: dict[str, torch.nn.Parameter],
                 phi: float):
    """penalty() = φ Σ_l c_l Σ_{i∈l} Ω_i (θ_i − θ*_i)², θ* = the parameters now."""
    coefficients = layer_coefficients(importance)
    anchors = {n: p.detach().clone() for n, p in trainable.items()}
    weights = {n: (phi * coefficients[layer_of(n)] * importance[n]).to(p.device, p.dtype)
               for n, p in trainable.items()}

    def penalty() -> torch.Tensor:
        total = None
        for name, p in trainable.items():
            term = (weights[name] * (p - anchors[name]).pow(2)).sum(dtype=torch.float32)
            total = term if total is None else total + term
        return total

    return penalty


def prepare_regularizer(spec, train_spec, model, trainable, tokenizer, data, run_folder: Path,
                        locate_importance, accelerator, say=print, objective=None, fmt: str = "text"):
    """Phase 1 (or reuse of a stored Ω) for a run, then the phase-2 penalty function.

    Language-model runs record Ω with the next-token loss on general text. Sequence-classification
    runs (`fmt="labelled"`, `objective` the classifier's loss) record it on an earlier labelled
    task (the continual-learning setting of Synaptic Intelligence: task A's importance protects
    what the encoder learnt for it while task B trains).
    """
    from workbench.data import BatchPlan, DataError, pack_source

    fingerprint = embedding_fingerprint(model)
    target = Path(run_folder) / IMPORTANCE_FILE
    source = target if target.is_file() else (locate_importance(spec.importance) if spec.importance else None)
    if source is not None:
        importance = load_importance(source, trainable, fingerprint)
        say(f"Importance Ω from {source}")
    else:
        try:
            general = pack_source(spec.data, tokenizer, data.seq_len, fmt, data.world_seed, data.world_size)
        except DataError as err:
            kind = "labelled data (a classification run)" if fmt == "labelled" else "text"
            raise DataError(f"train.regularizer.data must be {kind}: {err}") from None
        plan = BatchPlan(general, None, train_spec.batch_size // train_spec.grad_accum, 0.0, 0)
        say(f"Recording importance Ω on {spec.data} for {spec.steps} steps ...")
        started = time.time()
        importance = record_importance(model, trainable, plan, train_spec, spec.steps, spec.xi,
                                       accelerator, objective)
        save_importance(importance, target, fingerprint, spec.steps, spec.xi, time.time() - started)
    return make_penalty(importance, trainable, spec.phi)
