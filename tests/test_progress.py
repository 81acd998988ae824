"""Progress events: every stage appends {phase, step, total, unit, time} lines to the run's
progress.jsonl (training, evaluation, merging, quantizing, exporting); the job queue reads its
phase, step / total and time left from them."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from helpers import tiny_train_recipe
from workbench import progress
from workbench.jobs import JobQueue, loss_curve
from workbench.recipes import recipe_to_yaml
from workbench.stages import run_recipe
from workbench.io import read_jsonl


def _passes(events: list[dict], phase: str) -> list[list[dict]]:
    """The passes of one phase: runs of its events whose steps never go back."""
    passes: list[list[dict]] = []
    previous = None
    for event in events:
        if event["phase"] != phase:
            previous = None
            continue
        if previous is None or event["step"] < previous["step"] or event["total"] != previous["total"]:
            passes.append([])
        passes[-1].append(event)
        previous = event
    return passes


def _check_passes(events: list[dict], phase: str, unit: str) -> list[list[dict]]:
    """Every pass of `phase` counts `unit`s up to its total, in time order."""
    passes = _passes(events, phase)
    assert passes, f"no {phase!r} events in {events}"
    for found in passes:
        steps = [e["step"] for e in found]
        assert steps == sorted(steps) and steps[-1] == found[-1]["total"] > 0, found
        assert {e["unit"] for e in found} == {unit}
        assert [e["time"] for e in found] == sorted(e["time"] for e in found)
    return passes


def test_events_are_throttled_read_back_and_give_the_time_left(tmp_path, monkeypatch):
    assert progress.phase("nowhere", 3).enabled is False, "outside a run nothing is written"
    with progress.recording(tmp_path):
        with progress.phase("testing", 1000, "item") as events:
            for i in range(1, 1001):
                events.update(i, loss=1.0 / i)
    written = read_jsonl(tmp_path / progress.PROGRESS_FILE)
    assert written[0]["step"] == 0 and written[-1]["step"] == 1000 == written[-1]["total"]
    assert len(written) < 10, "a fast loop writes its first and last event, and a few per second"
    assert set(written[-1]) == {"phase", "step", "total", "unit", "loss", "time"}

    # a torn last line (a writer killed mid-line) is skipped by the reader, cut by the next writer
    path = tmp_path / progress.PROGRESS_FILE
    with open(path, "a") as f:
        f.write('{"phase": "test')
    assert progress.read_events(tmp_path) == written
    progress._checked.discard(path)
    progress.phase("again", 2, folder=tmp_path).update(2)
    assert [e["phase"] for e in read_jsonl(path)][-2:] == ["again", "again"]

    now = 1000.0
    events = [{"phase": "training", "step": s, "total": 100, "unit": "step", "time": now + s}
              for s in (0, 10, 20)]
    assert progress.eta_seconds(events, now=now + 20) == 80.0, "10 steps took 10 s: 80 left"
    assert progress.eta_seconds(events, now=now + 50) == 50.0
    assert progress.eta_seconds(events[:1], now=now) is None, "no rate yet"
    restarted = events + [{"phase": "training", "step": 5, "total": 100, "unit": "step", "time": now + 30}]
    assert progress.current_pass(restarted) == restarted[-1:], "a pass that starts again"
    assert progress.state(events, now=now + 20) == {"phase": "training", "step": 20, "total": 100,
                                                    "unit": "step", "eta_s": 80.0}
    assert progress.state([])["step"] == 0


def test_train_merge_quantize_and_eval_runs_write_progress_events(workspace):
    """Each stage's run folder gets its events: training steps with their loss, tensors merged,
    layers (RTN) and blocks (FlexRound) quantized, batches evaluated."""
    from test_quant_export import tiny_quantize_recipe

    from workbench.io import model_layout
    from workbench.recipes import EvalRecipe, EvalSpec, MergeRecipe, ModelSpec

    train = run_recipe(tiny_train_recipe(), workspace)
    events = progress.read_events(train.folder)
    (passed,) = _check_passes(events, "training", "step")
    assert passed[-1]["step"] == 6 and passed[-1]["loss"] == loss_curve(train)[-1]["loss"]
    assert all("loss" in e for e in passed[1:])

    merge = run_recipe(MergeRecipe.model_validate(
        {"kind": "merge", "name": "m", "inputs": [{"path": f"run:{train.id}", "weight": 0.5}]}), workspace)
    events = progress.read_events(merge.folder)
    (passed,) = _check_passes(events, "merging tensors", "tensor")
    assert passed[-1]["total"] == len(model_layout(merge.path("model"))), "every tensor written"

    quantize = run_recipe(tiny_quantize_recipe(model={"path": f"run:{merge.id}"}, eval=None,
                                               nf4_baseline=False, export=["dequantized"]), workspace)
    events = progress.read_events(quantize.folder)
    (layers,) = _check_passes(events, "quantizing layers", "layer")
    assert layers[-1]["total"] == 3 * 7
    (blocks,) = _check_passes(events, "quantizing blocks", "block")
    assert blocks[-1]["total"] == 3
    assert events.index(layers[-1]) < events.index(blocks[0]), "RTN first, then FlexRound"

    evaluation = run_recipe(EvalRecipe(name="e", model=ModelSpec(path=f"run:{train.id}"), seq_len=64,
                                       eval=EvalSpec(max_tokens=512, max_questions=4)), workspace)
    events = progress.read_events(evaluation.folder)
    passes = _check_passes(events, "evaluating", "batch")
    assert len(passes) == 2, "the adapted model, then its base (adapter off)"
    assert {e["phase"] for e in events} == {"evaluating"}


def test_job_view_reports_phase_and_step_of_total_from_the_events(workspace, monkeypatch):
    monkeypatch.setenv("WORKBENCH_WORKER_NICE", "0")
    queue = JobQueue(workspace)
    job = queue.submit(recipe_to_yaml(tiny_train_recipe(name="watched")), source="test")
    done = queue.wait(job["id"], timeout=180)
    assert done["status"] == "done", done.get("error")
    view = queue.view(job["id"])
    run = workspace.get(view["run"])
    last = progress.read_events(run.folder)[-1]
    assert (view["phase"], view["step"], view["total"], view["unit"]) == ("training", 6, 6, "step")
    assert (last["step"], last["total"]) == (6, 6)
    assert view["eta_s"] is None, "no time left to tell for a finished job"
    assert [p["step"] for p in view["loss"]] == [1, 2, 3, 4, 5, 6]
    # the run log's wording plays no part: the events alone tell the progress
    run.path("run.log").write_text("nothing to parse here\n")
    assert queue.view(job["id"])["total"] == 6


def _random_lora(base_folder, folder, seed: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    model.peft_config["default"].base_model_name_or_path = str(base_folder)
    model.save_pretrained(folder)
    return folder


def test_workbench_export_of_a_lora_run_to_model_and_adapter(workspace, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.cli import main
    from workbench.workspace import headline

    ws = workspace
    base_run = next(r for r in ws.runs() if r.info["kind"] == "pretrain")
    base_folder = base_run.path("model")
    trained = ws.create_run("train", "random-lora", "kind: train\n", 0, parents=[base_run.id])
    _random_lora(base_folder, trained.path("adapter"), seed=5)
    trained.finish({}, outputs={"adapter": "adapter", "base": f"run:{base_run.id}"})
    common = ["--workspace", str(ws.root)]

    assert main(["export", f"run:{trained.id}", "--format", "model", "--name", "merged",
                 "--max-shard-mb", "1", *common]) == 0
    folder = ws.root / "exports" / "merged"
    stock = AutoModelForCausalLM.from_pretrained(folder)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder),
                                          trained.path("adapter")).merge_and_unload()
    ids = AutoTokenizer.from_pretrained(folder)(["The river runs"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(stock(input_ids=ids).logits, reference(input_ids=ids).logits,
                              atol=1e-5, rtol=0), "base + s·B·A, as PEFT merges it"
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1

    # the export is a run: its record, its log, its progress events, the folder in its outputs
    (run,) = [r for r in ws.runs() if r.info["kind"] == "export"]
    info = run.info
    assert info["status"] == "done" and info["name"] == "merged" and info["parents"] == [trained.id]
    assert info["outputs"] == {"export": "exports/merged"}
    assert yaml.safe_load(run.path("recipe.yaml").read_text()) == {
        "kind": "export", "name": "merged", "source": f"run:{trained.id}", "format": "model",
        "max_shard_mb": 1}
    assert info["summary"]["files"] == sorted(p.name for p in folder.iterdir())
    assert headline(info) == "model → exports/merged", "what `workbench runs` says of it"
    manifest = json.loads((folder / "export.json").read_text())
    assert manifest["source_run"] == trained.id and manifest["kind"] == "model" and manifest["run"] == run.id
    assert "exporting model" in run.path("run.log").read_text()
    _check_passes(progress.read_events(run.folder), "merging tensors", "tensor")

    assert main(["export", trained.id, "--format", "adapter", "--name", "lora", *common]) == 0
    adapter = ws.root / "exports" / "lora"
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        assert (adapter / file).read_bytes() == trained.path("adapter", file).read_bytes()
    (run,) = [r for r in ws.runs() if r.info["kind"] == "export" and r.info["name"] == "lora"]
    (files,) = _check_passes(progress.read_events(run.folder), "exporting", "file")
    assert files[-1]["total"] == len(list(trained.path("adapter").iterdir()))

    # an existing name is refused before anything is made; so is a format the run does not offer
    capsys.readouterr()
    runs = len(ws.runs())
    before = sorted(p.name for p in adapter.iterdir())
    assert main(["export", trained.id, "--format", "adapter", "--name", "lora", *common]) == 1
    assert "exports/lora already exists" in capsys.readouterr().err
    assert main(["export", trained.id, "--format", "dequantized", "--name", "deq", *common]) == 1
    assert "offers model, adapter, not 'dequantized'" in capsys.readouterr().err
    assert len(ws.runs()) == runs and sorted(p.name for p in adapter.iterdir()) == before
    assert sorted(p.name for p in (ws.root / "exports").iterdir()) == ["lora", "merged"]
    with pytest.raises(SystemExit):
        main(["export", trained.id, "--format", "gguf", "--name", "g", *common])


def test_eta_while_a_job_runs(workspace, monkeypatch):
    """A long training job reports its phase, a total and, once it has a rate, the time left."""
    monkeypatch.setenv("WORKBENCH_WORKER_NICE", "0")
    queue = JobQueue(workspace)
    job = queue.submit(recipe_to_yaml(tiny_train_recipe(name="long", train__max_steps=100_000,
                                                        train__checkpoint_every=0)), source="test")
    try:
        deadline = time.monotonic() + 120
        while True:
            queue.tick()
            view = queue.view(job["id"])
            if view.get("eta_s"):
                break
            assert time.monotonic() < deadline, view["log_tail"]
            time.sleep(0.5)
        assert view["phase"] == "training" and view["total"] == 100_000 and 0 < view["step"] < 100_000
        assert view["eta_s"] > 0
    finally:
        queue.cancel(job["id"])
        queue.wait(job["id"], timeout=60)
