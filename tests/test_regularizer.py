"""The hierarchical importance regularizer: ω = −Σ g·Δθ by hand, c = softmax of layer norms, less
general forgetting with φ > 0 than with φ = 0, Ω reused across runs, foreign Ω refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from adapters.regularizer import (IMPORTANCE_FILE, ImportanceError, ImportanceRecorder,
                                  layer_coefficients, make_penalty)
from helpers import tiny_train_recipe
from workbench.evaluate import text_metrics
from workbench.data import read_texts
from workbench.models import load_model
from workbench.recipes import ModelSpec
from workbench.stages import run_train


def test_path_integral_and_layer_coefficients_by_hand():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    recorder = ImportanceRecorder({"model.layers.0.w": w})
    updates = [torch.tensor([0.1, 0.0, -0.2]), torch.tensor([0.3, 0.1, 0.0])]
    grads = [torch.tensor([-1.0, 2.0, 1.0]), torch.tensor([-0.5, -1.0, 3.0])]
    for g, step in zip(grads, updates):
        w.grad = g
        recorder.before_update()
        with torch.no_grad():
            w.add_(step)
        recorder.after_update()
    omega = -(grads[0] * updates[0] + grads[1] * updates[1])  # [0.25, 0.1, 0.2]
    total = updates[0] + updates[1]
    expected = omega.clamp_min(0) / (total ** 2 + 1e-3)
    assert torch.allclose(recorder.importance(1e-3)["model.layers.0.w"], expected)

    importance = {"m.layers.0.a": torch.tensor([3.0, 4.0]), "m.layers.1.a": torch.tensor([1.0]),
                  "m.embed.weight": torch.tensor([0.0, 2.0])}
    c = layer_coefficients(importance)
    norms = torch.tensor([2.0, 5.0, 1.0], dtype=torch.float64)  # m.embed, layer.0, layer.1
    assert list(c) == ["layer.0", "layer.1", "m.embed"]
    soft = torch.softmax(norms, 0)
    assert c["m.embed"] == pytest.approx(float(soft[0])) and c["layer.0"] == pytest.approx(float(soft[1]))
    p = {n: torch.nn.Parameter(torch.zeros_like(t)) for n, t in importance.items()}
    penalty = make_penalty(importance, p, phi=2.0)
    with torch.no_grad():
        p["m.layers.0.a"].copy_(torch.tensor([1.0, -1.0]))
        p["m.embed.weight"].copy_(torch.tensor([0.0, 3.0]))
    by_hand = 2.0 * (c["layer.0"] * (3.0 + 4.0) + c["m.embed"] * 2.0 * 9.0)
    assert float(penalty()) == pytest.approx(by_hand, rel=1e-6)


def _general_loss(workspace, run) -> float:
    model, tokenizer, _ = load_model(ModelSpec(path=f"run:{run.id}"), workspace)
    texts = read_texts("world:general_eval", 0, "tiny")
    return text_metrics(model, tokenizer, texts, 64, 2048, 16)["nll"]


def _domain_run(workspace, phi, name, **regularizer):
    return run_train(tiny_train_recipe(
        name=name, adapter={"method": "full"}, data__replay_ratio=0.0, train__lr=3e-3,
        train__max_steps=8, train__checkpoint_every=0,
        train__regularizer={"phi": phi, "steps": 8, **regularizer}), workspace)


@pytest.mark.slow
def test_penalty_reduces_general_forgetting_and_importance_is_reused(workspace):
    free = _domain_run(workspace, 0.0, "free")
    held = _domain_run(workspace, 1000.0, "held")
    assert not free.path(IMPORTANCE_FILE).exists() and held.path(IMPORTANCE_FILE).exists()
    assert _general_loss(workspace, held) < _general_loss(workspace, free)
    omega = load_file(held.path(IMPORTANCE_FILE))
    assert "model.layers.0.self_attn.q_proj.weight" in omega and all(t.min() >= 0 for t in omega.values())

    reused = _domain_run(workspace, 1000.0, "reused", importance=f"run:{held.id}")
    assert not reused.path(IMPORTANCE_FILE).exists()
    a = load_model(ModelSpec(path=f"run:{held.id}"), workspace)[0].state_dict()
    b = load_model(ModelSpec(path=f"run:{reused.id}"), workspace)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "the same Ω, seed and data give the same model"

    with pytest.raises(ImportanceError, match="parameters differ"):  # recorded for full FT, not LoRA
        run_train(tiny_train_recipe(name="lora", train__max_steps=2, train__checkpoint_every=0,
                                    train__regularizer={"importance": f"run:{held.id}"}), workspace)


def test_importance_from_another_model_is_refused(tmp_path):
    from adapters.regularizer import load_importance, save_importance

    p = {"w": torch.nn.Parameter(torch.zeros(2))}
    save_importance({"w": torch.ones(2)}, tmp_path / IMPORTANCE_FILE, "aaaa", 1, 1e-3, 0.1)
    assert torch.equal(load_importance(tmp_path / IMPORTANCE_FILE, p, "aaaa")["w"], torch.ones(2))
    with pytest.raises(ImportanceError, match="recorded on another model"):
        load_importance(tmp_path / IMPORTANCE_FILE, p, "bbbb")
    with pytest.raises(ImportanceError, match="shape"):
        load_importance(tmp_path / IMPORTANCE_FILE, {"w": torch.nn.Parameter(torch.zeros(3))}, "aaaa")
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ImportanceError, match="not a readable"):
        load_importance(tmp_path / "bad.safetensors", p, "aaaa")
