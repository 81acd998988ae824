"""The `workbench` command line end to end on the tiny embedded base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_demo_quick_reports_gain_and_forgetting(workspace, capsys):
    assert main(["demo", "--quick", "-w", str(workspace.root)]) == 0
    out = capsys.readouterr().out
    assert "Domain gain:" in out and "General forgetting:" in out
    run = [r for r in workspace.runs() if r.info["kind"] == "train"][-1]
    summary = json.loads(run.path("summary.json").read_text())
    assert summary["domain_gain_pct"] > 5.0, "the domain adapter must lower domain perplexity"
    assert summary["adapted"]["domain_ppl"] < summary["base"]["domain_ppl"]
    assert run.info["status"] == "done" and run.info["parents"]
    evals = [m for m in run.metrics() if "eval/domain_ppl" in m]
    assert [m["step"] for m in evals] == [0, 5, 20], "base and early checkpoints are evaluated"

    assert main(["runs", "-w", str(workspace.root)]) == 0
    listing = capsys.readouterr().out
    assert run.id in listing and "gain" in listing
    assert main(["show", run.id[:-3], "-w", str(workspace.root)]) == 0
    shown = capsys.readouterr().out
    assert "kind: train" in shown and "adapter" in shown

    assert main(["eval", f"run:{run.id}", "--max-questions", "4", "--max-tokens", "1024",
                 "-w", str(workspace.root)]) == 0
    assert "Domain gain:" in capsys.readouterr().out


def test_bad_recipe_exits_2_with_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: train\ntrain:\n  max_stpes: 3\n")
    assert main(["run", str(bad), "-w", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: train.max_stpes: unknown key 'max_stpes'; did you mean 'max_steps'?" in err
    assert not (tmp_path / "ws" / "runs").exists(), "a bad recipe creates no run"


def test_missing_model_and_too_long_sequences_are_clear(workspace, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("kind: train\nmodel: {path: /no/such/model}\n")
    assert main(["run", str(recipe), "-w", str(workspace.root)]) == 1
    assert "model '/no/such/model' not found" in capsys.readouterr().err
    recipe.write_text("kind: train\ndata: {seq_len: 4096, world_size: tiny}\neval: null\n")
    assert main(["run", str(recipe), "-w", str(workspace.root)]) == 1
    assert "data.seq_len=4096 is above the model's limit (max_position_embeddings=512" in \
        capsys.readouterr().err
    failed = [r for r in workspace.runs() if r.info["kind"] == "train"][-1]
    assert failed.info["status"] == "failed" and "seq_len" in failed.info["error"]


@pytest.mark.slow
def test_pipeline_chains_stages_by_name(workspace, capsys):
    args = ["run", str(EXAMPLES / "pipeline-cpt-then-eval.yaml"), "-w", str(workspace.root),
            "--set", "stages.0.train.max_steps=3", "--set", "stages.0.data.world_size=tiny",
            "--set", "stages.0.data.seq_len=64", "--set", "stages.1.eval.max_questions=2",
            "--set", "stages.1.eval.max_tokens=512", "--set", "stages.1.seq_len=64"]
    assert main(args) == 0
    runs = {r.info["kind"]: r for r in workspace.runs()}
    trained, evaluated = runs["train"], runs["eval"]
    assert evaluated.info["parents"] == [trained.id]
    assert runs["pipeline"].info["outputs"]["stages"] == {"domain-lora": trained.id,
                                                          "evaluate": evaluated.id}
    assert "domain_gain_pct" in json.loads(evaluated.path("summary.json").read_text())
