"""RoAd through PEFT (Liao & Monz 2024, "3-in-1: 2D Rotary Adaptation for Efficient Finetuning,
Efficient Batching and Composability").

Each adapted linear layer's output is rotated in 2-D pairs: z = R·(W x + b). Within each group of
`group_size` outputs, element i pairs with element i + group_size/2, and the pair is multiplied by
α·[[cos θ, −sin θ], [sin θ, cos θ]] (road_1: one θ, α per pair; road_2 / road_4 untie the entries).
At init θ = 0 and α = 1, so R = I and the model is unchanged.

- Merging into weights: R·(W x + b) = (R W) x + R b, so W ← R W and b ← R b (PEFT's merge).
- Composition (road_1 only): two rotations of the same pair by θ₁, α₁ then θ₂, α₂ are one rotation
  by θ₁ + θ₂ with scale α₁·α₂; `compose` builds that adapter exactly.
- Mixed batches: R acts element-wise on the output, so rows of one batch can use different
  adapters at element-wise cost (PEFT's `adapter_names=` forward argument).

PEFT has RoAd, so training, saving and loading go through PEFT; written here by hand are only the
group-size check (PEFT's error does not name the layer), composition and the task vector.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, Union
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import load_file

from pydantic import Field, model_validator

from workbench.io import ShardReader, all_finite, base_shape, model_layout, read_json_object, tensor_header
from workbench.sections import Strict
from workbench.task_vector import DenseTaskVector, check_same_space, check_weight

from .lora import PEFT_TASK_TYPES, PeftSaved, save_peft_folder


class RoadSpec(Strict):
    """RoAd through PEFT (Liao & Monz 2024): each adapted layer's output is rotated in 2-D pairs.

    z = R·(W x + b), R block-diagonal with blocks α·[[cos θ, −sin θ], [sin θ, cos θ]] (road_1; road_2
    and road_4 untie the entries). `group_size` must divide every adapted layer's output width;
    `auto` takes the largest of 64, 32, ..., 2 that does.
    """

    method: Literal["road"] = "road"
    variant: Literal["road_1", "road_2", "road_4"] = "road_1"
    group_size: Union[Literal["auto"], Annotated[int, Field(ge=2, le=65536)]] = "auto"
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"

    @model_validator(mode="after")
    def _even_group(self) -> "RoadSpec":
        if self.group_size != "auto" and self.group_size % 2:
            raise ValueError(f"adapter.group_size must be even (got {self.group_size})")
        return self


class RoadError(ValueError):
    """A RoAd adapter that cannot be built, loaded or combined as asked."""


HEAD_NAMES = ("lm_head", "score", "classifier")


def target_linear_layers(model: torch.nn.Module, target_modules) -> dict[str, torch.nn.Linear]:
    """The linear layers RoAd will adapt: all of them but the output head for 'all-linear', else
    those whose name ends with one of `target_modules` (PEFT's matching rule for lists)."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] in HEAD_NAMES:
            continue
        if target_modules == "all-linear" or any(
                name == t or name.endswith("." + t) for t in target_modules):
            found[name] = module
    return found


def choose_group_size(model: torch.nn.Module, spec: RoadSpec) -> int:
    """The group size to use: `auto` is the largest of 64, 32, ..., 2 dividing every adapted
    layer's output width; an explicit size must divide all of them (the layer is named if not)."""
    layers = target_linear_layers(model, spec.target_modules)
    if not layers:
        raise RoadError(f"adapter.target_modules={spec.target_modules!r} matches no linear layer")
    widths = sorted({m.out_features for m in layers.values()})
    if spec.group_size == "auto":
        for size in (64, 32, 16, 8, 4, 2):
            if all(w % size == 0 for w in widths):
                return size
        raise RoadError(f"no even group size divides the adapted output widths {widths}; "
                        "RoAd needs even widths (set adapter.target_modules to skip odd layers)")
    for name, layer in layers.items():
        if layer.out_features % spec.group_size:
            raise RoadError(
                f"adapter.group_size={spec.group_size} does not divide the output width "
                f"{layer.out_features} of layer '{name}' (adapted widths: {widths}); choose an even "
                "group_size that divides all of them, or group_size: auto")
    return spec.group_size


class RoadMethod(PeftSaved):
    name = "road"
    spec = RoadSpec
    label = "RoAd adapter"
    peft_type = "ROAD"


    def check_against_base(self, folder: Path, base_layout: dict, base_folder: Path) -> None:
        """Every tensor the folder touches exists in the base (`model_layout`) with a fitting
        shape, read from configs and safetensors headers only (the merge's pre-flight)."""
        config = read_json_object(Path(folder) / "adapter_config.json")
        variant, group_size = config.get("variant"), config.get("group_size")
        per_out = {"road_1": 0.5, "road_2": 1, "road_4": 2}
        if variant not in per_out or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
            raise ValueError(f"{folder / 'adapter_config.json'}: variant {variant!r} with group_size "
                             f"{group_size!r} is not a RoAd configuration")
        header = tensor_header(folder / "adapter_model.safetensors")
        for key, entry in header.items():
            layer, _, part = key.rpartition(".")
            if part not in ("road_theta", "road_alpha"):
                raise ValueError(f"{folder}: tensor {key} is not a RoAd rotation parameter; only "
                                 "rotations can be merged")
            name = layer.removeprefix("base_model.model.") + ".weight"
            shape = base_shape(base_layout, name, folder, "rotated by")
            if shape[0] % group_size or entry["shape"] != [int(shape[0] * per_out[variant])]:
                raise ValueError(f"tensor {name}: {shape[0]} outputs in the base, but {key} in "
                                 f"{folder} has shape {tuple(entry['shape'])} ({variant}, "
                                 f"group_size {group_size})")

    def load(self, model: torch.nn.Module, folder: Path, trainable: bool = False) -> torch.nn.Module:
        return load(model, folder, trainable)

    def delta_reader(self, folder: Path, layout: dict, stack):
        return RoadDelta(folder, layout, stack)

    def attach(self, model: torch.nn.Module, spec: RoadSpec, task: str = "causal-lm",
               gradient_checkpointing: bool = False, locate=None) -> torch.nn.Module:
        from peft import RoadConfig, get_peft_model

        group_size = choose_group_size(model, spec)
        config = RoadConfig(variant=spec.variant, group_size=group_size,
                            target_modules=spec.target_modules, task_type=PEFT_TASK_TYPES[task])
        return get_peft_model(model, config)

    def trainable_parameters(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def save(self, model, tokenizer, folder: Path, base_ref: str) -> None:
        save_peft_folder(model, tokenizer, folder, base_ref)

    def task_vector(self, folder: Path, base_folder: Path | None = None) -> "RoadTaskVector":
        return RoadTaskVector.from_peft_folder(folder)


def load(model: torch.nn.Module, folder: Path, trainable: bool = False,
         adapter_name: str = "default") -> torch.nn.Module:
    """Attach a saved PEFT RoAd adapter to a loaded base model (or add it to a PeftModel)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=trainable)
        return model
    return PeftModel.from_pretrained(model, folder, adapter_name=adapter_name, is_trainable=trainable)


def load_many(model: torch.nn.Module, folders: dict[str, Path]) -> torch.nn.Module:
    """Several RoAd adapters side by side, by name, for mixed batches:
    `model(input_ids=x, adapter_names=[name of row 0, name of row 1, ...])`."""
    if not folders:
        raise RoadError("load_many needs at least one adapter folder")
    for name, folder in folders.items():
        model = load(model, folder, adapter_name=name)
    return model


def merge_into_weights(model) -> torch.nn.Module:
    """W ← R W, b ← R b in every adapted layer; returns the plain transformers model."""
    return model.merge_and_unload()


# ----------------------------------------------------------------------------------------------
# Task vectors: the rotation parameters


def rotation_columns(variant: str, group_size: int, theta: torch.Tensor,
                     alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c₁, c₂), one entry per output, such that R·x = c₁ ⊙ x + c₂ ⊙ rot(x) (PEFT's layout).

    road_1: the θ, α of a group's first half are shared by its second half (c₁ = α cos θ,
    c₂ = α sin θ); road_2: one θ, α per output; road_4: cos and sin read separate θ and α.
    """
    if variant == "road_1":
        theta = theta.reshape(-1, group_size // 2).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, group_size // 2).repeat_interleave(2, dim=0).flatten()
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_4":
        theta, alpha = theta.reshape(-1, 2, group_size), alpha.reshape(-1, 2, group_size)
        return (alpha[:, 0, :] * theta[:, 0, :].cos()).flatten(), \
            (alpha[:, 1, :] * theta[:, 1, :].sin()).flatten()
    raise RoadError(f"unknown RoAd variant {variant!r} (road_1, road_2 or road_4)")


def rotation_delta(variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor,
                   x: torch.Tensor) -> torch.Tensor:
    """(R − I)·x along dim 0 of a weight (out, in) or a bias (out,), in float32.

    Within each group of `group_size` outputs, output i pairs with i + group_size/2:
    rot(x) = (−x₂, x₁) per group, and (R − I)x = (c₁ − 1) ⊙ x + c₂ ⊙ rot(x).
    """
    c1, c2 = rotation_columns(variant, group_size, theta.float(), alpha.float())
    x = x.float()
    if x.shape[0] != c1.shape[0]:
        raise RoadError(f"a rotation of {c1.shape[0]} outputs cannot act on a tensor of shape "
                        f"{tuple(x.shape)}")
    halves = x.reshape(-1, 2, group_size // 2, *x.shape[1:])
    rotated = torch.stack((-halves[:, 1], halves[:, 0]), dim=1).reshape(x.shape)
    view = (-1,) + (1,) * (x.dim() - 1)
    return (c1 - 1).view(view) * x + c2.view(view) * rotated


def weight_name(layer_key: str) -> str:
    """`base_model.model.model.layers.0.mlp.up_proj` → `model.layers.0.mlp.up_proj` (the module)."""
    return layer_key.removeprefix("base_model.model.")


@dataclass
class RoadTaskVector:
    """A RoAd adapter as its parameters: per adapted layer, angles θ and scales α (float32).

    As a task vector (kind "road", see `merge.task_vectors`) it lives in the log-polar coordinates
    (θ, log α) of each 2-D block α·R(θ): zero at init, and the sum of two vectors is their
    composition (angles add, scales multiply; exact for road_1). Scaling by w gives the rotation by
    w·θ with scale α^w (w = −1: the inverse rotation), which needs α > 0 unless w = 1. Tensors are
    named `<layer>.road_theta` and `<layer>.road_log_alpha`.
    """

    variant: str
    group_size: int
    theta: dict[str, torch.Tensor]
    alpha: dict[str, torch.Tensor]
    config: dict
    kind: ClassVar[str] = "road"

    @classmethod
    def from_peft_folder(cls, folder: Path) -> "RoadTaskVector":
        folder = Path(folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        if config.get("peft_type") != "ROAD":
            raise RoadError(f"{folder}: not a RoAd adapter (peft_type {config.get('peft_type')!r})")
        tensors = load_file(folder / "adapter_model.safetensors")
        theta, alpha = {}, {}
        for key, value in tensors.items():
            layer, _, param = key.rpartition(".")
            if param not in ("road_theta", "road_alpha"):
                raise RoadError(f"{folder}: tensor {key} is not a RoAd rotation parameter (a trained "
                                "module beside the rotations), so the adapter is not a rotation only")
            (theta if param == "road_theta" else alpha)[layer] = value.float()
        return cls(config["variant"], config["group_size"], theta, alpha, config)

    def compose(self, other: "RoadTaskVector") -> "RoadTaskVector":
        """`other` applied after `self`: angles add and scales multiply (road_1, same layers)."""
        if self.variant != "road_1" or other.variant != "road_1":
            raise RoadError("exact composition needs two road_1 adapters "
                            f"(got {self.variant} and {other.variant})")
        if self.group_size != other.group_size or set(self.theta) != set(other.theta):
            raise RoadError("composition needs the same layers and group_size in both adapters")
        theta = {k: self.theta[k] + other.theta[k] for k in self.theta}
        alpha = {k: self.alpha[k] * other.alpha[k] for k in self.alpha}
        return RoadTaskVector(self.variant, self.group_size, theta, alpha, dict(self.config))

    # The task-vector interface (merge.task_vectors)

    def names(self) -> list[str]:
        return sorted([f"{k}.road_theta" for k in self.theta] + [f"{k}.road_log_alpha" for k in self.alpha])

    def tensor(self, name: str) -> torch.Tensor:
        layer, _, part = name.rpartition(".")
        if part == "road_theta":
            return self.theta[layer]
        if part != "road_log_alpha" or layer not in self.alpha:
            raise KeyError(name)
        alpha = self.alpha[layer]
        if (alpha <= 0).any():
            raise RoadError(f"tensor {layer}.road_alpha: {int((alpha <= 0).sum())} scale(s) ≤ 0; the "
                            "log-polar coordinates of a RoAd vector need positive scales")
        return alpha.log()

    def __add__(self, other: "RoadTaskVector") -> "RoadTaskVector":
        if not isinstance(other, RoadTaskVector):
            check_same_space(self, other)
        return self.compose(other)

    def __mul__(self, weight: float) -> "RoadTaskVector":
        """Rotation by w·θ with scale α^w (road_1 only; α > 0 unless w = 1)."""

        weight = check_weight(weight)
        if self.variant != "road_1":
            raise RoadError(f"scaling a RoAd vector needs road_1 (got {self.variant}): only road_1 "
                            "blocks are rotations, whose angles and scales can be scaled")
        if weight == 1.0:
            return RoadTaskVector(self.variant, self.group_size, dict(self.theta), dict(self.alpha),
                                  dict(self.config))
        for layer, alpha in self.alpha.items():
            if (alpha <= 0).any():
                raise RoadError(f"tensor {layer}.road_alpha: {int((alpha <= 0).sum())} scale(s) ≤ 0, "
                                f"so α^{weight:g} is undefined; only weight 1 (plain composition) "
                                "works for this adapter")
        theta = {k: weight * v for k, v in self.theta.items()}
        alpha = {k: v.pow(weight) for k, v in self.alpha.items()}
        return RoadTaskVector(self.variant, self.group_size, theta, alpha, dict(self.config))

    __rmul__ = __mul__

    def __neg__(self) -> "RoadTaskVector":
        return self * -1.0

    def __sub__(self, other: "RoadTaskVector") -> "RoadTaskVector":
        return self + (-other)

    def dense_delta(self, layer: str, tensor: torch.Tensor) -> torch.Tensor:
        """(R − I)·W (or (R − I)·b) of one adapted layer, in float32."""
        return rotation_delta(self.variant, self.group_size, self.theta[layer], self.alpha[layer],
                              tensor)

    def to_dense(self, base_folder: Path):
        """The dense task vector in weight space: (R − I)·W for every adapted weight and (R − I)·b
        for its bias, read from the base's safetensors (a `merge.task_vectors.DenseTaskVector`)."""
        from safetensors import safe_open


        layout = model_layout(Path(base_folder))
        deltas = {}
        for layer in sorted(self.theta):
            module = weight_name(layer)
            for suffix in (".weight", ".bias"):
                name = module + suffix
                if name not in layout:
                    if suffix == ".weight":
                        raise RoadError(f"tensor {name}: adapted by the RoAd adapter but not in "
                                        f"the base {base_folder}")
                    continue
                with safe_open(layout[name][0], framework="pt") as f:
                    deltas[name] = self.dense_delta(layer, f.get_tensor(name))
        return DenseTaskVector(deltas)

    def save(self, folder: Path, base_ref: str | None = None) -> None:
        """Write as a PEFT RoAd folder (loadable by `PeftModel.from_pretrained`)."""
        from safetensors.torch import save_file

        from workbench.io import atomic_folder

        config = dict(self.config)
        if base_ref is not None:
            config["base_model_name_or_path"] = base_ref
        tensors = {f"{k}.road_theta": v.contiguous() for k, v in self.theta.items()}
        tensors.update({f"{k}.road_alpha": v.contiguous() for k, v in self.alpha.items()})
        with atomic_folder(Path(folder)) as tmp:
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
            save_file(tensors, tmp / "adapter_model.safetensors")


class RoadDelta:
    """τ = (R − I)·W for every weight a RoAd adapter rotates and (R − I)·b for its bias; None
    elsewhere. `source` is an adapter folder or a `RoadTaskVector` (e.g. a composition)."""

    fresh = True  # each call returns a new tensor (see merge.streaming._merged_tensor)

    def __init__(self, source, base_layout: dict, stack: ExitStack | None = None):
        self.vector = source if isinstance(source, RoadTaskVector) else \
            RoadTaskVector.from_peft_folder(Path(source))
        where = source if not isinstance(source, RoadTaskVector) else "the RoAd vector"
        self.layers: dict[str, str] = {}  # base tensor name → adapter layer key
        for layer in self.vector.theta:
            for part, values in (("road_theta", self.vector.theta[layer]),
                                 ("road_alpha", self.vector.alpha.get(layer))):
                if values is None:
                    raise ValueError(f"{where}: {layer} has road_theta but no road_alpha")
                if not all_finite(values):
                    raise ValueError(f"tensor {layer}.{part} in {where} holds NaN or inf")
            name = weight_name(layer) + ".weight"
            if name not in base_layout:
                raise ValueError(f"tensor {name}: rotated by {where} but not in the base model")
            self.layers[name] = layer
            if weight_name(layer) + ".bias" in base_layout:
                self.layers[weight_name(layer) + ".bias"] = layer
        self._base = ShardReader(base_layout)
        if stack is not None:
            stack.callback(self._base.close)

    def __call__(self, name: str) -> torch.Tensor | None:
        layer = self.layers.get(name)
        if layer is None:
            return None
        return self.vector.dense_delta(layer, self._base(name))


METHOD = RoadMethod()
