"""The playground: one prompt, several models or adapters of the workspace, answers side by side.

Generation runs in a separate, long-lived worker process (`python -m workbench.ui.playground`),
not in the web process:

- the app never imports torch or transformers nor holds model weights, so it starts fast and its
  memory stays small;
- a generation loop is Python holding the GIL token after token; in the web process it would
  stall every other request (job progress, run lists) for as long as it runs;
- a request that runs too long is ended by killing the worker (`timeout`), which cannot hurt the
  app; the next request starts a fresh one;
- the worker stays warm between requests and keeps the last few models loaded, so a second prompt
  answers in the time generation takes.

Requests go one at a time (a lock in the app), with `max_new_tokens` bounded by MAX_NEW_TOKENS.
Decoding is greedy, so answers are reproducible. The worker reads one JSON request per line on
stdin and writes one JSON answer per line on its own copy of stdout (anything the libraries print
goes to stderr, the worker's log).

Mixed-adapter batch (`mixed=True`): LoRA or RoAd adapters of one base (and the base itself, as
PEFT's `__base__`) are loaded once, side by side, into one PEFT model (`adapters.road.load_many`
for RoAd, `PeftModel.load_adapter` for LoRA), and one batch is generated with
`adapter_names=[...]`: row i goes through adapter i only. The answers equal those of each adapter
on its own (the playground shows both when asked, and the tests check it).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

MAX_NEW_TOKENS = 256
MAX_MODELS = 8
CACHE_SIZE = 3
DEFAULT_TIMEOUT = 300.0


class PlaygroundError(ValueError):
    """A request the playground cannot answer; the message says why."""


# ----------------------------------------------------------------------------------------------
# generation (in the worker)


def _stop_ids(tokenizer) -> list[int]:
    """End of text, and the chat format's end-of-turn token where the tokenizer has one."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    if isinstance(end_id, int) and end_id != tokenizer.unk_token_id:
        ids.append(end_id)
    return ids


def _greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, **kwargs) -> list[str]:
    """Greedy continuations of `prompts` (one batch, left-padded)."""
    import torch

    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    finally:
        tokenizer.padding_side = side
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=_stop_ids(tokenizer) or None, **kwargs)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in out[:, enc["input_ids"].shape[1]:]]


class Generator:
    """Models of one workspace, loaded on first use and kept (the last CACHE_SIZE)."""

    def __init__(self, workspace: Path):
        from workbench.workspace import Workspace

        self.ws = Workspace(workspace)
        self.cache: OrderedDict = OrderedDict()

    def _cached(self, key, load):
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        while len(self.cache) >= CACHE_SIZE:
            self.cache.popitem(last=False)
        self.cache[key] = value = load()
        return value

    def _single(self, ref: str):
        from workbench.models import load_model
        from workbench.recipes import ModelSpec

        def load():
            model, tokenizer, _ = load_model(ModelSpec(path=ref), self.ws)
            return model, tokenizer

        return self._cached(("single", ref), load)

    def generate(self, prompt: str, models: list[str], max_new_tokens: int) -> list[dict]:
        """Each model on its own: [{model, text, seconds}]."""
        answers = []
        for ref in models:
            model, tokenizer = self._single(ref)
            started = time.perf_counter()
            text = _greedy(model, tokenizer, [prompt], max_new_tokens)[0]
            answers.append({"model": ref, "text": text, "seconds": round(time.perf_counter() - started, 3)})
        return answers

    def mixed_plan(self, models: list[str]) -> dict:
        """The base folder and adapters of a mixed batch; PlaygroundError when the models are not
        LoRA or RoAd adapters of one base (or that base itself)."""
        from workbench.models import resolve_source

        from workbench.exporting import adapter_kind

        sources = [resolve_source(ref, self.ws) for ref in models]
        bases = {str(Path(s.folder).resolve()) for s in sources if s.folder is not None}
        if len(bases) != 1:
            raise PlaygroundError("a mixed batch needs adapters of one base model; these come from "
                                  f"{len(bases)} different models: {', '.join(sorted(bases))}")
        kinds = {}
        for ref, source in zip(models, sources):
            if source.adapter is not None:
                kinds[ref] = adapter_kind(source.adapter)
        if not kinds:
            raise PlaygroundError("a mixed batch needs at least one adapter")
        if len(set(kinds.values())) != 1 or next(iter(kinds.values())) not in ("lora", "road"):
            raise PlaygroundError("a mixed batch takes LoRA adapters or RoAd adapters of one base "
                                  f"(got {', '.join(f'{r}: {k}' for r, k in kinds.items())}); "
                                  "generate them separately instead")
        return {"base": next(iter(bases)), "sources": sources, "kind": next(iter(kinds.values()))}

    def generate_mixed(self, prompt: str, models: list[str], max_new_tokens: int) -> list[dict]:
        """One batch, row i through model i (`adapter_names`), the base as `__base__`."""
        plan = self.mixed_plan(models)
        names = ["__base__" if s.adapter is None else f"a{i}" for i, s in enumerate(plan["sources"])]

        def load():
            from workbench import resolver
            from workbench.models import load_model
            from workbench.sections import ModelSpec

            with resolver.workspace_record():  # the base the resolver already found for these models
                base, tokenizer, _ = load_model(ModelSpec(path=plan["base"]), self.ws)
            folders = {name: s.adapter for name, s in zip(names, plan["sources"]) if s.adapter is not None}
            if plan["kind"] == "road":
                from adapters.road import load_many

                model = load_many(base, folders)
            else:
                from peft import PeftModel

                first, *rest = folders.items()
                model = PeftModel.from_pretrained(base, first[1], adapter_name=first[0])
                for name, folder in rest:
                    model.load_adapter(str(folder), adapter_name=name)
            model.eval()
            return model, tokenizer

        model, tokenizer = self._cached(("mixed", tuple(models)), load)
        started = time.perf_counter()
        texts = _greedy(model, tokenizer, [prompt] * len(models), max_new_tokens, adapter_names=names)
        seconds = round(time.perf_counter() - started, 3)
        return [{"model": ref, "text": text, "seconds": seconds, "adapter_name": name}
                for ref, text, name in zip(models, texts, names)]


def check_request(request: dict) -> dict:
    """The request with its values checked and bounded; PlaygroundError otherwise."""
    prompt = request.get("prompt")
    models = request.get("models") or []
    if not isinstance(prompt, str) or not prompt.strip():
        raise PlaygroundError("write a prompt first")
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise PlaygroundError("models: a list of run ids, `default` or folders")
    if not 1 <= len(models) <= MAX_MODELS:
        raise PlaygroundError(f"choose 1 to {MAX_MODELS} models (got {len(models)})")
    if len(set(models)) != len(models):
        raise PlaygroundError("a model is chosen twice")
    tokens = request.get("max_new_tokens", 32)
    if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or \
            not 1 <= int(tokens) <= MAX_NEW_TOKENS:
        raise PlaygroundError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS} (got {tokens!r})")
    return {"prompt": prompt, "models": models, "max_new_tokens": int(tokens),
            "mixed": bool(request.get("mixed")), "separate": bool(request.get("separate", True))}


def answer(generator: Generator, request: dict) -> dict:
    """One request: {"ok", "separate": [...], "mixed": [...] or None, "error"}."""
    try:
        request = check_request(request)
        args = (request["prompt"], request["models"], request["max_new_tokens"])
        mixed = generator.generate_mixed(*args) if request["mixed"] else None
        separate = generator.generate(*args) if request["separate"] or not request["mixed"] else None
        return {"ok": True, "separate": separate, "mixed": mixed, "error": None}
    except Exception as err:  # noqa: BLE001 - every failure goes back to the page as a message
        return {"ok": False, "separate": None, "mixed": None, "error": f"{type(err).__name__}: {err}"}


def serve(workspace: str) -> int:
    """The worker loop: a JSON request per line in, a JSON answer per line out."""
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever the libraries print goes to the log, not into the answers
    sys.stdout = sys.stderr
    generator = Generator(Path(workspace))
    protocol.write(json.dumps({"ready": True}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except json.JSONDecodeError as err:
            reply = {"ok": False, "error": f"not a JSON request: {err}"}
        else:
            reply = answer(generator, request if isinstance(request, dict) else {})
            reply["id"] = request.get("id") if isinstance(request, dict) else None
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()
    return 0


# ----------------------------------------------------------------------------------------------
# the worker, seen from the app


class PlaygroundWorker:
    """The app's handle on the generation worker: started on first use, one request at a time,
    killed (and started again on the next request) when a request runs past `timeout`."""

    def __init__(self, workspace: Path, python: str = sys.executable, timeout: float = DEFAULT_TIMEOUT,
                 secret_env: tuple[str, ...] = ("WORKBENCH_AUTH",), worker_flags: list[str] = ()):
        self.workspace = Path(workspace)
        self.worker_flags = list(worker_flags)  # the app's resolver policy (Resolver.worker_flags)
        self.python, self.timeout, self.secret_env = python, timeout, secret_env
        self.process: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self._buffer = b""
        self._counter = 0

    @property
    def log_path(self) -> Path:
        return self.workspace / ".gradio" / "playground.log"

    def _start(self) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k not in self.secret_env}
        env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            process = subprocess.Popen([self.python, "-m", "workbench.ui.playground", "--workspace",
                                        str(self.workspace), *self.worker_flags], cwd=self.workspace, env=env,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                       start_new_session=True, bufsize=0)
        self.process, self._buffer = process, b""
        self._read(process, time.monotonic() + self.timeout)  # {"ready": true}
        return process

    def _read(self, process: subprocess.Popen, deadline: float) -> dict:
        """The worker's next answer line (read from the pipe's descriptor: nothing is left in a
        buffer that `select` cannot see)."""
        fd = process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise PlaygroundError(f"no answer within {self.timeout:.0f} s; the playground worker "
                                      "was stopped (the next request starts a new one)")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    code = process.wait(timeout=10)
                    self.process = None
                    raise PlaygroundError(f"the playground worker ended (exit code {code}); see "
                                          f"{self.log_path}")
                self._buffer += chunk
                continue
            if process.poll() is not None:
                self.process = None
                raise PlaygroundError(f"the playground worker ended (exit code {process.returncode}); "
                                      f"see {self.log_path}")
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def request(self, request: dict) -> dict:
        """Send one request and wait for its answer (at most `timeout` seconds)."""
        check_request(request)  # refuse bad values before starting anything
        with self.lock:
            deadline = time.monotonic() + self.timeout
            process = self.process if self.process is not None and self.process.poll() is None \
                else self._start()
            self._counter += 1
            request = {**request, "id": self._counter}
            try:
                process.stdin.write((json.dumps(request) + "\n").encode())
                process.stdin.flush()
            except (BrokenPipeError, OSError):
                self.close()
                raise PlaygroundError("the playground worker ended; try again") from None
            return self._read(process, deadline)

    def close(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from workbench import resolver

    parser = argparse.ArgumentParser(prog="python -m workbench.ui.playground")
    parser.add_argument("--workspace", required=True)
    resolver.add_policy_arguments(parser)
    args = parser.parse_args(argv)
    resolver.install(resolver.policy_from_arguments(args, args.workspace))
    return serve(args.workspace)


if __name__ == "__main__":
    sys.exit(main())
