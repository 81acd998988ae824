"""A new adapter method is one object registered with `workbench.methods`: defined entirely in this
file, it trains through `kind: train` and merges through `kind: merge` with no other file touched.

The toy method ("delta"): for each adapted linear layer, a dense trainable update D added to the
frozen weight, W' = W + D (D = 0 at start). It saves D per weight in `delta.safetensors` beside a
`delta_config.json`, and its task vector lives in weight space: the delta itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import folder_tensors, tiny_train_recipe
from workbench import methods
from workbench.recipes import parse_recipe
from workbench.sections import Strict
from workbench.stages import run_recipe

CONFIG, WEIGHTS = "delta_config.json", "delta.safetensors"


class DeltaSpec(Strict):
    method: Literal["delta"] = "delta"
    target: str = "q_proj"


class DeltaLinear(torch.nn.Module):
    """y = x (W + D)ᵀ + b with W and b frozen."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear
        self.delta = torch.nn.Parameter(torch.zeros_like(linear.weight))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.linear.weight + self.delta, self.linear.bias)


def _wrapped(model) -> dict[str, DeltaLinear]:
    return {name.removesuffix(".linear") if name.endswith(".linear") else name: m
            for name, m in model.named_modules() if isinstance(m, DeltaLinear)}


class DeltaMethod:
    name = "delta"
    spec = DeltaSpec
    label = "dense delta adapter"
    config_files = (CONFIG,)

    def detect(self, folder: Path) -> bool:
        return (Path(folder) / CONFIG).is_file()

    def attach(self, model, spec, task="causal-lm", gradient_checkpointing=False, locate=None):
        for p in model.parameters():
            p.requires_grad_(False)
        targets = [(n, m) for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.endswith(spec.target)]
        for name, linear in targets:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], DeltaLinear(linear))
        return model

    def trainable_parameters(self, model):
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def save(self, model, tokenizer, folder, base_ref):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        deltas = {f"{name}.weight": m.delta.detach().cpu().contiguous() for name, m in _wrapped(model).items()}
        save_file(deltas, str(folder / WEIGHTS))
        (folder / CONFIG).write_text(json.dumps({"base_model_name_or_path": base_ref}))
        tokenizer.save_pretrained(folder)

    def load(self, model, folder, trainable=False):
        deltas = load_file(Path(folder) / WEIGHTS)
        model = self.attach(model, DeltaSpec(target=next(iter(deltas)).split(".")[-2]))
        for name, module in _wrapped(model).items():
            module.delta.data.copy_(deltas[f"{name}.weight"])
        return model

    def task_vector(self, folder, base_folder=None):
        return load_file(Path(folder) / WEIGHTS)

    def delta_reader(self, folder, layout, stack):
        deltas = load_file(Path(folder) / WEIGHTS)
        return lambda name, rows=None: deltas[name].float().clone() if name in deltas else None


@pytest.fixture
def delta_method():
    methods.register(DeltaMethod())
    yield
    methods.unregister("delta")


def test_a_method_defined_here_trains_and_merges(workspace, delta_method):
    recipe = tiny_train_recipe(name="toy")
    data = recipe.model_dump()
    data["adapter"] = {"method": "delta", "target": "v_proj"}
    trained = run_recipe(parse_recipe(data), workspace)
    assert trained.status == "done"
    deltas = load_file(trained.path("adapter") / WEIGHTS)
    assert deltas and all(name.endswith("v_proj.weight") for name in deltas)
    assert all(t.abs().sum() > 0 for t in deltas.values()), "training moved every delta"
    assert methods.method_of_folder(trained.path("adapter")).name == "delta"

    merge = parse_recipe({"kind": "merge", "name": "toy-merge", "method": "task_arithmetic",
                          "inputs": [{"path": f"run:{trained.id}", "weight": 0.5}]})
    merged = run_recipe(merge, workspace)
    assert merged.status == "done"
    base = folder_tensors(workspace.get(trained.info["parents"][0]).path("model"))
    model = folder_tensors(merged.path("model"))
    for name, tensor in base.items():
        expected = tensor + 0.5 * deltas[name] if name in deltas else tensor
        torch.testing.assert_close(model[name], expected, atol=1e-6, rtol=0)


def test_unregistered_methods_are_refused_with_the_known_ones():
    with pytest.raises(Exception, match="delta"):
        parse_recipe({"kind": "train", "adapter": {"method": "delta"}})
    with pytest.raises(methods.UnknownMethod, match="known: .*lora"):
        methods.get_method("delta")
