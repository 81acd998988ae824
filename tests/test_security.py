"""Attacks on the workbench as a careless user or a hostile browser would try them, each of which
must now be refused: remote code from the browser, paths hidden in files a recipe names, `run:`
references that climb out of runs/, bare names that are symbolic links, and recipes that cost
unbounded CPU or disk. The resolver (`workbench.resolver`) is checked against generated traversal
forms; the app is driven through `gradio_client`, as a browser's script would drive it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from helpers import served_app

from workbench.recipes import RecipeError, load_recipe, parse_recipe
from workbench.resolver import PathRefused, Resolver, using
from workbench.workspace import RunNotFound, Workspace
from workbench.yamlio import MAX_YAML_BYTES, MAX_YAML_NODES, YamlRefused, expanded_nodes, load_yaml

USER, PASSWORD = "tester", "pw-security-not-in-any-file"


# ----------------------------------------------------------------------------------------------
# a workspace with things outside it, and links that lead there


@pytest.fixture
def world(tmp_path):
    """W (the workspace) and O (outside it): a secret file, a model folder, a mergekit config, and
    links from W into O under every disguise (bare names, suffixes, chains, dangling, nested)."""
    w, o = tmp_path / "W", tmp_path / "O"
    (w / "data").mkdir(parents=True)
    (w / "models" / "inside").mkdir(parents=True)
    (o / "model").mkdir(parents=True)
    (o / "secret.txt").write_text("the outside secret\n")
    (o / "model" / "config.json").write_text("{}")
    (w / "data" / "inside.txt").write_text("a document\n")
    (w / "pw").symlink_to(o / "secret.txt")
    (w / "pw.txt").symlink_to(o / "secret.txt")
    (w / "outm").symlink_to(o / "model", target_is_directory=True)
    (w / "chain2").symlink_to(o / "secret.txt")
    (w / "chain1").symlink_to(w / "chain2")
    (w / "dangling").symlink_to(o / "not-yet-there")
    (w / "data" / "up").symlink_to(Path("..") / ".." / "O", target_is_directory=True)
    (w / "inner").symlink_to(w / "data", target_is_directory=True)  # inside: allowed
    return w, o


def traversal_forms(w: Path, o: Path) -> list[str]:
    """Strings that try to name something outside W."""
    return [
        "..", "../O/secret.txt", "data/../../O/secret.txt", "./../O/secret.txt", "data/up/secret.txt",
        str(o / "secret.txt"), str(o / "model"), str(w / ".." / "O" / "secret.txt"), "/etc/passwd",
        "~", "~/secret.txt", "~root/x", "pw", "pw.txt", "outm", "chain1", "dangling",
        "data/up", "inner/../../O/secret.txt", "data/inside.txt\0.txt", "", "   ",
    ]


def harmless_forms() -> list[str]:
    """URL-encoded and backslash forms are plain names on this platform: they stay inside W."""
    return ["%2e%2e/O/secret.txt", "..%2fO%2fsecret.txt", "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
            "..\\O\\secret.txt", "data/inside.txt", "inner/inside.txt", "models/inside"]


RUN_REFERENCE_FORMS = ["run:../x", "run:../../other/runs/20250101-000000-train-x-ab12",
                       "run:a/b", "run:.hidden", "run:", "run:~", "run:/etc", "run:a\\b", "run:..",
                       "run:%2e%2e"]


def test_the_confined_resolver_refuses_every_traversal_form(world):
    w, o = world
    confined = Resolver.confined(w)
    for form in traversal_forms(w, o):
        with pytest.raises(PathRefused):
            confined.path(form, "data")
        with pytest.raises(PathRefused):
            confined.check_data(form)
        with pytest.raises(PathRefused):
            confined.check_model(form)
    for form in harmless_forms():
        resolved = confined.path(form, "data")
        assert resolved == w or w in resolved.parents, (form, resolved)
    for form in RUN_REFERENCE_FORMS:
        for resolver in (confined, Resolver()):  # a run reference is an id in the CLI too
            with pytest.raises(PathRefused, match="not a run reference"):
                resolver.check_model(form)
    for fine in ("default", "world:general_train", "run:20250101-000000-train-x-ab12", "run:2025",
                 "stage:domain", "config:llama-tiny", "org/some-model"):
        confined.check_model(fine)
    assert confined.path("data/inside.txt") == w / "data" / "inside.txt"


def test_the_cli_resolver_reads_what_the_user_typed(world, monkeypatch):
    w, o = world
    monkeypatch.chdir(w)
    open_ = Resolver()
    assert open_.path("pw") == o / "secret.txt"  # the user's own link: theirs to follow
    assert open_.path(str(o / "model")) == o / "model"
    assert open_.path("data/inside.txt") == w / "data" / "inside.txt"


def test_a_workspace_takes_run_ids_only(tmp_path):
    ws = Workspace(tmp_path / "ws")
    run = ws.create_run("eval", "x", "kind: eval\n", 0)
    assert ws.get(f"run:{run.id}").id == run.id and ws.get(run.id[:8]).id == run.id
    other = Workspace(tmp_path / "other")
    elsewhere = other.create_run("eval", "y", "kind: eval\n", 0)
    for form in (f"../../other/runs/{elsewhere.id}", f"run:../../other/runs/{elsewhere.id}",
                 str(elsewhere.folder), ".", "..", ""):
        with pytest.raises(RunNotFound):
            ws.get(form)


def _train(**sections) -> dict:
    return {"kind": "train", **sections}


def recipes_naming(value: str) -> dict[str, dict]:
    """One recipe per field that can name a file or folder, each set to `value`."""
    return {
        "model.path": _train(model={"path": value}),
        "data.train": _train(data={"train": value}),
        "data.replay": _train(data={"replay": value}),
        "eval.general_text": _train(eval={"general_text": value}),
        "eval.questions.0": _train(eval={"questions": [value]}),
        "eval.labelled": _train(eval={"labelled": value}),
        "adapter.init_from.0.path": _train(adapter={"method": "prompt", "init_from": [{"path": value}]}),
        "adapter.lambda_validation": _train(adapter={"method": "prompt", "lambda_validation": value}),
        "adapter.domain_adapters.0": _train(adapter={"method": "mixda", "stage": 2,
                                                     "domain_adapters": [value]}),
        "train.regularizer.importance": _train(train={"regularizer": {"importance": value}}),
        "train.regularizer.data": _train(train={"regularizer": {"data": value}}),
        "inputs.0.path": {"kind": "merge", "inputs": [{"path": value}]},
        "base.path": {"kind": "merge", "inputs": [{"path": "run:x"}], "base": {"path": value}},
        "calibration": {"kind": "quantize", "calibration": value},
        "eval.domain_text": {"kind": "eval", "eval": {"domain_text": value}},
        "config": {"kind": "mergekit", "config": value},
    }


def test_every_recipe_field_that_names_a_file_goes_through_the_resolver(world):
    w, o = world
    with using(Resolver.confined(w)):
        for form in ("pw", "outm", "chain1", str(o / "secret.txt"), "../O/model", "run:../x"):
            for key, recipe in recipes_naming(form).items():
                if key == "config" and form.startswith("run:"):
                    continue  # a mergekit config is a file: `run:../x` there is a name inside W
                with pytest.raises(RecipeError) as caught:
                    parse_recipe(recipe)
                assert f"recipe: {key}: " in str(caught.value), (form, key, str(caught.value))
                assert "outside the workspace" in str(caught.value) or \
                    "not a run reference" in str(caught.value)


def test_paths_inside_referenced_files_are_checked_too(world):
    """A mergekit config file that names an outside model is refused as the same config inline
    is; so is an adapter whose config names an outside base, and a model folder with a link out."""
    import mergekit  # noqa: F401  (reads the mergekit config; in the test extra)

    from workbench.models import ModelLoadError, resolve_source

    w, o = world
    config = {"merge_method": "linear", "models": [{"model": str(o / "model"), "parameters": {"weight": 1.0}}]}
    (w / "recipes").mkdir()
    (w / "recipes" / "mk.yaml").write_text(yaml.safe_dump(config))
    with using(Resolver.confined(w)):
        for given in (config, "recipes/mk.yaml"):
            with pytest.raises(RecipeError, match=r"config\.models\.0\.model.*outside the workspace"):
                parse_recipe({"kind": "mergekit", "config": given})
        adapter = w / "adapters" / "evil"
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(o / "model"),
                                                                 "peft_type": "LORA"}))
        with pytest.raises(PathRefused, match="outside the workspace"):
            resolve_source("adapters/evil")
        (w / "models" / "inside" / "config.json").write_text("{}")
        (w / "models" / "inside" / "model.safetensors").symlink_to(o / "secret.txt")
        with pytest.raises(PathRefused, match="model.safetensors"):
            resolve_source("models/inside")
    with pytest.raises(ModelLoadError):  # the CLI follows it, then finds no adapter base
        resolve_source(str(w / "models" / "missing"))


# ----------------------------------------------------------------------------------------------
# bounded cost


def alias_bomb(levels: int) -> str:
    """~400 bytes that expand to 9**levels leaves."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bombs_and_huge_recipes_are_refused_before_they_are_built(tmp_path):
    bomb = alias_bomb(7)
    assert len(bomb) < 500
    assert expanded_nodes(bomb, stop_after=10**9) > 9**7  # what PyYAML would have built
    with pytest.raises(YamlRefused, match="expands to more than"):
        load_yaml(bomb)
    small = "base: &b {lr: 0.1}\nfirst: *b\nsecond: *b\n"
    assert load_yaml(small) == {"base": {"lr": 0.1}, "first": {"lr": 0.1}, "second": {"lr": 0.1}}
    assert expanded_nodes(small, 10**9) == 1 + 2 * 3 + 2 * 3  # mapping, keys, aliases as copies
    big = "kind: train\neval_at: [" + ", ".join(["1"] * (MAX_YAML_BYTES // 3)) + "]\n"
    with pytest.raises(YamlRefused, match="above the limit"):
        load_yaml(big)
    many = "kind: train\ntrain:\n  eval_at:\n" + "  - 1\n" * (MAX_YAML_NODES + 10)
    assert len(many) < MAX_YAML_BYTES
    with pytest.raises(YamlRefused, match="expands to more than"):
        load_yaml(many)
    file = tmp_path / "huge.yaml"
    file.write_text(big)
    with pytest.raises(RecipeError, match="above the limit"):
        load_recipe(file)
    file.write_text(bomb)
    with pytest.raises(RecipeError, match="expands to more than"):
        load_recipe(file)


def test_the_cli_refuses_a_huge_recipe_at_once(tmp_path, capsys):
    from workbench.cli import main

    file = tmp_path / "huge.yaml"
    file.write_text("kind: train\n" + "# padding\n" * (MAX_YAML_BYTES // 10 + 1))
    assert main(["run", str(file), "--workspace", str(tmp_path / "ws")]) == 2
    assert "above the limit" in capsys.readouterr().err
    assert not (tmp_path / "ws" / "runs").exists()


# ----------------------------------------------------------------------------------------------
# remote code


def remote_code_model(folder: Path, marker: Path) -> Path:
    """A model folder whose config maps the Auto classes to a .py file beside it that, when
    imported, writes `marker` (what remote code from a browser could do)."""
    folder.mkdir(parents=True)
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaConfig as EvilConfig\n"
                                    "from transformers import LlamaForCausalLM as EvilModel\n")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["EvilModel"], "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 64,
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    return folder


def test_a_job_worker_of_the_app_refuses_remote_code(tmp_path, capsys):
    from workbench.cli import main

    ws = tmp_path / "ws"
    marker = tmp_path / "ran"
    remote_code_model(ws / "models" / "remote", marker)
    recipe = ws / "recipes" / "r.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text(yaml.safe_dump({"kind": "eval", "model": {"path": "models/remote",
                                                                "trust_remote_code": True}}))
    assert main(["run", str(recipe), "--workspace", str(ws), "--workspace-only"]) == 2
    assert "--allow-remote-code" in capsys.readouterr().err
    assert not marker.exists()
    allowed = Resolver.confined(ws, allow_remote_code=True)
    assert "--allow-remote-code" in allowed.worker_flags()
    with using(allowed):
        parse_recipe({"kind": "eval", "model": {"path": "models/remote", "trust_remote_code": True}})
    with using(Resolver.confined(ws)), pytest.raises(RecipeError, match="--allow-pickle"):
        parse_recipe({"kind": "eval", "model": {"path": "models/remote", "allow_pickle": True}})


# ----------------------------------------------------------------------------------------------
# the app, driven as a browser's script would


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app over an empty workspace beside an outside folder, with a password, on 127.0.0.1."""
    import gradio_client

    top = tmp_path_factory.mktemp("security")
    ws, outside = top / "W", top / "O"
    ws.mkdir()
    (outside / "model").mkdir(parents=True)
    (outside / "secret.txt").write_text("the outside secret\n")
    with served_app(ws, top / "app.log", auth=f"{USER}:{PASSWORD}") as url:
        client = gradio_client.Client(url, auth=(USER, PASSWORD), verbose=False, download_files=False)
        yield {"client": client, "ws": ws, "outside": outside,
               "AppError": gradio_client.exceptions.AppError}


def test_app_refuses_remote_code_from_the_browser(app, tmp_path):
    client, ws = app["client"], app["ws"]
    marker = tmp_path / "ran"
    remote_code_model(ws / "models" / "remote", marker)
    text = yaml.safe_dump({"kind": "eval", "name": "x",
                           "model": {"path": "models/remote", "trust_remote_code": True}})
    checked = client.predict(text, api_name="/validate_recipe")
    assert not checked["ok"] and "--allow-remote-code" in checked["message"]
    with pytest.raises(app["AppError"], match="--allow-remote-code"):
        client.predict(text, api_name="/submit_recipe")
    assert not marker.exists() and not (ws / "runs").exists()


@pytest.mark.slow
def test_app_checks_paths_inside_a_saved_mergekit_config(app):
    client, ws, outside = app["client"], app["ws"], app["outside"]
    config = yaml.safe_dump({"merge_method": "linear",
                             "models": [{"model": str(outside / "model"), "parameters": {"weight": 1.0}}]})
    assert client.predict("recipes/mk.yaml", config, api_name="/save_recipe") == "recipes/mk.yaml"
    with pytest.raises(app["AppError"], match=r"config\.models\.0\.model.*outside the workspace"):
        client.predict("kind: mergekit\nname: x\nconfig: recipes/mk.yaml\n", api_name="/submit_recipe")
    assert not (ws / "runs").exists()


def test_app_refuses_run_references_that_climb_out(app):
    client = app["client"]
    for ref in ("run:../../other/runs/20250101-000000-train-x-ab12", "run:../x", "run:a/b"):
        checked = client.predict(yaml.safe_dump({"kind": "eval", "model": {"path": ref}}),
                                 api_name="/validate_recipe")
        assert [e["key"] for e in checked["errors"]] == ["model.path"], checked
        assert "not a run reference" in checked["message"]


def test_app_refuses_bare_names_that_are_symlinks(app):
    client, ws, outside = app["client"], app["ws"], app["outside"]
    (ws / "pw").symlink_to(outside / "secret.txt")
    (ws / "outm").symlink_to(outside / "model", target_is_directory=True)
    for key, recipe in (("data.train", {"kind": "train", "data": {"train": "pw"}}),
                        ("model.path", {"kind": "train", "model": {"path": "outm"}})):
        checked = client.predict(yaml.safe_dump(recipe), api_name="/validate_recipe")
        assert [e["key"] for e in checked["errors"]] == [key], checked
        assert "outside the workspace" in checked["message"]


def test_app_refuses_recipes_of_unbounded_cost(app):
    client, ws = app["client"], app["ws"]
    checked = client.predict(alias_bomb(7), api_name="/validate_recipe")
    assert not checked["ok"] and "expands to more than" in checked["message"]
    huge = "kind: train\n" + "# padding\n" * (MAX_YAML_BYTES // 10 + 1)
    with pytest.raises(app["AppError"], match="above the limit"):
        client.predict(huge, api_name="/submit_recipe")
    with pytest.raises(app["AppError"], match="at most"):
        client.predict("recipes/huge.yaml", huge, api_name="/save_recipe")
    assert not (ws / "recipes" / "huge.yaml").exists() and not list(ws.glob("jobs/*.yaml"))


def test_the_app_queue_starts_its_workers_under_its_policy(tmp_path, monkeypatch):
    """Jobs queued by the app run `workbench run ... --workspace-only` (with the app's flags), so a
    worker resolves every path as the app checked it; the command shown to users is the plain one."""
    from workbench import jobs

    started = []

    class Recorder:
        def __init__(self, command, **kwargs):
            started.append(command)
            self.pid = os.getpid()

        def poll(self):
            return None

    monkeypatch.setattr(jobs.subprocess, "Popen", Recorder)
    ws = Workspace(tmp_path / "ws")
    queue = jobs.JobQueue(ws, resolver=Resolver.confined(ws.root, allow_pickle=True))
    job = queue.submit("kind: eval\nname: e\n")
    assert started and started[0][-3:] == [str(ws.root), "--workspace-only", "--allow-pickle"]
    assert jobs.display_command(queue.get(job["id"]), ws).endswith(f"--workspace {ws.root}")
