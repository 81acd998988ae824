"""Quantization quality: round-to-nearest, FlexRound and Intel's AutoRound side by side.

The same model, the same calibration rows, the same quantized layers (every linear layer of the
decoder blocks; embeddings and head kept) and the same grid at two settings: W4 per-channel and W4
group-128 (asymmetric by default, as FlexRound's reference recipe; `--symmetric` for both). For
each method: held-out perplexity on the embedded world's general and domain text, the gap to full
precision, the share of RTN's gap it closes, 100·(ppl_RTN − ppl)/(ppl_RTN − ppl_FP), and the time
it took (with seconds per block for FlexRound and AutoRound).

  * RTN: `quant.rtn`, min-max grid.
  * FlexRound: `quant.flexround` (Adam at `--lr`, cosine to 0), `--iterations` per block.
  * AutoRound: `auto_round.AutoRound` (SignRound) with its own learning-rate recipe, the same
    number of iterations per block, the same calibration rows (passed as token tensors with an
    all-ones attention mask), the same batch size, `bits=4`, `group_size=-1` (per channel) or 128,
    `sym` as above. Its fake-quantized weights are evaluated in place.

The model: by default the workbench pretrains one for the benchmark (once, cached in
`--workspace`): the embedded base's architecture (Llama, hidden 128, 4 layers, 4 heads) with the
intermediate size 384 instead of 352, so that every input width is a multiple of 128 (group-128
needs it; AutoRound also skips layers whose widths are not multiples of 32), trained on the
embedded general corpus exactly as the default base is. `--model PATH` uses any local causal-LM
folder instead (group-128 needs widths divisible by 128).

On a GPU, `--time-config llama-0.5b` adds a timing run on a randomly initialised Llama of that
built-in config (about 0.5B parameters): seconds per block for FlexRound and AutoRound at W4
per-channel on random calibration tokens (quality on random weights means nothing, so none is
reported there).

Targets (DESIGN.md section 7): FlexRound closes at least 50% of RTN's general-text perplexity gap
to full precision at W4 per-channel, and its perplexity is no worse than AutoRound's.

Run:

    python bench/quant_quality.py --quick        # a few minutes on 2 CPU cores
    python bench/quant_quality.py                # the full comparison (longer)
    python bench/quant_quality.py --device cuda --time-config llama-0.5b

Writes a table to stdout and JSON to `--out` (default bench/results/quant_quality.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import CpuContention, machine_info  # noqa: E402  (shared machine record)

BENCH_ARCH = "llama-base-g128"
SETTINGS = {"W4 per-channel": dict(granularity="channel"),
            "W4 group-128": dict(granularity="group", group_size=128)}
TARGET_GAP_CLOSED = 50.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="a causal-LM folder; default: the benchmark base")
    p.add_argument("--workspace", type=Path, default=ROOT / "workspace" / "bench-quant",
                   help="where the benchmark base is pretrained once and kept")
    p.add_argument("--pretrain-steps", type=int, default=400, help="steps of the benchmark base")
    p.add_argument("--iterations", type=int, default=500, help="FlexRound / AutoRound steps per block")
    p.add_argument("--samples", type=int, default=128, help="calibration rows")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration row")
    p.add_argument("--batch-size", type=int, default=4, help="calibration rows per step")
    p.add_argument("--lr", type=float, default=3e-3, help="FlexRound learning rate")
    p.add_argument("--symmetric", action="store_true", help="symmetric grids (default asymmetric)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per text set")
    p.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--time-config", default=None,
                   help="also time FlexRound and AutoRound per block on this random-init built-in "
                        "config (e.g. llama-0.5b; meant for a GPU)")
    p.add_argument("--time-iterations", type=int, default=200, help="steps per block in the timing run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="a short run: --pretrain-steps 120 --iterations 100 --samples 32 "
                        "--eval-tokens 4096 (explicit flags still win)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quant_quality.json")
    args = p.parse_args(argv)
    if args.quick:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for flag, value in (("--pretrain-steps", 120), ("--iterations", 100), ("--samples", 32),
                            ("--eval-tokens", 4096)):
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)
    if args.samples % args.batch_size:
        p.error("--samples must be a multiple of --batch-size")
    return args


# ----------------------------------------------------------------------------------------------
# Model, data, evaluation


def bench_base(args):
    """The benchmark base (pretrained once per step count) or `--model`: (model folder, ref)."""
    from workbench.base import run_pretrain
    from workbench.models import BUILTIN_CONFIGS
    from workbench.recipes import PretrainRecipe, TrainSpec
    from workbench.workspace import Workspace

    if args.model:
        return Path(args.model), args.model
    BUILTIN_CONFIGS.setdefault(BENCH_ARCH, {**BUILTIN_CONFIGS["llama-base"], "intermediate_size": 384})
    ws = Workspace(args.workspace)
    name = f"bench-base-g128-{args.pretrain_steps}"
    run = ws.latest("pretrain", name)
    if run is None:
        print(f"Pretraining the benchmark base ({BENCH_ARCH}, {args.pretrain_steps} steps) into {ws.root} ...",
              flush=True)
        default = PretrainRecipe()
        train = TrainSpec(**{**default.train.model_dump(), "max_steps": args.pretrain_steps,
                             "checkpoint_every": 0})
        run = run_pretrain(PretrainRecipe(name=name, architecture=BENCH_ARCH, train=train), ws)
    return run.path("model"), f"{ws.root}/runs/{run.id}/model"


def load(folder: Path, device):
    from workbench.models import load_tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").to(device).eval()
    return model, load_tokenizer(folder)


def perplexities(model, tokenizer, args) -> dict:
    from workbench.evaluate import evaluate_model
    from workbench.recipes import EvalSpec

    metrics = evaluate_model(model, tokenizer, EvalSpec(max_tokens=args.eval_tokens), 128, text_only=True)
    return {"general_ppl": metrics["general_ppl"], "domain_ppl": metrics["domain_ppl"]}


def block_linear_names(model) -> list[str]:
    from quant.rtn import quantizable_layers

    return list(quantizable_layers(model))


# ----------------------------------------------------------------------------------------------
# The three methods


def run_rtn(model, spec, batches, args):
    from quant.rtn import quantize_model_rtn

    started = time.time()
    quantize_model_rtn(model, spec)
    return {"seconds": time.time() - started}


def run_flexround(model, spec, batches, args, iterations=None):
    from quant.flexround import FlexRoundConfig, flexround_quantize

    config = FlexRoundConfig(iterations=iterations or args.iterations, samples=args.samples,
                             seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr)
    started = time.time()
    result = flexround_quantize(model, batches, spec, config, seed=args.seed, progress=False)
    seconds = time.time() - started
    return {"seconds": seconds, "seconds_per_block": seconds / len(result.blocks),
            "blocks": result.blocks}


def run_autoround(model, spec, batches, args, iterations=None):
    import torch
    from auto_round import AutoRound

    device = next(model.parameters()).device
    before = {n: model.get_submodule(n).weight.detach().clone() for n in block_linear_names(model)}
    data = [{"input_ids": b["input_ids"], "attention_mask": torch.ones_like(b["input_ids"])} for b in batches]
    started = time.time()
    autoround = AutoRound(model, args.tokenizer, bits=spec.bits, sym=spec.symmetric,
                          group_size=-1 if spec.granularity == "channel" else spec.group_size,
                          iters=iterations or args.iterations, nsamples=len(batches) * args.batch_size,
                          seqlen=args.seq_len, batch_size=args.batch_size, dataset=data, seed=args.seed,
                          device_map="cpu" if device.type == "cpu" else device.index or 0,
                          enable_torch_compile=False)
    autoround.quantize()
    seconds = time.time() - started
    changed = [n for n, w in before.items() if not torch.equal(model.get_submodule(n).weight.detach(), w)]
    blocks = len({n.rsplit(".", 2)[0] for n in before})
    return {"seconds": seconds, "seconds_per_block": seconds / blocks,
            "quantized_layers": len(changed), "layers": len(before)}


METHODS = {"RTN": run_rtn, "FlexRound": run_flexround, "AutoRound": run_autoround}


def gap_closed(fp: float, rtn: float, ppl: float) -> float | None:
    return 100.0 * (rtn - ppl) / (rtn - fp) if rtn > fp else None


def compare(args, device) -> dict:
    import torch

    from quant.flexround import calibration_batches
    from quant.rtn import WeightQuantSpec
    from workbench.data import read_texts

    folder, ref = bench_base(args)
    fp_model, tokenizer = load(folder, device)
    args.tokenizer = tokenizer
    batches = calibration_batches(read_texts("world:general_train"), tokenizer, args.seq_len, args.samples,
                                  args.batch_size, seed=args.seed, source="world:general_train")
    fp = perplexities(fp_model, tokenizer, args)
    print(f"full precision: general ppl {fp['general_ppl']:.4f}, domain ppl {fp['domain_ppl']:.4f}", flush=True)
    results = {"model": ref, "layers": len(block_linear_names(fp_model)), "full_precision": fp, "settings": {}}
    for setting in args.settings:
        spec = WeightQuantSpec(bits=4, symmetric=args.symmetric, **SETTINGS[setting])
        rows = {}
        for method, fn in METHODS.items():
            torch.manual_seed(args.seed)
            model = copy.deepcopy(fp_model)
            load_meter = CpuContention()
            row = fn(model, spec, batches, args)
            row.update(perplexities(model, tokenizer, args), load=load_meter.result())
            rows[method] = row
            print(f"{setting:15s} {method:9s} general ppl {row['general_ppl']:.4f} ({row['seconds']:.1f} s)",
                  flush=True)
            del model
        for row in rows.values():
            for kind in ("general", "domain"):
                row[f"{kind}_gap"] = row[f"{kind}_ppl"] - fp[f"{kind}_ppl"]
                row[f"{kind}_gap_closed_pct"] = gap_closed(fp[f"{kind}_ppl"], rows["RTN"][f"{kind}_ppl"],
                                                           row[f"{kind}_ppl"])
        flex, auto = rows["FlexRound"], rows["AutoRound"]
        results["settings"][setting] = {
            "spec": spec.__dict__, "methods": rows,
            "flexround_closes_half_of_rtn_gap": (flex["general_gap_closed_pct"] or 0.0) >= TARGET_GAP_CLOSED,
            "flexround_at_least_autoround": flex["general_ppl"] <= auto["general_ppl"],
            "autoround_quantized_every_layer": auto["quantized_layers"] == auto["layers"]}
    return results


def time_blocks(args, device) -> dict:
    """FlexRound and AutoRound seconds per block on a random-init built-in config."""
    import torch

    from quant.rtn import WeightQuantSpec
    from workbench.models import build_model_from_config, builtin_config

    vocab = builtin_config(args.time_config).get("vocab_size", 32000)
    model = build_model_from_config(args.time_config, vocab_size=vocab, seed=args.seed).to(device).eval()
    g = torch.Generator().manual_seed(args.seed)
    batches = [{"input_ids": torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g)}
               for _ in range(args.samples // args.batch_size)]
    spec = WeightQuantSpec(bits=4, symmetric=args.symmetric)
    params = sum(p.numel() for p in model.parameters())
    out = {"config": args.time_config, "parameters": params, "iterations": args.time_iterations}
    for method, fn in (("FlexRound", run_flexround), ("AutoRound", run_autoround)):
        copy_ = copy.deepcopy(model)
        row = fn(copy_, spec, batches, args, iterations=args.time_iterations)
        out[method] = {"seconds": row["seconds"], "seconds_per_block": row["seconds_per_block"]}
        print(f"{args.time_config}: {method} {row['seconds_per_block']:.1f} s per block", flush=True)
        del copy_
    return out


# ----------------------------------------------------------------------------------------------


def table(results: dict) -> str:
    lines = []
    for setting, block in results["settings"].items():
        lines.append(f"\n{setting} ({'symmetric' if block['spec']['symmetric'] else 'asymmetric'}), "
                     f"full precision general ppl {results['full_precision']['general_ppl']:.4f}, "
                     f"domain ppl {results['full_precision']['domain_ppl']:.4f}")
        head = f"{'method':10s} {'general ppl':>12s} {'gap':>9s} {'closed':>8s} {'domain ppl':>12s} " \
               f"{'closed':>8s} {'time (s)':>9s} {'s/block':>8s}"
        lines += [head, "-" * len(head)]
        for method, row in block["methods"].items():
            closed = lambda v: "-" if v is None else f"{v:.0f}%"  # noqa: E731
            per_block = f"{row['seconds_per_block']:.1f}" if "seconds_per_block" in row else "-"
            lines.append(f"{method:10s} {row['general_ppl']:12.4f} {row['general_gap']:+9.4f} "
                         f"{closed(row['general_gap_closed_pct']):>8s} {row['domain_ppl']:12.4f} "
                         f"{closed(row['domain_gap_closed_pct']):>8s} {row['seconds']:9.1f} {per_block:>8s}")
        auto = block["methods"]["AutoRound"]
        if auto["quantized_layers"] < auto["layers"]:
            lines.append(f"AutoRound quantized only {auto['quantized_layers']} of {auto['layers']} layers "
                         "(it skips widths that are not multiples of 32): not comparable")
        lines.append(f"FlexRound closes >= {TARGET_GAP_CLOSED:.0f}% of RTN's gap: "
                     f"{block['flexround_closes_half_of_rtn_gap']}; FlexRound ppl <= AutoRound's: "
                     f"{block['flexround_at_least_autoround']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    started = time.time()
    results = compare(args, device)
    if args.time_config:
        results["timing"] = time_blocks(args, device)
    settings = {k: getattr(args, k) for k in ("iterations", "samples", "seq_len", "batch_size", "lr",
                                                "symmetric", "eval_tokens", "pretrain_steps", "seed")}
    given = argv if argv is not None else sys.argv[1:]
    report = {"command": "python " + " ".join(shlex.quote(a) for a in ["bench/quant_quality.py", *given]),
              "machine": machine_info(device.type), "settings": settings, "results": results,
              "wall_seconds": round(time.time() - started, 1)}
    import importlib.metadata as md

    report["machine"]["auto-round"] = md.version("auto-round")
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
