"""Helpers shared by the tests (imported as `from helpers import ...`; conftest keeps fixtures)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served_app(workspace: Path, log_file: Path, *args: str, auth: str | None = None,
               timeout: float = 120) -> Iterator[str]:
    """`python app.py` over `workspace` on a free port of 127.0.0.1, its output in `log_file`;
    yields its URL once it answers (waiting at most `timeout` seconds), stops it afterwards."""
    import httpx

    port = free_port()
    env = {**os.environ, "WORKBENCH_WORKER_NICE": "0"}
    env.pop("GRADIO_SERVER_PORT", None)
    if auth is not None:
        env["WORKBENCH_AUTH"] = auth
    log = open(log_file, "wb")
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port),
                                "--workspace", str(workspace), *args], cwd=Path(workspace).parent,
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, Path(log_file).read_text()
            try:
                if httpx.get(url, timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the app did not answer within {timeout:.0f} s"
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
