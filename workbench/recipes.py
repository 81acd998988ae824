"""Recipes: the pydantic schema behind YAML files, the CLI and the UI (orchestration).

One model per stage kind (`pretrain`, `train`, `eval`, `merge`, `mergekit`, `quantize`) plus
`pipeline`, which chains stages by name. The shared sections come from `workbench.sections`; the
`adapter` section of a train recipe is the union of the registered methods' own sections
(`workbench.methods`), rebuilt when a method registers. Unknown keys are errors; every error names
the file, the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, Discriminator, Field, Tag, TypeAdapter, ValidationError,
                      field_validator, model_validator)
from pydantic.fields import FieldInfo

from quant.spec import QuantizeRecipe

from . import methods, resolver
from .sections import (DataSpec, EvalSpec, ModelRef, ModelSpec, RegularizerSpec, Strict, TrainSpec,
                       WorldSpec, recipe_to_yaml)
from .yamlio import YamlRefused, load_yaml, read_yaml_file

__all__ = ["DataSpec", "EvalSpec", "ModelSpec", "QuantizeRecipe", "RegularizerSpec", "TrainSpec",
           "WorldSpec", "recipe_to_yaml"]


class RecipeError(ValueError):
    """A recipe that cannot be read or does not validate; the message names file, key and value."""


def _adapter_method(value: Any) -> str | None:
    """The adapter section's method; LoRA when the section does not say."""
    if isinstance(value, dict):
        return value.get("method", "lora")
    return getattr(value, "method", None)


def adapter_section():
    """The `adapter` section: a union of every registered method's spec, told apart by `method`."""
    specs = [method.spec for method in methods.methods().values()]
    tagged = tuple(Annotated[spec, Tag(spec.model_fields["method"].default)] for spec in specs)
    return Annotated[Union[tagged], Discriminator(_adapter_method)]


def _default_adapter():
    return methods.get_method("lora").spec()


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
    adapter: adapter_section() = Field(default_factory=_default_adapter)
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


def _rebuild_for_methods(_method) -> None:
    """Follow the registry: the train recipe's `adapter` union (and what embeds it) anew."""
    global _RECIPE
    TrainRecipe.__pydantic_fields__["adapter"] = FieldInfo.from_annotated_attribute(
        adapter_section(), Field(default_factory=_default_adapter))
    TrainRecipe.model_rebuild(force=True)
    PipelineRecipe.model_rebuild(force=True)
    _RECIPE = TypeAdapter(Recipe)


methods.on_register(_rebuild_for_methods)
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
