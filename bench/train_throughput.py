"""Training throughput: the workbench training engine against PEFT + transformers `Trainer`.

Both contestants train the same LoRA (r=16, alpha=32, all linear layers) on the same randomly
initialised Llama from `workbench.models.BUILTIN_CONFIGS`, on the same seeded random token rows
(packed to exactly `--seq-len` tokens, so no padding anywhere), with AdamW at lr 2e-4, a constant
schedule without warmup, gradient clipping at 1.0, the same global batch and the same number of
steps. Each contestant runs in its own Python process (so peak memory is its own), the two
alternate, and the whole pair is repeated `--repeats` times; the report gives the medians.

Measured per optimizer step, after `--warmup-steps` untimed steps:
  * cadence: wall time from the end of one step to the end of the next (everything the loop does
    per step: data, forward, backward, clipping, optimizer, logging). tokens/s = tokens per step /
    median cadence. This is the headline number.
  * in-step: wall time from the start of a step to its optimizer update (the Trainer's
    on_step_begin -> on_step_end; the engine's own per-step timing in metrics.jsonl, which on a
    GPU stops before the queued clipping and optimizer kernels finish).
  * peak memory: on CPU the peak resident set size while training and its growth over the
    resident size just before training (the peak is reset first where Linux allows it); on a GPU
    torch.cuda.max_memory_allocated and its growth over the allocation before training.

Other processes on the machine distort CPU numbers far more than the two loops differ, so each
run records how many cores other processes kept busy; a contended run is run again and left out
of the medians (`--max-other-cores`, `--retries`).

Run (defaults finish in a few minutes on 2 CPU cores):

    python bench/train_throughput.py
    python bench/train_throughput.py --config llama-0.5b --seq-len 1024 --batch-size 8   # a GPU

Writes a table to stdout and JSON to `--out` (default bench/results/train_throughput.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTESTANTS = ("ours", "peer")
LABELS = {"ours": "workbench engine (train_loop)", "peer": "PEFT + transformers Trainer"}
LORA = dict(r=16, alpha=32.0, dropout=0.0, target_modules="all-linear")
LR, MAX_GRAD_NORM = 2e-4, 1.0
DEFAULT_VOCAB = 2048  # configs without their own vocab_size (the tokenizer size of the embedded base)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="llama-base",
                   help="built-in model config (workbench.models.BUILTIN_CONFIGS), e.g. llama-small, "
                        "llama-base, llama-0.5b")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed row")
    p.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step (global batch)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per contestant and repeat")
    p.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of the timing")
    p.add_argument("--repeats", type=int, default=2, help="runs per contestant (alternating)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: a CUDA GPU when one is available, else the CPU")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weights of the base model; auto as the workbench loads models: bfloat16 "
                        "on a GPU, float32 on the CPU (LoRA weights stay float32 either way)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads in both contestants (0: torch's default, one per core)")
    p.add_argument("--peer-optim", default=None,
                   help="Trainer `optim` for the peer (default: TrainingArguments' own default, "
                        "adamw_torch_fused on torch >= 2.8)")
    p.add_argument("--max-other-cores", type=float, default=0.25,
                   help="a run during which other processes kept more than this many cores busy "
                        "counts as contended: it is run again and left out of the medians")
    p.add_argument("--retries", type=int, default=2, help="re-runs allowed per contended run")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_throughput.json")
    p.add_argument("--only", choices=CONTESTANTS, default=None,
                   help="run one contestant in this process and print its result as JSON "
                        "(used internally, one subprocess per contestant)")
    args = p.parse_args(argv)
    if args.warmup_steps < 1 or args.steps <= args.warmup_steps + 1:
        p.error("need --warmup-steps >= 1 and --steps > --warmup-steps + 1")
    if args.repeats < 1 or args.retries < 0:
        p.error("need --repeats >= 1 and --retries >= 0")
    return args


# ----------------------------------------------------------------------------------------------
# Memory


def _status_kib(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(found.group(1)) if found else None


def _maxrss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class MemoryProbe:
    """Peak memory while training, and its growth over the level just before training."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.peak_reset = False
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated() / 2**20
            self.peak_reset = True
        else:
            try:  # Linux: writing 5 resets the process's peak RSS (VmHWM, ru_maxrss)
                Path("/proc/self/clear_refs").write_text("5")
                self.peak_reset = True
            except OSError:
                pass
            current = _status_kib("VmRSS")
            self.baseline = current / 1024 if current is not None else _maxrss_mib()

    def result(self) -> dict:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
            kind = "torch.cuda.max_memory_allocated"
        else:
            peak, kind = _maxrss_mib(), "peak RSS (ru_maxrss)"
        return {"kind": kind, "peak_mib": round(peak, 1), "baseline_mib": round(self.baseline, 1),
                "growth_mib": round(max(0.0, peak - self.baseline), 1), "peak_reset": self.peak_reset}


class CpuContention:
    """CPU time that other processes (and the hypervisor, as steal) took while a contestant ran.

    A shared machine slows both contestants by far more than their difference; this records how
    busy it was, so a reader can tell a clean measurement from a contended one.
    """

    def __init__(self):
        self.start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float, float] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        own = os.times()
        return (time.monotonic(), (user + nice + system + irq + softirq) / hz, steal / hz,
                own.user + own.system)

    def result(self) -> dict:
        end = self._snapshot()
        if self.start is None or end is None:
            return {}
        wall = end[0] - self.start[0]
        busy, steal, own = (end[i] - self.start[i] for i in (1, 2, 3))
        return {"own_cores": round(own / wall, 2), "other_cores": round(max(0.0, busy - own) / wall, 2),
                "steal_cores": round(steal / wall, 2)}


# ----------------------------------------------------------------------------------------------
# One contestant (runs in its own process)


def build_setup(args):
    """Model with LoRA attached, on its device, and the packed rows; identical for both."""
    import torch

    # Import both contestants' libraries up front, so that the memory baseline taken before
    # training holds the same code for both and the growth is what training itself allocates.
    import accelerate  # noqa: F401
    import transformers.trainer  # noqa: F401
    import workbench.engine  # noqa: F401
    from adapters.lora import LoraMethod
    from workbench.data import pack
    from workbench.models import build_model_from_config, resolve_dtype
    from adapters.lora import LoraSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model_from_config(args.config, vocab_size=DEFAULT_VOCAB, seed=args.seed)
    vocab = model.config.vocab_size
    rows = args.steps * args.batch_size  # one epoch covers every step: no epoch boundary in the run
    g = torch.Generator().manual_seed(args.seed)
    stream = torch.randint(0, vocab, (rows * args.seq_len,), generator=g).tolist()
    packed = pack(stream, list(stream), args.seq_len, f"random tokens (seed {args.seed})")
    dtype = resolve_dtype(args.dtype, device)
    model.to(device=device, dtype=dtype)
    torch.manual_seed(args.seed)
    model = LoraMethod().attach(model, LoraSpec(**LORA))
    info = {"params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "vocab_size": vocab, "rows": len(packed), "dtype": str(dtype).removeprefix("torch."),
            "lora_dtype": str(next(p for p in model.parameters() if p.requires_grad).dtype)
            .removeprefix("torch.")}
    return model, packed, device, info


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_ours(args, model, packed, device) -> dict:
    from adapters.lora import LoraMethod
    from workbench.data import BatchPlan
    from workbench.engine import make_accelerator, train_loop
    from workbench.recipes import TrainSpec
    from workbench.workspace import Workspace

    spec = TrainSpec(lr=LR, schedule="constant", warmup_ratio=0.0, batch_size=args.batch_size,
                     max_steps=args.steps, checkpoint_every=0, max_grad_norm=MAX_GRAD_NORM,
                     precision="auto")
    plan = BatchPlan(packed, None, args.batch_size, 0.0, args.seed)
    trainable = LoraMethod().trainable_parameters(model)
    ends: list[float] = []
    losses: list[float] = []

    def on_step(step: int, loss: float) -> None:
        _sync(device)
        ends.append(time.perf_counter())
        losses.append(loss)

    with tempfile.TemporaryDirectory() as tmp:
        run = Workspace(tmp).create_run("train", "throughput-bench", "{}\n", args.seed)
        memory = MemoryProbe(device)
        accelerator = make_accelerator(spec.precision)
        _sync(device)
        start = time.perf_counter()
        train_loop(model, plan, spec, args.steps, run, accelerator, trainable, on_step=on_step)
        memory = memory.result()
        rows = [r for r in run.metrics() if "tokens_per_s" in r]
    tokens = args.batch_size * args.seq_len
    return {"ends": [e - start for e in ends],
            "in_step_s": [tokens / r["tokens_per_s"] for r in rows],
            "losses": losses, "memory": memory,
            "precision": accelerator.mixed_precision,
            "optimizer": "torch.optim.AdamW (fused where available: workbench.engine.make_optimizer)"}


def run_peer(args, model, packed, device) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(packed)

        def __getitem__(self, i):
            return {"input_ids": packed.inputs[i], "labels": packed.labels[i]}

    class Timer(TrainerCallback):
        def __init__(self):
            self.begin, self.ends, self.in_step = 0.0, [], []

        def on_step_begin(self, *_, **__):
            _sync(device)
            self.begin = time.perf_counter()

        def on_step_end(self, *_, **__):
            _sync(device)
            now = time.perf_counter()
            self.in_step.append(now - self.begin)
            self.ends.append(now)

    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    extra = {"optim": args.peer_optim} if args.peer_optim else {}
    timer = Timer()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=MAX_GRAD_NORM, report_to=[], save_strategy="no", eval_strategy="no",
            logging_steps=10**6, dataloader_num_workers=0, seed=args.seed, bf16=bf16,
            use_cpu=device.type == "cpu", label_names=["labels"], **extra)
        memory = MemoryProbe(device)
        _sync(device)
        start = time.perf_counter()
        trainer = Trainer(model=model, args=targs, train_dataset=Rows(), callbacks=[timer])
        output = trainer.train()
        memory = memory.result()
    return {"ends": [e - start for e in timer.ends], "in_step_s": timer.in_step,
            "mean_loss": output.metrics.get("train_loss"), "memory": memory,
            "precision": "bf16" if bf16 else "no",
            "optimizer": f"{type(trainer.optimizer.optimizer).__name__} (optim={targs.optim.value}, "
                         f"fused={trainer.optimizer.optimizer.defaults.get('fused')})"}


def run_one(args) -> dict:
    import torch

    model, packed, device, info = build_setup(args)
    contention = CpuContention()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    result = (run_ours if args.only == "ours" else run_peer)(args, model, packed, device)
    result["cpu_contention"] = contention.result()
    # Fresh pages the process touched (first-touch faults), per step: large tensors that the
    # allocator returns to the OS and maps again cost this on every step.
    result["page_faults_per_step"] = round(
        (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps)
    ends = result.pop("ends")
    if len(ends) != args.steps:
        raise RuntimeError(f"{args.only}: timed {len(ends)} steps, expected {args.steps}")
    cadence = [b - a for a, b in zip(ends, ends[1:])][args.warmup_steps - 1:]
    in_step = result.pop("in_step_s")[args.warmup_steps:]
    tokens = args.batch_size * args.seq_len
    losses = result.pop("losses", None)
    if losses is not None:
        result["mean_loss"] = sum(losses) / len(losses)
    return {"contestant": args.only, "device": str(device), "torch_threads": torch.get_num_threads(),
            "tokens_per_step": tokens, "timed_steps": len(cadence),
            "step_s_median": statistics.median(cadence),
            "tokens_per_s": tokens / statistics.median(cadence),
            "in_step_s_median": statistics.median(in_step),
            "in_step_tokens_per_s": tokens / statistics.median(in_step),
            "step_s": [round(c, 5) for c in cadence], "total_s": ends[-1], **info, **result}


# ----------------------------------------------------------------------------------------------
# The comparison (parent process)


def machine_info(device: str) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    info = {"cpu": cpu, "cores": cores, "memory_gib": None, "os": platform.platform(),
            "python": platform.python_version(), "device": device}
    mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M) \
        if Path("/proc/meminfo").exists() else None
    info["memory_gib"] = round(int(mem.group(1)) / 2**20, 1) if mem else None
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    import importlib.metadata as md

    for name in ("torch", "transformers", "peft", "accelerate"):
        info[name] = md.version(name)
    return info


def child_command(args, who: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", who, "--config", args.config,
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
           "--seed", str(args.seed), "--device", args.device, "--dtype", args.dtype,
           "--threads", str(args.threads)]
    if args.peer_optim:
        cmd += ["--peer-optim", args.peer_optim]
    return cmd


def run_child(args, who: str) -> dict:
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    done = subprocess.run(child_command(args, who), cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"{who}: benchmark process failed (exit {done.returncode})")
    return json.loads(lines[-1])


def fmt_mib(x: float) -> str:
    return f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MiB"


def summarize(results: dict[str, list[dict]]) -> dict:
    out = {}
    for who, every in results.items():
        runs = [r for r in every if not r["contended"]] or every  # all contended: use them, flagged
        out[who] = {
            "runs_used": len(runs), "runs_contended": sum(r["contended"] for r in every),
            "measured_under_contention": all(r["contended"] for r in runs),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "in_step_tokens_per_s": statistics.median(r["in_step_tokens_per_s"] for r in runs),
            "peak_memory_mib": statistics.median(r["memory"]["peak_mib"] for r in runs),
            "memory_growth_mib": statistics.median(r["memory"]["growth_mib"] for r in runs),
            "memory_kind": runs[0]["memory"]["kind"],
            "mean_loss": statistics.median(r["mean_loss"] for r in runs),
            "precision": runs[0]["precision"], "optimizer": runs[0]["optimizer"],
            "best_tokens_per_s": max(r["tokens_per_s"] for r in runs),
            "per_repeat_tokens_per_s": [round(r["tokens_per_s"], 1) for r in runs],
            "per_repeat_other_cores": [r["cpu_contention"].get("other_cores") for r in runs],
        }
    ours, peer = out["ours"], out["peer"]
    out["ratio_ours_over_peer"] = {
        "tokens_per_s": ours["tokens_per_s"] / peer["tokens_per_s"],
        "in_step_tokens_per_s": ours["in_step_tokens_per_s"] / peer["in_step_tokens_per_s"],
        "best_tokens_per_s": ours["best_tokens_per_s"] / peer["best_tokens_per_s"],
        "peak_memory": ours["peak_memory_mib"] / peer["peak_memory_mib"],
        "memory_growth": (ours["memory_growth_mib"] / peer["memory_growth_mib"]
                          if peer["memory_growth_mib"] else None),
    }
    return out


def table(summary: dict) -> str:
    head = ("| contestant | tokens/s (median) | tokens/s (best repeat) | in-step tokens/s "
            "| peak memory | growth while training | mean loss |")
    rows = [head, "|" + "---|" * 7]
    for who in CONTESTANTS:
        s = summary[who]
        rows.append(f"| {LABELS[who]} | {s['tokens_per_s']:,.0f} | {s['best_tokens_per_s']:,.0f} "
                    f"| {s['in_step_tokens_per_s']:,.0f} | {fmt_mib(s['peak_memory_mib'])} "
                    f"| {fmt_mib(s['memory_growth_mib'])} | {s['mean_loss']:.4f} |")
    r = summary["ratio_ours_over_peer"]
    growth = f"{r['memory_growth']:.2f}x" if r["memory_growth"] is not None else "n/a"
    rows.append(f"| **ours / peer** | **{r['tokens_per_s']:.2f}x** | {r['best_tokens_per_s']:.2f}x "
                f"| {r['in_step_tokens_per_s']:.2f}x | {r['peak_memory']:.2f}x | {growth} | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.only:
        if args.device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported
        print(json.dumps(run_one(args)), flush=True)
        return
    import torch

    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and device != "cuda":
        raise SystemExit("--device cuda: no CUDA GPU is available")
    command = "python " + shlex.join([os.path.relpath(Path(__file__).resolve(), ROOT)] + sys.argv[1:])
    results: dict[str, list[dict]] = {who: [] for who in CONTESTANTS}
    started = time.time()
    for repeat in range(args.repeats):
        order = CONTESTANTS if repeat % 2 == 0 else CONTESTANTS[::-1]
        for who in order:
            for attempt in range(args.retries + 1):
                r = run_child(args, who)
                other = r["cpu_contention"].get("other_cores", 0.0)
                r["contended"] = other > args.max_other_cores
                results[who].append(r)
                print(f"repeat {repeat + 1}/{args.repeats} {who:>4}: {r['tokens_per_s']:,.0f} tokens/s "
                      f"(in-step {r['in_step_tokens_per_s']:,.0f}), peak {fmt_mib(r['memory']['peak_mib'])}, "
                      f"growth {fmt_mib(r['memory']['growth_mib'])}, loss {r['mean_loss']:.4f}, "
                      f"other processes {other:.2f} cores"
                      + (" -> contended, left out" + (", running again" if attempt < args.retries else "")
                         if r["contended"] else ""), flush=True)
                if not r["contended"]:
                    break
    summary = summarize(results)
    first = results["ours"][0]
    report = {
        "benchmark": "train_throughput",
        "command": command,
        "argv": sys.argv,
        "machine": machine_info(device),
        "settings": {
            "config": args.config, "params": first["params"], "trainable_params": first["trainable_params"],
            "vocab_size": first["vocab_size"], "dtype": first["dtype"], "lora_dtype": first["lora_dtype"],
            "seq_len": args.seq_len, "batch_size": args.batch_size,
            "tokens_per_step": first["tokens_per_step"], "steps": args.steps,
            "warmup_steps": args.warmup_steps, "timed_steps": first["timed_steps"],
            "repeats": args.repeats, "seed": args.seed, "lora": LORA, "lr": LR,
            "schedule": "constant", "max_grad_norm": MAX_GRAD_NORM, "torch_threads": first["torch_threads"],
        },
        "summary": summary,
        "runs": results,
        "wall_seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    s = report["settings"]
    print(f"\n{args.config}: {s['params']:,} {s['dtype']} params ({s['trainable_params']:,} trainable "
          f"{s['lora_dtype']} LoRA), "
          f"{args.batch_size} x {args.seq_len} tokens per step, {s['timed_steps']} timed steps, "
          f"median of {args.repeats} repeats, device {device}\n")
    print(table(summary))
    if any(summary[w]["measured_under_contention"] for w in CONTESTANTS):
        print("\nwarning: other processes kept the CPU busy during every run of a contestant; "
              "these numbers measure the contention, not the training loops")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
