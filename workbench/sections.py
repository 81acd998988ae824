"""The recipe sections every stage and method shares: the foundation of the recipe schema.

`Strict` (unknown keys refused), the model, data, training, regularizer, evaluation and world
sections, and the two kinds of recipe string that name files: `ModelRef` (a model or adapter) and
`DataRef` (a data source), checked by the resolver in force whenever a recipe is validated
(`workbench.resolver`). Each method keeps its own section beside its code (`adapters/lora.py`:
`LoraSpec`, ...); `workbench.recipes` assembles the stage recipes from these and the registry.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from . import resolver
from .yamlio import dump_yaml


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


def recipe_to_yaml(recipe: BaseModel) -> str:
    """The recipe as YAML with every value spelled out, so re-running it reproduces the run."""
    return dump_yaml(recipe.model_dump(mode="json"))
