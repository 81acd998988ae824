"""Adapter methods, one module per method, each behind the protocol in `adapters.protocol`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .full import FullMethod
from .lora import LoraMethod
from .road import RoadMethod

METHODS = {"lora": LoraMethod(), "full": FullMethod(), "road": RoadMethod()}


def get_method(name: str):
    """The adapter method registered under `name`."""
    if name not in METHODS:
        raise ValueError(f"unknown adapter method '{name}' (known: {', '.join(METHODS)})")
    return METHODS[name]


def load_adapter(model: torch.nn.Module, folder: Path, trainable: bool = False) -> torch.nn.Module:
    """Attach a saved adapter folder to its loaded base model, whatever its method."""
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: not an adapter folder (no adapter_config.json)")
    peft_type = json.loads(config_path.read_text()).get("peft_type")
    if peft_type == "LORA":
        from .lora import load

        return load(model, folder, trainable=trainable)
    if peft_type == "ROAD":
        from .road import load

        return load(model, folder, trainable=trainable)
    raise ValueError(f"{config_path}: unsupported adapter type {peft_type!r}")
