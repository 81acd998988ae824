"""Merging inputs of every kind: dense task vectors read tensor by tensor, and `merge_folders`.

A dense task vector reader maps a base tensor's name to the input's float32 delta for it (None
where the input does not touch it), reading the safetensors files one tensor at a time; readers
marked `by_rows` also take (name, (start, stop)) for a block of rows, which the streaming writer
uses wherever the merge acts element by element (`merge.streaming._merged_blocks`):

- `FullModelDelta`: τ[name] = θ_input[name] − θ_base[name].
- `LoraDelta`: τ[name] = s·B·A for the weights a LoRA adapter adapts.
- `RoadDelta`: τ[W] = (R − I)·W and τ[b] = (R − I)·b for the layers a RoAd adapter rotates (Liao &
  Monz 2024: the adapted layer computes R·(W x + b)), with W and b read from the base.

`merged_deltas` combines the inputs' τ of one tensor with a method from `merge.methods`; an input
that does not touch a tensor counts as zeros there. `merge_folders` is the one entry point of the
merge stage: it runs the pre-flight checks (`merge.preflight`) and then the merge the inputs make:

- LoRA adapters only, task arithmetic: exact and factored, θ_base + λ Σ wᵢ sᵢ BᵢAᵢ, written as a
  model (`merge.streaming.merge_lora_into_base`) or as one adapter of rank Σ rᵢ.
- road_1 RoAd adapters only, task arithmetic: the rotations composed in their own parameters,
  θ = λ Σ wᵢ θᵢ and α = Π αᵢ^(λ wᵢ) per 2-D block (with λ = wᵢ = 1: angles add and scales multiply,
  exactly the adapters applied one after the other; other weights scale each rotation
  geometrically, α·R(θ) → α^w·R(w θ)). A layer some adapter does not rotate counts as the
  identity for it. Written as one RoAd adapter, or as a model with W ← R W, b ← R b.
- Task prompt vectors only (one shared P_init): P = P_init + merge(τ₁..τₙ), a PEFT prompt-tuning
  adapter (Belanec et al. 2024).
- MixDA folders only (same layers and adapters): their module weights merged tensor by tensor, a
  MixDA folder.
- Anything else (mixed kinds, TIES, DARE, road_2/road_4): every input as its dense delta,
  θ = θ_base + merge(τ₁..τₙ) per tensor, streamed into a model folder. With task arithmetic, LoRA
  inputs still stay factored (their s·B·A is added in the writer), which is the same sum.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path

import torch

from adapters.road import RoadDelta
from workbench.io import FLOAT_DTYPES, ShardReader, all_finite, model_layout

from .methods import check_parameters, merge_tensors
from .streaming import DeltaReader, lora_concat_adapter, merge_lora_into_base, row_blocks


class VectorDelta:
    """A task vector in its own space (task prompt vector, MixDA module weights) as a reader over
    its own tensor names, `names`; used to compare such inputs (`pairwise_cosines`)."""

    def __init__(self, vector):
        self.vector, self.names = vector, vector.names()

    def __call__(self, name: str) -> torch.Tensor | None:
        return self.vector.tensor(name).clone() if name in self.names else None


def delta_readers(folders: list[Path], layout: dict, stack: ExitStack) -> list[DeltaReader]:
    """One task-vector reader per input folder, by its kind: dense deltas over the base's tensors
    for models, LoRA and RoAd; the vector itself for task prompt vectors and MixDA folders."""
    from workbench.methods import get_method

    from .preflight import input_kind

    readers: list[DeltaReader] = []
    for folder in map(Path, folders):
        method = get_method(input_kind(folder))  # the method that saved the folder gives its reader
        reader = method.delta_reader(folder, layout, stack)
        readers.append(reader if reader is not None else VectorDelta(method.task_vector(folder)))
    return readers


def merged_deltas(readers: list[DeltaReader], weights: list[float], method: str, seed: int,
                  params: dict) -> DeltaReader:
    """name → the merged delta of all inputs for that tensor (None where no input touches it).

    Task arithmetic reads one input at a time and accumulates λ·Σ (wᵢ·τᵢ) in place in float32
    (the products and sums `merge.methods` defines, in input order, without stacking copies: the
    peak is two full-size tensors whatever the number of inputs). Other methods stack the inputs'
    deltas for `merge.methods.merge_tensors`. Readers hand over a new tensor per call
    (`FullModelDelta`, `LoraDelta`, `RoadDelta`, `VectorDelta` do), which may be overwritten.
    """
    values = check_parameters(method, params)
    if len(weights) != len(readers):
        raise ValueError(f"{len(readers)} inputs but {len(weights)} weights")
    for i, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"weight {i} must be a finite number, got {weight!r}")

    def summed(name: str, rows: tuple[int, int] | None) -> torch.Tensor | None:
        total = None
        for i, (read, weight) in enumerate(zip(readers, weights)):
            part = read(name) if rows is None else read(name, rows)
            if part is None:
                continue
            term = part if part.dtype == torch.float32 else part.float()
            if weight != 1:  # x·1 = x exactly: a pass over the tensor saved
                term.mul_(weight)
            if total is not None and term.shape != total.shape:
                raise ValueError(f"tensor {name!r}: task vector {i} has shape {tuple(term.shape)}, "
                                 f"another {tuple(total.shape)}")
            total = term if total is None else total.add_(term)
        if total is not None and values["scale"] != 1:
            total.mul_(values["scale"])
        return total

    def delta(name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        if method == "task_arithmetic":
            return summed(name, rows)
        parts = [read(name) for read in readers]
        present = [p for p in parts if p is not None]
        if not present:
            return None
        parts = [p if p is not None else torch.zeros_like(present[0]) for p in parts]
        return merge_tensors(method, parts, weights, name, seed, **params)

    delta.fresh = True  # every call returns a new tensor the writer may add into
    # task arithmetic acts element by element, so it can run on blocks of rows when every reader can
    delta.by_rows = method == "task_arithmetic" and all(getattr(r, "by_rows", False) for r in readers)
    return delta


def pairwise_cosines(readers: list[DeltaReader], names: list[str]) -> list[list[float]]:
    """cos(τ_i, τ_j) over whole task vectors, accumulated tensor by tensor in float64.

    An input that does not touch a tensor counts as zeros there; a zero vector has cosine 0.
    Readers with their own tensor names (`VectorDelta.names`) add those names.
    """
    names = list(names)
    seen = set(names)
    for read in readers:
        for name in getattr(read, "names", ()):
            if name not in seen:
                names.append(name)
                seen.add(name)
    n = len(readers)
    dots = torch.zeros(n, n, dtype=torch.float64)
    for name in names:
        parts = [read(name) for read in readers]
        present = [p for p in parts if p is not None]
        if not present:
            continue
        flat = torch.stack([(p if p is not None else torch.zeros_like(present[0])).flatten()
                            for p in parts]).double()
        dots += flat @ flat.T
    norms = dots.diagonal().sqrt()
    denominator = torch.outer(norms, norms)
    cosines = torch.where(denominator > 0, dots / denominator.clamp_min(1e-300), torch.zeros_like(dots))
    return cosines.tolist()


def relative_difference(folder: Path, reference: Path) -> float:
    """‖θ − θ_ref‖ / ‖θ_ref‖ between two models (how far apart two bases are), over the
    floating-point tensors both hold with one shape, streamed from their safetensors files in
    blocks of rows (`ShardReader`) and accumulated in float32; 0 when θ_ref is zero. Models
    without such a tensor in common are refused (ValueError)."""
    layout, reference_layout = model_layout(Path(folder)), model_layout(Path(reference))
    shared = [name for name, (_, dtype, shape, _) in reference_layout.items()
              if dtype in FLOAT_DTYPES and name in layout and layout[name][1] in FLOAT_DTYPES
              and layout[name][2] == shape]
    if not shared:
        raise ValueError(f"{folder} and {reference} share no floating-point tensor of one shape: "
                         "they are not models of one architecture")
    read, read_reference = ShardReader(layout), ShardReader(reference_layout)
    squared_difference = torch.zeros((), dtype=torch.float32)
    squared_reference = torch.zeros((), dtype=torch.float32)
    try:
        for name in shared:
            for rows in row_blocks(reference_layout[name][2]):
                theirs = read_reference(name, rows).to(torch.float32)
                squared_difference += (read(name, rows).to(torch.float32) - theirs).square().sum()
                squared_reference += theirs.square().sum()
    finally:
        read.close()
        read_reference.close()
    if squared_reference <= 0:
        return 0.0
    return float((squared_difference / squared_reference).sqrt())


# ----------------------------------------------------------------------------------------------
# The merge of each kind


def compose_road(vectors: list, coefficients: list[float], layout: dict):
    """Σ cᵢ·vᵢ of road_1 RoAd vectors (angles λwᵢθᵢ added, scales αᵢ^(λwᵢ) multiplied); a layer a
    vector lacks is the identity (θ = 0, α = 1) for it. Returns a `RoadTaskVector`."""
    from adapters.road import RoadTaskVector, weight_name

    from .task_vectors import weighted_sum

    layers = sorted(set().union(*(v.theta for v in vectors)))
    padded = []
    for vector in vectors:
        theta, alpha = dict(vector.theta), dict(vector.alpha)
        for layer in layers:
            if layer not in theta:
                size = layout[weight_name(layer) + ".weight"][2][0] // 2
                theta[layer], alpha[layer] = torch.zeros(size), torch.ones(size)
        padded.append(RoadTaskVector(vector.variant, vector.group_size, theta, alpha,
                                     dict(vector.config)))
    total = weighted_sum(padded, coefficients)
    total.config["target_modules"] = [weight_name(layer) for layer in layers]
    return total


def merge_folders(base_folder: Path, inputs: list[tuple[Path, float]], out_folder: Path, *,
                  method: str = "task_arithmetic", parameters: dict | None = None, seed: int = 0,
                  output: str = "model", max_shard_bytes: int = 2**31,
                  trained_on: list | None = None, base_ref: str | None = None) -> Path:
    """Merge `inputs` ((folder, weight) pairs of any kind) onto `base_folder` into `out_folder`.

    `output` is "model" (a sharded model folder) or "adapter" (one adapter of the inputs' kind).
    `trained_on` gives, per input, the model folder it was trained on when known (checked against
    the base's architecture); `base_ref` is recorded as an output adapter's base (default: the
    base folder). Every check runs before any weight is read; the write is atomic, and an
    existing `out_folder` is refused (FileExistsError).
    """
    from .preflight import check_merge_inputs

    base_folder, out_folder = Path(base_folder), Path(out_folder)
    if out_folder.exists():
        raise FileExistsError(f"{out_folder}: output folder already exists")
    if not inputs:
        raise ValueError("no inputs to merge")
    parameters = dict(parameters or {})
    values = check_parameters(method, parameters)
    folders = [Path(f) for f, _ in inputs]
    weights = [float(w) for _, w in inputs]
    kinds, plan = check_merge_inputs(base_folder, folders, trained_on or [], method, output)
    if output == "adapter" and plan not in ("lora", "road", "prompt", "mixda"):
        raise ValueError(f"output: adapter needs method: task_arithmetic over LoRA adapters only "
                         f"(got {method}); other merges are written as a model")
    base_ref = base_ref or str(base_folder)
    layout = model_layout(base_folder)

    if plan == "lora":
        pairs = [(f, w * values["scale"]) for f, w in zip(folders, weights)]
        if output == "adapter":
            return lora_concat_adapter(pairs, out_folder, base_model=base_ref)
        return merge_lora_into_base(base_folder, pairs, out_folder, max_shard_bytes=max_shard_bytes)
    if plan == "road":
        from adapters.road import RoadTaskVector

        vectors = [RoadTaskVector.from_peft_folder(f) for f in folders]
        for folder, vector in zip(folders, vectors):
            for part, tensors in (("road_theta", vector.theta), ("road_alpha", vector.alpha)):
                for layer, t in tensors.items():
                    if not all_finite(t):
                        raise ValueError(f"tensor {layer}.{part}: NaN or inf in "
                                         f"{folder / 'adapter_model.safetensors'}")
        composed = compose_road(vectors, [w * values["scale"] for w in weights], layout)
        if output == "adapter":
            composed.save(out_folder, base_ref=base_ref)
            return out_folder
        with ExitStack() as stack:
            return merge_lora_into_base(base_folder, [], out_folder, max_shard_bytes=max_shard_bytes,
                                        extra_deltas=RoadDelta(composed, layout, stack))
    if plan == "prompt":
        return _merge_prompts(folders, weights, out_folder, method, seed, parameters, base_ref)
    if plan == "mixda":
        return _merge_mixda(folders, weights, out_folder, method, seed, parameters)

    with ExitStack() as stack:
        if method == "task_arithmetic":  # LoRA inputs stay factored; the rest as dense deltas
            lora = [(f, w * values["scale"]) for f, w, k in zip(folders, weights, kinds) if k == "lora"]
            rest = [(f, w) for f, w, k in zip(folders, weights, kinds) if k != "lora"]
            readers = delta_readers([f for f, _ in rest], layout, stack)
            deltas = merged_deltas(readers, [w for _, w in rest], method, seed, parameters)
            return merge_lora_into_base(base_folder, lora, out_folder, max_shard_bytes=max_shard_bytes,
                                        extra_deltas=deltas)
        readers = delta_readers(folders, layout, stack)
        deltas = merged_deltas(readers, weights, method, seed, parameters)
        return merge_lora_into_base(base_folder, [], out_folder, max_shard_bytes=max_shard_bytes,
                                    extra_deltas=deltas)


def _merge_prompts(folders: list[Path], weights: list[float], out_folder: Path, method: str,
                   seed: int, parameters: dict, base_ref: str) -> Path:
    """P = P_init + merge(τ₁..τₙ) as a PEFT prompt-tuning folder (with its P_init)."""
    from adapters.prompt import PROMPT_KEY, TaskPromptVector

    vectors = [TaskPromptVector.from_folder(f) for f in folders]
    for vector in vectors[1:]:
        vectors[0].check_compatible(vector)
    for folder, vector in zip(folders, vectors):
        if not all_finite(vector.tau) or not all_finite(vector.init):
            raise ValueError(f"tensor {PROMPT_KEY}: NaN or inf in {folder}")
    tau = merge_tensors(method, [v.tau for v in vectors], weights, PROMPT_KEY, seed, **parameters)
    merged = TaskPromptVector(tau, vectors[0].init, dict(vectors[0].meta))
    return merged.save(out_folder, template=folders[0], base_ref=base_ref)


def _merge_mixda(folders: list[Path], weights: list[float], out_folder: Path, method: str,
                 seed: int, parameters: dict) -> Path:
    """Module weights merge(T₁..Tₙ) per tensor (their base is no module), as a MixDA folder."""
    from adapters.mixda import MixdaTaskVector

    vectors = [MixdaTaskVector.from_folder(f) for f in folders]
    for vector in vectors[1:]:
        vectors[0]._check(vector)
    merged = {}
    for name in vectors[0].names():
        parts = [v.tensors[name] for v in vectors]
        for folder, part in zip(folders, parts):
            if not all_finite(part):
                raise ValueError(f"tensor {name}: NaN or inf in {folder / 'mixda.safetensors'}")
        merged[name] = merge_tensors(method, parts, weights, name, seed, **parameters)
    return MixdaTaskVector(merged).save(out_folder, template=folders[0],
                                        merged_from=[str(f) for f in folders])
