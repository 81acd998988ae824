"""Full fine-tuning: every parameter trains; saved as a Hugging Face model folder.

Its task vector is the dense difference θ_ft − θ_base, tensor by tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from workbench.export import save_model_folder
from workbench.methods import is_adapter_folder
from workbench.sections import Strict


class FullSpec(Strict):
    """Full fine-tuning: every parameter trains."""

    method: Literal["full"] = "full"


class FullMethod:
    name = "full"
    spec = FullSpec
    label = "full model"
    config_files = ("config.json",)

    def detect(self, folder: Path) -> bool:
        """A Hugging Face model folder (config.json) that is no adapter folder."""
        return (Path(folder) / "config.json").is_file() and not is_adapter_folder(folder)

    def load(self, model: torch.nn.Module, folder: Path, trainable: bool = False) -> torch.nn.Module:
        raise ValueError(f"{folder} is a full model, not an adapter to attach to a base")

    def attach(self, model: torch.nn.Module, spec=None, task: str = "causal-lm",
               gradient_checkpointing: bool = False, locate=None) -> torch.nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def trainable_parameters(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def save(self, model, tokenizer, folder: Path, base_ref: str) -> None:
        save_model_folder(model, tokenizer, folder)

    def task_vector(self, folder: Path, base_folder: Path | None = None):
        from merge.task_vectors import DenseTaskVector

        if base_folder is None:
            raise ValueError("a full model's task vector needs its base folder")
        return DenseTaskVector.difference(folder, base_folder)

    def delta_reader(self, folder: Path, layout: dict, stack):
        from merge.dense import FullModelDelta

        return FullModelDelta(folder, layout, stack)


METHOD = FullMethod()
