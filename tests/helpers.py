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

from adapters.lora import LoraSpec
from workbench.base import DEFAULT_BASE_NAME
from workbench.recipes import (DataSpec, EvalSpec, ModelSpec, PretrainRecipe, TrainRecipe, TrainSpec,
                               WorldSpec)

ROOT = Path(__file__).resolve().parents[1]

TINY_PRETRAIN = PretrainRecipe(
    name=DEFAULT_BASE_NAME, world=WorldSpec(size="tiny"), vocab_size=1024,
    architecture="llama-small", seq_len=64,
    train=TrainSpec(lr=3e-3, batch_size=16, max_steps=40, checkpoint_every=0, warmup_ratio=0.05),
    eval=EvalSpec(max_tokens=1024, max_questions=8),
)


def tiny_train_recipe(**changes) -> TrainRecipe:
    """A LoRA training recipe that runs in seconds on the tiny base; `changes` set fields by path
    (`train__max_steps=3`)."""
    recipe = TrainRecipe(
        name="tiny-lora", model=ModelSpec(path="default"),
        data=DataSpec(world_size="tiny", seq_len=64, replay_ratio=0.25),
        adapter=LoraSpec(r=4, alpha=8),
        train=TrainSpec(lr=5e-3, batch_size=8, max_steps=6, checkpoint_every=3, warmup_ratio=0.0),
        eval=None,
    )
    data = recipe.model_dump()
    for key, value in changes.items():
        node = data
        *parents, last = key.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    return TrainRecipe.model_validate(data)


def folder_tensors(folder) -> dict:
    """Every tensor of a model or adapter folder, read shard by shard with plain safetensors (an
    independent reader for checking what our exports wrote)."""
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def add_noise(model, seed: int, scale: float):
    """Adds N(0, scale²) noise, drawn from a generator seeded with `seed`, to every parameter of
    `model` in place (a stand-in for a fine-tune of it); returns the model."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale)
    return model


def save_random_lora(model, folder, *, r: int, alpha: int, seed: int, scale: float = 0.2,
                     target_modules="all-linear", use_rslora: bool = False, base=None):
    """`model` wrapped in a PEFT LoRA with B ~ N(0, scale²) (drawn from a generator seeded with
    `seed`) instead of PEFT's zeros, so that its update s·B·A is not zero, saved to `folder`; with
    `base`, the adapter records that folder as its base model. Returns `folder`."""
    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules,
                                                  use_rslora=use_rslora, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    if base is not None:
        peft_model.peft_config["default"].base_model_name_or_path = str(base)
    peft_model.save_pretrained(folder, safe_serialization=True)
    return folder


def random_lora_adapter(folder, r: int, alpha: int, seed: int, use_rslora: bool = False,
                        vocab_size: int = 64, base=None, **overrides):
    """A PEFT LoRA folder on a fresh llama-tiny (all linear layers) with B ~ N(0, 0.2²) instead of
    PEFT's zeros, so that its update s·B·A is not zero; with `base`, it records that base."""
    from workbench.models import build_model_from_config

    model = build_model_from_config("llama-tiny", vocab_size=vocab_size, **overrides)
    return save_random_lora(model, folder, r=r, alpha=alpha, seed=seed, use_rslora=use_rslora,
                            base=base)


def lora_updates(adapters, dtype) -> dict:
    """Σ w·s·B·A per adapted weight (named as in the base model), computed in `dtype` from the
    factors in the adapters' own files; `adapters` is a list of (folder, weight), and s is
    lora_alpha / r, or lora_alpha / √r for rsLoRA."""
    import json
    import math

    from safetensors.torch import load_file

    total: dict = {}
    for folder, weight in adapters:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
        r, alpha = config["r"], config["lora_alpha"]
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        raw = load_file(Path(folder) / "adapter_model.safetensors")
        for key, a in raw.items():
            if ".lora_A." not in key:
                continue
            b = raw[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            term = weight * scale * (b.to(dtype) @ a.to(dtype))
            total[name] = total[name] + term if name in total else term
    return total


def copy_linked_runs(workspace) -> None:
    """Replaces each run folder of `workspace` that is a symbolic link (the `workspace` fixture
    links the session's tiny base) with a copy of what it links to: the app reads only inside its
    workspace and refuses links that lead out of it."""
    import shutil

    for run in workspace.runs_dir.iterdir():
        if run.is_symlink():
            target = run.resolve()
            run.unlink()
            shutil.copytree(target, run)


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
    env.pop("WORKBENCH_AUTH", None)  # no password unless `auth` gives one
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
