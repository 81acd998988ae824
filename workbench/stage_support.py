"""What every stage uses: saying what happens, run parents, step counts, the sequence-length check,
the main process's value under torchrun. Foundation: no method, no orchestration."""

from __future__ import annotations

import math

import torch

from .data import BatchPlan, DataError
from .models import max_sequence_length
from .sections import TrainSpec


def broadcast_from_main(value):
    """The main process's value on every process (identity when there is one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return value


def say(message: str = "") -> None:
    """A line for the user, at once (job logs and terminals)."""
    print(message, flush=True)


def total_steps(spec: TrainSpec, plan: BatchPlan) -> int:
    """Optimizer steps: from train.epochs when set, otherwise train.max_steps."""
    if spec.epochs is not None:
        return max(1, math.ceil(spec.epochs * plan.steps_per_epoch()))
    return spec.max_steps


def check_seq_len(seq_len: int, model, source: str) -> None:
    """Refuse a sequence length above the model's position limit, naming where it comes from."""
    limit = max_sequence_length(model)
    if limit is not None and seq_len > limit:
        raise DataError(f"data.seq_len={seq_len} is above the model's limit "
                        f"(max_position_embeddings={limit} in {source})")


def run_parents(*refs: str) -> list[str]:
    """The run ids among model references (`run:<id>`): a new run's parents."""
    return [r.removeprefix("run:") for r in refs if r and r.startswith("run:")]
