"""Adapter methods, one module per method, each behind the protocol in `adapters.protocol`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .full import FullMethod
from .lora import LoraMethod
from .mixda import MixdaMethod
from .prompt import PromptMethod
from .road import RoadMethod

METHODS = {"lora": LoraMethod(), "full": FullMethod(), "road": RoadMethod(),
           "prompt": PromptMethod(), "mixda": MixdaMethod()}


def get_method(name: str):
    """The adapter method registered under `name`."""
    if name not in METHODS:
        raise ValueError(f"unknown adapter method '{name}' (known: {', '.join(METHODS)})")
    return METHODS[name]


def load_adapter(model: torch.nn.Module, folder: Path, trainable: bool = False) -> torch.nn.Module:
    """Attach a saved adapter folder to its loaded base model, whatever its method."""
    folder = Path(folder)
    if (folder / "mixda_config.json").is_file():
        from .mixda import load

        return load(model, folder, trainable=trainable)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: not an adapter folder (no adapter_config.json "
                                "or mixda_config.json)")
    peft_type = json.loads(config_path.read_text()).get("peft_type")
    if peft_type == "LORA":
        from .lora import load

        return load(model, folder, trainable=trainable)
    if peft_type == "ROAD":
        from .road import load

        return load(model, folder, trainable=trainable)
    if peft_type == "PROMPT_TUNING":
        from .prompt import load

        return load(model, folder, trainable=trainable)
    raise ValueError(f"{config_path}: unsupported adapter type {peft_type!r}")
