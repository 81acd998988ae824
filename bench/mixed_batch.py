"""Mixed-adapter batch inference: a batch whose rows use different adapters, against one adapter.

For RoAd (`peft.RoadConfig`, road_1, group size 64, all linear layers) and LoRA (`peft.LoraConfig`,
r=16, alpha=32, all linear layers), `--adapters` adapters (default 8) are added to one PEFT model
(`get_peft_model` for the first, `add_adapter` for the rest) and given seeded, non-trivial weights:
RoAd theta ~ N(0, 0.1) and alpha ~ 1 + N(0, 0.1); LoRA A keeps PEFT's (seeded) Kaiming init and B
~ N(0, 0.02) instead of zeros. Two forwards are then compared on the same token batch:

  * single: `set_adapter(first)` and a plain forward, every row through the same adapter;
  * mixed:  `model(input_ids=..., adapter_names=[...])`, PEFT's mixed-batch path, row i through
            adapter i mod K (so each adapter's rows are spread across the batch, as requests are).

The base model with no adapter at all is timed alongside as a reference. The model is a randomly
initialised Llama built from a config (no downloads): `--model base` is hidden 512, intermediate
1408, 8 layers, 8 heads, vocabulary 8192; `--model small` is hidden 256, intermediate 704, 4
layers. (The intermediate size is a multiple of 64: RoAd needs every adapted layer's output size
to be divisible by its group size, and all-linear includes gate_proj/up_proj.)

Before timing, a correctness check (float32, on the chosen device): the mixed-batch logits of row i
must equal the logits of row i run alone with its adapter set active (max abs diff <= 1e-4, else
the script fails), and rows whose adapter is not the first must differ from the single-adapter
batch (else the mixed path ignored `adapter_names`, or the adapters are trivial).

Timing: eval mode, `torch.no_grad()`, `use_cache=False`, full logits. `--warmup` untimed rounds,
then `--iters` timed rounds; each round runs every case once, in an order that rotates from round
to round, so that load from other processes falls on all cases alike. Each forward is timed with
`time.perf_counter` (synchronised around it on a GPU). On the CPU each round also records how many
cores other processes kept busy; a round above `--max-other-cores` is left out and run again (up to
`--retries` extra rounds): with 2 threads on 2 cores a neighbour stalls every parallel op, which
slows the mixed paths (thousands of small ops) up to 10x more than the single ones. tokens/s = batch
tokens / median seconds per forward over the clean rounds. The headline ratio is mixed/single tokens/s (ratio of the medians); the median of the
per-round ratios is given too (less sensitive to load that drifts during the run). DESIGN.md target:
mixed RoAd >= 0.8x single-adapter throughput.

Run (defaults take a few minutes on 2 CPU cores):

    python bench/mixed_batch.py
    python bench/mixed_batch.py --quick                         # seconds: small model, small batch
    python bench/mixed_batch.py --device cuda --dtype bf16      # a GPU, bf16 weights

Writes a table to stdout and JSON to `--out` (default bench/results/mixed_batch.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import CpuContention  # noqa: E402  (one probe for every benchmark)
from train_throughput import machine_info as shared_machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 8192
MODELS = {
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8),
    "base": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=8),
}
ROAD = dict(variant="road_1", group_size=64, target_modules="all-linear")
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
ROAD_THETA_STD, ROAD_ALPHA_STD, LORA_B_STD = 0.1, 0.1, 0.02
TOLERANCE = 1e-4          # max abs diff, mixed row vs the row alone (float32)
MIN_DISTINCT = 1e-2       # rows on another adapter must differ from the single-adapter batch by more
TARGET = 0.8              # DESIGN.md section 7: mixed >= 0.8x single-adapter throughput
METHODS = ("road", "lora")
LABELS = {"road": "RoAd (road_1, group 64)", "lora": "LoRA (r=16, alpha=32)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=tuple(MODELS), default="base",
                   help="base: hidden 512, intermediate 1408, 8 layers; small: hidden 256, "
                        "intermediate 704, 4 layers (both 8 heads, vocabulary 8192)")
    p.add_argument("--intermediate-size", type=int, default=None,
                   help="override the model's intermediate size (must be divisible by --group-size)")
    p.add_argument("--group-size", type=int, default=ROAD["group_size"], help="RoAd group size")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    p.add_argument("--adapters", type=int, default=8, help="adapters per method; row i uses adapter i mod K")
    p.add_argument("--iters", type=int, default=10, help="timed forwards per case")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per case before timing")
    p.add_argument("--quick", action="store_true",
                   help="a few-second smoke run: --model small --batch-size 8 --seq-len 64 --iters 3 "
                        "--warmup 1 (explicit flags still win)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: a CUDA GPU when one is available, else the CPU")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="weights (base and adapters) while timing; the correctness check always "
                        "runs in float32")
    p.add_argument("--threads", type=int, default=2,
                   help="torch.set_num_threads (0: leave torch's default, one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one single and one mixed RoAd forward with "
                        "torch.profiler and print the top operators")
    p.add_argument("--max-other-cores", type=float, default=0.25,
                   help="a timed round during which other processes kept more than this many cores "
                        "busy counts as contended: it is left out and another round is run (CPU only)")
    p.add_argument("--retries", type=int, default=5,
                   help="extra rounds allowed in place of contended ones")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mixed_batch.json")
    args = p.parse_args(argv)
    if args.quick:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for flag, value in (("--model", "small"), ("--batch-size", 8), ("--seq-len", 64),
                            ("--iters", 3), ("--warmup", 1)):
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)
    if min(args.iters, args.batch_size, args.seq_len) < 1 or min(args.warmup, args.retries) < 0 \
            or args.adapters < 2:
        p.error("need --iters, --batch-size, --seq-len >= 1, --warmup, --retries >= 0, --adapters >= 2")
    return args


# ----------------------------------------------------------------------------------------------
# Machine and load


def machine_info(device) -> dict:
    """The shared machine record (train_throughput.machine_info) plus threads and CUDA version."""
    import torch

    info = shared_machine_info(device.type)
    info["torch_threads"] = torch.get_num_threads()
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


# ----------------------------------------------------------------------------------------------
# Models


def build_base(args, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    params = dict(MODELS[args.model])
    if args.intermediate_size:
        params["intermediate_size"] = args.intermediate_size
    config = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=False,
                         max_position_embeddings=max(512, args.seq_len), **params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(config)
    return model.to(device).eval()


def adapter_names(k: int) -> list[str]:
    return [f"a{i}" for i in range(k)]


def attach(base, method: str, args):
    """A copy of `base` with K adapters of `method`, each with its own seeded non-trivial weights."""
    import torch
    from peft import LoraConfig, RoadConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.tuners.road import RoadLayer

    names = adapter_names(args.adapters)
    model = copy.deepcopy(base)
    torch.manual_seed(args.seed + 1)  # LoRA A's Kaiming init draws from the global generator
    for i, name in enumerate(names):
        config = (RoadConfig(**{**ROAD, "group_size": args.group_size}) if method == "road"
                  else LoraConfig(**LORA))
        if i == 0:
            model = get_peft_model(model, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    g = torch.Generator().manual_seed(args.seed + 2)
    layers = 0
    with torch.no_grad():
        for _, module in model.named_modules():
            if method == "road" and isinstance(module, RoadLayer):
                layers += 1
                for name in names:
                    theta, alpha = module.road_theta[name], module.road_alpha[name]
                    theta.copy_(torch.randn(theta.shape, generator=g) * ROAD_THETA_STD)
                    alpha.copy_(1.0 + torch.randn(alpha.shape, generator=g) * ROAD_ALPHA_STD)
            elif method == "lora" and isinstance(module, LoraLayer):
                layers += 1
                for name in names:
                    weight = module.lora_B[name].weight
                    weight.copy_(torch.randn(weight.shape, generator=g) * LORA_B_STD)
    if not layers:
        raise SystemExit(f"{method}: no adapted layers found")
    model.eval()
    model.set_adapter(names[0])
    return model, layers


# ----------------------------------------------------------------------------------------------
# Correctness


def check(method: str, model, ids, mixed_names: list[str]) -> dict:
    """Mixed-batch logits of row i == row i alone with its adapter active (float32)."""
    import torch

    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=mixed_names, use_cache=False).logits.float()
        model.set_adapter(mixed_names[0])
        single = model(input_ids=ids, use_cache=False).logits.float()
        worst = 0.0
        for name in dict.fromkeys(mixed_names):
            model.set_adapter(name)
            for i, row_name in enumerate(mixed_names):
                if row_name == name:
                    alone = model(input_ids=ids[i:i + 1], use_cache=False).logits.float()
                    worst = max(worst, (mixed[i] - alone[0]).abs().max().item())
        model.set_adapter(mixed_names[0])
    others = [i for i, n in enumerate(mixed_names) if n != mixed_names[0]]
    distinct = min((mixed[i] - single[i]).abs().max().item() for i in others) if others else float("nan")
    scale = mixed.abs().max().item()
    print(f"check {method}: mixed vs row alone max abs diff {worst:.2e} (tolerance {TOLERANCE:.0e}); "
          f"rows on other adapters differ from the single-adapter batch by >= {distinct:.2e} "
          f"(max |logit| {scale:.2f})", flush=True)
    if not worst <= TOLERANCE:
        raise SystemExit(f"FAILED {method}: mixed-batch logits differ from the row run alone by "
                         f"{worst:.3e} > {TOLERANCE:.0e}")
    if others and not distinct > MIN_DISTINCT:
        raise SystemExit(f"FAILED {method}: rows on other adapters differ from the single-adapter batch "
                         f"by only {distinct:.3e}: adapter_names was ignored or the adapters are trivial")
    return {"max_abs_diff": worst, "tolerance": TOLERANCE, "min_distinct_from_single": distinct,
            "max_abs_logit": scale}


# ----------------------------------------------------------------------------------------------
# Timing


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cases(cases: dict, ids, args, device) -> tuple[dict[str, list[float]], list[dict]]:
    """Round-robin: each round runs every case once, the order rotating from round to round.

    A round during which other processes kept more than `--max-other-cores` cores busy is
    contended: it is left out and another round is run, up to `--retries` extra rounds. With two
    threads on two cores, a process on the other core stalls every parallel op at its barrier,
    which hits the mixed paths (thousands of small ops per forward) many times harder than the
    single ones: a contended round measures the neighbour, not the adapters.
    """
    import torch

    names = list(cases)
    rounds: list[dict] = []
    clean = 0
    r = 0
    with torch.no_grad():
        while r < args.warmup or (clean < args.iters and r < args.warmup + args.iters + args.retries):
            load = CpuContention()
            shift = r % len(names)
            took: dict[str, float] = {}
            for name in names[shift:] + names[:shift]:
                model, kwargs = cases[name]
                _sync(device)
                start = time.perf_counter()
                model(input_ids=ids, use_cache=False, **kwargs)  # output dropped at once
                _sync(device)
                took[name] = time.perf_counter() - start
            r += 1
            if r <= args.warmup:
                continue
            other = load.result().get("other_cores", 0.0) if device.type == "cpu" else 0.0
            contended = other > args.max_other_cores
            clean += not contended
            rounds.append({"s": {n: took[n] for n in names}, "other_cores": other, "contended": contended})
            print(f"  round {len(rounds)} ({clean}/{args.iters} clean): " + ", ".join(
                f"{n} {took[n] * 1e3:,.0f} ms" for n in names)
                + f"; other processes {other:.2f} cores" + (" -> contended, left out" if contended else ""),
                flush=True)
    used = [x for x in rounds if not x["contended"]] or rounds  # all contended: use them, flagged
    return {n: [x["s"][n] for x in used] for n in names}, rounds


def profile_road(model, ids, mixed_names, device, rows: int = 15) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out = {}
    with torch.no_grad():
        for label, kwargs in (("single", {}), ("mixed", {"adapter_names": mixed_names})):
            model(input_ids=ids, use_cache=False, **kwargs)  # warm
            with profile(activities=activities) as prof:
                model(input_ids=ids, use_cache=False, **kwargs)
                _sync(device)
            averages = prof.key_averages()
            print(f"\nprofile: RoAd {label} forward, top {rows} operators by {key}")
            print(averages.table(sort_by=key, row_limit=rows))
            top = sorted(averages, key=lambda e: getattr(e, key, 0), reverse=True)[:rows]
            out[label] = [{"op": e.key, "calls": e.count, "self_ms": round(getattr(e, key, 0) / 1e3, 3)}
                          for e in top]
    return out


# ----------------------------------------------------------------------------------------------
# Report


def summarize(times: dict[str, list[float]], tokens: int) -> dict:
    out: dict = {"cases": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        out["cases"][name] = {"s_median": med, "s_min": min(ts), "s_max": max(ts),
                              "tokens_per_s": tokens / med, "s": [round(t, 5) for t in ts]}
    base = out["cases"]["base"]["tokens_per_s"]
    for m in METHODS:
        single, mixed = out["cases"][f"{m} single"], out["cases"][f"{m} mixed"]
        paired = [s / x for s, x in zip(times[f"{m} single"], times[f"{m} mixed"])]
        out[m] = {"mixed_over_single": mixed["tokens_per_s"] / single["tokens_per_s"],
                  "mixed_over_single_paired_median": statistics.median(paired),
                  "single_over_base": single["tokens_per_s"] / base,
                  "mixed_over_base": mixed["tokens_per_s"] / base}
        out[m]["target_met"] = out[m]["mixed_over_single"] >= TARGET
    out["road_mixed_over_lora_mixed"] = (out["cases"]["road mixed"]["tokens_per_s"]
                                         / out["cases"]["lora mixed"]["tokens_per_s"])
    return out


def table(summary: dict, k: int) -> str:
    rows = ["| case | adapters in the batch | ms / forward (median) | tokens/s (median) | vs base "
            "| mixed / single |", "|" + "---|" * 6]
    c = summary["cases"]
    b = c["base"]
    rows.append(f"| base model, no adapter | 0 | {b['s_median'] * 1e3:,.0f} | {b['tokens_per_s']:,.0f} "
                f"| 1.00x | |")
    for m in METHODS:
        for kind, count in (("single", "1 (set_adapter)"), ("mixed", f"{k} (adapter_names)")):
            x = c[f"{m} {kind}"]
            ratio = f"**{summary[m]['mixed_over_single']:.2f}x**" if kind == "mixed" else ""
            rows.append(f"| {LABELS[m]}, {kind} | {count} | {x['s_median'] * 1e3:,.0f} "
                        f"| {x['tokens_per_s']:,.0f} | {x['tokens_per_s'] / b['tokens_per_s']:.2f}x "
                        f"| {ratio} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    import torch

    # PEFT asks transformers 5 for `is_gradient_checkpointing` on every adapter added: noise here
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    command = "python " + shlex.join([os.path.relpath(Path(__file__).resolve(), ROOT)] + sys.argv[1:])
    started = time.time()

    base = build_base(args, device)
    size = base.config.intermediate_size
    if size % args.group_size or base.config.hidden_size % args.group_size:
        raise SystemExit(f"RoAd group size {args.group_size} must divide hidden size "
                         f"{base.config.hidden_size} and intermediate size {size}")
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, VOCAB, (args.batch_size, args.seq_len), generator=g).to(device)
    names = adapter_names(args.adapters)
    mixed_names = [names[i % len(names)] for i in range(args.batch_size)]
    tokens = args.batch_size * args.seq_len

    models, checks, adapted = {}, {}, {}
    for m in METHODS:
        models[m], adapted[m] = attach(base, m, args)
        checks[m] = check(m, models[m], ids, mixed_names)
    if dtype != torch.float32:
        for model in (base, *models.values()):
            model.to(dtype)
    cases = {"base": (base, {})}
    for m in METHODS:
        cases[f"{m} single"] = (models[m], {})                              # active adapter: a0
        cases[f"{m} mixed"] = (models[m], {"adapter_names": mixed_names})

    print(f"\ntiming: {args.warmup} warmup + {args.iters} timed rounds of {len(cases)} cases, "
          f"{args.batch_size} x {args.seq_len} tokens, {args.dtype}, device {device}, "
          f"{torch.get_num_threads()} threads", flush=True)
    times, rounds = time_cases(cases, ids, args, device)
    contended = sum(x["contended"] for x in rounds)
    under_contention = contended == len(rounds)
    summary = summarize(times, tokens)
    profile = profile_road(models["road"], ids, mixed_names, device) if args.profile else None

    report = {
        "benchmark": "mixed_batch",
        "command": command,
        "argv": sys.argv,
        "machine": machine_info(device),
        "settings": {
            "model": args.model, "config": {k: base.config.to_dict()[k] for k in (
                "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size")},
            "attn_implementation": base.config._attn_implementation,
            "params": sum(p.numel() for p in base.parameters()),
            "adapter_params": {m: sum(p.numel() for n, p in models[m].named_parameters()
                                      if ("road_" if m == "road" else "lora_") in n) for m in METHODS},
            "adapted_layers": adapted, "adapters": args.adapters, "mixed_adapter_names": mixed_names,
            "single_adapter": names[0], "batch_size": args.batch_size, "seq_len": args.seq_len,
            "tokens_per_forward": tokens, "dtype": args.dtype, "device": device.type,
            "warmup": args.warmup, "iters": args.iters, "seed": args.seed,
            "road": {**ROAD, "group_size": args.group_size, "theta_std": ROAD_THETA_STD,
                     "alpha": f"1 + N(0, {ROAD_ALPHA_STD})"},
            "lora": {**LORA, "B_std": LORA_B_STD, "A": "PEFT default (kaiming_uniform, seeded)"},
            "grad": "torch.no_grad(), eval mode, use_cache=False, full logits",
            "target": f"RoAd mixed >= {TARGET}x single-adapter tokens/s",
        },
        "correctness": checks,
        "rounds": {"timed": len(rounds), "contended_left_out": 0 if under_contention else contended,
                   "measured_under_contention": under_contention,
                   "max_other_cores": args.max_other_cores,
                   "per_round": [{"other_cores": x["other_cores"], "contended": x["contended"],
                                  "ms": {n: round(t * 1e3, 1) for n, t in x["s"].items()}}
                                 for x in rounds]},
        "summary": summary,
        "profile": profile,
        "wall_seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    s = report["settings"]
    cfg = s["config"]
    print(f"\nLlama {args.model} (hidden {cfg['hidden_size']}, intermediate {cfg['intermediate_size']}, "
          f"{cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}; {s['params']:,} {args.dtype} "
          f"params), {args.adapters} adapters per method on {adapted['road']} linear layers, "
          f"{args.batch_size} x {args.seq_len} tokens per forward, median of {len(times['base'])} "
          f"rounds ({contended} contended rounds {'used' if under_contention else 'left out'}), "
          f"device {device} ({torch.get_num_threads()} threads)\n")
    print(table(summary, args.adapters))
    print()
    for m in METHODS:
        r = summary[m]
        print(f"{LABELS[m]}: mixed/single {r['mixed_over_single']:.3f}x (median per-round ratio "
              f"{r['mixed_over_single_paired_median']:.3f}x), target >= {TARGET}x: "
              f"{'MET' if r['target_met'] else 'NOT MET'}")
    print(f"RoAd mixed / LoRA mixed: {summary['road_mixed_over_lora_mixed']:.3f}x")
    if under_contention:
        print(f"\nwarning: other processes kept more than {args.max_other_cores} cores busy in every timed "
              "round; these numbers measure the contention, not the adapters")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
