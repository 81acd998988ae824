"""LoRA through PEFT (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

For each adapted linear layer W (out × in): W' = W + s·B·A with A (r × in), B (out × r), B = 0 at
init, s = α/r (or α/√r with rsLoRA, Kalajdzievski 2023). Saved in PEFT's folder format, so plain
`PeftModel.from_pretrained` loads it; its task vector keeps the factors (B, A, s) unmultiplied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Union

import torch
from pydantic import Field

from workbench.io import all_finite, base_shape, peft_adapter_header, tensor_header
from workbench.sections import Strict
from workbench.task_vector import LoraTaskVector

PEFT_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "sequence-classification": "SEQ_CLS",
                   "feature-extraction": "FEATURE_EXTRACTION"}


class LoraSpec(Strict):
    """LoRA through PEFT: ΔW = (α/r)·B·A (or α/√r with rsLoRA)."""

    method: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, le=4096)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    use_rslora: bool = False


def check_adapter_format(folder: Path) -> None:
    """A PEFT LoRA adapter this merge folds in exactly: plain LoRA of linear layers (no DoRA, no
    fan_in_fan_out, nothing but lora_A/lora_B pairs); ValueError or FileNotFoundError if not."""
    header = peft_adapter_header(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: a {config['peft_type']} adapter, only LoRA can be merged here")
    if config.get("use_dora"):
        raise ValueError(f"{folder}: DoRA adapters are not supported by this merge")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"{folder}: fan_in_fan_out adapters are not supported by this merge")
    # Anything besides lora_A/lora_B pairs (embedding LoRA, DoRA magnitudes, trained biases,
    # fully trained modules) cannot be folded into W + s·B·A: refused rather than dropped.
    for key in header:
        if key != "__metadata__" and ".lora_A." not in key and ".lora_B." not in key:
            raise ValueError(f"{folder}: tensor {key} cannot be merged by this merge "
                             "(only lora_A/lora_B pairs of linear layers can)")


def peft_type(folder: Path) -> str | None:
    """The `peft_type` a PEFT adapter folder's config names (None for no PEFT folder)."""
    config = Path(folder) / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None


class PeftSaved:
    """What the methods PEFT saves share: a folder told by its config's `peft_type`."""

    peft_type: str
    config_files = ("adapter_config.json",)

    def detect(self, folder: Path) -> bool:
        return peft_type(folder) == self.peft_type


class LoraMethod(PeftSaved):
    name = "lora"
    spec = LoraSpec
    label = "LoRA adapter"
    peft_type = "LORA"


    def check_against_base(self, folder: Path, base_layout: dict, base_folder: Path) -> None:
        """Every tensor the folder touches exists in the base (`model_layout`) with a fitting
        shape, read from configs and safetensors headers only (the merge's pre-flight)."""
        check_adapter_format(folder)
        header = tensor_header(folder / "adapter_model.safetensors")
        for key, entry in header.items():
            if ".lora_A." not in key:
                continue
            b_key = key.replace(".lora_A.", ".lora_B.")
            if b_key not in header:
                raise ValueError(f"{folder}: {key} has no matching lora_B tensor")
            (r, n_in), (n_out, r_b) = entry["shape"], header[b_key]["shape"]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            shape = base_shape(base_layout, name, folder, "adapted by")
            if r != r_b or shape != [n_out, n_in]:
                raise ValueError(f"tensor {name}: shape {tuple(shape)} in the base but the adapter "
                                 f"{folder} updates shape {(n_out, n_in)} (rank {r}/{r_b})")

    def attach(self, model: torch.nn.Module, spec: LoraSpec, task: str = "causal-lm",
               gradient_checkpointing: bool = False, locate=None) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gradient_checkpointing)
        config = LoraConfig(
            r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, use_rslora=spec.use_rslora,
            target_modules=spec.target_modules, task_type=PEFT_TASK_TYPES[task],
        )
        return get_peft_model(model, config)

    def trainable_parameters(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def save(self, model, tokenizer, folder: Path, base_ref: str) -> None:
        save_peft_folder(model, tokenizer, folder, base_ref)

    def load(self, model: torch.nn.Module, folder: Path, trainable: bool = False) -> torch.nn.Module:
        return load(model, folder, trainable)

    def task_vector(self, folder: Path, base_folder: Path | None = None):
        return LoraTaskVector.from_peft_folder(folder)

    def delta_reader(self, folder: Path, layout: dict, stack):
        return LoraDelta(folder, layout)


def load(model: torch.nn.Module, folder: Path, trainable: bool = False) -> torch.nn.Module:
    """Attach a saved PEFT LoRA adapter to a loaded base model."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, folder, is_trainable=trainable)


def save_peft_folder(model, tokenizer, folder: Path, base_ref: str) -> None:
    """PEFT folder: adapter_config.json + adapter_model.safetensors (+ the tokenizer)."""
    model.peft_config["default"].base_model_name_or_path = base_ref
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


class LoraDelta:
    """τ[name] = s·B·A for the weights a LoRA adapter adapts, None elsewhere."""

    fresh = True  # each call returns a new tensor (see merge.streaming._merged_tensor)

    def __init__(self, folder: Path, base_layout: dict):
        folder = Path(folder)
        check_adapter_format(folder)
        self.factors = LoraTaskVector.from_peft_folder(folder).factors
        for name, (b, a, _) in self.factors.items():
            if name not in base_layout:
                raise ValueError(f"tensor {name}: adapted by {folder} but not in the base model")
            if base_layout[name][2] != [b.shape[0], a.shape[1]]:
                raise ValueError(f"tensor {name}: shape {tuple(base_layout[name][2])} in the base but "
                                 f"the adapter {folder} updates shape {(b.shape[0], a.shape[1])}")
            for part, t in (("lora_B", b), ("lora_A", a)):
                if not all_finite(t):
                    raise ValueError(f"tensor {name}: {part} in {folder} holds NaN or inf")

    def __call__(self, name: str) -> torch.Tensor | None:
        if name not in self.factors:
            return None
        b, a, scale = self.factors[name]
        return scale * (b @ a)


METHOD = LoraMethod()
