"""Merge search: the Pareto front and the choice rules against hand-computed examples, a sweep on
tiny models with a fabricated metric function (front, files, PNG, chosen merge as the output), and
the real in-memory evaluation against the written model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import workbench.stages as stages
from helpers import add_noise, tiny_train_recipe
from merge.search import choose_point, pareto_front
from workbench.evaluate import evaluate_model
from workbench.models import build_model_from_config, load_model
from workbench.recipes import EvalSpec, MergeInput, MergeRecipe, ModelSpec
from workbench.stages import run_merge, run_train
from workbench.workspace import Workspace

VOCAB = 64
PROBE = "model.layers.0.mlp.down_proj.weight"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_pareto_front_by_hand():
    #            gain  forgetting
    points = [(0.0, 0.0),    # 0: dominated by 1 (more gain, same forgetting)
              (10.0, 0.0),   # 1: front
              (20.0, 10.0),  # 2: front
              (15.0, 4.0),   # 3: front
              (30.0, 30.0),  # 4: front
              (5.0, 2.0),    # 5: dominated by 1
              (15.0, 4.0),   # 6: equal to 3: both stay
              (15.0, 12.0),  # 7: dominated by 2
              (math.nan, 0.0)]  # 8: never on the front
    assert pareto_front(points) == [1, 2, 3, 4, 6]


def test_choice_rules_by_hand():
    points = [(0.0, 0.0), (10.0, 0.0), (20.0, 10.0), (15.0, 4.0), (30.0, 30.0)]
    assert choose_point(points, "max_gain", 12.0)[0] == 2
    assert choose_point(points, "max_gain", 5.0)[0] == 3
    assert choose_point(points, "max_gain", 100.0)[0] == 4
    index, reason = choose_point([(5.0, 8.0), (9.0, 7.0), (12.0, 9.0)], "max_gain", 5.0)
    assert index == 1 and "least forgetting" in reason
    # knee: the front rescaled to [0, 1] on both axes is (0, 0), (0.1, 0.8), (0.5, 0.9), (1, 1)
    # (forgetting, gain); the farthest from the line y = x is (0.1, 0.8).
    knee = [(0.0, 0.0), (8.0, 1.0), (9.0, 5.0), (10.0, 10.0)]
    assert choose_point(knee, "knee", 0.0)[0] == 1
    assert "fewer than three" in choose_point(points[:2], "knee", 5.0)[1]


# ----------------------------------------------------------------------------------------------
# A sweep on tiny models with a fabricated metric function


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A base and two fine-tuned full models (θ_i = θ_base + τ_i), as folders."""
    root = tmp_path_factory.mktemp("search")
    base = build_model_from_config("llama-tiny", vocab_size=VOCAB)
    base.save_pretrained(root / "base", safe_serialization=True)
    for seed in (1, 2):
        model = add_noise(build_model_from_config("llama-tiny", vocab_size=VOCAB), seed, 0.05)
        model.save_pretrained(root / f"ft{seed}", safe_serialization=True)
    return root


# The fabricated validation metrics of each point (w_1, w_2): gain 0, 10, 20, 15, 30 and 5 %,
# forgetting 0, 0, 10, 4, 30 and 2 % against the base's (domain ppl 10, general ppl 5).
TABLE = {(0.0, 0.0): (10.0, 5.0), (0.5, 0.0): (9.0, 5.0), (1.0, 0.0): (8.0, 5.5),
         (1.0, 0.5): (8.5, 5.2), (1.5, 0.0): (7.0, 6.5), (0.5, 0.5): (9.5, 5.1)}
FRONT = [1, 2, 3, 4]  # by hand, as in test_pareto_front_by_hand


def _fabricated_scorer(root: Path, seen: list):
    """score(tensors): recover (w_1, w_2) from the merged tensor PROBE by least squares against
    τ_1 and τ_2, then look the point's metrics up in TABLE."""
    base = load_file(root / "base" / "model.safetensors")[PROBE].double()
    taus = [load_file(root / f"ft{s}" / "model.safetensors")[PROBE].double() - base for s in (1, 2)]
    gram = torch.tensor([[float((a * b).sum()) for b in taus] for a in taus], dtype=torch.float64)

    def score(tensors) -> dict:
        state = dict(tensors)
        delta = state[PROBE].double() - base
        rhs = torch.tensor([float((t * delta).sum()) for t in taus], dtype=torch.float64)
        weights = tuple(round(float(w), 3) for w in torch.linalg.solve(gram, rhs))
        seen.append(weights)
        domain_ppl, general_ppl = TABLE[weights]
        return {"domain_ppl": domain_ppl, "general_ppl": general_ppl, "acc_general_qa_eval": 0.5}

    return score, {"domain_ppl": 10.0, "general_ppl": 5.0, "acc_general_qa_eval": 0.25}


def test_sweep_keeps_the_hand_computed_front_and_writes_the_chosen_merge(tiny_models, tmp_path,
                                                                         monkeypatch):
    root, workspace = tiny_models, Workspace(tmp_path / "ws")
    seen: list = []
    monkeypatch.setattr(stages, "_validation_scorer", lambda *args: _fabricated_scorer(root, seen))
    rows = [list(w) for w in TABLE]
    recipe = MergeRecipe(base=ModelSpec(path=str(root / "base")),
                         inputs=[MergeInput(path=str(root / "ft1")), MergeInput(path=str(root / "ft2"))],
                         search={"weights": rows, "max_forgetting_pct": 12.0})
    run = run_merge(recipe, workspace)

    assert seen == [tuple(r) for r in rows]  # every point merged and scored, in order
    result = json.loads(run.path("search.json").read_text())
    assert result["front"] == FRONT
    assert [p["on_front"] for p in result["points"]] == [i in FRONT for i in range(len(rows))]
    assert [round(p["domain_gain_pct"], 6) for p in result["points"]] == [0, 10, 20, 15, 30, 5]
    assert [round(p["general_forgetting_pct"], 6) for p in result["points"]] == [0, 0, 10, 4, 30, 2]
    assert result["chosen"] == 2 and result["rule"] == "max_gain"  # largest gain with forgetting ≤ 12%

    table = run.path("search.md").read_text()
    assert table.count("| yes |") == len(FRONT) and "| w=[1, 0] |" in table
    png = run.path("pareto.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    from PIL import Image

    with Image.open(run.path("pareto.png")) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100

    merged = load_file(run.path("model", "model.safetensors"))  # the chosen point: 1·τ_1 + 0·τ_2
    ft1 = load_file(root / "ft1" / "model.safetensors")
    for name, value in ft1.items():
        torch.testing.assert_close(merged[name], value, atol=1e-6, rtol=0, msg=name)
    summary = run.info["summary"]
    assert summary["search"]["chosen"] == "w=[1, 0]" and summary["inputs"][0][1] == 1.0
    assert summary["search"]["front"] == ["w=[0.5, 0]", "w=[1, 0]", "w=[1, 0.5]", "w=[1.5, 0]"]


def test_search_recipe_is_validated():
    inputs = [MergeInput(path="a"), MergeInput(path="b")]
    with pytest.raises(ValueError, match="give either weights .* or parameter and values"):
        MergeRecipe(inputs=inputs, search={})
    with pytest.raises(ValueError, match="search.weights.1: 1 weights for 2 inputs"):
        MergeRecipe(inputs=inputs, search={"weights": [[1, 1], [1]]})
    with pytest.raises(ValueError, match="ties has no numeric parameter 'sign_vote'"):
        MergeRecipe(inputs=inputs, method="ties", search={"parameter": "sign_vote", "values": [1]})
    with pytest.raises(ValueError, match="dare: p .* must be in"):
        MergeRecipe(inputs=inputs, method="dare", search={"parameter": "p", "values": [0.5, 1.0]})
    with pytest.raises(ValueError, match="instruction_vector has no input weights"):
        MergeRecipe(method="instruction_vector", search={"weights": [[1, 1]]},
                    inputs=[MergeInput(path="a", role="domain"), MergeInput(path="b", role="instruct")])


# ----------------------------------------------------------------------------------------------
# The real evaluation: in memory, equal to evaluating the written model


@pytest.mark.slow
def test_in_memory_evaluation_equals_the_written_model(workspace):
    domain = run_train(tiny_train_recipe(name="domain", train__checkpoint_every=0), workspace)
    instruct = run_train(tiny_train_recipe(
        name="instruct", adapter={"method": "full"}, data__train="world:instruct_train",
        data__format="instruct", train__lr=1e-3, train__checkpoint_every=0), workspace)
    validation = EvalSpec(max_tokens=512, max_questions=2, questions=["world:general_qa_eval"])
    recipe = MergeRecipe(method="instruction_vector", world={"size": "tiny"}, seq_len=64,
                         inputs=[MergeInput(path=f"run:{domain.id}", role="domain"),
                                 MergeInput(path=f"run:{instruct.id}", role="instruct")],
                         search={"parameter": "alpha", "values": [0.0, 0.5, 1.0], "choose": "knee",
                                 "validation": validation})
    run = run_merge(recipe, workspace)
    result = json.loads(run.path("search.json").read_text())
    assert [p["parameters"]["alpha"] for p in result["points"]] == [0.0, 0.5, 1.0]
    chosen = result["points"][result["chosen"]]
    assert chosen["on_front"] and run.info["summary"]["parameters"] == chosen["parameters"]
    model, tokenizer, _ = load_model(ModelSpec(path=f"run:{run.id}"), workspace)
    written = evaluate_model(model, tokenizer, validation, 64, 0, "tiny")
    assert written == pytest.approx(chosen["metrics"], rel=1e-6)
    base_model, base_tokenizer, _ = load_model(ModelSpec(path="default"), workspace)
    assert result["reference"] == pytest.approx(
        evaluate_model(base_model, base_tokenizer, validation, 64, 0, "tiny"), rel=1e-6)
    # alpha = 0 leaves the domain model: its metrics are those of base + domain adapter
    domain_model, domain_tokenizer, _ = load_model(ModelSpec(path=f"run:{domain.id}"), workspace)
    assert result["points"][0]["metrics"] == pytest.approx(
        evaluate_model(domain_model, domain_tokenizer, validation, 64, 0, "tiny"), rel=1e-5)
