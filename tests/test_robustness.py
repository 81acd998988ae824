"""What a full disk, a power loss, a kill or damaged files leave behind, and how the workbench
copes: torn metrics lines, half-created runs, NaN / inf weights, user data errors by file line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from helpers import tiny_train_recipe
from workbench import engine
from workbench.base import DEFAULT_BASE_NAME
from workbench.cli import main
from workbench.data import DataError, read_examples, read_labelled, read_texts
from workbench.jobs import loss_curve
from workbench.models import ModelLoadError, load_model
from workbench.recipes import ModelSpec
from workbench.stages import run_train
from workbench.io import JsonlError
from workbench.workspace import Workspace

NO_SUCH_PID = 2**22 + 12345
TORN = '{"step": 5, "loss": 1.2'


class Killed(Exception):
    """Stands for the process being killed in the middle of a step."""


def _losses(run) -> list[float]:
    return [m["loss"] for m in run.metrics() if "loss" in m]


def _as_if_killed(run) -> None:
    """What a SIGKILL leaves in run.json: `running`, with a process that no longer exists."""
    run.update(status="running", pid=NO_SUCH_PID, host=socket.gethostname(), error=None,
               finished=None)


def _log(run) -> str:
    path = run.path("run.log")
    return path.read_text(encoding="utf-8") if path.exists() else ""


def _metric_rows(steps) -> str:
    return "".join(json.dumps({"step": s, "loss": 2.0 - s / 10}) + "\n" for s in steps)


# ----------------------------------------------------------------------------------------------
# A torn last line in metrics.jsonl


@pytest.mark.slow
def test_torn_metrics_line_is_skipped_noted_once_and_resume_gives_the_uninterrupted_curve(
        workspace, monkeypatch, capsys):
    reference = run_train(tiny_train_recipe(name="reference"), workspace)
    real = engine.token_loss_sum
    calls = {"n": 0}

    def killed_in_step_5(model, inputs, labels):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Killed("killed during step 5")
        return real(model, inputs, labels)

    monkeypatch.setattr(engine, "token_loss_sum", killed_in_step_5)
    with pytest.raises(Killed):
        run_train(tiny_train_recipe(name="killed"), workspace)
    monkeypatch.setattr(engine, "token_loss_sum", real)
    run = next(r for r in workspace.runs() if r.info["name"] == "killed")
    _as_if_killed(run)
    with open(run.path("metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(TORN)  # the row of step 5, cut short by a full disk
    assert run.status == "interrupted"

    assert main(["show", run.id, "-w", str(workspace.root)]) == 0
    assert "# last step 4: loss" in capsys.readouterr().out
    assert main(["resume", run.id, "-w", str(workspace.root)]) == 0

    assert run.info["status"] == "done"
    assert _losses(run) == pytest.approx(_losses(reference), rel=1e-6, abs=1e-7)
    text = run.path("metrics.jsonl").read_text(encoding="utf-8")
    assert TORN not in text and text.endswith("\n")
    assert all(isinstance(json.loads(line), dict) for line in text.splitlines())
    log = _log(run)
    assert log.count("skipped its torn last line 5") == 1  # `show` noted it; resume did not repeat it
    assert repr(TORN) in log


def test_append_cuts_a_torn_last_line_instead_of_gluing_the_row_to_it(tmp_path):
    run = Workspace(tmp_path).create_run("train", "x", "kind: train\n", seed=0)
    run.path("metrics.jsonl").write_text(_metric_rows([1, 2]) + TORN, encoding="utf-8")
    run.append_metrics({"step": 3, "loss": 1.7})
    assert run.path("metrics.jsonl").read_text(encoding="utf-8") == _metric_rows([1, 2]) + \
        json.dumps({"step": 3, "loss": 1.7}) + "\n"
    assert f"cut its torn last line ({len(TORN)} bytes)" in _log(run)


def test_append_keeps_a_whole_last_row_that_only_lacks_its_newline(tmp_path):
    run = Workspace(tmp_path).create_run("train", "x", "kind: train\n", seed=0)
    run.path("metrics.jsonl").write_text(_metric_rows([1, 2]).rstrip("\n"), encoding="utf-8")
    run.append_metrics({"step": 3, "loss": 1.7})
    assert [m["step"] for m in run.metrics()] == [1, 2, 3]


def test_a_bad_line_before_the_last_is_an_error_naming_file_and_line(tmp_path, capsys):
    ws = Workspace(tmp_path)
    run = ws.create_run("train", "x", "kind: train\n", seed=0)
    run.path("metrics.jsonl").write_text(_metric_rows([1]) + "\n" + TORN + "\n" + _metric_rows([3]),
                                         encoding="utf-8")
    with pytest.raises(JsonlError, match=r"metrics.jsonl: line 3 is not valid JSON"):
        run.metrics()
    with pytest.raises(JsonlError, match=r"line 3"):
        loss_curve(run)
    assert main(["show", run.id, "-w", str(tmp_path)]) == 1
    assert f"{run.path('metrics.jsonl')}: line 3 is not valid JSON" in capsys.readouterr().err


def test_a_line_a_live_run_is_still_writing_is_read_past_without_a_note(tmp_path):
    run = Workspace(tmp_path).create_run("train", "x", "kind: train\n", seed=0)
    run.mark_running()
    run.update(pid=os.getppid())  # another process of this run, alive, in the middle of a write
    run.path("metrics.jsonl").write_text(_metric_rows([1, 2]) + TORN, encoding="utf-8")
    assert [p["step"] for p in loss_curve(run)] == [1, 2]
    assert "torn" not in _log(run)
    run.update(pid=NO_SUCH_PID)  # that process has died: the line is torn for good
    assert [p["step"] for p in loss_curve(run)] == [1, 2]
    assert "skipped its torn last line 3" in _log(run)


# ----------------------------------------------------------------------------------------------
# A full disk when a run is created


@pytest.mark.parametrize("failing_write, file_name", [(1, "recipe.yaml"), (2, "run.json")])
def test_full_disk_at_run_creation_leaves_no_run_folder_and_names_the_file(
        tmp_path, monkeypatch, failing_write, file_name):
    ws = Workspace(tmp_path)
    ws.runs_dir.mkdir(parents=True)
    real_write = os.write
    calls = {"n": 0}

    def disk_fills_up(fd, data):
        calls["n"] += 1
        if calls["n"] >= failing_write:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", disk_fills_up)
        with pytest.raises(OSError) as raised:
            ws.create_run("train", "full-disk", "kind: train\n", seed=0)
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC
    assert f"cannot write {ws.runs_dir}" in message and f"{file_name}: the disk is full" in message
    assert list(ws.runs_dir.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# NaN / inf weights


POISONED = "model.layers.0.mlp.up_proj.weight"


def _poison(folder: Path, name: str, count: int) -> None:
    """Set `count` values of tensor `name` to NaN / inf in whichever safetensors file holds it."""
    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        if name in tensors:
            flat = tensors[name].view(-1)
            flat[:count] = float("nan")
            flat[0] = float("inf")
            save_file(tensors, path, metadata={"format": "pt"})
            return
    raise AssertionError(f"no tensor {name} in {folder}")


@pytest.fixture(scope="module")
def poisoned_base(base_workspace, tmp_path_factory) -> Path:
    """A copy of the tiny base model folder with 3 NaN / inf values in one MLP weight."""
    base = base_workspace.latest("pretrain", DEFAULT_BASE_NAME)
    folder = tmp_path_factory.mktemp("poisoned") / "base"
    shutil.copytree(base.path(base.info["outputs"]["model"]), folder)
    _poison(folder, POISONED, 3)
    return folder


def test_nan_weights_are_refused_at_load_naming_the_tensor_and_the_folder(poisoned_base):
    with pytest.raises(ModelLoadError) as raised:
        load_model(ModelSpec(path=str(poisoned_base)))
    assert f"{POISONED}: 3 NaN / inf values" in str(raised.value)
    assert str(poisoned_base) in str(raised.value)


def test_training_on_nan_weights_fails_at_load_not_with_a_nan_loss(workspace, poisoned_base):
    with pytest.raises(ModelLoadError, match=f"{POISONED}: 3 NaN / inf values"):
        run_train(tiny_train_recipe(model__path=str(poisoned_base), name="poisoned"), workspace)
    run = next(r for r in workspace.runs() if r.info["name"] == "poisoned")
    assert run.info["status"] == "failed"
    assert POISONED in run.info["error"] and "loss is" not in run.info["error"]
    assert not run.path("metrics.jsonl").exists()


def test_nan_in_an_adapter_is_refused_naming_its_tensor_and_folder(workspace, tmp_path):
    trained = run_train(tiny_train_recipe(train__max_steps=1, train__checkpoint_every=0), workspace)
    adapter = shutil.copytree(trained.path("adapter"), tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    name = next(n for n in load_file(weights) if "lora_B" in n)
    _poison(adapter, name, 1)
    assert load_model(ModelSpec(path=str(trained.path("adapter"))), workspace)  # the intact one loads
    with pytest.raises(ModelLoadError) as raised:
        load_model(ModelSpec(path=str(adapter)), workspace)
    assert f"{name}: 1 NaN / inf values" in str(raised.value)
    assert str(adapter) in str(raised.value) and "adapter holds" in str(raised.value)


# ----------------------------------------------------------------------------------------------
# User data: errors give the file's own line numbers


BLANKS_FIRST = ['{"text": "one", "prompt": "p", "answer": "a", "label": "x"}', "", "   ",
                '{"text": "two", "prompt": "p", "answer": "a", "label": "y"}', ""]


@pytest.mark.parametrize("reader, bad, problem", [
    (read_texts, '{"text": "three"', "line 6 is not valid JSON"),
    (read_texts, '{"body": "three"}', "line 6 has no string field 'text'"),
    (read_examples, '{"prompt": "p"}', "line 6 needs string fields 'prompt'"),
    (read_labelled, '{"text": "three"}', "line 6 needs a string 'text' and a 'label'"),
    (read_labelled, '["text", "label"]', "line 6 is not a JSON object"),
])
def test_data_errors_name_the_files_own_line_with_blank_lines_counted(tmp_path, reader, bad, problem):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(BLANKS_FIRST + [bad]) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as raised:
        reader(str(path))
    assert str(raised.value).startswith(f"{path}: {problem}")


def test_a_line_separator_inside_a_record_does_not_split_it(tmp_path):
    path = tmp_path / "data.jsonl"
    records = [{"text": "first\u2028still the first"}, {"text": "second"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert read_texts(str(path)) == ["first\u2028still the first", "second"]
