"""The Gradio app: launched on 127.0.0.1 in its own process and driven through gradio_client
(a training job followed to the end, its adapter merged, quantized and exported, side-by-side
generation, errors, the workspace boundary, the security defaults), plus what it is built on, in
process: the schema forms (train, merge, quantize), the comparison table, the exporters, the
playground's mixed-adapter batch."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gradio_client
import httpx
import pytest
import yaml

from adapters.road import RoadSpec
from helpers import folder_tensors, save_random_lora, served_app, tiny_train_recipe
from workbench.recipes import TrainRecipe, parse_recipe, recipe_to_yaml
from workbench.ui.forms import Form
from workbench.ui.launch import LaunchRefused, settings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
USER, PASSWORD = "tester", "pw-7f3a9c-not-in-any-file"


@pytest.fixture(scope="module")
def app(base_workspace, tmp_path_factory):
    """The app on a free port over a workspace holding the tiny base; the password comes from
    WORKBENCH_AUTH, uploads are capped at 1 MB. The base run is copied in (about 1 MB), not linked:
    the app reads only inside its workspace and refuses links that lead out of it."""
    from workbench.base import DEFAULT_BASE_NAME
    from workbench.workspace import Workspace

    ws = Workspace(tmp_path_factory.mktemp("app") / "ws")
    ws.runs_dir.mkdir(parents=True)
    base = base_workspace.latest("pretrain", DEFAULT_BASE_NAME)
    shutil.copytree(base.folder, ws.runs_dir / base.id)
    with served_app(ws.root, ws.root.parent / "app.log", "--max-upload-mb", "1",
                    auth=f"{USER}:{PASSWORD}") as url:
        client = gradio_client.Client(url, auth=(USER, PASSWORD), verbose=False, download_files=False)
        yield {"url": url, "client": client, "ws": ws, "base": base}


def _client(app):
    """A new gradio_client logged in to the app (its own session and event stream)."""
    return gradio_client.Client(app["url"], auth=(USER, PASSWORD), verbose=False, download_files=False)


def _session(app) -> httpx.Client:
    """An HTTP session logged in like a browser."""
    session = httpx.Client(base_url=app["url"], timeout=10)
    assert session.post("/login", data={"username": USER, "password": PASSWORD}).status_code == 200
    return session


@pytest.fixture(scope="module")
def trained_run(app):
    """The tiny LoRA recipe submitted through the API once per module and followed to its end:
    the recipe's text, the submitted job, every status seen while it ran (the last one final), the
    job list right after it ended, and the run it made (None if it made none)."""
    client = app["client"]
    text = recipe_to_yaml(tiny_train_recipe(name="api-lora"))
    job = client.predict(text, api_name="/submit_recipe")
    statuses, deadline = [], time.monotonic() + 150
    while True:
        status = client.predict(job["id"], api_name="/job_status")
        statuses.append(status)
        if status["status"] in ("done", "failed", "stopped", "cancelled"):
            break
        assert time.monotonic() < deadline, f"job still {status['status']}: {status['log_tail']}"
        time.sleep(1.0)
    return {"text": text, "job": job, "statuses": statuses,
            "jobs_after": client.predict(api_name="/list_jobs"), "run": status.get("run")}


def _trained(trained_run) -> str:
    """The run id of the module's training job, which must have ended well."""
    final = trained_run["statuses"][-1]
    assert final["status"] == "done", final["error"] or final["log_tail"]
    return trained_run["run"]


@pytest.mark.slow
def test_train_job_through_the_api_to_the_end(app, trained_run):
    client, ws = app["client"], app["ws"]
    text, job = trained_run["text"], trained_run["job"]
    checked = client.predict(text, api_name="/validate_recipe")
    assert checked["ok"] and checked["kind"] == "train" and checked["name"] == "api-lora"
    assert job["status"] in ("queued", "running") and job["kind"] == "train"

    seen_steps = [s["step"] for s in trained_run["statuses"]]
    status = trained_run["statuses"][-1]
    assert status["status"] == "done", status["error"] or status["log_tail"]
    assert status["step"] == status["total"] == 6
    assert [p["step"] for p in status["loss"]] == [1, 2, 3, 4, 5, 6]
    assert seen_steps == sorted(seen_steps), "progress only moves forward"
    assert status["summary"]["steps"] == 6
    assert status["display_command"].endswith(f"--workspace {ws.root}")

    run_id = status["run"]
    runs = {r["id"]: r for r in client.predict(api_name="/list_runs")}
    assert runs[run_id]["status"] == "done" and runs[run_id]["kind"] == "train"
    assert runs[run_id]["parents"] == [app["base"].id]
    run = client.predict(run_id, api_name="/get_run")
    assert [a["id"] for a in run["lineage"]["ancestors"]] == [app["base"].id]
    assert yaml.safe_load(run["recipe"])["name"] == "api-lora"
    assert len(run["loss"]) == 6 and "adapter" in run["files"]
    base = client.predict(app["base"].id, api_name="/get_run")
    assert run_id in base["lineage"]["children"]

    # all of it is in the workspace, where the next app (or `workbench runs`) finds it
    assert (ws.root / "runs" / run_id / "adapter" / "adapter_model.safetensors").is_file()
    record = yaml.safe_load((ws.root / "jobs" / f"{job['id']}.json").read_text())
    assert record["status"] == "done" and record["run"] == run_id
    log = (ws.root / record["log"]).read_text()
    assert "step" in log and "gemm_4bit" not in log, "no bitsandbytes CPU-kernel warning in the log"
    assert trained_run["jobs_after"][0]["id"] == job["id"], "the newest job is listed first"


def _wait(client, job: dict, timeout: float = 150) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.predict(job["id"], api_name="/job_status")
        if status["status"] in ("done", "failed", "stopped", "cancelled"):
            return status
        assert time.monotonic() < deadline, f"job still {status['status']}: {status['log_tail']}"
        time.sleep(0.5)


@pytest.mark.slow
def test_merge_quantize_export_and_generate_through_the_api(app, trained_run, tmp_path):
    """The trained adapter merged (θ + 0.5·s·B·A), the merge quantized, all of it exported and
    found in the workspace; the playground answers with the base and the adapter side by side."""
    client, ws, trained = app["client"], app["ws"], _trained(trained_run)
    AppError = gradio_client.exceptions.AppError
    sources = [s["value"] for s in client.predict(api_name="/list_sources")]
    assert sources[0] == "default" and f"run:{trained}" in sources

    merge = yaml.safe_dump({"kind": "merge", "name": "api-merge", "max_shard_mb": 1,
                            "inputs": [{"path": f"run:{trained}", "weight": 0.5}]})
    merged = _wait(client, client.predict(merge, api_name="/submit_recipe"))
    assert merged["status"] == "done", merged["error"] or merged["log_tail"]
    merge_run = merged["run"]
    adapter = ws.root / "runs" / trained / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = folder_tensors(adapter)
    base = folder_tensors(app["base"].path("model"))
    model = folder_tensors(ws.root / "runs" / merge_run / "model")
    name = "model.layers.1.self_attn.q_proj.weight"
    b = factors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    a = factors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    by_hand = base[name] + 0.5 * (config["lora_alpha"] / config["r"]) * (b @ a)
    assert torch_allclose(model[name], by_hand)

    quantize = yaml.safe_dump({"kind": "quantize", "name": "api-rtn", "method": "rtn",
                               "model": {"path": f"run:{merge_run}"}, "nf4_baseline": False,
                               "world": {"size": "tiny"}, "seq_len": 64,
                               "eval": {"max_tokens": 512, "max_questions": 4}})
    quantized = _wait(client, client.predict(quantize, api_name="/submit_recipe"))
    assert quantized["status"] == "done", quantized["error"] or quantized["log_tail"]
    quant_run = quantized["run"]
    runs = {r["id"]: r for r in client.predict(api_name="/list_runs")}
    assert runs[merge_run]["parents"][0] == trained and runs[quant_run]["parents"] == [merge_run]

    # the comparison reads the quantization report: gain and forgetting against full precision
    rows = client.predict([quant_run], api_name="/compare_runs")["rows"]
    report = json.loads((ws.root / "runs" / quant_run / "report.json").read_text())
    fp, rtn = report["rows"]["full_precision"]["metrics"], report["rows"]["rtn"]["metrics"]
    assert len(rows) == 1 and rows[0]["label"].endswith("RTN W4 (exported)")
    assert math.isclose(rows[0]["domain_gain_pct"], 100 * (1 - rtn["domain_ppl"] / fp["domain_ppl"]))
    assert math.isclose(rows[0]["general_forgetting_pct"], 100 * (rtn["general_ppl"] / fp["general_ppl"] - 1))

    assert client.predict(trained, api_name="/export_options") == ["model", "adapter"]
    assert client.predict(quant_run, api_name="/export_options") == ["compressed-tensors", "dequantized"]
    jobs = [client.predict(merge_run, "model", "merged", 1, api_name="/export_run"),
            client.predict(trained, "adapter", "lora", 2048, api_name="/export_run"),
            client.predict(quant_run, "compressed-tensors", "w4", 2048, api_name="/export_run")]
    with pytest.raises(AppError, match="already exporting to exports/merged|exports/merged already exists"):
        client.predict(trained, "model", "merged", 1, api_name="/export_run")
    for job in jobs:
        done = _wait(client, job)
        assert done["status"] == "done", done["error"] or done["log_tail"]
    exported = {e["name"]: e for e in client.predict(api_name="/list_exports")}
    assert set(exported) == {"merged", "lora", "w4"}
    folder = ws.root / "exports" / "merged"
    assert exported["merged"]["folder"] == str(folder) and exported["merged"]["source_run"] == merge_run
    # a client that downloads the files an endpoint returns (gradio_client's default) gets the rows
    # as they are: no row looks like a file to fetch
    downloading = gradio_client.Client(app["url"], auth=(USER, PASSWORD), verbose=False,
                                       download_files=str(tmp_path / "downloads"))
    assert downloading.predict(api_name="/list_exports") == client.predict(api_name="/list_exports")
    assert folder_tensors(folder).keys() == model.keys()
    assert all(torch_equal(t, model[k]) for k, t in folder_tensors(folder).items()), "copied as stored"
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    biggest = max(t.numel() * t.element_size() for t in model.values())
    assert all(s.stat().st_size <= max(2**20, biggest) + 2**16 for s in shards), "shards of ≤ 1 MB"
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        assert (ws.root / "exports" / "lora" / file).read_bytes() == (adapter / file).read_bytes()
    w4 = ws.root / "exports" / "w4"
    compressed = ws.root / "runs" / quant_run / "model-compressed"
    assert json.loads((w4 / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    assert all(torch_equal(t, folder_tensors(compressed)[k]) for k, t in folder_tensors(w4).items())
    with pytest.raises(AppError, match="exports/lora already exists"):
        client.predict(trained, "adapter", "lora", 2048, api_name="/export_run")
    for bad in ("../escape", ".hidden", "a/b"):
        with pytest.raises(AppError, match="export name"):
            client.predict(trained, "adapter", bad, 2048, api_name="/export_run")
    with pytest.raises(AppError, match="offers model, adapter, not 'dequantized'"):
        client.predict(trained, "dequantized", "nope", 2048, api_name="/export_run")
    assert not (ws.root.parent / "escape").exists()

    # the playground: the base and the adapter, alone and as one mixed batch (LoRA rows by name)
    reply = client.predict("The", ["default", f"run:{trained}"], 6, True, api_name="/generate")
    assert [a["model"] for a in reply["separate"]] == ["default", f"run:{trained}"]
    assert [a["text"] for a in reply["mixed"]] == [a["text"] for a in reply["separate"]]
    with pytest.raises(AppError, match="max_new_tokens must be between 1 and 256"):
        client.predict("The", ["default"], 1000, False, api_name="/generate")
    with pytest.raises(AppError, match="outside the workspace"):
        client.predict("The", ["/etc"], 4, False, api_name="/generate")


def torch_allclose(a, b) -> bool:
    import torch

    return torch.allclose(a, b, atol=1e-6)


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and torch.equal(a, b)


def test_bad_value_comes_back_readable(app):
    client = app["client"]
    bad = "kind: train\ntrain: {lr: -0.1, max_stpes: 3}\nadapter: {method: road, group_size: 3}\n"
    checked = client.predict(bad, api_name="/validate_recipe")
    assert not checked["ok"]
    errors = {e["key"]: e["message"] for e in checked["errors"]}
    assert errors["train.lr"] == "Input should be greater than 0 (got -0.1)"
    assert errors["train.max_stpes"].startswith("unknown key 'max_stpes'; did you mean 'max_steps'?")
    assert "adapter.group_size must be even (got 3)" in errors["adapter"]
    with pytest.raises(gradio_client.exceptions.AppError,
                       match=r"train\.lr: Input should be greater than 0 \(got -0\.1\)"):
        client.predict(bad, api_name="/submit_recipe")
    with pytest.raises(gradio_client.exceptions.AppError, match="no job 'nope'"):
        client.predict("nope", api_name="/job_status")


@pytest.mark.slow
def test_paths_outside_the_workspace_are_refused(app, tmp_path):
    client, ws = app["client"], app["ws"]
    outside = tmp_path / "secret.yaml"
    outside.write_text("kind: train\n")
    AppError = gradio_client.exceptions.AppError
    for path in ("../../../../etc/passwd", str(outside), f"recipes/../../{outside.name}", "~/x.yaml"):
        with pytest.raises(AppError, match="outside the workspace"):
            client.predict(path, api_name="/read_recipe")
    with pytest.raises(AppError, match="outside the workspace"):
        client.predict("../escaped.yaml", "kind: train\n", api_name="/save_recipe")
    assert not (ws.root.parent / "escaped.yaml").exists()
    for path in ("runs/some-run/recipe.yaml", "jobs/x.yaml", ".gradio/x.yaml"):
        with pytest.raises(AppError, match="kept by the workbench"):
            client.predict(path, "kind: train\n", api_name="/save_recipe")
    # a recipe naming a file outside is refused before anything reads it
    for key, value in (("data.train", "/etc/passwd"), ("model.path", "../../other-model")):
        section, field = key.split(".")
        text = yaml.safe_dump({"kind": "train", section: {field: value}})
        checked = client.predict(text, api_name="/validate_recipe")
        assert [e["key"] for e in checked["errors"]] == [key], checked
        assert "outside the workspace" in checked["message"]
    mergekit = yaml.safe_dump({"kind": "mergekit", "config": str(outside)})
    assert "outside the workspace" in client.predict(mergekit, api_name="/validate_recipe")["message"]
    # a relative path means the workspace (where workers run), not the app's own folder
    (ws.root.parent / "cfg.yaml").write_text("merge_method: linear\n")  # the app's working folder
    relative = client.predict(yaml.safe_dump({"kind": "mergekit", "config": "cfg.yaml"}),
                              api_name="/validate_recipe")
    assert f"'{ws.root / 'cfg.yaml'}' not found" in relative["message"], relative

    # a run reference is a run id: none leads out of runs/, even to a folder that looks like a run
    evil = tmp_path / "evil-run"
    evil.mkdir()
    (evil / "run.json").write_text(json.dumps({"id": "evil", "kind": "train", "status": "done",
                                               "outputs": {"adapter": "."}}))
    up = os.path.relpath(evil, ws.root / "runs")
    for call in ((up, "/get_run"), (up, "/export_options"), (up, "adapter", "stolen", 1, "/export_run"),
                 (up, "tiny", 256, 4, "/evaluate_run"), ("x", [f"run:{up}"], 4, False, "/generate")):
        with pytest.raises(AppError, match="no run"):
            client.predict(*call[:-1], api_name=call[-1])
    assert client.predict([up], api_name="/compare_runs") == {"rows": [], "searches": []}
    assert not (ws.root / "exports" / "stolen").exists()

    # inside: saved exactly as given and read back
    text = "# my recipe\nkind: train\nname: kept\n"
    assert client.predict("recipes/kept.yaml", text, api_name="/save_recipe") == "recipes/kept.yaml"
    assert (ws.root / "recipes" / "kept.yaml").read_text() == text
    assert client.predict("recipes/kept.yaml", api_name="/read_recipe") == text

    # Gradio's file route serves the workspace and nothing else
    session = _session(app)
    assert session.get(f"/gradio_api/file={ws.root / 'recipes' / 'kept.yaml'}").text == text
    for path in ("/etc/passwd", str(outside), f"{ws.root}/../{outside.name}"):
        assert session.get(f"/gradio_api/file={path}").status_code == 403, path


def test_security_defaults_of_the_running_app(app):
    anonymous = httpx.Client(base_url=app["url"], timeout=10)
    assert anonymous.get("/gradio_api/info").status_code == 401, "a password is required"
    with pytest.raises(Exception):
        gradio_client.Client(app["url"], verbose=False)
    session = _session(app)
    assert session.get("/gradio_api/info").status_code == 200
    assert session.get("/monitoring").status_code == 403, "the monitoring page is off"
    config = session.get("/config").json()
    assert config["analytics_enabled"] is False
    assert config.get("run_history") in (False, None)
    assert "runs" not in config.get("footer_links", [])
    big = session.post("/gradio_api/upload", files={"files": ("big.txt", b"x" * (2 * 1024 * 1024))})
    assert big.status_code == 413, "uploads over --max-upload-mb are refused"
    small = session.post("/gradio_api/upload", files={"files": ("small.txt", b"hello\n")})
    assert small.status_code == 200
    uploaded = Path(small.json()[0])
    assert app["ws"].root in uploaded.parents, "uploads land inside the workspace"
    # the password is in no file the app or its jobs wrote
    for path in app["ws"].root.rglob("*"):
        if path.is_file() and path.stat().st_size < 10_000_000:
            assert PASSWORD.encode() not in path.read_bytes(), path


def test_startup_output_names_the_url_and_not_gradios_share_hint(app):
    output = (app["ws"].root.parent / "app.log").read_text()
    assert f"Serving on {app['url']}" in output
    assert "share=True" not in output and "public link" not in output
    assert "gemm_4bit" not in output


def _from(app, address: str) -> httpx.Client:
    """An HTTP client to the app whose connections come from `address` (any of 127.0.0.0/8)."""
    return httpx.Client(base_url=app["url"], timeout=10,
                        transport=httpx.HTTPTransport(local_address=address))


def test_repeated_wrong_passwords_are_slowed_down_per_address(app):
    """Five wrong passwords from one address are answered; the sixth try, even with the right
    password, gets 429 and Retry-After; another address (a few wrong tries of its own included)
    logs in at once; after the wait the right password works and clears the count."""
    from workbench.ui.throttle import LoginThrottle

    wrong = {"username": USER, "password": "not-it"}
    right = {"username": USER, "password": PASSWORD}
    free = LoginThrottle().free_attempts
    with _from(app, "127.0.0.2") as guesser, _from(app, "127.0.0.3") as other:
        assert [guesser.post("/login", data=wrong).status_code for _ in range(free)] == [400] * free
        locked = guesser.post("/login", data=wrong)
        assert locked.status_code == 429, locked.text
        wait = int(locked.headers["retry-after"])
        assert 1 <= wait <= 300
        assert guesser.post("/login", data=right).status_code == 429, "locked: not even checked"

        assert [other.post("/login", data=wrong).status_code for _ in range(2)] == [400, 400]
        assert other.post("/login", data=right).status_code == 200
        assert other.get("/gradio_api/info").status_code == 200, "logged in"
        assert _session(app).get("/gradio_api/info").status_code == 200, "127.0.0.1 unaffected"

        time.sleep(wait + 0.2)
        assert guesser.post("/login", data=right).status_code == 200
        assert guesser.post("/login", data=wrong).status_code == 400, "the success cleared the count"
        assert guesser.post("/login", data=right).status_code == 200


def _call(http: httpx.Client, name: str, data: list):
    """One API call through plain HTTP (Gradio's /gradio_api/call/<name>, then its event stream);
    returns the endpoint's value."""
    posted = http.post(f"/gradio_api/call/{name}", json={"data": data})
    assert posted.status_code == 200, posted.text
    event = None
    with http.stream("GET", f"/gradio_api/call/{name}/{posted.json()['event_id']}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ").strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                assert event == "complete", line
                return json.loads(line.removeprefix("data:"))[0]
    raise AssertionError(f"{name}: the event stream ended without an answer")


@pytest.mark.slow
def test_fifty_concurrent_read_only_calls_all_answer_while_a_job_trains(app):
    """50 read-only calls at once (list_runs, list_jobs, job_status, get_run, list_exports), through
    plain HTTP and through gradio_client, while a training job runs: every one answers."""
    from concurrent.futures import ThreadPoolExecutor

    client, count, timeout = app["client"], 50, 60
    recipe = recipe_to_yaml(tiny_train_recipe(name="api-load", train__max_steps=100_000,
                                              train__checkpoint_every=0))
    job = client.predict(recipe, api_name="/submit_recipe")
    try:
        deadline = time.monotonic() + 120
        while (status := client.predict(job["id"], api_name="/job_status"))["step"] < 1:
            assert status["status"] in ("queued", "running"), status["error"] or status["log_tail"]
            assert time.monotonic() < deadline, f"no training step within 120 s: {status['log_tail']}"
            time.sleep(0.5)
        calls = [("list_runs", []), ("list_jobs", []), ("job_status", [job["id"]]),
                 ("get_run", [status["current_run"]]), ("list_exports", [])] * (count // 5)
        # one gradio_client per caller, as 50 scripts would be (logged in one after the other): calls
        # sharing one client share its event stream, which gradio_client closes under some of them
        clients = [_client(app) for _ in calls]
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
        cookies = _session(app).cookies
        with httpx.Client(base_url=app["url"], timeout=timeout, limits=limits, cookies=cookies) as http, \
                ThreadPoolExecutor(max_workers=count) as pool:
            by_http = [pool.submit(_call, http, name, data) for name, data in calls]
            by_client = [pool.submit(lambda c, n, d: c.predict(*d, api_name=f"/{n}"), c, name, data)
                         for c, (name, data) in zip(clients, calls)]
            answers = [f.result(timeout=2 * timeout) for f in by_http + by_client]
        for (name, _), answer in zip(calls * 2, answers):
            if name == "job_status":
                assert answer["id"] == job["id"] and answer["status"] == "running"
            elif name == "get_run":
                assert answer["id"] == status["current_run"]
            else:
                assert isinstance(answer, list), (name, answer)
        assert status["current_run"] in {r["id"] for r in answers[0]}
    finally:
        client.predict(job["id"], api_name="/cancel_job")
    assert _wait(client, job)["status"] == "cancelled"


def test_public_bind_needs_a_password(tmp_path, monkeypatch):
    monkeypatch.delenv("WORKBENCH_AUTH", raising=False)
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--host", "0.0.0.0",
                             "--workspace", str(tmp_path / "ws")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "refusing to bind 0.0.0.0" in result.stderr and "--auth" in result.stderr
    assert not (tmp_path / "ws").exists(), "nothing is started or created"
    with pytest.raises(LaunchRefused, match="refusing to bind 192.0.2.1"):
        settings(["--host", "192.0.2.1", "-w", str(tmp_path)])
    assert settings(["--host", "0.0.0.0", "--auth", "u:p", "-w", str(tmp_path)])["auth"] == ("u", "p")
    assert settings(["--host", "0.0.0.0", "--allow-public-without-password",
                     "-w", str(tmp_path)])["auth"] is None
    with pytest.raises(LaunchRefused, match="USER:PASSWORD"):
        settings(["--auth", "nopassword", "-w", str(tmp_path)])
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    config = settings([])
    assert config["host"] == "127.0.0.1" and config["port"] == 7999
    assert config["workspace"].root == (tmp_path / "home").resolve()
    assert settings(["--port", "8123"])["port"] == 8123


# ----------------------------------------------------------------------------------------------
# the server's own parts (no server)


def test_login_throttle_locks_an_address_for_a_doubling_time_and_a_success_clears_it():
    from workbench.ui.throttle import LoginThrottle

    now = [1000.0]
    throttle = LoginThrottle(free_attempts=3, first_lock_s=2.0, max_lock_s=10.0,
                             forget_after_s=60.0, max_addresses=4, clock=lambda: now[0])
    for _ in range(2):
        throttle.attempt("a")
        assert throttle.retry_after("a") == 0.0, "within the free attempts"
    throttle.attempt("a")
    assert throttle.retry_after("a") == 2.0, "the third failure locks for first_lock_s"
    assert throttle.retry_after("b") == 0.0, "other addresses are not affected"
    waits = []
    for _ in range(4):
        now[0] += throttle.retry_after("a")
        assert throttle.retry_after("a") == 0.0
        throttle.attempt("a")
        waits.append(throttle.retry_after("a"))
    assert waits == [4.0, 8.0, 10.0, 10.0], "doubling, up to max_lock_s"
    now[0] += 10.0
    throttle.attempt("a")
    throttle.succeeded("a")
    assert throttle.retry_after("a") == 0.0
    throttle.attempt("a")
    assert throttle.retry_after("a") == 0.0, "counting starts again after a success"

    # concurrent attempts count before they are answered: the fourth is already refused
    for _ in range(3):
        throttle.attempt("c")
    assert throttle.retry_after("c") > 0
    # addresses are forgotten an hour (here: a minute) after their last try, and at most
    # max_addresses are kept
    now[0] += 61.0
    for name in ("d", "e", "f", "g", "h"):
        throttle.attempt(name)
    assert set(throttle._addresses) == {"e", "f", "g", "h"}


def test_sessions_compute_block_configs_only_when_asked(monkeypatch):
    """A new session (each plain-HTTP API call is one) computes no block's configuration; the
    configurations it gives when asked are Gradio's own, updates included."""
    import gradio as gr
    from gradio.blocks import BlocksConfig
    from gradio.state_holder import SessionState

    from workbench.ui.sessions import LazySessionState, LazyStateHolder

    with gr.Blocks() as demo:
        name = gr.Textbox("x", label="name")
        choice = gr.Dropdown(["a", "b"], value="a", label="choice")
        kept = gr.State({"n": 1})
        gr.Button("go").click(lambda n, c, k: (n, c), [name, choice, kept], [name, choice])
    computed = []
    original = BlocksConfig.config_for_block

    def counting(*args, **kwargs):
        computed.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(BlocksConfig, "config_for_block", staticmethod(counting))
    holder = LazyStateHolder()
    holder.set_blocks(demo)
    lazy = holder["session-1"]
    assert isinstance(lazy, LazySessionState) and computed == []
    assert lazy[kept._id] == {"n": 1} and lazy[name._id] is name
    eager = SessionState(demo)
    assert computed and list(lazy.components) == list(eager.components)
    for state in (lazy, eager):
        state[choice._id] = gr.Dropdown(["a", "b", "c"], value="c", label="choice")
        state._update_value_in_config(name._id, "y")
    assert list(lazy.components) == list(eager.components)
    assert next(c for c in lazy.components if c["id"] == name._id)["props"]["value"] == "y"


@pytest.mark.slow
def test_bitsandbytes_cpu_kernel_warning_is_dropped_and_nothing_else():
    import logging

    import workbench  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please "
                       "make sure you already `pip install kernels`", "No module named 'kernels'")
        logger.warning("some other bitsandbytes warning")
    finally:
        logger.removeHandler(handler)
    assert seen == ["some other bitsandbytes warning"]
    result = subprocess.run([sys.executable, "-c", "import workbench.models, peft"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "gemm_4bit" not in result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------
# the forms (no server)


def test_form_saves_a_loaded_recipe_back_unchanged_and_changes_only_what_was_edited():
    form = Form.of(TrainRecipe)
    text = (EXAMPLES / "road.yaml").read_text()
    data = yaml.safe_load(text)
    state = form.state_of(parse_recipe(data).model_dump(mode="json"))
    loaded = {"text": text, "data": data, "state": state}
    assert form.text(dict(state), loaded)[0] == text, "byte for byte, comments included"

    edited = dict(state)
    edited["train.lr"] = 0.0123
    out, errors = form.text(edited, loaded)
    assert errors == {}
    expected = yaml.safe_load(text)
    expected["train"]["lr"] = 0.0123
    assert yaml.safe_load(out) == expected, "only the edited value changes"

    edited["@tag:adapter"] = "lora"
    edited["adapter[lora].r"] = 4
    changed = yaml.safe_load(form.text(edited, loaded)[0])
    assert changed["adapter"] == {"method": "lora", "r": 4}, "a new method starts from its defaults"
    assert parse_recipe(changed).adapter.r == 4


def test_fresh_form_gives_the_recipe_it_shows():
    form = Form.of(TrainRecipe)
    recipe = tiny_train_recipe(adapter=RoadSpec(variant="road_2", group_size=8).model_dump(),
                               train__regularizer={"phi": 0.5})
    state = form.state_of(recipe.model_dump(mode="json"))
    assert state["@tag:adapter"] == "road" and state["adapter[road].group_size"] == "8"
    assert state["@on:train.regularizer"] is True and state["@on:eval"] is False
    text, errors = form.text(state)
    assert errors == {}
    assert parse_recipe(yaml.safe_load(text)) == recipe, "the compact YAML is the same recipe"
    assert "world_seed" not in text, "values at their defaults are left out"


def test_form_errors_land_next_to_their_fields():
    form = Form.of(TrainRecipe)
    state = form.defaults()
    state["train.lr"] = -1.0
    state["@tag:adapter"] = "road"
    state["adapter[road].group_size"] = "3"
    state["train.eval_at"] = "[1, 2"
    text, yaml_errors = form.text(state)
    recipe, problems = form.validate(text)
    assert recipe is None
    placed = form.place_errors(problems, state)
    assert placed["train.lr"] == "Input should be greater than 0 (got -1.0)"
    assert "adapter.group_size must be even (got 3)" in placed["adapter[road].group_size"]
    assert yaml_errors["train.eval_at"].startswith("not a valid YAML value")
    state["train.lr"], state["adapter[road].group_size"], state["train.eval_at"] = 0.01, "auto", "[5]"
    text, yaml_errors = form.text(state)
    assert yaml_errors == {} and form.validate(text)[1] == []


def test_every_page_event_answers_with_its_outputs(workspace, tmp_path, monkeypatch):
    """The page's own (private) events, called in-process with the page's initial values: each
    returns one value per output, in a form its component accepts; the train form's preview puts
    a bad value's error next to its field."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    from workbench.ui.app import API_NAMES, build_app
    from workbench.ui.service import Service

    (workspace.root / "recipes").mkdir()
    (workspace.root / "recipes" / "r.yaml").write_text(recipe_to_yaml(tiny_train_recipe()))
    demo = build_app(Service(workspace))
    skip = {"load_upload", "editor_upload", "pick_row", "add_data", "submit_form", "editor_submit",
            "evaluate", "export", "play"}  # these queue jobs or start the playground worker
    called = set()
    for block_fn in demo.fns.values():
        if block_fn.name in skip or block_fn.api_visibility != "private":
            continue
        values = [getattr(c, "value", None) for c in block_fn.inputs]
        result = block_fn.fn(*values)
        result = list(result) if isinstance(result, (list, tuple)) and len(block_fn.outputs) > 1 \
            else [result]
        assert len(result) == len(block_fn.outputs), block_fn.name
        for value, component in zip(result, block_fn.outputs):
            if not (isinstance(value, dict) and value.get("__type__") == "update") \
                    and hasattr(component, "postprocess") and not isinstance(component, gr.State):
                component.postprocess(value)
        called.add(block_fn.name)
    assert {"preview", "load_path", "save_form", "job_panel", "run_panel", "on_load",
            "use_template", "editor_validate", "editor_to_form", "instruction_vector_preset",
            "show_comparison", "pick_run", "tick", "visibility"} <= called
    assert sorted(f.api_name for f in demo.fns.values() if f.api_visibility != "private") == \
        sorted(API_NAMES), "the API endpoints keep their names"

    preview = next(f for f in demo.fns.values() if f.name == "preview")
    values = [getattr(c, "value", None) for c in preview.inputs]
    ids = [getattr(c, "label", None) for c in preview.inputs]
    values[ids.index("train.lr")] = -1.0
    text, command, message, *errors = preview.fn(*values)
    assert "lr: -1.0" in text and message.startswith("✗ 1 problem")
    assert "workbench run recipes/demo-lora-cpt-quick.yaml" in command
    shown = [e for e in errors if e.get("visible")]
    assert len(shown) == 1 and "Input should be greater than 0 (got -1.0)" in shown[0]["value"]
    load = next(f for f in demo.fns.values() if f.name == "load_path")
    loaded = load.fn("recipes/r.yaml")
    fields = len(ids) - 2  # the preview's inputs: the form's fields, the loaded recipe, the path
    assert loaded[fields + 3] == (workspace.root / "recipes" / "r.yaml").read_text(), \
        "a loaded recipe's preview is the file itself"


# ----------------------------------------------------------------------------------------------
# merge and quantize forms, comparison, exports, playground (in process)


def _rendered_forms(service):
    """The page's recipe forms, rendered into a throwaway Blocks (their state logic needs the
    components)."""
    import gradio as gr
    from workbench.ui.app import _start_state, make_forms

    forms = make_forms(service)
    with gr.Blocks():
        for kind, form in forms.items():
            form.render(_start_state(kind, form))
    return forms


def _load(service, form, text):
    """What loading a recipe file does: the canonical form state and the `loaded` record."""
    checked = service.check(text)
    state = form.canonical(form.form.state_of(yaml.safe_load(checked["recipe"])))
    return state, {"text": text, "data": yaml.safe_load(text), "state": state, "path": "r.yaml"}


MERGE_TEXT = """# two adapters by TIES
kind: merge
name: ties-two
inputs:
  - {path: run:one, weight: 1}
  - path: run:two
    weight: 0.5
method: ties
parameters: {density: 0.5, scale: 1.0}
"""


def test_merge_form_shows_and_edits_inputs_parameters_and_search(workspace, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from workbench.ui.service import Service

    service = Service(workspace)
    form = _rendered_forms(service)["merge"]
    state, loaded = _load(service, form, MERGE_TEXT)
    values = dict(zip(form.keys, form.updates_for(state)))
    assert values["@ed:inputs:count"] == 2 and values["@ed:inputs:path:1"] == "run:two"
    assert values["@ed:inputs:weight:1"] == 0.5 and values["@ed:parameters:density"] == 0.5
    assert values["@ed:parameters:sign_vote"] == "weighted", "a parameter not given shows its default"
    shown = form.state_from([values[k] for k in form.keys])
    assert form.text(shown, loaded)[0] == MERGE_TEXT, "loaded and saved back byte for byte"

    # another method: its own parameters; those of the old one leave the recipe
    values.update({"method": "dare", "@ed:parameters:p": 0.3, "@ed:inputs:count": 3,
                   "@ed:inputs:path:2": "exports/other", "@ed:inputs:weight:2": -1.0})
    text, problems = form.text(form.state_from([values[k] for k in form.keys]), loaded)
    edited = yaml.safe_load(text)
    assert problems == {}
    assert edited["method"] == "dare" and edited["parameters"] == {"scale": 1.0, "p": 0.3}
    assert edited["inputs"][2] == {"path": "exports/other", "weight": -1.0}
    assert parse_recipe(edited).parameters == {"scale": 1.0, "p": 0.3}

    # problems land next to their controls: an input without a path, a parameter out of range
    values.update({"@ed:inputs:path:2": "", "method": "ties", "@ed:parameters:density": 2.0})
    state = form.state_from([values[k] for k in form.keys])
    _, _, message, updates = form.preview(state, loaded, "r.yaml")
    shown = {name: u["value"] for name, u in zip(form.errors, updates) if u["visible"]}
    assert "choose a run or folder for input 2" in shown["inputs"]
    assert "density" in shown["parameters"] and "must be in (0, 1], got 2.0" in shown["parameters"]
    assert message.startswith("✗ 2 problem")

    # a search over the method's parameter
    values.update({"@ed:inputs:path:2": "run:three", "@ed:parameters:density": 0.5,
                   "@on:search": True, "@ed:search.parameter": "density", "search.values": "[0.2, 0.8]"})
    state = form.state_from([values[k] for k in form.keys])
    text, problems = form.text(state, None)
    search = parse_recipe(yaml.safe_load(text)).search
    assert problems == {} and search.parameter == "density" and search.values == [0.2, 0.8]
    assert [u["choices"] for u in form.editors["search.parameter"].visibility(state)][0] == \
        [("none: sweep search.weights rows", "")] + ["density", "scale"], "numeric parameters of ties"


def test_quantize_form_export_formats_and_errors(workspace, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from workbench.ui.service import Service

    service = Service(workspace)
    form = _rendered_forms(service)["quantize"]
    state = form.canonical(form.form.state_of({"kind": "quantize"}))
    assert state["export"] == ["compressed-tensors", "dequantized"] and state["method"] == "flexround"
    state.update({"method": "rtn", "weights.bits": 3, "export": ["dequantized"], "layers": "[q_proj, v_proj]"})
    text, problems = form.text(state, None)
    assert problems == {} and yaml.safe_load(text) == {
        "kind": "quantize", "method": "rtn", "weights": {"bits": 3}, "layers": ["q_proj", "v_proj"],
        "export": ["dequantized"]}, "only what differs from the defaults"
    state["export"] = ["dequantized", "compressed-tensors"]  # packs 4 or 8 bits only
    _, _, _, updates = form.preview(state, None, "q.yaml")
    shown = {name: u["value"] for name, u in zip(form.errors, updates) if u["visible"]}
    assert len(shown) == 1 and "compressed-tensors packs 4 or 8 bits" in next(iter(shown.values()))
    assert next(iter(shown)) in ("weights.bits", "export")
    assert "export" not in yaml.safe_load(form.text(state, None)[0]), \
        "both formats, in any order of ticking, are the default"


def _finished(ws, kind, name, summary, outputs=None, parents=None, report=None):
    from workbench.workspace import write_json

    run = ws.create_run(kind, name, f"kind: {kind}\n", 0, parents=parents)
    if report is not None:
        write_json(run.path("report.json"), report)
    run.finish(summary, outputs=outputs or {})
    return run


def test_comparison_reads_every_kind_of_run(workspace):
    from workbench.evaluate import comparison_report
    from workbench.ui import compare
    from workbench.ui.tabs import scatter_figure, scatter_frame

    ws = workspace
    train = _finished(ws, "train", "lora", {"domain_gain_pct": 40.0, "general_forgetting_pct": 5.0},
                      report={"model": {"general_ppl": 2.1, "domain_ppl": 30.0}})
    classifier = _finished(ws, "train", "topics", {"task_gain_pts": 12.0, "general_forgetting_pct": 0.5})
    fp = {"general_ppl": 10.0, "domain_ppl": 20.0}
    rtn = {"general_ppl": 11.0, "domain_ppl": 19.0}
    quant = _finished(ws, "quantize", "w4", {"general_ppl": 11.0}, report={
        "setup": {"method": "rtn", "weights": {"bits": 4}},
        "rows": {"full_precision": {"metrics": fp, "weights_bytes": 4 * 2**20},
                 "rtn": {"metrics": rtn, "weights_bytes": 2**20}},
        "comparison": comparison_report({"full precision": fp, "RTN": rtn}, "full precision")})
    merge = _finished(ws, "merge", "plain", {"method": "ties"}, outputs={"model": "model"})
    evaluation = _finished(ws, "eval", "eval-plain", {"domain_gain_pct": 7.5, "general_forgetting_pct": 1.25,
                                                       "model": {"general_ppl": 3.0}}, parents=[merge.id])
    searched = _finished(ws, "merge", "searched", {"search": {
        "chosen": "w=[1, 0]", "domain_gain_pct": 3.0, "general_forgetting_pct": 1.0, "reason": "r"}})
    searched.path("search.md").write_text("| # | point |\n")
    searched.path("pareto.png").write_bytes(b"\x89PNG")
    bare = _finished(ws, "merge", "bare", {"method": "ties"})

    rows = compare.compare_rows(ws, [train.id, classifier.id, quant.id, merge.id, searched.id, bare.id, "nope"])
    by_run = {r["run"]: r for r in rows}
    assert len(rows) == 6
    assert (by_run[train.id]["gain"], by_run[train.id]["general_forgetting_pct"]) == (40.0, 5.0)
    assert by_run[train.id]["general_ppl"] == 2.1 and by_run[train.id]["gain_unit"] == "% domain ppl"
    assert (by_run[classifier.id]["gain"], by_run[classifier.id]["gain_unit"]) == (12.0, "accuracy pts")
    q = by_run[quant.id]
    assert math.isclose(q["domain_gain_pct"], 100 * (1 - 19 / 20))        # 5 %
    assert math.isclose(q["general_forgetting_pct"], 100 * (11 / 10 - 1))  # 10 %
    assert q["weights_mib"] == 1.0 and q["label"].endswith("RTN W4 (exported)")
    assert by_run[merge.id]["gain"] == 7.5 and by_run[merge.id]["source"] == f"eval run {evaluation.id}"
    assert by_run[searched.id]["source"] == "search validation, chosen point"
    assert by_run[bare.id]["gain"] is None and by_run[bare.id]["source"] == "no evaluation yet"
    points = scatter_frame(rows)
    assert len(points) == 5 and points["gain"].dtype == "float64"
    labels = [t.get_text() for t in scatter_figure(rows).axes[0].texts]
    assert sorted(labels) == sorted(points["run"]), "one labelled point per row with both numbers"
    found = compare.search_of(ws, searched.id)
    assert found["image"] == str(searched.path("pareto.png")) and found["table"].startswith("| #")
    assert compare.search_of(ws, train.id) is None


def _random_lora(base_folder: Path, folder: Path, seed: int) -> Path:
    """A LoRA adapter of the tiny base with B ~ N(0, 0.3²), so that it changes the answers."""
    from transformers import AutoModelForCausalLM

    return save_random_lora(AutoModelForCausalLM.from_pretrained(base_folder), folder, r=4, alpha=8,
                            seed=seed, scale=0.3, base=base_folder)


def _random_road(base_folder: Path, folder: Path, seed: int) -> Path:
    import torch
    from peft import RoadConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder),
                           RoadConfig(variant="road_1", group_size=16, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "road_theta" in name:  # angles of about ±1.5 rad: answers change visibly
                param.copy_(torch.randn(param.shape, generator=gen) * 1.5)
    model.peft_config["default"].base_model_name_or_path = str(base_folder)
    model.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_evaluating_a_run_fills_in_its_comparison(workspace):
    """The Evaluate button's recipe, run: the adapter against its base, and the comparison of the
    run shows the eval's numbers; a merged model is evaluated against the base it records."""
    from workbench.recipes import load_recipe
    from workbench.stages import run_recipe
    from workbench.ui import compare
    from workbench.ui.service import Refused, Service

    ws = workspace
    service = Service(ws)
    base_run = next(r for r in ws.runs() if r.info["kind"] == "pretrain")
    run = ws.create_run("train", "random-lora", "kind: train\n", 0, parents=[base_run.id])
    _random_lora(base_run.path("model"), run.path("adapter"), seed=5)
    run.finish({}, outputs={"adapter": "adapter", "base": f"run:{base_run.id}"})
    assert compare.compare_rows(ws, [run.id])[0]["source"] == "no evaluation yet"

    text = service.evaluation_recipe(run.id, "tiny", 256, 2)
    assert yaml.safe_load(text) == {"kind": "eval", "name": "eval-random-lora",
                                    "model": {"path": f"run:{run.id}"}, "world": {"size": "tiny"},
                                    "eval": {"max_tokens": 256, "max_questions": 2}}
    (ws.root / "eval.yaml").write_text(text)
    evaluation = run_recipe(load_recipe(ws.root / "eval.yaml"), ws)
    row = compare.compare_rows(ws, [run.id])[0]
    summary = evaluation.info["summary"]
    assert row["source"] == f"eval run {evaluation.id}" and row["run"] == run.id
    assert (row["gain"], row["general_forgetting_pct"]) == (summary["domain_gain_pct"],
                                                            summary["general_forgetting_pct"])
    assert row["general_ppl"] == summary["model"]["general_ppl"]

    merged = _finished(ws, "merge", "m", {"base": str(base_run.path("model"))}, outputs={"model": "model"})
    assert yaml.safe_load(service.evaluation_recipe(merged.id))["base"] == {"path": f"run:{base_run.id}"}
    with pytest.raises(Refused, match="no finished model or adapter"):
        service.evaluation_recipe(_finished(ws, "eval", "e", {}).id)


def test_exports_are_exact_atomic_and_never_overwrite(workspace):
    import torch

    from workbench import exporting

    ws = workspace
    base_run = next(r for r in ws.runs() if r.info["kind"] == "pretrain")
    base_folder = base_run.path("model")
    run = ws.create_run("train", "random-lora", "kind: train\n", 0, parents=[base_run.id])
    _random_lora(base_folder, run.path("adapter"), seed=3)
    run.finish({}, outputs={"adapter": "adapter", "base": f"run:{base_run.id}"})
    assert exporting.options(run) == ["model", "adapter"]

    out = exporting.export(ws, run.id, "model", "merged", max_shard_mb=1, say=lambda m: None)
    assert out == ws.root / "exports" / "merged"
    merged, base = folder_tensors(out), folder_tensors(base_folder)
    factors = folder_tensors(run.path("adapter"))
    config = json.loads(run.path("adapter", "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    adapted = 0
    for name, tensor in base.items():
        key = "base_model.model." + name.removesuffix(".weight")
        if f"{key}.lora_A.weight" in factors:  # W + s·B·A, by hand
            expected = tensor + scale * factors[f"{key}.lora_B.weight"] @ factors[f"{key}.lora_A.weight"]
            assert torch.allclose(merged[name], expected, atol=1e-6), name
            assert not torch.allclose(merged[name], tensor), name
            adapted += 1
        else:
            assert torch.equal(merged[name], tensor), name
    assert adapted == 3 * 7, "every linear layer of the three blocks"
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["source_run"] == run.id and manifest["kind"] == "model" and manifest["max_shard_mb"] == 1
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1

    with pytest.raises(exporting.ExportError, match="exports/merged already exists"):
        exporting.export(ws, run.id, "adapter", "merged")
    for bad in ("../up", ".hidden", "a/b", ""):
        with pytest.raises(exporting.ExportError, match="export name"):
            exporting.export(ws, run.id, "adapter", bad)

    # a failure half-way leaves no target and no partial folder
    broken = ws.create_run("train", "broken", "kind: train\n", 0)
    _random_lora(base_folder, broken.path("adapter"), seed=4)
    weights = broken.path("adapter", "adapter_model.safetensors")
    weights.write_bytes(weights.read_bytes()[:-100])
    broken.finish({}, outputs={"adapter": "adapter", "base": f"run:{base_run.id}"})
    with pytest.raises(Exception, match="adapter_model.safetensors"):
        exporting.export(ws, broken.id, "model", "broken-model", say=lambda m: None)
    assert sorted(p.name for p in (ws.root / "exports").iterdir()) == ["merged"]


@pytest.mark.slow
def test_playground_mixed_batch_answers_as_each_adapter_alone(workspace):
    """Row i of a mixed batch goes through adapter i only: its greedy answer equals that adapter's
    own, as plain PEFT generates it (LoRA and RoAd; the base as __base__)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.ui.playground import Generator, PlaygroundError, answer

    ws = workspace
    base_folder = next(r for r in ws.runs() if r.info["kind"] == "pretrain").path("model")
    loras = [str(_random_lora(base_folder, ws.root / "adapters" / f"lora{i}", seed=i)) for i in (1, 2)]
    roads = [str(_random_road(base_folder, ws.root / "adapters" / f"road{i}", seed=i)) for i in (1, 2)]
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    prompt = "The river"

    def alone(adapter: str | None) -> str:  # an independent greedy continuation in plain PEFT
        model = AutoModelForCausalLM.from_pretrained(base_folder)
        if adapter:
            model = PeftModel.from_pretrained(model, adapter)
        enc = tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            out = model.eval().generate(**enc, max_new_tokens=8, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id,
                                        eos_token_id=[tokenizer.eos_token_id])
        return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    generator = Generator(ws.root)
    for adapters in (loras, roads):
        models = ["default", *adapters]
        separate = generator.generate(prompt, models, 8)
        mixed = generator.generate_mixed(prompt, models, 8)
        expected = [alone(None), *(alone(a) for a in adapters)]
        assert [a["text"] for a in separate] == expected
        assert [a["text"] for a in mixed] == expected
        assert [a["adapter_name"] for a in mixed] == ["__base__", "a1", "a2"]
        assert len(set(expected)) == 3, "the adapters change the answers (so the rows are told apart)"
    with pytest.raises(PlaygroundError, match="LoRA adapters or RoAd adapters of one base"):
        generator.generate_mixed(prompt, [loras[0], roads[0]], 4)
    assert answer(generator, {"prompt": "", "models": ["default"]})["error"].endswith("write a prompt first")
    assert "between 1 and 256" in answer(generator, {"prompt": "x", "models": ["default"],
                                                     "max_new_tokens": 0})["error"]
