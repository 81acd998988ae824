"""Task prompt vectors (Belanec et al. 2024, "Task Prompt Vectors: Effective Initialization through
Multi-Task Soft-Prompt Transfer") on PEFT's soft prompt tuning (Lester et al. 2021).

A soft prompt P (num_virtual_tokens × hidden) is prepended to every input's embeddings; only P
trains. The task prompt vector is τ = P_tuned − P_init. Vectors are added only when they share one
P_init:   P = P_init + Σ_t λ_t τ_t.

P_init is drawn from `init_seed`: rows of the model's own embedding table at token ids drawn from a
seeded generator (the "sampled vocabulary" init of Lester et al.), so it has the embeddings' scale
and two runs with the same seed on the same model share it exactly. PEFT does not keep the initial
prompt, so it is saved beside PEFT's folder in `prompt_init.safetensors`, with the seed and a
fingerprint of the model's embedding table; arithmetic between vectors whose P_init differ (other
seed, other model, other length) is refused.

A new run can start from P_init + Σ λ_t τ_t of earlier runs (`init_from`), with each λ_t searched
over `lambda_grid` on a validation set (the combination with the lowest next-token loss wins).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import ClassVar, Literal
from pathlib import Path

import torch
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from workbench.io import read_json_object, tensor_header
from workbench.methods import ModelState
from workbench.models import embedding_fingerprint
from workbench.sections import DataRef, ModelRef, Strict

from .lora import PEFT_TASK_TYPES, PeftSaved, save_peft_folder

INIT_FILE = "prompt_init.safetensors"
PROMPT_KEY = "prompt_embeddings"  # PEFT's key for the soft prompt
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model", "added_tokens.json")
MAX_SEARCH = 64  # combinations tried by the λ search at most


@dataclass
class PromptState:
    """What a prompt-tuning run keeps beside its model: P_init (saved beside PEFT's folder), its
    metadata, and the earlier runs' vectors it started from (for the λ search)."""

    init: torch.Tensor
    meta: dict[str, str]
    vectors: list


PROMPT_STATE = ModelState("task prompt (P_init)")


def initial_prompt_of(model: torch.nn.Module) -> torch.Tensor:
    """P_init of a model the prompt method attached itself to."""
    return PROMPT_STATE.get(model).init


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


class PromptVectorError(ValueError):
    """Prompt vectors that cannot be combined or loaded; the message says why."""


def initial_prompt(model, num_virtual_tokens: int, seed: int) -> torch.Tensor:
    """P_init: embedding rows at `num_virtual_tokens` token ids drawn from `seed` (float32)."""
    table = model.get_input_embeddings().weight.detach()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, table.shape[0], (num_virtual_tokens,), generator=generator)
    return table[ids.to(table.device)].float().cpu().clone()


@dataclass
class TaskPromptVector:
    """τ = P_tuned − P_init with the P_init it belongs to (and where it came from).

    As a task vector (kind "prompt", see `merge.task_vectors`) it holds one tensor,
    `prompt_embeddings` = τ.
    """

    tau: torch.Tensor
    init: torch.Tensor
    meta: dict
    kind: ClassVar[str] = "prompt"

    @classmethod
    def from_folder(cls, folder: Path) -> "TaskPromptVector":
        folder = Path(folder)
        if not (folder / INIT_FILE).is_file():
            raise PromptVectorError(f"{folder}: no {INIT_FILE}; not a task prompt vector run "
                                    "(a PEFT prompt-tuning folder alone does not keep its initial prompt)")
        tuned = load_file(folder / "adapter_model.safetensors")["prompt_embeddings"].float()
        with safe_open(folder / INIT_FILE, "pt") as f:
            init, meta = f.get_tensor("prompt_init").float(), dict(f.metadata())
        meta["source"] = str(folder)
        if tuned.shape != init.shape:
            raise PromptVectorError(f"{folder}: tuned prompt {tuple(tuned.shape)} and initial "
                                    f"prompt {tuple(init.shape)} differ in shape")
        return cls(tuned - init, init, meta)

    def check_compatible(self, other: "TaskPromptVector") -> None:
        """Refuse arithmetic between vectors of different initial prompts, naming the difference."""
        a, b = self.meta, other.meta
        where = f"{a.get('source', 'vector')} and {b.get('source', 'vector')}"
        if a.get("model") != b.get("model"):
            raise PromptVectorError(f"task prompt vectors from different models ({where}: embedding "
                                    f"fingerprints {a.get('model')} vs {b.get('model')})")
        if self.init.shape != other.init.shape:
            raise PromptVectorError(f"task prompt vectors of different lengths ({where}: "
                                    f"{self.init.shape[0]} vs {other.init.shape[0]} virtual tokens)")
        if not torch.equal(self.init, other.init):
            raise PromptVectorError(f"task prompt vectors from different initial prompts ({where}: "
                                    f"init_seed {a.get('init_seed')} vs {b.get('init_seed')}); "
                                    "arithmetic is only defined for one shared P_init")

    def __add__(self, other: "TaskPromptVector") -> "TaskPromptVector":
        if not isinstance(other, TaskPromptVector):
            raise PromptVectorError(f"a task prompt vector cannot be combined with "
                                    f"{type(other).__name__}; only with task prompt vectors of its P_init")
        self.check_compatible(other)
        return TaskPromptVector(self.tau + other.tau, self.init, dict(self.meta))

    def __mul__(self, weight: float) -> "TaskPromptVector":
        return TaskPromptVector(self.tau * weight, self.init, dict(self.meta))

    __rmul__ = __mul__

    def __neg__(self) -> "TaskPromptVector":
        return self * -1.0

    def __sub__(self, other: "TaskPromptVector") -> "TaskPromptVector":
        return self + (-other)

    def prompt(self) -> torch.Tensor:
        """P_init + τ: the prompt this vector stands for."""
        return self.init + self.tau

    def names(self) -> list[str]:
        return [PROMPT_KEY]

    def tensor(self, name: str) -> torch.Tensor:
        if name != PROMPT_KEY:
            raise KeyError(name)
        return self.tau

    def save(self, folder: Path, template: Path, base_ref: str | None = None) -> Path:
        """Write P_init + τ as a PEFT prompt-tuning folder, atomically: `template`'s
        adapter_config.json (its `base_model_name_or_path` set to `base_ref` when given), the prompt
        in `template`'s dtype, P_init with its metadata in prompt_init.safetensors (so the result is
        a task prompt vector again), and `template`'s tokenizer files."""
        import shutil

        from workbench.io import atomic_folder

        template = Path(template)
        config = json.loads((template / "adapter_config.json").read_text())
        if base_ref is not None:
            config["base_model_name_or_path"] = base_ref
        with safe_open(template / "adapter_model.safetensors", "pt") as f:
            dtype = f.get_slice(PROMPT_KEY).get_dtype()
        dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        torch_dtype = dtypes.get(dtype, torch.float32)
        meta = {k: v for k, v in self.meta.items() if k != "source"}
        with atomic_folder(Path(folder)) as tmp:
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
            save_file({PROMPT_KEY: self.prompt().to(torch_dtype).contiguous()},
                      tmp / "adapter_model.safetensors", metadata={"format": "pt"})
            save_file({"prompt_init": self.init.contiguous()}, tmp / INIT_FILE, metadata=meta)
            for name in TOKENIZER_FILES:
                if (template / name).is_file():
                    shutil.copy2(template / name, tmp / name)
        return Path(folder)


def combine(vectors: list[TaskPromptVector], weights: list[float]) -> TaskPromptVector:
    """Σ λ_t τ_t (all vectors must share one P_init)."""
    if not vectors or len(vectors) != len(weights):
        raise PromptVectorError("combine needs one weight per vector and at least one vector")
    total = vectors[0] * weights[0]
    for vector, weight in zip(vectors[1:], weights[1:]):
        total = total + vector * weight
    return total


def set_prompt(model, prompt: torch.Tensor) -> None:
    """Overwrite the PEFT model's soft prompt."""
    weight = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.copy_(prompt.to(weight.device, weight.dtype))


@torch.no_grad()
def validation_loss(model, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean next-token loss of the prompted model on validation rows."""
    from workbench.engine import next_token_nll_sum

    device = next(model.parameters()).device
    nll = next_token_nll_sum(model(input_ids=inputs.to(device)).logits, labels.to(device))
    return float(nll) / max(1, int((labels[:, 1:] != -100).sum()))


def search_lambdas(model, init: torch.Tensor, vectors: list[TaskPromptVector], grid: list[float],
                   inputs: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[dict]]:
    """Try λ in `grid` for every vector (at most MAX_SEARCH combinations); keep the lowest loss."""
    combos = list(itertools.product(grid, repeat=len(vectors)))
    if len(combos) > MAX_SEARCH:
        raise PromptVectorError(f"adapter.lambda_grid gives {len(combos)} combinations for "
                                f"{len(vectors)} vectors; at most {MAX_SEARCH} are searched")
    table = []
    was_training = model.training
    model.eval()
    for weights in combos:
        set_prompt(model, init + combine(vectors, list(weights)).tau)
        table.append({"lambdas": list(weights), "loss": validation_loss(model, inputs, labels)})
    model.train(was_training)
    best = min(table, key=lambda row: row["loss"])
    return best["lambdas"], table


class PromptMethod(PeftSaved):
    name = "prompt"
    spec = PromptSpec
    label = "task prompt vector"
    peft_type = "PROMPT_TUNING"


    def check_against_base(self, folder: Path, base_layout: dict, base_folder: Path) -> None:
        """Every tensor the folder touches exists in the base (`model_layout`) with a fitting
        shape, read from configs and safetensors headers only (the merge's pre-flight)."""
        tuned = tensor_header(folder / "adapter_model.safetensors")
        if not (folder / INIT_FILE).is_file():
            raise ValueError(f"{folder}: no {INIT_FILE}; not a task prompt vector (a PEFT "
                             "prompt-tuning folder alone does not keep its initial prompt)")
        init = tensor_header(folder / INIT_FILE)
        if PROMPT_KEY not in tuned or "prompt_init" not in init:
            raise ValueError(f"{folder}: adapter_model.safetensors needs {PROMPT_KEY} and "
                             f"{INIT_FILE} needs prompt_init")
        if tuned[PROMPT_KEY]["shape"] != init["prompt_init"]["shape"]:
            raise ValueError(f"{folder}: tensor {PROMPT_KEY} has shape {tuple(tuned[PROMPT_KEY]['shape'])} "
                             f"but prompt_init {tuple(init['prompt_init']['shape'])}")
        config = Path(base_folder) / "config.json"
        hidden = read_json_object(config).get("hidden_size") if config.is_file() else None
        if hidden is not None and tuned[PROMPT_KEY]["shape"][1] != hidden:
            raise ValueError(f"{folder}: tensor {PROMPT_KEY} has width {tuned[PROMPT_KEY]['shape'][1]}, "
                             f"but the base's hidden_size is {hidden}")

    def load(self, model: torch.nn.Module, folder: Path, trainable: bool = False) -> torch.nn.Module:
        return load(model, folder, trainable)

    def delta_reader(self, folder: Path, layout: dict, stack):
        return None  # P_tuned − P_init lives in prompt space: it merges with prompt vectors only

    def attach(self, model: torch.nn.Module, spec: PromptSpec, task: str = "causal-lm",
               gradient_checkpointing: bool = False, locate=None) -> torch.nn.Module:
        from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

        init = initial_prompt(model, spec.num_virtual_tokens, spec.init_seed)
        fingerprint = embedding_fingerprint(model)
        vectors = [TaskPromptVector.from_folder(locate(item.path) if locate else Path(item.path))
                   for item in spec.init_from]
        mine = TaskPromptVector(torch.zeros_like(init), init,
                                {"model": fingerprint, "init_seed": str(spec.init_seed), "source": "this run"})
        for vector in vectors:
            mine.check_compatible(vector)
        config = PromptTuningConfig(task_type=PEFT_TASK_TYPES[task], num_virtual_tokens=spec.num_virtual_tokens,
                                    prompt_tuning_init=PromptTuningInit.RANDOM)
        model = get_peft_model(model, config)
        start = init + combine(vectors, [i.weight for i in spec.init_from]).tau if vectors else init
        set_prompt(model, start)
        PROMPT_STATE.set(model, PromptState(
            init, {"model": fingerprint, "init_seed": str(spec.init_seed),
                   "num_virtual_tokens": str(spec.num_virtual_tokens)}, vectors))
        return model

    def prepare(self, model, spec: PromptSpec, validation) -> dict:
        """The λ search (when `lambda_grid` is set): returns what to record in the run summary."""
        state = PROMPT_STATE.get(model)
        if not spec.lambda_grid or not state.vectors:
            return {}
        rows = validation.inputs[:spec.lambda_rows], validation.labels[:spec.lambda_rows]
        best, table = search_lambdas(model, state.init, state.vectors, spec.lambda_grid, *rows)
        set_prompt(model, state.init + combine(state.vectors, best).tau)
        return {"lambda_search": table, "lambdas": best}

    def trainable_parameters(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def save(self, model, tokenizer, folder: Path, base_ref: str) -> None:
        """PEFT's prompt-tuning folder plus `prompt_init.safetensors` (P_init and its metadata)."""
        save_peft_folder(model, tokenizer, folder, base_ref)
        state = PROMPT_STATE.get(model)
        save_file({"prompt_init": state.init.contiguous()}, Path(folder) / INIT_FILE,
                  metadata=state.meta)

    def task_vector(self, folder: Path, base_folder: Path | None = None) -> TaskPromptVector:
        return TaskPromptVector.from_folder(folder)


def load(model: torch.nn.Module, folder: Path, trainable: bool = False) -> torch.nn.Module:
    """Attach a saved prompt-tuning folder (plain PEFT) to its base model."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, folder, is_trainable=trainable)
    if (Path(folder) / INIT_FILE).is_file():
        vector = TaskPromptVector.from_folder(folder)
        if vector.meta.get("model") != embedding_fingerprint(model.get_base_model()):
            raise PromptVectorError(f"{folder}: this prompt was tuned on another model "
                                    "(its embedding fingerprint differs from the base's)")
    return model


def describe(folder: Path) -> dict:
    """The metadata of a saved task prompt vector (for `workbench show` and reports)."""
    with safe_open(Path(folder) / INIT_FILE, "pt") as f:
        return json.loads(json.dumps(dict(f.metadata())))


METHOD = PromptMethod()
