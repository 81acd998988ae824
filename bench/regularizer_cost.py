"""Cost of the importance regularizer's phase 1 against EWC's Fisher information, same model and data.

Song et al. (2025) claim their path-integral importance (Synaptic-Intelligence style: ω = −Σ g·Δθ
accumulated while training on general data, Ω = max(0, ω)/(Δ² + ξ)) is far cheaper than EWC
(Kirkpatrick et al. 2017, diagonal Fisher F_i = E_x[(∂ log p(x)/∂θ_i)²]). This measures it:

  * si      : `--steps` optimizer steps on general batches with `adapters.regularizer.ImportanceRecorder`
              (what `train.regularizer` runs), then Ω; the recorder's own overhead is the
              difference to `train`, the same steps without it.
  * ewc     : the diagonal Fisher at θ* over the same `--steps` batches, per example (one forward
              and backward per row, the textbook estimator).
  * ewc-emp : the cheap "empirical batch" variant: squared batch gradients, one backward per batch.

Storage: each method's importance tensors saved with safetensors (float32, one value per trained
parameter); EWC's penalty also needs θ*, as ours does, so that is not counted for either.
The model is a randomly initialised Llama from a built-in config (no downloads), full fine-tuning,
random token batches (cost does not depend on the text).

    python bench/regularizer_cost.py                 # llama-base, 20 steps of 8 x 128 tokens
    python bench/regularizer_cost.py --quick         # seconds

Each method runs `--repeats` times (default 2) and the fastest counts. Writes a table and JSON (`--out`, default bench/results/regularizer_cost.json).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import machine_info  # noqa: E402

from adapters.regularizer import ImportanceRecorder  # noqa: E402
from workbench.models import build_model_from_config  # noqa: E402


def loss_of(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())


def fresh(args):
    torch.manual_seed(0)
    model = build_model_from_config(args.model, vocab_size=args.vocab, seed=0)
    model.train()
    return model, dict(model.named_parameters())


def batches(args):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(args.vocab, (args.batch, args.seq_len), generator=g) for _ in range(args.steps)]


def train(args, data, record: bool):
    model, params = fresh(args)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-4, weight_decay=0.0)
    recorder = ImportanceRecorder(params) if record else None
    started = time.perf_counter()
    for x in data:
        loss_of(model, x).backward()
        if recorder:
            recorder.before_update()
        optimizer.step()
        if recorder:
            recorder.after_update()
        optimizer.zero_grad(set_to_none=True)
    importance = recorder.importance(1e-3) if recorder else None
    return time.perf_counter() - started, importance


def fisher(args, data, per_example: bool):
    model, params = fresh(args)
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    started = time.perf_counter()
    for x in data:
        rows = x.split(1) if per_example else [x]
        for row in rows:
            model.zero_grad(set_to_none=True)
            loss_of(model, row).backward()
            for n, p in params.items():
                total[n] += p.grad.float().pow(2)
            count += 1
    result = {n: t / count for n, t in total.items()}
    return time.perf_counter() - started, result


def stored_bytes(tensors: dict) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "importance.safetensors"
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(path))
        return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-base")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="time each method this often; keep the fastest")
    parser.add_argument("--quick", action="store_true", help="llama-tiny, 4 steps of 4 x 32")
    parser.add_argument("--out", default=str(ROOT / "bench/results/regularizer_cost.json"))
    args = parser.parse_args()
    if args.quick:
        args.model, args.steps, args.batch, args.seq_len = "llama-tiny", 4, 4, 32
    torch.set_num_threads(args.threads)
    data = batches(args)

    def best(run):  # the fastest of `--repeats` runs (the first pays one-off warm-up costs)
        results = [run() for _ in range(args.repeats)]
        return min(r[0] for r in results), results[0][1]

    plain_s, _ = best(lambda: train(args, data, record=False))
    si_s, omega = best(lambda: train(args, data, record=True))
    ewc_s, fisher_diag = best(lambda: fisher(args, data, per_example=True))
    emp_s, fisher_emp = best(lambda: fisher(args, data, per_example=False))
    rows = [
        ("train (no recording)", plain_s, None),
        ("si: train + record Ω", si_s, stored_bytes(omega)),
        ("ewc: per-example Fisher", ewc_s, stored_bytes(fisher_diag)),
        ("ewc-emp: batch Fisher", emp_s, stored_bytes(fisher_emp)),
    ]
    print(f"{args.model}, {args.steps} batches of {args.batch} x {args.seq_len} tokens, "
          f"{args.threads} threads")
    print(f"{'method':26s} {'seconds':>9s} {'stored MB':>10s}")
    for name, seconds, size in rows:
        print(f"{name:26s} {seconds:9.2f} {'' if size is None else f'{size / 2**20:10.2f}'}")
    print(f"recording overhead over plain training: {100 * (si_s / plain_s - 1):+.1f}%; "
          f"per-example Fisher / SI phase 1: {ewc_s / si_s:.2f}x")
    result = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "machine": machine_info("cpu"), "settings": vars(args),
              "seconds": {name: s for name, s, _ in rows},
              "stored_bytes": {name: b for name, _, b in rows if b is not None},
              "recording_overhead_pct": 100 * (si_s / plain_s - 1),
              "ewc_over_si": ewc_s / si_s}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
