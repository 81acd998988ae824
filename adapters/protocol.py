"""The one protocol every adapter method implements (DESIGN.md section 3).

A method attaches itself to a model from its recipe section, names its trainable parameters,
saves and loads itself (PEFT's format where PEFT has the method), and turns a saved adapter into a
task vector in the space where arithmetic on it is exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch


class AdapterMethod(Protocol):
    name: str

    def attach(self, model: torch.nn.Module, spec, task: str = "causal-lm",
               gradient_checkpointing: bool = False, locate=None) -> torch.nn.Module:
        """Return the model with the adapter attached and only the adapter trainable.

        `locate(ref)` turns a reference to an earlier run (`run:<id>`, a folder) into the folder of
        the adapter it produced, for methods that build on earlier adapters.
        """

    def trainable_parameters(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The parameters the optimizer updates, by name."""

    def save(self, model: torch.nn.Module, tokenizer, folder: Path, base_ref: str) -> None:
        """Write the trained adapter (or model) to `folder` in its standard format."""

    def task_vector(self, folder: Path, base_folder: Path | None = None):
        """The saved adapter as a task vector (see `merge.task_vectors`)."""

    # Optional: `objective(spec)` returns the training signal (default: next-token loss, see
    # `workbench.engine.LanguageModelObjective`).
