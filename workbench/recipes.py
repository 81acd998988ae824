"""Recipes: the pydantic schema behind YAML files, the CLI and the UI.

One model per stage kind (`pretrain`, `train`, `eval`, `merge`) plus `pipeline`, which chains stages by
name. Unknown keys are errors; every error names the file, the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter,
                      ValidationError, field_validator, model_validator)

from . import resolver
from .yamlio import YamlRefused, dump_yaml, load_yaml, read_yaml_file


class RecipeError(ValueError):
    """A recipe that cannot be read or does not validate; the message names file, key and value."""


def _model_reference(value: str) -> str:
    if value.strip():  # an empty value names nothing: the stage says what is missing
        resolver.current().check_model(value, "model")
    return value


def _data_reference(value: str) -> str:
    if value.strip():
        resolver.current().check_data(value, "data")
    return value


# Recipe strings that name a model / adapter or a data source: checked by the resolver in force
# (`workbench.resolver`) whenever a recipe is validated, and resolved by it again when used.
ModelRef = Annotated[str, AfterValidator(_model_reference)]
DataRef = Annotated[str, AfterValidator(_data_reference)]


class Strict(BaseModel):
    """Base of every recipe section: unknown keys are refused, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------------
# Sections


class ModelSpec(Strict):
    """Which model to load and how.

    `path` is one of: `default` (the embedded base, built on first use), a local Hugging Face
    folder, a hub id such as `org/name` (only when the hub is reachable), `run:<run-id>` (the model
    or adapter a run produced), `stage:<name>` (inside a pipeline) or `config:<name>` (a randomly
    initialised model from the built-in configs in `workbench.models.BUILTIN_CONFIGS`).
    """

    path: ModelRef = "default"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    load_in: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the base quantized with bitsandbytes (QLoRA); needs a CUDA GPU."
    )
    trust_remote_code: bool = False
    allow_pickle: bool = Field(
        False, description="Allow .bin/.pt checkpoints (loaded with weights_only=True)."
    )

    @model_validator(mode="after")
    def _allowed_here(self) -> "ModelSpec":
        """Remote code and pickles as far as the resolver in force lets recipes turn them on."""
        resolver.current().check_remote_code(self.trust_remote_code)
        resolver.current().check_pickle(self.allow_pickle)
        return self


class DataSpec(Strict):
    """Training data. Sources are `world:<split>` (the embedded world) or a .txt / .jsonl file.

    A .txt file holds one document per line; a .jsonl file holds {"text": ...} records for
    `format: text` and {"prompt"|"question": ..., "answer": ...} records for `format: instruct`.
    """

    train: DataRef = "world:domain_train"
    replay: DataRef = "world:general_train"
    replay_ratio: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of each batch drawn from `replay` (general data)."
    )
    format: Literal["text", "instruct", "labelled"] = Field(
        "text", description="labelled: {text, label} examples (or world:topic_train) train a "
        "sequence-classification head; replay is not used.")
    seq_len: int = Field(128, ge=8, le=131072)
    world_seed: int = 0
    world_size: Literal["tiny", "default"] = "default"


class LoraSpec(Strict):
    """LoRA through PEFT: ΔW = (α/r)·B·A (or α/√r with rsLoRA)."""

    method: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, le=4096)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    use_rslora: bool = False


class FullSpec(Strict):
    """Full fine-tuning: every parameter trains."""

    method: Literal["full"] = "full"


class RoadSpec(Strict):
    """RoAd through PEFT (Liao & Monz 2024): each adapted layer's output is rotated in 2-D pairs.

    z = R·(W x + b), R block-diagonal with blocks α·[[cos θ, −sin θ], [sin θ, cos θ]] (road_1; road_2
    and road_4 untie the entries). `group_size` must divide every adapted layer's output width;
    `auto` takes the largest of 64, 32, ..., 2 that does.
    """

    method: Literal["road"] = "road"
    variant: Literal["road_1", "road_2", "road_4"] = "road_1"
    group_size: Union[Literal["auto"], Annotated[int, Field(ge=2, le=65536)]] = "auto"
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"

    @model_validator(mode="after")
    def _even_group(self) -> "RoadSpec":
        if self.group_size != "auto" and self.group_size % 2:
            raise ValueError(f"adapter.group_size must be even (got {self.group_size})")
        return self


class PromptInit(Strict):
    """One earlier task prompt vector (`run:<id>` of a prompt-tuning run, or its folder) and its λ."""

    path: ModelRef
    weight: float = 1.0


class PromptSpec(Strict):
    """Soft prompt tuning through PEFT, kept as a task prompt vector τ = P_tuned − P_init.

    The initial prompt P_init is drawn from `init_seed` (random rows of the embedding table's
    scale) and stored beside the tuned one. With `init_from`, the run starts at
    P_init + Σ λ_t τ_t of earlier runs that share this P_init (Belanec et al. 2024).
    """

    method: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(16, ge=1, le=1024)
    init_seed: int = 0
    init_from: list[PromptInit] = Field(default_factory=list)
    lambda_grid: list[float] = Field(
        default_factory=list,
        description="Search each init_from weight over these values (replaces the given weights).")
    lambda_validation: DataRef | None = Field(
        None, description="Text source scored by the λ search; the training data when unset.")
    lambda_rows: int = Field(16, ge=1, description="Validation rows scored per λ combination.")


class MixdaSpec(Strict):
    """MixDA domain adapters (Diao et al. 2023) beside the FFN output projection, mixed by a gate.

    Stage 1 (unlabelled domain text, backbone frozen): trains one bottleneck adapter K and the
    gate with L = λ·L_K + L_S (L_S keeps the mixed FFN output close to the original on the replay
    data, which must be general text). Stage 2: the `domain_adapters` (stage-1 runs) are frozen;
    a new gate over [K_1..K_n, F] and a LoRA task adapter train on labelled or instruction data.
    """

    method: Literal["mixda"] = "mixda"
    stage: Literal[1, 2] = 1
    layers: list[int] | None = Field(None, description="Layer indices to adapt; all when unset.")
    bottleneck: int = Field(64, ge=1, le=65536)
    lambda_k: float = Field(0.5, ge=0.0, description="Weight λ of the domain LM loss in stage 1.")
    domain_adapters: list[ModelRef] = Field(
        default_factory=list, description="Stage 2: `run:<id>` or folders of stage-1 MixDA runs.")
    task_lora: LoraSpec | None = Field(
        default_factory=LoraSpec, description="Stage 2: the task adapter trained with the gate.")

    @model_validator(mode="after")
    def _stage_inputs(self) -> "MixdaSpec":
        if self.stage == 2 and not self.domain_adapters:
            raise ValueError("adapter.domain_adapters: stage 2 needs at least one stage-1 MixDA run")
        if self.stage == 1 and self.domain_adapters:
            raise ValueError("adapter.domain_adapters is for stage 2; stage 1 trains a new adapter")
        return self


def _adapter_method(value: Any) -> str | None:
    """The adapter section's method; LoRA when the section does not say."""
    if isinstance(value, dict):
        return value.get("method", "lora")
    return getattr(value, "method", None)


AdapterSpec = Annotated[
    Union[Annotated[LoraSpec, Tag("lora")], Annotated[FullSpec, Tag("full")],
          Annotated[RoadSpec, Tag("road")], Annotated[PromptSpec, Tag("prompt")],
          Annotated[MixdaSpec, Tag("mixda")]],
    Discriminator(_adapter_method),
]


class RegularizerSpec(Strict):
    """Hierarchical layer-wise and element-wise regularization (Song et al. 2025).

    Phase 1 records the path-integral importance Ω on `data` (general text; for a classification
    run, an earlier labelled task) for `steps` steps, or
    reuses `importance` (an importance.safetensors file or the `run:<id>` that recorded it);
    phase 2 adds φ·Σ_l c_l Σ_i Ω_i (θ_i − θ*_i)² to the training loss.
    """

    phi: float = Field(1.0, ge=0.0, description="Weight φ of the penalty (0 turns it off).")
    importance: DataRef | None = None
    data: DataRef = "world:general_train"
    steps: int = Field(50, ge=1)
    xi: float = Field(1e-3, gt=0.0, description="Damping ξ in Ω = ω / (Δ² + ξ).")


class TrainSpec(Strict):
    """Optimisation knobs of the training loop (continued-pretraining defaults)."""

    lr: float = Field(2e-4, gt=0, le=1.0)
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "cosine",
        description="cosine: re-warm then cosine to min_lr; wsd: warmup-stable-decay; "
        "constant: warmup then constant ('infinite' schedule).",
    )
    warmup_ratio: float = Field(0.01, ge=0.0, le=0.5)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    decay_ratio: float = Field(0.2, gt=0.0, le=1.0, description="wsd: share of steps that decay.")
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(8, ge=1, description="Sequences per optimizer step, all processes.")
    grad_accum: int = Field(1, ge=1)
    max_steps: int | None = Field(200, ge=1)
    epochs: float | None = Field(None, gt=0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    checkpoint_every: int = Field(50, ge=0, description="0 saves only the final state.")
    keep_checkpoints: int = Field(2, ge=1)
    eval_at: list[int] = Field(
        default_factory=list,
        description="Extra steps at which to evaluate (early steps show the stability gap).",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on a GPU that supports it, fp32 otherwise."
    )
    gradient_checkpointing: bool = False
    regularizer: RegularizerSpec | None = Field(
        None, description="Penalise drift of parameters important to general data.")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainSpec":
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be divisible by "
                f"train.grad_accum ({self.grad_accum})"
            )
        return self


class EvalSpec(Strict):
    """Held-out evaluation: perplexity / bits per byte on text, exact match on questions."""

    general_text: DataRef = "world:general_eval"
    domain_text: DataRef = "world:domain_eval"
    questions: list[DataRef] = Field(
        default_factory=lambda: [
            "world:general_qa_eval",
            "world:general_cloze_eval",
            "world:domain_cloze_eval",
        ]
    )
    labelled: DataRef = Field("world:topic_eval",
                          description="Held-out labelled examples (sequence classification runs).")
    max_tokens: int = Field(16384, ge=64, description="Token budget per text set.")
    max_questions: int = Field(100, ge=1)
    max_new_tokens: int = Field(8, ge=1, le=256)
    batch_size: int = Field(16, ge=1)


class WorldSpec(Strict):
    seed: int = 0
    size: Literal["tiny", "default"] = "default"


# ----------------------------------------------------------------------------------------------
# Stage recipes


class PretrainRecipe(Strict):
    """Build a base model on the embedded world: train a tokenizer, pretrain a small Llama."""

    kind: Literal["pretrain"] = "pretrain"
    name: str = "default-base"
    seed: int = 0
    world: WorldSpec = Field(default_factory=WorldSpec)
    vocab_size: int = Field(2048, ge=300, le=65536)
    architecture: str = "llama-base"
    seq_len: int = Field(128, ge=8)
    train: TrainSpec = Field(
        default_factory=lambda: TrainSpec(
            lr=3e-3, schedule="cosine", warmup_ratio=0.02, batch_size=32, max_steps=400,
            checkpoint_every=100, weight_decay=0.01,
        )
    )
    eval: EvalSpec = Field(default_factory=EvalSpec)


class TrainRecipe(Strict):
    """Train an adapter (or the full model) on a model, then evaluate it against its base."""

    kind: Literal["train"] = "train"
    name: str = "train"
    seed: int = 0
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    adapter: AdapterSpec = Field(default_factory=LoraSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec | None = Field(default_factory=EvalSpec)

    @property
    def task(self) -> str:
        """sequence-classification for labelled data, causal-lm otherwise."""
        return "sequence-classification" if self.data.format == "labelled" else "causal-lm"


class EvalRecipe(Strict):
    """Evaluate a model (or base + adapter) and report gain and forgetting against a base."""

    kind: Literal["eval"] = "eval"
    name: str = "eval"
    seed: int = 0
    model: ModelSpec = Field(default_factory=ModelSpec)
    base: ModelSpec | None = Field(
        None, description="What to compare against; by default the model's own base."
    )
    world: WorldSpec = Field(default_factory=WorldSpec)
    seq_len: int = Field(128, ge=8)
    eval: EvalSpec = Field(default_factory=EvalSpec)


class MergeInput(Strict):
    """One input to merge: `run:<id>` of a training run, a PEFT LoRA folder or a model folder."""

    path: ModelRef
    weight: float = 1.0
    role: Literal["domain", "instruct"] | None = Field(
        None, description="method instruction_vector: which input is the domain model (or adapter) "
        "and which the instruction-tuned one.")


class MergeSearch(Strict):
    """Sweep the merge on validation sets and keep the domain-gain vs general-forgetting Pareto front.

    Either `weights` (one row per point, one weight per input) or `parameter` (a number the method
    takes: scale λ, alpha α, density, p) with its `values`. Each point is merged in memory and
    evaluated on `validation` against the base; search.json, search.md and pareto.png go into the
    run folder and the chosen point becomes the run's output. `choose: max_gain` takes the largest
    domain gain among the points with general forgetting ≤ max_forgetting_pct (none within: the
    least forgetting); `knee` takes the knee of the front. `validation` defaults to the held-out
    sets at a smaller budget; point it at your own validation files to keep the final report free
    of the selection.
    """

    weights: list[list[float]] | None = None
    parameter: str | None = None
    values: list[float] = Field(default_factory=list)
    choose: Literal["max_gain", "knee"] = "max_gain"
    max_forgetting_pct: float = Field(5.0, description="The bound of choose: max_gain, in percent.")
    validation: EvalSpec = Field(default_factory=lambda: EvalSpec(max_tokens=4096, max_questions=20))

    @model_validator(mode="after")
    def _one_sweep(self) -> "MergeSearch":
        if (self.weights is None) == (self.parameter is None):
            raise ValueError("search: give either weights (one row per point) or parameter and values")
        if self.parameter is not None and not self.values:
            raise ValueError(f"search.values: no values to try for parameter {self.parameter!r}")
        if self.weights is not None and not self.weights:
            raise ValueError("search.weights: no points to try")
        if self.weights is not None and self.values:
            raise ValueError("search.values goes with search.parameter, not with search.weights")
        numbers = [w for row in self.weights or [] for w in row] + list(self.values)
        if not all(math.isfinite(v) for v in numbers) or not math.isfinite(self.max_forgetting_pct):
            raise ValueError("search: weights, values and max_forgetting_pct must be finite numbers")
        return self


class MergeRecipe(Strict):
    """Merge task vectors into a base: θ = θ_base + merge(τ_1..τ_n; w_1..w_n).

    Inputs are LoRA adapters (τ = s·B·A), RoAd adapters ((R − I)·W as a dense delta, or composed
    rotations when road_1 adapters are merged by task arithmetic), full models (τ = θ_i − θ_base),
    task prompt vectors (with others sharing their P_init) or MixDA folders (with others of the
    same layers). `method` is one of `merge.methods` with its `parameters` (e.g. density for TIES,
    p for DARE). Task arithmetic over LoRA adapters alone stays factored and exact:
    Σ w_i·s_i·B_i·A_i. `output: model` streams the result into a sharded Hugging Face folder;
    `output: adapter` writes one adapter of the inputs' kind (prompt vectors and MixDA only merge
    this way); for LoRA inputs (task arithmetic or instruction_vector) one PEFT adapter of rank
    Σ r_i with exactly the same update, or,
    with `rank` below Σ r_i, the best rank-`rank` approximation of it (truncated SVD; the relative
    error per tensor and overall goes into the summary).

    `method: instruction_vector` (Hirano & Imajo 2024): θ = θ_domain + α(θ_inst − θ_base), with two
    inputs marked `role: domain` and `role: instruct` (full models or LoRA adapters of one base)
    and `parameters: {alpha: α}` (default 1). Its evaluation puts base, instruct, domain and
    merged side by side. `search` sweeps weights or a parameter first (see MergeSearch).

    Inputs trained on a base other than the one merged onto (each other's, or `base:`'s) are
    refused with how far apart the bases are, unless `allow_different_bases: true`.
    """

    kind: Literal["merge"] = "merge"
    name: str = "merge"
    seed: int = 0
    base: ModelSpec | None = Field(
        None, description="Merge onto this model; by default the inputs' own (shared) base.")
    allow_different_bases: bool = Field(
        False, description="Merge inputs trained on bases other than the one merged onto (each "
        "other's, or `base:`'s). Off: such a merge is refused with how far apart the bases are "
        "(‖θ_a − θ_b‖ / ‖θ_b‖); on: it runs and the log and summary record that difference.")
    inputs: list[MergeInput] = Field(min_length=1)
    method: Literal["task_arithmetic", "ties", "dare", "dare_ties", "instruction_vector"] = "task_arithmetic"
    parameters: dict[str, float | str] = Field(default_factory=dict)
    output: Literal["model", "adapter"] = "model"
    rank: int | None = Field(
        None, ge=1, description="output: adapter: truncate the merged update to this rank by SVD.")
    max_shard_mb: int = Field(2048, ge=1)
    world: WorldSpec = Field(default_factory=WorldSpec)
    seq_len: int = Field(128, ge=8)
    eval: EvalSpec | None = None
    search: MergeSearch | None = None

    @model_validator(mode="after")
    def _known_parameters(self) -> "MergeRecipe":
        from merge.instruction_vector import METHOD, ROLES, check_merge_parameters

        check_merge_parameters(self.method, self.parameters)
        roles = [item.role for item in self.inputs]
        if self.method == METHOD:
            if sorted(r for r in roles if r) != sorted(ROLES) or len(roles) != 2:
                raise ValueError("method instruction_vector needs two inputs, one with role: domain "
                                 f"and one with role: instruct (got roles {roles})")
            if any(item.weight != 1.0 for item in self.inputs):
                raise ValueError("method instruction_vector: leave the inputs' weights at 1 and set "
                                 "parameters.alpha, the factor on the instruction vector")
        elif any(roles):
            raise ValueError(f"inputs.role is for method instruction_vector, not {self.method}")
        if self.rank is not None and self.output != "adapter":
            raise ValueError("rank (SVD truncation) needs output: adapter")
        if self.search is not None:
            self._check_search(self.search)
        return self

    def _check_search(self, search: MergeSearch) -> None:
        from merge.instruction_vector import METHOD, check_merge_parameters

        if search.weights is not None:
            if self.method == METHOD:
                raise ValueError("search.weights: instruction_vector has no input weights; "
                                 "search parameter alpha instead")
            for k, row in enumerate(search.weights):
                if len(row) != len(self.inputs):
                    raise ValueError(f"search.weights.{k}: {len(row)} weights for "
                                     f"{len(self.inputs)} inputs")
            return
        defaults = check_merge_parameters(self.method, self.parameters)
        if search.parameter not in defaults or isinstance(defaults[search.parameter], str):
            numeric = [k for k, v in defaults.items() if not isinstance(v, str)]
            raise ValueError(f"search.parameter: {self.method} has no numeric parameter "
                             f"{search.parameter!r}; it has {', '.join(numeric)}")
        for value in search.values:
            check_merge_parameters(self.method, {**self.parameters, search.parameter: value})


class MergekitRecipe(Strict):
    """Run a mergekit merge as a stage: any of mergekit's methods (slerp, della, model_stock, ...).

    `config` is a mergekit YAML, inline or the path of a YAML file (read when the recipe loads, so
    the run keeps its content). It is checked by mergekit's own schema plus the keys and parameter
    names mergekit would silently ignore. Model references in it may be `run:<id>` (a LoRA run
    stands for mergekit's `base+lora`), `stage:<name>` in a pipeline, `default`, a folder (relative
    to the workspace first), a hub id, or `model+lora`. The merged model goes to the run's `model/`
    folder, the config as run (local folders) to `mergekit.yaml`. With `eval`, the result is
    evaluated against `base_model` (else the first model). `seed` seeds mergekit's random methods.
    """

    kind: Literal["mergekit"] = "mergekit"
    name: str = "mergekit"
    seed: int = 0
    config: dict[str, Any]
    world: WorldSpec = Field(default_factory=WorldSpec)
    seq_len: int = Field(128, ge=8)
    eval: EvalSpec | None = None

    @field_validator("config", mode="before")
    @classmethod
    def _read_file(cls, value: Any) -> Any:
        from merge.mergekit_bridge import read_mergekit_config

        return read_mergekit_config(value) if isinstance(value, (str, Path)) else value

    @field_validator("config")
    @classmethod
    def _valid_for_mergekit(cls, value: dict) -> dict:
        """mergekit's schema, then every model reference in it through the resolver in force
        (the same check whether the config came inline or from a file)."""
        from merge.mergekit_bridge import MergekitConfigError, check_mergekit_config, reference_paths

        try:
            check_mergekit_config(value)
        except MergekitConfigError as err:
            raise ValueError(str(err).replace("\n", "; ")) from None
        for where, reference in reference_paths(value):
            resolver.current().check_model(reference, f"config.{where}")
        return value


class WeightQuantSection(Strict):
    """The weight grid (see `quant.rtn`): Ŵ = s·(q − z), q ∈ [0, 2ᵇ − 1], one (s, z) per group."""

    bits: int = Field(4, ge=2, le=8)
    symmetric: bool = Field(
        True, description="z = 2ᵇ⁻¹ (compressed-tensors' W4A16). Asymmetric per-channel or group "
        "grids export in the format compressed-tensors writes, but the installed transformers + "
        "compressed-tensors cannot load those folders back (see quant/export.py).")
    granularity: Literal["tensor", "channel", "group"] = "channel"
    group_size: int = Field(128, ge=1, description="Inputs per group (granularity: group).")
    clipping: Literal["minmax", "search"] = "minmax"


class FlexRoundSection(Strict):
    """Reconstruction settings: a preset (`reference`: the official Llama-2 W4A16 recipe; `fast`:
    CPU), any field set here replacing the preset's value."""

    preset: Literal["reference", "fast"] = "fast"
    iterations: int | None = Field(None, ge=1, description="Adam steps per block.")
    samples: int | None = Field(None, ge=1, description="Calibration rows.")
    seq_len: int | None = Field(None, ge=8, description="Tokens per calibration row.")
    batch_size: int | None = Field(None, ge=1, description="Rows per step.")
    lr: float | None = Field(None, gt=0, le=1.0)


class QuantizeRecipe(Strict):
    """Quantize a model's block linear layers: round-to-nearest and FlexRound, compared with the
    full-precision model (and NF4 through bitsandbytes where it runs) in one report; the chosen
    `method` is exported as a compressed-tensors pack-quantized folder and/or a dequantized one.

    `layers`: `all-linear` (every linear layer inside the decoder blocks / encoder layers) or names
    matched by suffix (`q_proj`, `mlp.down_proj`). Embeddings and the output head stay in full
    precision. `calibration`: any text source (`world:<split>`, .txt, .jsonl).
    """

    kind: Literal["quantize"] = "quantize"
    name: str = "quantize"
    seed: int = 0
    model: ModelSpec = Field(default_factory=ModelSpec)
    method: Literal["flexround", "rtn"] = "flexround"
    weights: WeightQuantSection = Field(default_factory=WeightQuantSection)
    layers: Union[Literal["all-linear"], list[str]] = "all-linear"
    flexround: FlexRoundSection = Field(default_factory=FlexRoundSection)
    calibration: DataRef = "world:general_train"
    world: WorldSpec = Field(default_factory=WorldSpec)
    export: list[Literal["compressed-tensors", "dequantized"]] = Field(
        default_factory=lambda: ["compressed-tensors", "dequantized"])
    max_shard_mb: int = Field(2048, ge=1)
    nf4_baseline: bool = Field(True, description="Add bitsandbytes NF4 (no calibration) to the report.")
    seq_len: int = Field(128, ge=8, description="Evaluation sequence length.")
    eval: EvalSpec | None = Field(default_factory=EvalSpec)

    @model_validator(mode="after")
    def _consistent(self) -> "QuantizeRecipe":
        from quant.flexround import resolve_config
        from quant.rtn import QuantError

        if "compressed-tensors" in self.export and self.weights.bits not in (4, 8):
            raise ValueError(f"export: compressed-tensors packs 4 or 8 bits, not weights.bits="
                             f"{self.weights.bits}; export only `dequantized` for other widths")
        if self.method == "flexround":
            try:
                resolve_config(**self.flexround.model_dump())
            except QuantError as err:
                raise ValueError(str(err)) from None
        return self


StageRecipe = Annotated[Union[PretrainRecipe, TrainRecipe, EvalRecipe, MergeRecipe, MergekitRecipe,
                              QuantizeRecipe],
                        Field(discriminator="kind")]


class PipelineRecipe(Strict):
    """Stages run in order; a stage refers to an earlier one's output as `stage:<name>`."""

    kind: Literal["pipeline"] = "pipeline"
    name: str = "pipeline"
    stages: list[StageRecipe] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "PipelineRecipe":
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(dupes)}")
        return self


Recipe = Annotated[
    Union[PretrainRecipe, TrainRecipe, EvalRecipe, MergeRecipe, MergekitRecipe, QuantizeRecipe,
          PipelineRecipe],
    Field(discriminator="kind"),
]
_RECIPE = TypeAdapter(Recipe)
KINDS = ("pretrain", "train", "eval", "merge", "mergekit", "quantize", "pipeline")


# ----------------------------------------------------------------------------------------------
# Loading, validating, saving


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic model classes inside an annotation (through Optional, list, Union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in getattr(annotation, "__args__", ()) or ():
        found += [m for m in _models_in(arg) if m not in found]
    return found


def _tag_map(models: list[type[BaseModel]]) -> dict[str, type[BaseModel]]:
    """Discriminator value ('kind' or 'method') -> model, for a union of sections."""
    tags = {}
    for model in models:
        for key in ("kind", "method"):
            if key in model.model_fields:
                tags[model.model_fields[key].default] = model
    return tags


def _resolve_loc(loc: tuple) -> tuple[list, type[BaseModel] | None]:
    """Drop union tags from a pydantic error location; return it and the model of its last key."""
    current = _RECIPE_MODELS.get(loc[0]) if loc else None
    pending: dict[str, type[BaseModel]] | None = None
    clean: list = []
    parent = current
    for part in loc[1:]:
        if pending is not None and isinstance(part, str) and part in pending:
            current, pending = pending[part], None
            continue
        clean.append(part)
        if isinstance(part, int):
            continue
        parent = current
        field = current.model_fields.get(part) if current is not None else None
        models = _models_in(field.annotation) if field is not None else []
        current = models[0] if len(models) == 1 else None
        pending = _tag_map(models) if len(models) > 1 else None
    return clean, parent


_RECIPE_MODELS = {
    "pretrain": PretrainRecipe, "train": TrainRecipe, "eval": EvalRecipe, "merge": MergeRecipe,
    "mergekit": MergekitRecipe, "quantize": QuantizeRecipe, "pipeline": PipelineRecipe,
}


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: `source: key.path: message (got value)`, with a typo suggestion."""
    lines = []
    for e in err.errors():
        loc, parent = _resolve_loc(tuple(e["loc"]))
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = list(parent.model_fields) if parent is not None else []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown key '{loc[-1]}'"
            if close:
                msg += f"; did you mean '{close[0]}'?"
            if allowed:
                msg += f" Allowed here: {', '.join(allowed)}"
            lines.append(f"{source}: {key}: {msg}")
            continue
        if e["type"] == "union_tag_invalid" or e["type"] == "union_tag_not_found":
            msg += f" (allowed kinds: {', '.join(KINDS)})" if not loc else ""
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) or e["type"] == "missing" else f" (got {got!r})"
        lines.append(f"{source}: {key}: {msg}{shown}")
    return "\n".join(lines)


def parse_recipe(data: Any, source: str = "recipe"):
    """Validate a recipe given as a dict; raise RecipeError naming key, value and what is allowed."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with a 'kind' key ({', '.join(KINDS)})")
    if "kind" not in data:
        raise RecipeError(f"{source}: missing key 'kind' (one of: {', '.join(KINDS)})")
    if data["kind"] not in KINDS:
        raise RecipeError(f"{source}: kind: unknown kind {data['kind']!r} (one of: {', '.join(KINDS)})")
    try:
        return _RECIPE.validate_python(data)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, source)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None):
    """Read a YAML recipe file, apply `key.path=value` overrides, and validate it."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = read_yaml_file(path)
    except YamlRefused as err:
        raise RecipeError(str(err)) from None
    for item in overrides or []:
        apply_override(data, item, str(path))
    return parse_recipe(data, str(path))


def apply_override(data: dict, item: str, source: str = "--set") -> None:
    """Set `a.b.c=value` in a recipe dict; the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in item:
        raise RecipeError(f"{source}: override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        if isinstance(node, list) and part.isdigit():
            node = node[int(part)]
            continue
        node = node.setdefault(part, {})
    try:
        node[parts[-1]] = load_yaml(raw, f"{source}: {key.strip()}")
    except YamlRefused as err:
        raise RecipeError(str(err)) from None


def recipe_to_yaml(recipe: BaseModel) -> str:
    """The recipe as YAML with every value spelled out, so re-running it reproduces the run."""
    return dump_yaml(recipe.model_dump(mode="json"))
