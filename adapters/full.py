"""Full fine-tuning: every parameter trains; saved as a Hugging Face model folder.

Its task vector is the dense difference θ_ft − θ_base, tensor by tensor.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Literal

import torch

from workbench.export import save_model_folder
from workbench.io import FLOAT_DTYPES, ShardReader, all_finite, model_layout
from workbench.methods import is_adapter_folder
from workbench.sections import Strict
from workbench.task_vector import DenseTaskVector


class FullSpec(Strict):
    """Full fine-tuning: every parameter trains."""

    method: Literal["full"] = "full"


class FullMethod:
    name = "full"
    spec = FullSpec
    label = "full model"
    config_files = ("config.json",)
    output = "model"  # the run saves a whole model folder, not an adapter


    def check_against_base(self, folder: Path, base_layout: dict, base_folder: Path) -> None:
        """Every tensor the folder touches exists in the base (`model_layout`) with a fitting
        shape, read from configs and safetensors headers only (the merge's pre-flight)."""
        layout = model_layout(folder)
        for name, (_, dtype, shape, _) in base_layout.items():
            if name not in layout:
                raise ValueError(f"tensor {name}: in the base but not in {folder}")
            if layout[name][2] != shape:
                raise ValueError(f"tensor {name}: shape {tuple(layout[name][2])} in {folder} "
                                 f"but {tuple(shape)} in the base")
        extra = sorted(set(layout) - set(base_layout))
        if extra:
            raise ValueError(f"tensor {extra[0]}: in {folder} but not in the base")

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
        if base_folder is None:
            raise ValueError("a full model's task vector needs its base folder")
        return DenseTaskVector.difference(folder, base_folder)

    def delta_reader(self, folder: Path, layout: dict, stack):
        return FullModelDelta(folder, layout, stack)


class FullModelDelta:
    """τ[name] = θ_model[name] − θ_base[name] in float32, read lazily; checked against the base first.

    A non-finite value stops the merge with the tensor and the file named. At most one shard of
    each of the two models is open at a time (`ShardReader`); `stack` closes them at its end.
    """

    fresh = True  # each call returns a new tensor (see merge.streaming._merged_tensor)
    by_rows = True  # may be called as (name, (start, stop)) for a block of rows

    def __init__(self, folder: Path, base_layout: dict, stack: ExitStack | None = None):
        self.folder, self.base_layout = Path(folder), base_layout
        self.layout = model_layout(self.folder)
        for name, (_, _, shape, _) in base_layout.items():
            if name not in self.layout:
                raise ValueError(f"tensor {name}: in the base but not in {self.folder}")
            if self.layout[name][2] != shape:
                raise ValueError(f"tensor {name}: shape {tuple(self.layout[name][2])} in {self.folder} "
                                 f"but {tuple(shape)} in the base")
        extra = sorted(set(self.layout) - set(base_layout))
        if extra:
            raise ValueError(f"tensor {extra[0]}: in {self.folder} but not in the base")
        self._model, self._base = ShardReader(self.layout), ShardReader(base_layout)
        if stack is not None:
            stack.callback(self.close)

    def __call__(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        if self.base_layout[name][1] not in FLOAT_DTYPES:
            return None  # integer buffers are not merged
        # the model's own tensor is released once converted (one float16 copy less at the peak)
        delta = self._model(name, rows).to(torch.float32, copy=True).sub_(self._base(name, rows))
        if not all_finite(delta):
            from_model = not all_finite(self._model(name, rows).float())
            where = self.layout[name][0] if from_model else self.base_layout[name][0]
            raise ValueError(f"tensor {name}: NaN or inf in {where}")
        return delta

    def close(self) -> None:
        self._model.close()
        self._base.close()


METHOD = FullMethod()
