"""Starting the app (`python app.py`, `workbench app`) with safe defaults.

- Binds 127.0.0.1 unless `--host` says otherwise, and refuses an address other machines can reach
  without a password (`--auth USER:PASSWORD` or $WORKBENCH_AUTH) unless
  `--allow-public-without-password` is given. Never opens a share link.
- Port from `--port`, else $GRADIO_SERVER_PORT, else 7860; workspace from `--workspace`, else
  $WORKBENCH_HOME, else ./workspace.
- Gradio's analytics, monitoring page, browser-side run history, MCP server and share links are
  off; uploads are capped (`--max-upload-mb`) and land in <workspace>/.gradio; the only folder
  Gradio may serve files from is the workspace.
- Recipes from the browser are validated and run under the confined resolver
  (`workbench.resolver`): files only inside the workspace, `run:` references as run ids,
  `model.trust_remote_code` only with `--allow-remote-code`, pickled checkpoints only with
  `--allow-pickle`; the job and playground workers run under the same policy.
- The password is kept in memory only: it is removed from the environment the job workers and
  the playground's generation worker inherit, and is written into no file.
- Wrong passwords are slowed down: after a few failed logins in a row, an address waits a
  doubling time before its next try (`throttle`).
- A new Gradio session (each plain-HTTP API call is one) costs next to nothing (`sessions`), so
  concurrent read-only calls do not wait for one another.
- Jobs (training, merging, quantizing, evaluating, exporting) run in worker processes one at a
  time, at a lower CPU priority than the app; generation runs in its own worker process.
- Gradio's own start-up lines are left out (its hint about share links does not apply here); the
  app prints where it serves.
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import os
import socket
import sys
import threading

from .. import resolver
from ..resolver import PICKLE_FLAG, REMOTE_CODE_FLAG, Resolver
from ..workspace import ENV_HOME, Workspace

ENV_AUTH = "WORKBENCH_AUTH"
ENV_PORT = "GRADIO_SERVER_PORT"
DEFAULT_PORT = 7860


class LaunchRefused(ValueError):
    """The app will not start with these settings; the message says why and what to do."""


def build_parser(prog: str = "app.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="The adapter workbench in the browser.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=None,
                        help=f"port (default: ${ENV_PORT} or {DEFAULT_PORT})")
    parser.add_argument("--workspace", "-w", default=None,
                        help=f"workspace folder (default: ${ENV_HOME} or ./workspace)")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                        help=f"require this login (or set ${ENV_AUTH}; the variable keeps the "
                             "password out of the process list)")
    parser.add_argument("--allow-public-without-password", action="store_true",
                        help="bind a non-loopback address without a password (anyone who can reach "
                             "the port can run jobs and read the workspace)")
    parser.add_argument("--max-upload-mb", type=int, default=200,
                        help="largest file a browser may upload, in MB (default 200)")
    parser.add_argument(REMOTE_CODE_FLAG, action="store_true",
                        help="let recipes from the browser set model.trust_remote_code (Python "
                             "files shipped with a model then run in the job workers)")
    parser.add_argument(PICKLE_FLAG, action="store_true",
                        help="let recipes from the browser set model.allow_pickle (pickled "
                             "checkpoints, loaded with weights_only=True)")
    return parser


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """`user:password` as a pair; LaunchRefused for a value without a user or a password."""
    if value is None or value == "":
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise LaunchRefused(f"--auth / ${ENV_AUTH}: expected USER:PASSWORD with both parts non-empty")
    return user, password


def check_bind(host: str, auth, allow_public: bool) -> None:
    """Refuse to serve a reachable address with no password unless explicitly allowed."""
    if auth is None and not allow_public and not is_loopback(host):
        raise LaunchRefused(
            f"refusing to bind {host}: it is reachable from other machines and no password is set. "
            f"Set one with --auth USER:PASSWORD or ${ENV_AUTH}, or pass "
            "--allow-public-without-password if that is really intended.")


def settings(argv: list[str] | None = None, prog: str = "app.py") -> dict:
    """Parsed and checked launch settings (nothing started yet)."""
    args = build_parser(prog).parse_args(argv)
    auth = parse_auth(args.auth if args.auth is not None else os.environ.get(ENV_AUTH))
    check_bind(args.host, auth, args.allow_public_without_password)
    port = args.port if args.port is not None else int(os.environ.get(ENV_PORT) or DEFAULT_PORT)
    if args.max_upload_mb < 1:
        raise LaunchRefused("--max-upload-mb must be at least 1")
    ws = Workspace(args.workspace)
    return {"host": args.host, "port": port, "workspace": ws, "auth": auth,
            "max_upload_mb": args.max_upload_mb,
            "resolver": Resolver.confined(ws.root, allow_remote_code=args.allow_remote_code,
                                          allow_pickle=args.allow_pickle)}


def prepare_environment(ws: Workspace) -> None:
    """Gradio settings read from the environment at import time: set them before importing it."""
    os.environ.pop(ENV_AUTH, None)  # workers inherit the environment; the password stays here
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["GRADIO_RUN_HISTORY"] = "False"
    os.environ["GRADIO_SHARE"] = "False"
    os.environ["GRADIO_MCP_SERVER"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(ws.root / ".gradio" / "uploads")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(ws.root / ".gradio" / "cached_examples")
    os.environ.pop("GRADIO_ALLOWED_PATHS", None)


def launch_app(config: dict, block: bool = True):
    """Build the app over the workspace, start the job scheduler, serve."""
    ws: Workspace = config["workspace"]
    ws.root.mkdir(parents=True, exist_ok=True)
    prepare_environment(ws)
    from ..jobs import JobQueue
    from .app import CSS, build_app
    from .service import Service

    resolver.install(config["resolver"])  # every recipe this process validates is a browser's
    queue = JobQueue(ws, resolver=config["resolver"])
    threading.Thread(target=queue.run_forever, name="job-queue", daemon=True).start()
    service = Service(ws, queue)
    atexit.register(service.playground.close)  # the generation worker ends with the app
    demo = build_app(service)
    demo.queue(default_concurrency_limit=4)
    demo.launch(
        server_name=config["host"], server_port=config["port"], auth=config["auth"],
        share=False, max_file_size=f"{config['max_upload_mb']}mb",
        allowed_paths=[str(ws.root)], enable_monitoring=False, run_history=False,
        footer_links=["api", "settings"], ssr_mode=False, mcp_server=False, pwa=False,
        show_error=False, inbrowser=False, prevent_thread_lock=True, css=CSS, quiet=True,
        auth_message="Adapter workbench: log in with the --auth / WORKBENCH_AUTH user.",
        app_kwargs=server_hooks(),
    )
    print(f"Serving on {serving_url(config['host'], demo.server_port)}", flush=True)
    if block:
        demo.block_thread()
    return demo


def server_hooks() -> dict:
    """What the app adds to Gradio's web server (FastAPI settings for `launch(app_kwargs=...)`):
    the login throttle in front of `/login`, and cheap sessions installed at start-up."""
    from starlette.middleware import Middleware

    from .sessions import lazy_sessions_lifespan
    from .throttle import LoginThrottleMiddleware

    return {"middleware": [Middleware(LoginThrottleMiddleware)], "lifespan": lazy_sessions_lifespan}


def serving_url(host: str, port: int) -> str:
    """The address to open in a browser (an IPv6 address in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def main(argv: list[str] | None = None, prog: str = "app.py") -> int:
    try:
        config = settings(argv, prog)
    except LaunchRefused as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Workspace: {config['workspace'].root}", flush=True)
    launch_app(config)
    return 0
