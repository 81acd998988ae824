"""MixDA: mixture of domain adapters (Diao et al. 2023, "Mixing Domain Adapters: Mixture-of-Domain-
Adapters for Decoupling and Injecting Domain Knowledge to Pre-trained Language Models' Memories").

PEFT has no MixDA, so this module writes by hand what it needs: the inserted modules, their
save/load format (`mixda_config.json` + `mixda.safetensors`) and the stage-1 consistency loss. The
stage-2 task adapter is plain LoRA through PEFT.

In each chosen layer, with z the FFN's intermediate activation (Llama: act(gate_proj(x))·up_proj(x),
the input of `mlp.down_proj`; BERT: the output of `BertIntermediate`, the input of
`layer.output.dense`) and F = W_out·z the FFN's output projection:

    K_j(z)  = W_up,j · GELU(W_down,j · z + b_down,j) + b_up,j       (bottleneck domain adapter j)
    g(h)    = softmax(W_g · h + b_g)  ∈ Δ^{n}, per token            (h: the hidden state entering the FFN)
    mixed   = Σ_j g_j (F + K_j) + g_F · F = F + Σ_j g_j · K_j        (experts [F+K_1, …, F+K_n, F])

Choice (differs from the paper's formulation): the paper mixes the adapters' outputs with the FFN's;
here each adapter runs *parallel* to F, so every expert is F + K_j. With the up projections
initialised to zero (K_j ≡ 0) the adapted model is exactly the base model, whatever the gate.
The gate is per token; the original code gated once per sequence from the last position (which may
be padding), and we do not copy that. BERT: F is taken before `output.dropout`, the residual and
the LayerNorm, which then apply to `mixed`.

Stage 1 (domain text, backbone frozen): one new adapter `K_0` and a gate over [K_0, F] train with
L = λ·L_K + L_S, where L_S = mean over adapted layers of ‖mixed − F‖² = ‖Σ_j g_j K_j‖²₂ on general
text (`set_recording` + `consistency_per_row`). Stage 2: stage-1 adapters load frozen side by side
as `K_1 … K_n`, and a new gate over [K_1, …, K_n, F] trains with an optional LoRA task adapter.

Folder format: `mixda_config.json`, `mixda.safetensors` (keys `layers.<i>.adapters.<K>.{down,up}.*`,
`layers.<i>.gate.*`, `head.<name>.*` for sequence classification and `mlm_head.<name>.*` for a
masked-LM head trained in stage 1), the tokenizer when given, and for stage 2 with a task LoRA a PEFT
folder `task_lora/`.

Encoders (BERT family) train stage 1 with the masked-LM loss for L_K (`workbench.engine.TokenMasker`,
15% of tokens, 80/10/10), as the paper did on RoBERTa. A checkpoint without a masked-LM head (a
sentence encoder such as all-MiniLM-L6-v2 ships only the encoder) gets a freshly initialised head
whose transform and bias train together with the domain adapters (the decoder stays tied to the
frozen word embeddings) and are saved in the folder; a checkpoint that has its head keeps it frozen.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

from workbench.data import IGNORE
from workbench.io import atomic_folder, read_json_object, tensor_header
from workbench.methods import ModelState
from workbench.sections import ModelRef, Strict

from .lora import PEFT_TASK_TYPES, LoraSpec, save_peft_folder

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
BERT_FAMILY = ("bert", "roberta")
TASKS = ("causal-lm", "masked-lm", "sequence-classification", "feature-extraction")
MLM_HEAD_NAMES = ("cls", "lm_head")  # BERT, RoBERTa
HEAD_NAMES = ("score", "classifier")
CONFIG_FILE, WEIGHTS_FILE, LORA_FOLDER = "mixda_config.json", "mixda.safetensors", "task_lora"
MIXDA_STATE = ModelState("MixDA layers (stage, task, sources)")


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


class MixdaError(ValueError):
    """A MixDA configuration, folder or model that cannot work together."""


# ---------------------------------------------------------------------------------------------
# The inserted modules


class BottleneckAdapter(nn.Module):
    """K(z) = up(GELU(down(z))), up initialised to zero so that K ≡ 0 at init."""

    def __init__(self, d_in: int, bottleneck: int, d_out: int):
        super().__init__()
        self.down = nn.Linear(d_in, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, d_out)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(z)))


class MixdaLayer(nn.Module):
    """Adapters K_1..K_n and a per-token gate over [K_1, …, K_n, F]: mixed = F + Σ_j g_j·K_j(z).

    Parameters are float32 whatever the backbone's dtype; inputs are cast to it and the update back
    to F's dtype. When `recording` is on, `recorded` keeps per row b the token mean of
    ‖mixed − F‖²₂ (float32, differentiable), over the tokens of `record_mask` when one is set.
    """

    def __init__(self, index: int, hidden_size: int, intermediate_size: int,
                 bottlenecks: dict[str, int]):
        super().__init__()
        self.index = index
        self.adapters = nn.ModuleDict({name: BottleneckAdapter(intermediate_size, size, hidden_size)
                                       for name, size in bottlenecks.items()})
        self.gate = nn.Linear(hidden_size, len(bottlenecks) + 1)
        self.enabled = True
        self.recording = False
        self.record_mask: torch.Tensor | None = None
        self.recorded: torch.Tensor | None = None

    def forward(self, gate_input: torch.Tensor, intermediate: torch.Tensor,
                f_out: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return f_out
        dtype = self.gate.weight.dtype
        g = torch.softmax(self.gate(gate_input.to(dtype)), dim=-1)
        z = intermediate.to(dtype)
        delta = sum(g[..., j:j + 1] * adapter(z) for j, adapter in enumerate(self.adapters.values()))
        if self.recording:
            self.recorded = self._row_means(delta.float().pow(2).sum(-1))
        return f_out + delta.to(f_out.dtype)

    def _row_means(self, sq: torch.Tensor) -> torch.Tensor:
        """Per row, the mean over tokens of ‖mixed − F‖² (masked tokens left out)."""
        sq = sq.reshape(sq.shape[0], -1)
        mask = self.record_mask
        if mask is None or mask.shape != sq.shape:
            return sq.mean(dim=1)
        mask = mask.to(sq.device, sq.dtype)
        return (sq * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


class MixdaLlamaMLP(nn.Module):
    """LlamaMLP with MixDA beside `down_proj`; adopts the MLP's submodules so names are unchanged."""

    def __init__(self, mlp: nn.Module, mixda: MixdaLayer):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.mixda = mixda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.mixda(x, z, self.down_proj(z))


class MixdaBertOutput(nn.Module):
    """BertOutput with MixDA beside `dense`: LayerNorm(dropout(F + Σ g_j K_j) + input_tensor)."""

    def __init__(self, output: nn.Module, mixda: MixdaLayer):
        super().__init__()
        self.dense, self.LayerNorm, self.dropout = output.dense, output.LayerNorm, output.dropout
        self.mixda = mixda

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        mixed = self.mixda(input_tensor, hidden_states, self.dense(hidden_states))
        return self.LayerNorm(self.dropout(mixed) + input_tensor)


# ---------------------------------------------------------------------------------------------
# Finding things in a model


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _family(base: nn.Module) -> str:
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type in LLAMA_FAMILY:
        return "llama"
    if model_type in BERT_FAMILY:
        return "bert"
    raise MixdaError(f"MixDA does not support model_type {model_type!r}; supported families: "
                     f"Llama ({', '.join(LLAMA_FAMILY)}) and BERT ({', '.join(BERT_FAMILY)})")


def _blocks(base: nn.Module) -> nn.ModuleList:
    """The decoder (Llama) or encoder (BERT) layers."""
    backbone = base.base_model
    return backbone.layers if _family(base) == "llama" else backbone.encoder.layer


def _model_facts(base: nn.Module) -> dict:
    c = base.config
    return {"model_type": c.model_type, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers}


def _named_module(base: nn.Module, names: tuple[str, ...], what: str) -> tuple[str, nn.Module]:
    """The first of `names` that is a submodule of `base` (heads differ in name across families)."""
    for name in names:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise MixdaError(f"{type(base).__name__}: no {what} ({' or '.join(names)})")


def _head(base: nn.Module) -> tuple[str, nn.Module]:
    return _named_module(base, HEAD_NAMES, "classification head")


def mixda_layers(model: nn.Module) -> list[MixdaLayer]:
    """The inserted MixDA modules, in layer order (through PEFT, DDP or any other wrapper)."""
    return [m for m in model.modules() if isinstance(m, MixdaLayer)]


# ---------------------------------------------------------------------------------------------
# Insertion


def _check_layers(layers: list[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    for i in layers:
        if not 0 <= i < n_layers:
            raise MixdaError(f"MixDA layer {i} is out of range: the model has {n_layers} layers "
                             f"(valid indices 0..{n_layers - 1})")
    if len(set(layers)) != len(layers):
        dup = next(i for i in layers if layers.count(i) > 1)
        raise MixdaError(f"MixDA layer {dup} is listed twice (the model has {n_layers} layers)")
    return sorted(layers)


def _insert(base: nn.Module, layers: list[int], bottlenecks: dict[str, int]) -> None:
    """Wrap the FFN output of each chosen layer with a new MixdaLayer (float32, F's device)."""
    if mixda_layers(base):
        raise MixdaError("the model already has MixDA layers; start from a fresh base model")
    family, blocks, facts = _family(base), _blocks(base), _model_facts(base)
    for i in layers:
        block = blocks[i]
        ffn = block.mlp if family == "llama" else block.output
        f_weight = ffn.down_proj.weight if family == "llama" else ffn.dense.weight
        mixda = MixdaLayer(i, facts["hidden_size"], facts["intermediate_size"], bottlenecks)
        mixda.to(f_weight.device)
        if family == "llama":
            block.mlp = MixdaLlamaMLP(ffn, mixda)
        else:
            block.output = MixdaBertOutput(ffn, mixda)


def _set_trainable(model: nn.Module, stage: int, task: str, on: bool = True,
                   mlm_head: bool = False) -> None:
    """Stage 1: adapters + gate; stage 2: gate only; plus the head for sequence classification,
    and a new masked-LM head's own parameters when `mlm_head`."""
    for layer in mixda_layers(model):
        layer.gate.requires_grad_(on)
        layer.adapters.requires_grad_(on and stage == 1)
    if task == "sequence-classification":
        _head(_unwrap(model))[1].requires_grad_(on)
    if mlm_head:
        for p in _mlm_head_parameters(_unwrap(model)).values():
            p.requires_grad_(on)


def _mlm_head(base: nn.Module) -> tuple[str, nn.Module]:
    return _named_module(base, MLM_HEAD_NAMES, "masked-LM head")


def _mlm_head_parameters(base: nn.Module) -> dict[str, nn.Parameter]:
    """The masked-LM head's own parameters (transform, bias): not the decoder tied to the input
    embeddings."""
    _, head = _mlm_head(base)
    embedding = base.get_input_embeddings().weight
    return {n: p for n, p in head.named_parameters() if p is not embedding}


def _checkpoint_has_mlm_head(base: nn.Module) -> bool:
    """Whether the folder the model came from stores a masked-LM head (read from safetensors
    headers; a folder we cannot read counts as having none)."""
    from workbench.models import read_safetensors_header

    folder = Path(getattr(base.config, "_name_or_path", "") or ".")
    names: set[str] = set()
    for path in folder.glob("*.safetensors") if folder.is_dir() else []:
        names.update(read_safetensors_header(path))
    return any(n.split(".", 1)[0] in MLM_HEAD_NAMES for n in names)


# ---------------------------------------------------------------------------------------------
# Folders


def _read_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise MixdaError(f"{folder}: not a MixDA folder (no {CONFIG_FILE})")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("method") != "mixda":
        raise MixdaError(f"{folder}: {CONFIG_FILE} is for method {config.get('method')!r}, not mixda")
    return config


def _check_compatible(folder: Path, config: dict, base: nn.Module) -> None:
    for key, actual in _model_facts(base).items():
        if config.get(key) != actual:
            raise MixdaError(f"{folder}: saved for a model with {key}={config.get(key)!r}, but this "
                             f"model has {key}={actual!r}")


def _layer_tensors(tensors: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    prefix = f"layers.{index}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _load_module(module: nn.Module, tensors: dict[str, torch.Tensor], source: Path, what: str) -> None:
    """load_state_dict (strict), with a MixdaError naming the folder and the part."""
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise MixdaError(f"{source}: the saved {what} does not fit this model: {err}") from err


def _domain_adapter(folder: Path, base: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """A stage-1 folder's config and its K_0 tensors, checked against the model."""
    config = _read_config(folder)
    _check_compatible(folder, config, base)
    if config.get("stage") != 1:
        raise MixdaError(f"{folder}: a domain adapter must be a stage-1 MixDA folder "
                         f"(this one is stage {config.get('stage')})")
    return config, load_file(Path(folder) / WEIGHTS_FILE)


def _lora_targets(base: nn.Module, targets) -> list[str]:
    """Names of the backbone's nn.Linear layers (not MixDA's, not the head) matching `targets`."""
    prefix = base.base_model_prefix + "." if base.base_model is not base else ""
    mixda_names = [n + "." for n, m in base.named_modules() if isinstance(m, MixdaLayer)]
    names = [n for n, m in base.named_modules()
             if isinstance(m, nn.Linear) and n.startswith(prefix)
             and not any(n.startswith(p) for p in mixda_names)]
    if targets != "all-linear":
        names = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise MixdaError(f"task_lora.target_modules {targets!r} matches no backbone linear layer")
    return names


def _attach_lora(model: nn.Module, spec: LoraSpec, task: str) -> nn.Module:
    """LoRA on the backbone through PEFT. Sequence classification gets no PEFT task type, so that
    PEFT does not wrap the head in modules_to_save: the head is ours, in mixda.safetensors."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        use_rslora=spec.use_rslora,
                        target_modules=_lora_targets(model, spec.target_modules),
                        task_type=None if task == "sequence-classification" else PEFT_TASK_TYPES.get(task))
    return get_peft_model(model, config)


# ---------------------------------------------------------------------------------------------
# The method


class MixdaMethod:
    """The adapter method (`workbench.methods.AdapterMethod`) for MixDA."""

    name = "mixda"
    spec = MixdaSpec
    label = "MixDA folder"
    config_files = (CONFIG_FILE,)


    def check_against_base(self, folder: Path, base_layout: dict, base_folder: Path) -> None:
        """Every tensor the folder touches exists in the base (`model_layout`) with a fitting
        shape, read from configs and safetensors headers only (the merge's pre-flight)."""
        config = read_json_object(folder / "mixda_config.json")
        base_path = Path(base_folder) / "config.json"
        base = read_json_object(base_path) if base_path.is_file() else {}
        for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if key in base and config.get(key) != base[key]:
                raise ValueError(f"{folder / 'mixda_config.json'}: {key} {config.get(key)!r}, but "
                                 f"the base {base_path} has {base[key]!r}")
        tensor_header(folder / "mixda.safetensors")

    def detect(self, folder: Path) -> bool:
        return (Path(folder) / CONFIG_FILE).is_file()

    def load(self, model: nn.Module, folder: Path, trainable: bool = False) -> nn.Module:
        return load(model, folder, trainable)

    def delta_reader(self, folder: Path, layout: dict, stack):
        return None  # module weights of an adapter the base lacks: they merge with MixDA only

    def attach(self, model: nn.Module, spec: MixdaSpec, task: str = "causal-lm",
               gradient_checkpointing: bool = False,
               locate: Callable[[str], Path] | None = None) -> nn.Module:
        """Insert MixDA (stage 1 or 2) and leave only its trainable parts trainable.

        `gradient_checkpointing` needs nothing here (the engine enables the non-reentrant kind).
        """
        if task not in TASKS:
            raise MixdaError(f"MixDA task {task!r} is not one of {', '.join(TASKS)}")
        base = _unwrap(model)
        if task == "sequence-classification":
            _head(base)
        if spec.stage == 2 and spec.task_lora is not None and hasattr(model, "peft_config"):
            raise MixdaError("the model is already a PeftModel; MixDA stage 2 adds its own task LoRA")
        model.requires_grad_(False)
        if spec.stage == 1:
            layers = _check_layers(spec.layers, len(_blocks(base)))
            _insert(base, layers, {"K_0": spec.bottleneck})
            sources: list[dict] = []
        else:
            sources = self._attach_domain_adapters(base, spec, locate or Path)
            if spec.task_lora is not None:
                model = _attach_lora(model, spec.task_lora, task)
        if task == "masked-lm" and spec.stage != 1:
            raise MixdaError("masked-LM training of MixDA is stage 1; stage 2 trains on labelled or "
                             "instruction data")
        mlm_head = task == "masked-lm" and not _checkpoint_has_mlm_head(base)
        if task == "masked-lm":
            _mlm_head(base)
        MIXDA_STATE.set(base, {"stage": spec.stage, "task": task, "sources": sources,
                               "mlm_head": mlm_head})
        _set_trainable(model, spec.stage, task, mlm_head=mlm_head)
        return model

    def _attach_domain_adapters(self, base: nn.Module, spec: MixdaSpec,
                                locate: Callable[[str], Path]) -> list[dict]:
        """Load n stage-1 adapters frozen as K_1..K_n beside a new gate over [K_1..K_n, F]."""
        folders = [Path(locate(ref)) for ref in spec.domain_adapters]
        loaded = [_domain_adapter(folder, base) for folder in folders]
        layers = loaded[0][0]["layers"]
        for folder, (config, _) in zip(folders, loaded):
            if sorted(config["layers"]) != sorted(layers):
                raise MixdaError(f"{folder}: adapts layers {config['layers']}, but {folders[0]} "
                                 f"adapts {layers}; domain adapters must share their layers")
        if spec.layers is not None and sorted(spec.layers) != sorted(layers):
            raise MixdaError(f"adapter.layers {spec.layers} differs from the domain adapters' "
                             f"layers {layers}")
        layers = _check_layers(list(layers), len(_blocks(base)))
        names = [f"K_{j + 1}" for j in range(len(folders))]
        _insert(base, layers, {n: c["bottleneck"]["K_0"] for n, (c, _) in zip(names, loaded)})
        for layer in mixda_layers(base):
            for name, folder, (_, tensors) in zip(names, folders, loaded):
                part = {k.removeprefix("adapters.K_0."): v
                        for k, v in _layer_tensors(tensors, layer.index).items()
                        if k.startswith("adapters.K_0.")}
                _load_module(layer.adapters[name], part, folder, f"adapter K_0 of layer {layer.index}")
        return [{"name": n, "ref": ref, "folder": str(f)}
                for n, ref, f in zip(names, spec.domain_adapters, folders)]

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def objective(self, spec: MixdaSpec, masker=None):
        """Stage 1: λ·L_K + L_S (`Stage1Objective`, L_K masked-LM when a `masker` is given);
        stage 2: the engine's default signal."""
        return Stage1Objective(spec.lambda_k, masker) if spec.stage == 1 else None

    @staticmethod
    @contextmanager
    def disabled(model: nn.Module):
        """Inside: every MixDA layer returns F (the model is its backbone, heads kept)."""
        layers = mixda_layers(model)
        for layer in layers:
            layer.enabled = False
        try:
            yield model
        finally:
            for layer in layers:
                layer.enabled = True

    def save(self, model: nn.Module, tokenizer, folder: Path, base_ref: str) -> None:
        """Write config, MixDA tensors, the task LoRA (stage 2) and the tokenizer, atomically."""
        folder = Path(folder)
        base = _unwrap(model)
        if not MIXDA_STATE.has(base) or not mixda_layers(base):
            raise MixdaError("the model has no MixDA layers to save")
        meta = MIXDA_STATE.get(base)
        has_lora = meta["stage"] == 2 and hasattr(model, "peft_config")
        with atomic_folder(folder, overwrite=True) as tmp:
            save_file(_mixda_tensors(base, meta["task"], meta.get("mlm_head", False)),
                      str(tmp / WEIGHTS_FILE))
            config = _folder_config(base, meta, base_ref, has_lora)
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            if has_lora:
                save_peft_folder(model, None, tmp / LORA_FOLDER, base_ref)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

    def task_vector(self, folder: Path, base_folder: Path | None = None) -> "MixdaTaskVector":
        """The module weights of a MixDA folder (their base is the absent adapter, so
        `base_folder` is not needed and ignored)."""
        return MixdaTaskVector.from_folder(folder)


def _mixda_tensors(base: nn.Module, task: str, mlm_head: bool = False) -> dict[str, torch.Tensor]:
    tensors = {f"layers.{layer.index}.{k}": v for layer in mixda_layers(base)
               for k, v in layer.state_dict().items()}
    if task == "sequence-classification":
        name, head = _head(base)
        tensors.update({f"head.{name}.{k}": v for k, v in head.state_dict().items()})
    if mlm_head:
        name = _mlm_head(base)[0]
        tensors.update({f"mlm_head.{name}.{k}": v for k, v in _mlm_head_parameters(base).items()})
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _folder_config(base: nn.Module, meta: dict, base_ref: str, has_lora: bool) -> dict:
    layers = mixda_layers(base)
    adapters = layers[0].adapters
    config = {"method": "mixda", "stage": meta["stage"], "task": meta["task"],
              "layers": [layer.index for layer in layers],
              "adapters": list(adapters),
              "bottleneck": {n: a.down.out_features for n, a in adapters.items()},
              **_model_facts(base), "base_model_name_or_path": base_ref,
              "task_lora": has_lora, "mlm_head": bool(meta.get("mlm_head"))}
    if meta["stage"] == 2:
        config["domain_adapters"] = meta["sources"]
    return config


def load(model: nn.Module, folder: Path, trainable: bool = False) -> nn.Module:
    """Reattach a saved MixDA folder to a freshly loaded base (and its task LoRA for stage 2)."""
    folder = Path(folder)
    config = _read_config(folder)
    base = _unwrap(model)
    _check_compatible(folder, config, base)
    layers = _check_layers(list(config["layers"]), len(_blocks(base)))
    _insert(base, layers, {n: config["bottleneck"][n] for n in config["adapters"]})
    tensors = load_file(folder / WEIGHTS_FILE)
    for layer in mixda_layers(base):
        _load_module(layer, _layer_tensors(tensors, layer.index), folder, f"MixDA layer {layer.index}")
    if config["task"] == "sequence-classification":
        name, head = _head(base)
        _load_module(head, {k.removeprefix(f"head.{name}."): v for k, v in tensors.items()
                            if k.startswith(f"head.{name}.")}, folder, f"head {name}")
    mlm_head = bool(config.get("mlm_head"))
    if mlm_head:
        name = _mlm_head(base)[0]
        prefix = f"mlm_head.{name}."
        own = _mlm_head_parameters(base)
        stored = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        if sorted(stored) != sorted(own):
            raise MixdaError(f"{folder}: masked-LM head tensors {sorted(stored)} do not match the "
                             f"model's {name} head {sorted(own)}")
        with torch.no_grad():
            for key, p in own.items():
                p.copy_(stored[key].to(p.dtype))
    model.requires_grad_(False)
    if config.get("task_lora"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, folder / LORA_FOLDER, is_trainable=trainable)
    MIXDA_STATE.set(base, {"stage": config["stage"], "task": config["task"],
                           "sources": config.get("domain_adapters", []), "mlm_head": mlm_head})
    _set_trainable(model, config["stage"], config["task"], on=trainable, mlm_head=mlm_head)
    return model


# ---------------------------------------------------------------------------------------------
# The consistency loss L_S


def set_recording(model: nn.Module, on: bool, attention_mask: torch.Tensor | None = None) -> None:
    """Turn recording of ‖mixed − F‖² on or off in every MixDA layer. Turning it on clears stale
    values; `attention_mask` ([B, T], 1 = real token) leaves padding out of the token means."""
    layers = mixda_layers(model)
    if not layers:
        raise MixdaError("the model has no MixDA layers")
    for layer in layers:
        layer.recording = on
        layer.record_mask = attention_mask if on else None
        if on:
            layer.recorded = None


def consistency_per_row(model: nn.Module) -> torch.Tensor:
    """L_S per row: mean over adapted layers of mean_t ‖mixed − F‖²₂ (float32, differentiable).

    Reads what the last recorded forward stored and clears it.
    """
    layers = mixda_layers(model)
    missing = [layer.index for layer in layers if layer.recorded is None]
    if not layers or missing:
        raise MixdaError(f"no recorded MixDA values (layers {missing}); call set_recording(model, "
                         "True) before the forward pass")
    values = torch.stack([layer.recorded for layer in layers]).mean(dim=0)
    for layer in layers:
        layer.recorded = None
    return values


class Stage1Objective:
    """L = λ·L_K + L_S for one step (see `workbench.engine.LanguageModelObjective` for the protocol).

    The step's batch holds domain rows (the training data) and general rows (the replay data):
    L_K is the next-token loss over the domain rows' target tokens (the masked-LM loss over their
    masked tokens when a `TokenMasker` is given, for encoders); L_S is the mean over general
    rows of the per-row consistency ‖mixed − F‖² (`consistency_per_row`). General rows carry no
    language-model loss, as in the paper (L_S alone keeps the old knowledge).
    """

    def __init__(self, lambda_k: float, masker=None):
        self.lambda_k, self.masker = lambda_k, masker

    def totals(self, inputs: torch.Tensor, labels: torch.Tensor, replay: torch.Tensor) -> dict:
        if not bool(replay.any()):
            raise MixdaError("MixDA stage 1 needs general text for L_S: set data.replay (general "
                             "text) and data.replay_ratio > 0")
        if self.masker is not None:
            masked = self.masker(inputs[~replay])[1]
            return {"domain_tokens": int((masked != IGNORE).sum()), "replay_rows": int(replay.sum())}
        domain = labels[~replay]
        return {"domain_tokens": int((domain[:, 1:] != IGNORE).sum()),
                "replay_rows": int(replay.sum())}

    def __call__(self, model, inputs, labels, replay, totals: dict) -> torch.Tensor:
        from workbench.engine import masked_nll_sum, next_token_nll_sum

        kwargs: dict = {"use_cache": False}
        if self.masker is not None:  # encoders: corrupt the domain rows, keep general rows clean
            corrupted, targets = inputs.clone(), torch.full_like(inputs, IGNORE)
            corrupted[~replay], targets[~replay] = self.masker(inputs[~replay])
            inputs, kwargs = corrupted, {}
        set_recording(model, True)
        try:
            logits = model(input_ids=inputs, **kwargs).logits
            per_row = consistency_per_row(model)
        finally:
            set_recording(model, False)
        if self.masker is not None:
            l_k = masked_nll_sum(logits, targets) / max(1, totals["domain_tokens"])
        else:
            domain_labels = labels.masked_fill(replay[:, None], IGNORE)
            l_k = next_token_nll_sum(logits, domain_labels) / max(1, totals["domain_tokens"])
        l_s = per_row[replay].sum() / totals["replay_rows"]
        return self.lambda_k * l_k + l_s


# ---------------------------------------------------------------------------------------------
# Task vectors


@dataclass
class MixdaTaskVector:
    """MixDA module weights (adapters, gate, head), float32; arithmetic only between vectors with
    the same tensors (same layers, adapters and shapes). Kind "mixda" in `merge.task_vectors`."""

    tensors: dict[str, torch.Tensor]
    kind: ClassVar[str] = "mixda"

    @classmethod
    def from_folder(cls, folder: Path) -> "MixdaTaskVector":
        _read_config(folder)
        return cls({k: v.float() for k, v in load_file(Path(folder) / WEIGHTS_FILE).items()})

    @property
    def layers(self) -> list[int]:
        return sorted({int(k.split(".")[1]) for k in self.tensors if k.startswith("layers.")})

    def _check(self, other: "MixdaTaskVector") -> None:
        if not isinstance(other, MixdaTaskVector):
            raise MixdaError(f"cannot combine a MixDA task vector with {type(other).__name__}")
        if set(self.tensors) != set(other.tensors):
            diff = sorted(set(self.tensors) ^ set(other.tensors))
            raise MixdaError(f"MixDA task vectors differ (layers {self.layers} vs {other.layers}; "
                             f"e.g. {diff[0]})")
        for k, v in self.tensors.items():
            if v.shape != other.tensors[k].shape:
                raise MixdaError(f"MixDA task vectors differ in shape at {k}: "
                                 f"{tuple(v.shape)} vs {tuple(other.tensors[k].shape)}")

    def __add__(self, other: "MixdaTaskVector") -> "MixdaTaskVector":
        self._check(other)
        return MixdaTaskVector({k: v + other.tensors[k] for k, v in self.tensors.items()})

    def __sub__(self, other: "MixdaTaskVector") -> "MixdaTaskVector":
        return self + (-other)

    def __mul__(self, scale: float) -> "MixdaTaskVector":
        if not isinstance(scale, (int, float)):
            return NotImplemented
        return MixdaTaskVector({k: v * float(scale) for k, v in self.tensors.items()})

    __rmul__ = __mul__

    def __neg__(self) -> "MixdaTaskVector":
        return self * -1.0

    def to_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def names(self) -> list[str]:
        return sorted(self.tensors)

    def tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def save(self, folder: Path, template: Path, merged_from: list[str] | None = None) -> Path:
        """Write these module weights as a MixDA folder, atomically: `template`'s mixda_config.json
        (plus `merged_from` when given), mixda.safetensors in `template`'s dtypes, and `template`'s
        tokenizer files. A template with a task LoRA is refused (its LoRA is not part of this vector)."""
        import shutil

        from safetensors import safe_open

        template = Path(template)
        config = _read_config(template)
        if config.get("task_lora"):
            raise MixdaError(f"{template}: has a task LoRA ({LORA_FOLDER}/), which a MixDA task vector "
                             "does not hold; merge the task LoRA separately")
        if merged_from is not None:
            config["merged_from"] = list(merged_from)
        with safe_open(template / WEIGHTS_FILE, "pt") as f:
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        torch_dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        tensors = {k: v.to(torch_dtypes.get(dtypes.get(k), torch.float32)).contiguous()
                   for k, v in self.tensors.items()}
        with atomic_folder(Path(folder)) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            for path in template.iterdir():
                if path.is_file() and path.name.startswith(("tokenizer", "special_tokens", "vocab",
                                                            "added_tokens", "merges", "chat_template")):
                    shutil.copy2(path, tmp / path.name)
        return Path(folder)


METHOD = MixdaMethod()
