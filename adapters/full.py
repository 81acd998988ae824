"""Full fine-tuning: every parameter trains; saved as a Hugging Face model folder.

Its task vector is the dense difference θ_ft − θ_base, tensor by tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from workbench.export import save_model_folder


class FullMethod:
    name = "full"

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
