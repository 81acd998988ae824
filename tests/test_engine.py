"""The training loop: schedules, learning, checkpoint/resume, divergence, multi-process equality."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import tiny_train_recipe
from workbench import engine
from workbench.engine import TrainingDiverged, lr_at
from workbench.recipes import TrainSpec, recipe_to_yaml
from workbench.stages import run_train

ROOT = Path(__file__).resolve().parents[1]


def test_cosine_schedule_by_hand():
    spec = TrainSpec(lr=1.0, schedule="cosine", warmup_ratio=0.1, min_lr_ratio=0.1, max_steps=100)
    # 10 warmup steps: step 0 → 1/10, step 9 → 10/10
    assert lr_at(0, spec, 100) == pytest.approx(0.1)
    assert lr_at(9, spec, 100) == pytest.approx(1.0)
    # after warmup: 0.1 + 0.9 * 0.5 * (1 + cos(pi * p)), p = (step - 10) / 90
    assert lr_at(10, spec, 100) == pytest.approx(1.0)
    assert lr_at(55, spec, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, spec, 100) == pytest.approx(0.1)


def test_wsd_and_constant_schedules_by_hand():
    wsd = TrainSpec(lr=0.2, schedule="wsd", warmup_ratio=0.1, decay_ratio=0.2, min_lr_ratio=0.0,
                    max_steps=10)
    # warmup 1 step, stable until step 8, then linear to 0 over the last 2 steps
    assert [lr_at(s, wsd, 10) for s in range(10)] == pytest.approx(
        [0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.1, 0.0])
    const = TrainSpec(lr=0.5, schedule="constant", warmup_ratio=0.2, max_steps=10)
    assert [lr_at(s, const, 10) for s in range(4)] == pytest.approx([0.25, 0.5, 0.5, 0.5])


@pytest.mark.slow
def test_lora_training_lowers_domain_loss(workspace):
    run = run_train(tiny_train_recipe(train__max_steps=25, train__checkpoint_every=0,
                                      data__replay_ratio=0.0), workspace)
    losses = [m["loss"] for m in run.metrics() if "loss" in m]
    assert len(losses) == 25
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.15
    assert run.info["status"] == "done"
    assert (run.path("adapter", "adapter_config.json")).is_file()
    rows = [m for m in run.metrics() if "loss" in m]
    assert {"step", "loss", "lr", "tokens_per_s", "elapsed"} <= set(rows[0])


@pytest.mark.slow
def test_same_recipe_and_seed_give_the_same_run(workspace):
    recipe = tiny_train_recipe(adapter__dropout=0.1)
    first = [m["loss"] for m in run_train(recipe, workspace).metrics()]
    second = [m["loss"] for m in run_train(recipe, workspace).metrics()]
    assert first == second


@pytest.mark.slow
def test_nan_loss_stops_names_the_step_and_keeps_the_last_checkpoint(workspace, monkeypatch):
    calls = {"n": 0}
    real = engine.token_loss_sum

    def poisoned(model, inputs, labels):
        calls["n"] += 1
        loss = real(model, inputs, labels)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(engine, "token_loss_sum", poisoned)
    with pytest.raises(TrainingDiverged, match=r"at step 5.*step-000003"):
        run_train(tiny_train_recipe(train__max_steps=8), workspace)
    run = [r for r in workspace.runs() if r.info["kind"] == "train"][-1]
    assert run.info["status"] == "failed"
    assert "step 5" in run.info["error"]
    assert (run.path("checkpoints", "step-000003", "trainable.safetensors")).is_file()
    assert not run.path("adapter").exists()


def _cli(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, **kwargs)


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}
    return env


def _losses(run_folder: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_curve(workspace, tmp_path):
    recipe = tiny_train_recipe(train__max_steps=40, train__checkpoint_every=5, adapter__dropout=0.1,
                               name="resume")
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_to_yaml(recipe))
    full = _cli("run", str(path), "-w", str(workspace.root), env=_env())
    assert full.returncode == 0, full.stderr
    reference = [r for r in workspace.runs() if r.info["name"] == "resume"][-1]

    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "run", str(path), "-w",
                             str(workspace.root)], env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    killed = None
    while time.time() < deadline and killed is None:
        runs = [r for r in workspace.runs() if r.info["name"] == "resume" and r.id != reference.id]
        if runs and list(runs[0].path("checkpoints").glob("step-000010")):
            proc.send_signal(signal.SIGKILL)
            killed = runs[0]
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed is not None, "the run never reached its second checkpoint"
    assert killed.status == "interrupted"
    assert not killed.path("adapter").exists()

    resumed = _cli("resume", killed.id, "-w", str(workspace.root), env=_env())
    assert resumed.returncode == 0, resumed.stderr
    assert killed.info["status"] == "done"
    assert _losses(killed.folder) == pytest.approx(_losses(reference.folder), rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_two_processes_match_one_process(workspace, tmp_path):
    recipe = tiny_train_recipe(train__max_steps=4, train__checkpoint_every=0, train__grad_accum=2,
                               name="ddp")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    single = _cli("run", str(path), "-w", str(workspace.root), env=_env())
    assert single.returncode == 0, single.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", "29533",
         "-m", "workbench.cli", "run", str(path), "-w", str(workspace.root)],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    runs = [r for r in workspace.runs() if r.info["name"] == "ddp"]
    assert len(runs) == 2, "2 processes must share one run folder"
    one_proc, two_proc = (_losses(r.folder) for r in runs)
    assert len(two_proc) == 4
    # same global batch, loss normalised by the global token count: equal up to float reordering
    assert two_proc == pytest.approx(one_proc, rel=1e-4)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_losses(workspace):
    plain = run_train(tiny_train_recipe(train__max_steps=3, train__checkpoint_every=0), workspace)
    ckpt = run_train(tiny_train_recipe(train__max_steps=3, train__checkpoint_every=0,
                                       train__gradient_checkpointing=True), workspace)
    assert [m["loss"] for m in ckpt.metrics()] == pytest.approx(
        [m["loss"] for m in plain.metrics()], rel=1e-5)


@pytest.mark.slow
def test_failed_run_resumes_without_evaluating_the_base_twice(workspace, monkeypatch):
    from workbench.recipes import EvalSpec
    from workbench.stages import resume_run

    real = engine.token_loss_sum
    calls = {"n": 0}

    def poisoned(model, inputs, labels):
        calls["n"] += 1
        return real(model, inputs, labels) * (float("inf") if calls["n"] == 5 else 1.0)

    monkeypatch.setattr(engine, "token_loss_sum", poisoned)
    recipe = tiny_train_recipe(train__max_steps=6, name="evaluated",
                               eval=EvalSpec(max_tokens=512, max_questions=2).model_dump())
    with pytest.raises(TrainingDiverged, match="loss is inf at step 5"):
        run_train(recipe, workspace)
    monkeypatch.setattr(engine, "token_loss_sum", real)
    run = resume_run([r for r in workspace.runs() if r.info["name"] == "evaluated"][0].id, workspace)
    assert run.info["status"] == "done" and run.path("report.json").is_file()
    steps = [m["step"] for m in run.metrics() if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert len([m for m in run.metrics() if m["step"] == 0]) == 1


@pytest.fixture
def interruptible():
    """SIGINT handled as Python's default handler does, however pytest was started: a process
    started in the background by a shell without job control inherits SIGINT as ignored, and the
    engine rightly restores whatever handler it found."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
def test_stop_signal_finishes_the_step_saves_it_and_resume_loses_nothing(workspace, monkeypatch,
                                                                         interruptible):
    """SIGINT in the middle of step 3 (as Ctrl-C or the app's Stop send it): step 3 completes, a
    checkpoint of it is written although checkpoint_every is 0, the run is `stopped`, and resuming
    gives exactly the uninterrupted loss curve."""
    import os

    from workbench.engine import TrainingStopped
    from workbench.stages import resume_run

    reference = run_train(tiny_train_recipe(train__max_steps=6, train__checkpoint_every=0,
                                            name="stop-reference"), workspace)
    real = engine.token_loss_sum
    calls = {"n": 0}

    def interrupted(model, inputs, labels):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, inputs, labels)

    monkeypatch.setattr(engine, "token_loss_sum", interrupted)
    with pytest.raises(TrainingStopped, match="stopped after step 3"):
        run_train(tiny_train_recipe(train__max_steps=6, train__checkpoint_every=0, name="stopped"),
                  workspace)
    monkeypatch.setattr(engine, "token_loss_sum", real)
    run = [r for r in workspace.runs() if r.info["name"] == "stopped"][0]
    assert run.status == "stopped"
    assert [p.name for p in run.path("checkpoints").glob("step-*")] == ["step-000003"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    resume_run(run.id, workspace)
    assert _losses(run.folder) == pytest.approx(_losses(reference.folder), rel=1e-6, abs=1e-7)
