"""How quickly the app starts, and how responsive it stays while a training job runs.

1. Launch: `python app.py --port P --workspace WS` is started `--launches` times (a fresh process
   each time); the time from starting it to the first HTTP 200 on `/` is recorded.
2. Idle latency: with the last app, `gradio_client` calls the `list_runs` endpoint `--calls` times
   (after `--warmup` untimed calls); each call is timed with `time.perf_counter` from `predict` to
   its answer (the round trip a script or the page sees: HTTP, Gradio's queue, the handler reading
   the workspace).
3. Under a job: a LoRA training job with a step budget it will not reach is submitted through the
   API (`submit_recipe`); once its worker reports training steps (or, in a workspace without the
   embedded base, steps of building the base, also a training loop), the same `--calls` calls are
   timed again; then the job is cancelled. The job's step counter before and after the timed calls
   shows that it kept training meanwhile.
4. Concurrent read-only calls under the job: while the job still trains, `--concurrent` calls
   (default 50) start at once, cycling through the read-only endpoints (`list_runs`, `list_jobs`,
   `job_status` of the load job, `get_run` of its run, `list_exports`): once through plain HTTP
   (Gradio's `POST /gradio_api/call/<name>`, then its event stream; one httpx client), once
   through one `gradio_client.Client` (`submit`, then `result`). Each call is timed from its start
   to its answer, and may take at most `--call-timeout` seconds; a call that fails or times out is
   counted, not timed. Target: p99 under 2 s.

Reported: median and 90th percentile of each phase, the ratio loaded / idle of the medians, the
launch times, how many cores were busy during each phase (`train_throughput.CpuContention`:
own = this script, other = the app, the worker and anything else), and the machine record
(`train_throughput.machine_info`). Targets (issue 6): launch within 10 s on 2 CPU cores, event
latency under a job within 2x idle. Workers run at nice +10 by default ($WORKBENCH_WORKER_NICE;
recorded), which is what keeps the app responsive while a job takes every core.

Run (about a minute once the workspace has the embedded base; without `--workspace` a temporary
workspace is used and the job is the base being built). The cancelled load job and its stopped
run stay in the given workspace's history:

    python bench/ui_latency.py --workspace ./workspace
    python bench/ui_latency.py --quick          # smoke run: 1 launch, 5 calls per phase, 10 at once

Writes bench/results/ui_latency.json (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import itertools
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import CpuContention  # noqa: E402  (one probe for every benchmark)
from train_throughput import machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TARGET_S = 10.0
LATENCY_TARGET_RATIO = 2.0
LONG_STEPS = 1_000_000
CONCURRENT_TARGET_P99_S = 2.0
READ_ONLY_CALLS = ("list_runs", "list_jobs", "job_status", "get_run", "list_exports")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", default=None,
                        help="workspace to serve (default: a new temporary one)")
    parser.add_argument("--launches", type=int, default=3, help="app starts timed (default 3)")
    parser.add_argument("--calls", type=int, default=30, help="timed calls per phase (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    parser.add_argument("--job-start-timeout", type=float, default=600.0,
                        help="seconds to wait for the job's first training step (default 600)")
    parser.add_argument("--concurrent", type=int, default=50,
                        help="read-only calls started at once under the job (default 50)")
    parser.add_argument("--call-timeout", type=float, default=60.0,
                        help="seconds one concurrent call may take before it counts as failed")
    parser.add_argument("--quick", action="store_true",
                        help="1 launch, 5 calls per phase, 10 concurrent calls")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ui_latency.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.launches, args.calls, args.warmup, args.concurrent = 1, 5, 1, 10
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workspace: Path, log_path: Path, timeout: float = 120.0) -> tuple[subprocess.Popen, str, float]:
    """Start the app; return (process, url, seconds until `/` answered 200)."""
    import httpx

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("WORKBENCH_AUTH", "GRADIO_SERVER_PORT")}
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "ab") as log:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port),
                                    "--workspace", str(workspace)], cwd=workspace, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with code {process.returncode}; see {log_path}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return process, url, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        if time.perf_counter() - started > timeout:
            process.kill()
            raise RuntimeError(f"the app did not answer within {timeout:.0f} s; see {log_path}")
        time.sleep(0.05)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def timed_calls(client, calls: int, warmup: int) -> tuple[list[float], dict]:
    """Seconds per `list_runs` call, and how busy the machine was meanwhile."""
    for _ in range(warmup):
        client.predict(api_name="/list_runs")
    probe = CpuContention()
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        client.predict(api_name="/list_runs")
        seconds.append(time.perf_counter() - started)
    return seconds, probe.result()


def percentile(seconds: list[float], q: float) -> float:
    """The `q` quantile of the samples (nearest rank)."""
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(seconds: list[float]) -> dict:
    return {"calls": len(seconds), "median_ms": round(1000 * statistics.median(seconds), 2),
            "p90_ms": round(1000 * percentile(seconds, 0.9), 2),
            "max_ms": round(1000 * max(seconds), 2),
            "samples_ms": [round(1000 * s, 2) for s in seconds]}


def read_only_requests(job_id: str, run_id: str | None, count: int) -> list[tuple[str, list]]:
    """`count` (endpoint, arguments) pairs cycling through the read-only endpoints."""
    arguments = {"list_runs": [], "list_jobs": [], "job_status": [job_id], "get_run": [run_id],
                 "list_exports": []}
    names = [n for n in READ_ONLY_CALLS if n != "get_run" or run_id]
    return [(name, arguments[name]) for name in itertools.islice(itertools.cycle(names), count)]


def http_call(http, name: str, data: list) -> None:
    """One endpoint call through plain HTTP (`http`: an httpx.Client on the app's URL, shared by
    the threads): queue it, then read its event stream to the end."""
    posted = http.post(f"gradio_api/call/{name}", json={"data": data})
    posted.raise_for_status()
    event_id = posted.json()["event_id"]
    event = None
    with http.stream("GET", f"gradio_api/call/{name}/{event_id}") as stream:
        stream.raise_for_status()
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ").strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                break
    if event != "complete":
        raise RuntimeError(f"{name}: the stream ended with {event!r}, not 'complete'")


def client_call(client, name: str, data: list, timeout: float) -> None:
    """One endpoint call through gradio_client."""
    client.submit(*data, api_name=f"/{name}").result(timeout=timeout)


def concurrent_calls(call, requests: list[tuple[str, list]], timeout: float) -> dict:
    """Start every request at once (one thread each) through `call(name, data)`; return the
    seconds of the calls that answered and the errors of those that did not."""
    start = threading.Barrier(len(requests))

    def timed(request: tuple[str, list]) -> float:
        start.wait(timeout=timeout)
        began = time.perf_counter()
        call(*request)
        return time.perf_counter() - began

    probe = CpuContention()
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        futures = [pool.submit(timed, request) for request in requests]
        seconds, errors = [], []
        for future in futures:
            try:
                seconds.append(future.result(timeout=2 * timeout + 10))
            except Exception as err:  # noqa: BLE001 - a failed call is counted and reported
                errors.append(f"{type(err).__name__}: {err}"[:300])
    wall = time.perf_counter() - began
    result = {"calls": len(requests), "answered": len(seconds), "failed": len(errors),
              "errors": errors[:5], "burst_wall_s": round(wall, 3), "cpu": probe.result()}
    if seconds:
        result.update(median_ms=round(1000 * statistics.median(seconds), 2),
                      p99_ms=round(1000 * percentile(seconds, 0.99), 2),
                      max_ms=round(1000 * max(seconds), 2),
                      samples_ms=[round(1000 * s, 2) for s in sorted(seconds)])
    return result


def concurrent_read_only(url: str, job_id: str, run_id: str | None, count: int,
                         timeout: float) -> dict:
    """The concurrent read-only burst, through plain HTTP and through gradio_client."""
    import httpx
    from gradio_client import Client

    requests = read_only_requests(job_id, run_id, count)
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    with httpx.Client(base_url=url, timeout=timeout, limits=limits) as http:
        by_http = concurrent_calls(lambda name, data: http_call(http, name, data), requests, timeout)
    client = Client(url, verbose=False, download_files=False, max_workers=count)
    by_client = concurrent_calls(lambda name, data: client_call(client, name, data, timeout),
                                 requests, timeout)
    for label, result in (("plain HTTP", by_http), ("gradio_client", by_client)):
        timing = (f"median {result['median_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms"
                  if "median_ms" in result else "no answers")
        print(f"{count} concurrent read-only calls under a job ({label}): {result['answered']} "
              f"answered, {result['failed']} failed; {timing}", flush=True)
    return {"endpoints": [name for name, _ in requests[:len(READ_ONLY_CALLS)]],
            "call_timeout_s": timeout, "target_p99_ms": 1000 * CONCURRENT_TARGET_P99_S,
            "plain_http": by_http, "gradio_client": by_client}


def job_recipe() -> str:
    """A LoRA training on the embedded base that runs until it is cancelled."""
    import yaml

    return yaml.safe_dump({
        "kind": "train", "name": "ui-latency-load",
        "data": {"world_size": "tiny", "seq_len": 128, "replay_ratio": 0.25},
        "adapter": {"method": "lora", "r": 16, "alpha": 32},
        "train": {"lr": 1e-3, "batch_size": 16, "max_steps": LONG_STEPS, "checkpoint_every": 0},
        "eval": None}, sort_keys=False)


def wait_for_steps(client, job_id: str, timeout: float) -> dict:
    """The job's view once its worker has logged a training step (of the base or the adapter)."""
    deadline = time.monotonic() + timeout
    while True:
        view = client.predict(job_id, api_name="/job_status")
        if view["status"] not in ("queued", "running"):
            raise RuntimeError(f"the load job ended ({view['status']}): {view.get('error')}\n"
                               f"{view.get('log_tail')}")
        if view.get("step", 0) >= 1:
            return view
        if time.monotonic() > deadline:
            raise RuntimeError(f"the load job logged no step within {timeout:.0f} s")
        time.sleep(1.0)


def run(args: argparse.Namespace) -> dict:
    import yaml
    from gradio_client import Client

    temporary = None
    if args.workspace:
        workspace = Path(args.workspace).expanduser().resolve()
        workspace.mkdir(parents=True, exist_ok=True)
    else:
        temporary = tempfile.TemporaryDirectory(prefix="ui-latency-")
        workspace = Path(temporary.name) / "ws"
        workspace.mkdir()
    log_path = workspace / ".ui-latency-app.log"
    has_base = any((p / "run.json").is_file() and "pretrain" in p.name
                   for p in (workspace / "runs").glob("*")) if (workspace / "runs").is_dir() else False

    launches = []
    for k in range(args.launches):
        process, url, seconds = launch(workspace, log_path)
        launches.append(round(seconds, 3))
        print(f"launch {k + 1}: {seconds:.2f} s to HTTP 200 on /", flush=True)
        if k < args.launches - 1:
            stop(process)
    job_id = None
    try:
        client = Client(url, verbose=False, download_files=False)
        idle, idle_load = timed_calls(client, args.calls, args.warmup)
        print(f"idle: median {statistics.median(idle) * 1000:.1f} ms over {len(idle)} calls", flush=True)
        job = client.predict(job_recipe(), api_name="/submit_recipe")
        job_id = job["id"]
        before = wait_for_steps(client, job_id, args.job_start_timeout)
        loaded, loaded_load = timed_calls(client, args.calls, args.warmup)
        burst = concurrent_read_only(url, job_id, before.get("current_run"), args.concurrent,
                                     args.call_timeout)
        after = client.predict(job_id, api_name="/job_status")
        print(f"under a job: median {statistics.median(loaded) * 1000:.1f} ms over {len(loaded)} calls "
              f"(job step {before['step']} → {after['step']})", flush=True)
    finally:
        if job_id is not None:
            try:
                client.predict(job_id, api_name="/cancel_job")
            except Exception as err:  # noqa: BLE001 - report, then stop the app anyway
                print(f"could not cancel job {job_id}: {err}", file=sys.stderr)
        stop(process)
        if temporary is not None:
            temporary.cleanup()

    idle_s, loaded_s = summary(idle), summary(loaded)
    ratio = loaded_s["median_ms"] / idle_s["median_ms"]
    launch_median = statistics.median(launches)
    return {
        "benchmark": "ui_latency",
        "machine": machine_info("cpu"),
        "settings": {"launches": args.launches, "calls": args.calls, "warmup": args.warmup,
                     "concurrent": args.concurrent,
                     "event": "gradio_client list_runs", "workspace_had_base": has_base,
                     "worker_nice": os.environ.get("WORKBENCH_WORKER_NICE", "10 (default)"),
                     "load_job": yaml.safe_load(job_recipe())},
        "launch_s": {"samples": launches, "median": round(launch_median, 3), "max": max(launches),
                     "target": LAUNCH_TARGET_S, "within_target": launch_median <= LAUNCH_TARGET_S},
        "idle": {**idle_s, "cpu": idle_load},
        "under_job": {**loaded_s, "cpu": loaded_load,
                      "job": {"kind_running": "adapter training" if has_base else "building the base",
                              "step_before": before["step"], "step_after": after["step"],
                              "run": after.get("current_run")}},
        "concurrent_read_only_under_job": burst,
        "ratio_under_job_to_idle": round(ratio, 3),
        "latency_target_ratio": LATENCY_TARGET_RATIO,
        "latency_within_target": ratio <= LATENCY_TARGET_RATIO,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"launch median {result['launch_s']['median']:.2f} s (target ≤ {LAUNCH_TARGET_S:g} s); "
          f"list_runs median idle {result['idle']['median_ms']:.1f} ms, under a job "
          f"{result['under_job']['median_ms']:.1f} ms: {result['ratio_under_job_to_idle']:.2f}x "
          f"(target ≤ {LATENCY_TARGET_RATIO:g}x). Written to {out}")
    for label in ("plain_http", "gradio_client"):
        burst = result["concurrent_read_only_under_job"][label]
        print(f"{burst['calls']} concurrent read-only calls ({label}): {burst['answered']} answered, "
              f"p99 {burst.get('p99_ms', float('nan')):.0f} ms "
              f"(target < {1000 * CONCURRENT_TARGET_P99_S:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
