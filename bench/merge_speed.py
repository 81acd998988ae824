"""Merge speed: the workbench's exact streaming merge against mergekit, and the copy floor.

Inputs (generated once into `--workdir`, reused while the same settings are asked for): a randomly
initialised Llama of about `--size-mb` MiB in float16 (vocabulary 32000, hidden size and depth
chosen to fit the size), saved as sharded safetensors with `model.safetensors.index.json` (shards
of `--shard-mb`, default size/5); `--k` LoRA adapters (rank `--rank`, alpha 2·rank, all seven
linear layers of every block, A ~ N(0, 1/in), B ~ N(0, 0.01²), float32, PEFT format); and two
"fine-tuned" full models, instruct = base + N(0, 0.002²) and domain = base + N(0, 0.002²) per
tensor, which stand for an instruction-tuned model and a domain model.

Cases, each in a fresh Python process:

  (a) LoRA + instruction vector into the base, written as a sharded model:
      θ = θ_base + Σ wᵢ·sᵢ·BᵢAᵢ + α·(θ_instruct − θ_base), w = (0.5, 0.3, 0.2, ...), α = 1.
      ours:     `merge.dense.merge_folders` (the merge stage's writer: exact, LoRA factors kept
                factored, blocks of rows read from the shards, float32 arithmetic).
      mergekit: task_arithmetic over `base+lora_i` model references (mergekit merges each LoRA into
                a full copy of the base with PEFT's merge_and_unload and saves it in its LoRA cache,
                a fresh one per run) and the instruct model, `dtype: float32`, `out_dtype: float16`.
  (b) plain full-model task arithmetic, θ = θ_base + 0.5·(θ_instruct − θ_base) + 0.5·(θ_domain −
      θ_base): ours (`merge_folders`) against mergekit on the equivalent YAML.
  (c) the floor: copying the base folder (`shutil.copytree`, no torch imported).
  (c') the floor of (a) itself: reading every byte (a) has to read (the base and the instruct
      model) and writing as many as it writes (the base's files), in 4 MiB pieces through one
      reused buffer in user space, no arithmetic (no torch imported). A kernel copy moves 1 GiB
      without it ever reaching the process; a merge must read 2 GiB into the process and write
      1 GiB back.

Both merges write shards of the input shard size (mergekit: `out_shard_size` in parameters) and no
tokenizer. Measured per case: wall time of the whole process (what a user waits for, imports
included), wall time of the work alone (after imports, reported by the process), and the process's
peak resident set size (ru_maxrss of that child, from `os.wait4`; memory-mapped file pages count;
the parent imports no torch until every case has run, since a child's ru_maxrss starts from the
size of the process that spawned it), with the part reached before the work began (imports).
The RSS target for (a) is the largest input shard + the adapters' files + 1 GiB.
Outputs of ours and mergekit are compared tensor by tensor (max abs difference in float32, and the
fraction of entries that differ): in (a) mergekit rounds each base+LoRA model to float16 before
its task arithmetic, so a difference of a float16 rounding step is expected there.

The page cache is warm for every case (the inputs were just generated or read); other processes
on the machine are recorded per case (`train_throughput.CpuContention`).

Run (the full size takes several minutes and about 12 GB of disk under --workdir):

    python bench/merge_speed.py                        # about 1 GB, K = 3
    python bench/merge_speed.py --size-mb 50           # a smoke test, under a minute

On a busy machine, `--threads 1` keeps torch's threads from stalling on each other (both
contestants get the same setting); `--repeats 3` reports medians.

Writes a table to stdout and JSON to `--out` (default bench/results/merge_speed.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import CpuContention  # noqa: E402  (one probe for every benchmark)
from train_throughput import fmt_mib, machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = ("copy", "io_a", "ours_a", "mergekit_a", "ours_b", "mergekit_b")
INTERNAL = CASES + ("generate",)
LABELS = {"copy": "(c) copy of the base folder",
          "io_a": "(c') the bytes (a) must move, no arithmetic",
          "ours_a": "(a) ours: K LoRA + instruction vector",
          "mergekit_a": "(a) mergekit: base+lora, task_arithmetic",
          "ours_b": "(b) ours: full-model task arithmetic",
          "mergekit_b": "(b) mergekit: full-model task_arithmetic"}
VOCAB = 32000
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
INPUTS_VERSION = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size-mb", type=int, default=1024, help="size of the base model in MiB (float16)")
    p.add_argument("--shard-mb", type=int, default=0, help="input and output shard size (0: size/5)")
    p.add_argument("--k", type=int, default=3, help="number of LoRA adapters in case (a)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the instruction vector in (a)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs of every case (medians reported)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "workbench-merge-speed",
                   help="cache of the generated inputs, and scratch space for the outputs")
    p.add_argument("--keep-outputs", action="store_true", help="keep the merged folders")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "merge_speed.json")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads in every merge process (0: torch's default, one per "
                        "core; on a busy machine 1 avoids threads stalling on each other)")
    p.add_argument("--only", choices=INTERNAL, default=None, help=argparse.SUPPRESS)
    p.add_argument("--inputs", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.size_mb < 4 or args.k < 1 or args.rank < 1 or args.repeats < 1:
        p.error("need --size-mb >= 4, --k >= 1, --rank >= 1, --repeats >= 1")
    return args


# ----------------------------------------------------------------------------------------------
# Inputs


def llama_dims(size_mb: int) -> dict:
    """A Llama config of about `size_mb` MiB in float16: the widest hidden size that still leaves
    at least 4 decoder layers beside the (untied) embeddings, vocabulary 32000."""
    target = size_mb * 2**20 // 2
    for hidden in (2048, 1536, 1024, 768, 512, 384, 256, 128, 64):
        head_dim = 128 if hidden >= 1024 else 64
        heads = hidden // head_dim
        kv_heads = max(1, heads // 4)
        inter = int(round(hidden * 2.75 / 64)) * 64
        kv = kv_heads * head_dim
        per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
        layers = round((target - 2 * VOCAB * hidden - hidden) / per_layer)
        if layers >= 4 or hidden == 64:
            return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                        num_hidden_layers=max(1, min(layers, 64)), num_attention_heads=heads,
                        num_key_value_heads=kv_heads, head_dim=head_dim,
                        max_position_embeddings=4096, tie_word_embeddings=False)
    raise AssertionError("unreachable")


def shard_bytes(args) -> int:
    return (args.shard_mb or max(1, args.size_mb // 5)) * 2**20


def _shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a LlamaForCausalLM, from a meta-device model (no memory)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def _write_sharded(folder: Path, tensors_of, names_shapes, max_bytes: int, config) -> None:
    """Write tensors (produced one by one by `tensors_of(name, shape)`) as float16 shards plus the
    index, config.json and generation_config.json."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    plan, size = [[]], 0
    for name, shape in names_shapes:
        nbytes = math.prod(shape) * 2
        if plan[-1] and size + nbytes > max_bytes:
            plan.append([])
            size = 0
        plan[-1].append((name, shape))
        size += nbytes
    folder.mkdir(parents=True)
    weight_map, total = {}, 0
    for k, group in enumerate(plan, start=1):
        file_name = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        shard = {name: tensors_of(name, shape).to(torch.float16).contiguous() for name, shape in group}
        total += sum(t.numel() * 2 for t in shard.values())
        save_file(shard, folder / file_name, metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float16"
    config.save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(folder)


def ensure_inputs(args) -> Path:
    """The generated inputs for these settings (built once, atomically, then reused)."""
    import torch
    from transformers import LlamaConfig

    dims = llama_dims(args.size_mb)
    spec = {"version": INPUTS_VERSION, "dims": dims, "shard_bytes": shard_bytes(args), "k": args.k,
            "rank": args.rank, "seed": args.seed}
    name = f"inputs-{args.size_mb}mb-k{args.k}-r{args.rank}-s{args.seed}-shard{shard_bytes(args) >> 20}"
    folder = args.workdir / name
    if (folder / "spec.json").is_file() and json.loads((folder / "spec.json").read_text()) == spec:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    tmp = args.workdir / f".{name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    started = time.time()
    config = LlamaConfig(**dims)
    names_shapes = _shapes(config)

    def generator(tag: str, name: str) -> torch.Generator:
        import hashlib

        digest = hashlib.sha256(f"{args.seed}\0{tag}\0{name}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))

    def base_tensor(name, shape):
        if len(shape) == 1:
            return torch.ones(shape)
        return torch.randn(shape, generator=generator("base", name)) * 0.02

    def finetuned(tag):
        def tensor(name, shape):
            return base_tensor(name, shape).half().float() + \
                torch.randn(shape, generator=generator(tag, name)) * 0.002
        return tensor

    max_bytes = shard_bytes(args)
    print(f"generating inputs in {folder}: Llama {dims['hidden_size']}x{dims['num_hidden_layers']} "
          f"layers, {sum(math.prod(s) for _, s in names_shapes) / 1e6:.0f}M parameters ...", flush=True)
    _write_sharded(tmp / "base", base_tensor, names_shapes, max_bytes, config)
    for tag in ("instruct", "domain"):
        _write_sharded(tmp / tag, finetuned(tag), names_shapes, max_bytes, LlamaConfig(**dims))
    shapes = dict(names_shapes)
    for i in range(args.k):
        _write_lora(tmp / f"lora_{i}", tmp / "base", shapes, dims["num_hidden_layers"], args.rank,
                    lambda name, i=i: generator(f"lora{i}", name))
    (tmp / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    os.replace(tmp, folder)
    # adapters name their base by path: point them at the final folder
    for i in range(args.k):
        config_path = folder / f"lora_{i}" / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = str(folder / "base")
        config_path.write_text(json.dumps(adapter_config, indent=2) + "\n")
    print(f"inputs ready in {time.time() - started:.0f} s", flush=True)
    return folder


def _write_lora(folder: Path, base: Path, shapes: dict, layers: int, rank: int, generator) -> None:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors = {}
    for layer in range(layers):
        for module in TARGETS:
            key = f"model.layers.{layer}.{module}"
            out_features, in_features = shapes[f"{key}.weight"]
            gen = generator(key)
            tensors[f"base_model.model.{key}.lora_A.weight"] = \
                torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features)
            tensors[f"base_model.model.{key}.lora_B.weight"] = \
                torch.randn(out_features, rank, generator=gen) * 0.01
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=sorted({t.split(".")[1] for t in TARGETS}),
                        base_model_name_or_path=str(base))
    config.save_pretrained(folder)


def lora_weights(k: int) -> list[float]:
    """(0.5, 0.3, 0.2) for K = 3; otherwise decreasing weights that sum to 1."""
    if k == 3:
        return [0.5, 0.3, 0.2]
    raw = [k - i for i in range(k)]
    return [r / sum(raw) for r in raw]


# ----------------------------------------------------------------------------------------------
# One case (runs in its own process)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def mergekit_config(inputs: Path, case: str, args) -> dict:
    base = str(inputs / "base")
    if case == "mergekit_a":
        models = [{"model": f"{base}+{inputs / f'lora_{i}'}", "parameters": {"weight": w}}
                  for i, w in enumerate(lora_weights(args.k))]
        models.append({"model": str(inputs / "instruct"), "parameters": {"weight": args.alpha}})
    else:
        models = [{"model": str(inputs / name), "parameters": {"weight": 0.5}}
                  for name in ("instruct", "domain")]
    return {"merge_method": "task_arithmetic", "base_model": base, "models": models,
            "parameters": {"normalize": False}, "dtype": "float32", "out_dtype": "float16"}


def our_inputs(inputs: Path, case: str, args) -> list[tuple[Path, float]]:
    if case == "ours_a":
        return [(inputs / f"lora_{i}", w) for i, w in enumerate(lora_weights(args.k))] + \
            [(inputs / "instruct", args.alpha)]
    return [(inputs / "instruct", 0.5), (inputs / "domain", 0.5)]


def move_the_bytes_of_a(inputs: Path, output: Path, piece: int = 4 << 20) -> None:
    """Read the instruct model's and the base's files and write the base's into `output`, through
    one reused buffer: the I/O a merge of case (a) cannot avoid."""
    buffer = memoryview(bytearray(piece))
    for shard in sorted((inputs / "instruct").glob("*.safetensors")):
        with open(shard, "rb") as f:
            while f.readinto(buffer):
                pass
    output.mkdir(parents=True)
    for path in sorted((inputs / "base").iterdir()):
        with open(path, "rb") as f, open(output / path.name, "wb") as out:
            while n := f.readinto(buffer):
                out.write(buffer[:n])


def _hwm_mib() -> float | None:
    """The process's peak resident size so far (VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_case(args) -> dict:
    started = time.perf_counter()
    contention = CpuContention()
    case, inputs, output = args.only, args.inputs, args.output
    if case != "copy" and args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if case == "copy":
        import_s, work_start, before_work = 0.0, started, _hwm_mib()
        shutil.copytree(inputs / "base", output)
    elif case == "io_a":
        import_s, work_start, before_work = 0.0, started, _hwm_mib()
        move_the_bytes_of_a(inputs, output)
    elif case.startswith("ours"):
        from merge.dense import merge_folders

        work_start, before_work = time.perf_counter(), _hwm_mib()
        import_s = work_start - started
        merge_folders(inputs / "base", our_inputs(inputs, case, args), output,
                      max_shard_bytes=shard_bytes(args))
    else:
        import yaml
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        work_start, before_work = time.perf_counter(), _hwm_mib()
        import_s = work_start - started
        cache = Path(tempfile.mkdtemp(prefix="lora-cache-", dir=output.parent))
        try:
            options = MergeOptions(lora_merge_cache=str(cache), copy_tokenizer=False,
                                   write_model_card=False, quiet=True,
                                   out_shard_size=shard_bytes(args) // 2,
                                   num_threads=args.threads or None)
            options.apply_global_options()
            config = mergekit_config(inputs, case, args)
            run_merge(MergeConfiguration.model_validate(config), str(output), options=options,
                      config_source=yaml.safe_dump(config))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    work_s = time.perf_counter() - work_start
    import resource

    return {"case": case, "work_s": work_s, "import_s": import_s, "rss_before_work_mib": before_work,
            "self_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "output_bytes": folder_bytes(output), "cpu_contention": contention.result()}


# ----------------------------------------------------------------------------------------------
# The comparison (parent process)


def run_child(args, case: str, inputs: Path, output: Path) -> dict:
    """Run one case in a fresh process; its wall time and peak RSS (os.wait4's ru_maxrss)."""
    return _run(args, case, inputs, output)


def _run(args, case: str, inputs: Path | None, output: Path | None) -> dict:
    paths = ["--inputs", str(inputs), "--output", str(output)] if inputs is not None else []
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", case, *paths,
           "--size-mb", str(args.size_mb), "--shard-mb",
           str(shard_bytes(args) >> 20), "--k", str(args.k), "--rank", str(args.rank),
           "--alpha", str(args.alpha), "--seed", str(args.seed), "--threads", str(args.threads),
           "--workdir", str(args.workdir)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if child.returncode != 0 or not lines:
        sys.stderr.write(stdout[-4000:] + stderr[-8000:])
        raise SystemExit(f"{case}: benchmark process failed (exit {child.returncode})")
    if case == "generate":
        sys.stdout.write("".join(ln + "\n" for ln in stdout.splitlines() if not ln.startswith("{")))
    return {**json.loads(lines[-1]), "wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def compare(a: Path, b: Path) -> dict:
    """Max abs difference (float32) and fraction of differing entries between two model folders."""
    from safetensors import safe_open

    from workbench.io import model_layout

    la, lb = model_layout(a), model_layout(b)
    if set(la) != set(lb):
        only = sorted(set(la) ^ set(lb))
        return {"same_tensors": False, "only_in_one": only[:5]}
    worst, worst_name, differ, total = 0.0, None, 0, 0
    for name in la:
        with safe_open(la[name][0], "pt") as fa, safe_open(lb[name][0], "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape:
            return {"same_tensors": False, "mismatch": name}
        diff = (x.float() - y.float()).abs()
        m = float(diff.max()) if diff.numel() else 0.0
        if m > worst:
            worst, worst_name = m, name
        differ += int((diff > 0).sum())
        total += diff.numel()
    return {"same_tensors": True, "max_abs_diff": worst, "max_at": worst_name,
            "fraction_differing": differ / max(1, total)}


def reference_check(inputs: Path, args, ours: Path, theirs: Path) -> dict:
    """Case (a) on a few adapted weights, by hand in float64 and rounded once to float16: the
    max abs difference of ours and of mergekit's output from it (ours is exact up to that one
    rounding and float32 accumulation; mergekit also rounds each base+LoRA model to float16)."""
    from safetensors import safe_open

    from workbench.io import model_layout

    layers = llama_dims(args.size_mb)["num_hidden_layers"]
    names = ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{layers - 1}.mlp.down_proj.weight"]
    base_layout, inst_layout = model_layout(inputs / "base"), model_layout(inputs / "instruct")
    out = {}
    for name in names:
        def read(layout):
            with safe_open(layout[name][0], "pt") as f:
                return f.get_tensor(name).double()
        theta = read(base_layout)
        expected = theta + args.alpha * (read(inst_layout) - theta)
        key = "base_model.model." + name.removesuffix(".weight")
        for i, w in enumerate(lora_weights(args.k)):
            config = json.loads((inputs / f"lora_{i}" / "adapter_config.json").read_text())
            with safe_open(inputs / f"lora_{i}" / "adapter_model.safetensors", "pt") as f:
                b = f.get_tensor(f"{key}.lora_B.weight").double()
                a = f.get_tensor(f"{key}.lora_A.weight").double()
            expected += w * config["lora_alpha"] / config["r"] * (b @ a)
        expected = expected.half().double()
        for label, folder in (("ours", ours), ("mergekit", theirs)):
            layout = model_layout(folder)
            with safe_open(layout[name][0], "pt") as f:
                got = f.get_tensor(name).double()
            out.setdefault(label, {})[name] = float((got - expected).abs().max())
    return out


def median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def summarize(runs: dict[str, list[dict]], inputs: Path) -> dict:
    from workbench.io import model_layout

    layout = model_layout(inputs / "base")
    shard_sizes = {}
    for path, _, _, nbytes in layout.values():
        shard_sizes[path.name] = shard_sizes.get(path.name, 0) + nbytes
    adapters_mib = sum(folder_bytes(p) for p in inputs.glob("lora_*")) / 2**20
    out = {"cases": {}}
    for case, rs in runs.items():
        out["cases"][case] = {
            "wall_s": median([r["wall_s"] for r in rs]), "work_s": median([r["work_s"] for r in rs]),
            "import_s": median([r["import_s"] for r in rs]),
            "peak_rss_mib": median([r["peak_rss_mib"] for r in rs]),
            "rss_before_work_mib": median([r["rss_before_work_mib"] or 0.0 for r in rs]),
            "per_repeat_wall_s": [round(r["wall_s"], 2) for r in rs],
            "per_repeat_other_cores": [r["cpu_contention"].get("other_cores") for r in rs],
            "output_mib": rs[-1]["output_bytes"] / 2**20}
    c = out["cases"]
    largest_shard_mib = max(shard_sizes.values()) / 2**20
    bound = largest_shard_mib + adapters_mib + 1024
    out["inputs"] = {"base_mib": sum(shard_sizes.values()) / 2**20, "shards": len(shard_sizes),
                     "largest_shard_mib": largest_shard_mib, "adapters_mib": adapters_mib,
                     "rss_bound_mib": bound}
    out["ratios"] = {
        "a_mergekit_over_ours_wall": c["mergekit_a"]["wall_s"] / c["ours_a"]["wall_s"],
        "a_mergekit_over_ours_work": c["mergekit_a"]["work_s"] / c["ours_a"]["work_s"],
        "a_ours_over_copy_wall": c["ours_a"]["wall_s"] / c["copy"]["wall_s"],
        "a_ours_over_copy_work": c["ours_a"]["work_s"] / c["copy"]["work_s"],
        "a_ours_over_its_io_floor_wall": c["ours_a"]["wall_s"] / c["io_a"]["wall_s"],
        "a_its_io_floor_over_copy_wall": c["io_a"]["wall_s"] / c["copy"]["wall_s"],
        "b_mergekit_over_ours_wall": c["mergekit_b"]["wall_s"] / c["ours_b"]["wall_s"],
        "b_mergekit_over_ours_work": c["mergekit_b"]["work_s"] / c["ours_b"]["work_s"],
    }
    r = out["ratios"]
    out["targets"] = {
        "a_at_least_3x_faster_than_mergekit": r["a_mergekit_over_ours_wall"] >= 3,
        "a_peak_rss_within_largest_shard_plus_adapters_plus_1GiB": c["ours_a"]["peak_rss_mib"] <= bound,
        "a_at_most_1.5x_the_copy": r["a_ours_over_copy_wall"] <= 1.5,
        "b_no_slower_than_mergekit": r["b_mergekit_over_ours_wall"] >= 1,
    }
    return out


def table(summary: dict, agreement: dict) -> str:
    rows = ["| case | wall (process) | work (after imports) | peak RSS | of which before the work |",
            "|---|---|---|---|---|"]
    for case in CASES:
        s = summary["cases"][case]
        rows.append(f"| {LABELS[case]} | {s['wall_s']:.2f} s | {s['work_s']:.2f} s "
                    f"| {fmt_mib(s['peak_rss_mib'])} | {fmt_mib(s['rss_before_work_mib'])} |")
    r, t, i = summary["ratios"], summary["targets"], summary["inputs"]
    lines = ["\n".join(rows), "",
             f"(a) mergekit / ours: {r['a_mergekit_over_ours_wall']:.2f}x wall, "
             f"{r['a_mergekit_over_ours_work']:.2f}x work (target >= 3x: "
             f"{'met' if t['a_at_least_3x_faster_than_mergekit'] else 'not met'}); ours / copy: "
             f"{r['a_ours_over_copy_wall']:.2f}x wall, {r['a_ours_over_copy_work']:.2f}x work "
             f"(target <= 1.5x: {'met' if t['a_at_most_1.5x_the_copy'] else 'not met'}); ours / the "
             f"bytes (a) must move: {r['a_ours_over_its_io_floor_wall']:.2f}x wall (those bytes / "
             f"copy: {r['a_its_io_floor_over_copy_wall']:.2f}x); peak RSS "
             f"{fmt_mib(summary['cases']['ours_a']['peak_rss_mib'])} vs bound "
             f"{fmt_mib(i['rss_bound_mib'])} = largest shard {fmt_mib(i['largest_shard_mib'])} + "
             f"adapters {fmt_mib(i['adapters_mib'])} + 1 GiB "
             f"({'met' if t['a_peak_rss_within_largest_shard_plus_adapters_plus_1GiB'] else 'not met'})",
             f"(b) mergekit / ours: {r['b_mergekit_over_ours_wall']:.2f}x wall, "
             f"{r['b_mergekit_over_ours_work']:.2f}x work (target >= 1x: "
             f"{'met' if t['b_no_slower_than_mergekit'] else 'not met'})"]
    for key, value in agreement.items():
        if value.get("same_tensors"):
            lines.append(f"{key}: max abs diff {value['max_abs_diff']:.3g} (at {value['max_at']}), "
                         f"{100 * value['fraction_differing']:.4f}% of entries differ")
        else:
            lines.append(f"{key}: outputs hold different tensors: {value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.only == "generate":
        print(json.dumps({"inputs": str(ensure_inputs(args))}), flush=True)
        return
    if args.only:
        print(json.dumps(run_case(args)), flush=True)
        return
    # The parent stays free of torch while the cases run: a child's ru_maxrss starts from the
    # resident size of the process it was spawned from.
    args.workdir.mkdir(parents=True, exist_ok=True)
    generated = _run(args, "generate", None, None)
    inputs = Path(generated["inputs"])
    scratch = args.workdir / "outputs"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    command = "python " + shlex.join([os.path.relpath(Path(__file__).resolve(), ROOT)] + sys.argv[1:])
    runs: dict[str, list[dict]] = {case: [] for case in CASES}
    first: dict[str, Path] = {}
    started = time.time()
    for repeat in range(args.repeats):
        for case in CASES:
            output = scratch / f"{case}-{repeat}"
            r = run_child(args, case, inputs, output)
            runs[case].append(r)
            print(f"repeat {repeat + 1}/{args.repeats} {LABELS[case]:45s} wall {r['wall_s']:7.2f} s  "
                  f"work {r['work_s']:7.2f} s  peak RSS {fmt_mib(r['peak_rss_mib']):>9s}  "
                  f"other cores busy {r['cpu_contention'].get('other_cores')}", flush=True)
            if repeat == 0:
                first[case] = output
            elif not args.keep_outputs:
                shutil.rmtree(output, ignore_errors=True)
    agreement = {"(a) ours vs mergekit": compare(first["ours_a"], first["mergekit_a"]),
                 "(b) ours vs mergekit": compare(first["ours_b"], first["mergekit_b"])}
    by_hand = reference_check(inputs, args, first["ours_a"], first["mergekit_a"])
    if not args.keep_outputs:
        for folder in first.values():
            shutil.rmtree(folder, ignore_errors=True)
    summary = summarize(runs, inputs)
    import importlib.metadata as md

    machine = machine_info("cpu")
    machine["mergekit"] = md.version("mergekit")
    machine["safetensors"] = md.version("safetensors")
    machine["torch_threads"] = args.threads or "default"
    result = {"benchmark": "merge_speed", "command": command, "argv": sys.argv,
              "machine": machine, "settings": {
                  "size_mb": args.size_mb, "dims": llama_dims(args.size_mb),
                  "shard_bytes": shard_bytes(args), "k": args.k, "rank": args.rank,
                  "lora_weights": lora_weights(args.k), "alpha": args.alpha, "seed": args.seed,
                  "repeats": args.repeats, "threads": args.threads, "inputs": str(inputs)},
              "summary": summary, "agreement": agreement,
              "a_against_float64_by_hand": by_hand, "runs": runs,
              "elapsed_s": round(time.time() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(summary, agreement))
    for label, diffs in by_hand.items():
        print(f"(a) {label} vs float64 by hand, rounded to float16: max abs diff "
              + ", ".join(f"{d:.3g} ({n})" for n, d in diffs.items()))
    print(f"\nwrote {os.path.relpath(args.out, ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
