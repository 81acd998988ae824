"""The export stage: a finished run's model, adapter or quantized model written to
`<workspace>/exports/<name>/` by the exporters the runs themselves use.

    workbench export SOURCE --format FORMAT --name NAME [--max-shard-mb N]

SOURCE is a run id (a unique prefix, or `run:<id>`). Formats (which ones a run offers: `options`):

- `model`: a full Hugging Face folder in shards of at most `max_shard_mb` MB. From a run's model
  folder, every tensor is copied as stored into the new shards (`merge.streaming.
  merge_lora_into_base` with no adapter); from a LoRA or RoAd adapter, the adapter merged into its
  base: W + s·B·A (LoRA) or R·W (RoAd) through `merge.dense.merge_folders`.
- `adapter`: the adapter folder as the run saved it (PEFT: adapter_config.json +
  adapter_model.safetensors; MixDA: mixda_config.json + mixda.safetensors), tokenizer included.
- `compressed-tensors` / `dequantized`: a quantize run's pack-quantized or float folder, re-sharded
  like `model` (quantization_config kept in config.json).

Another format plugs in with `register_format(ExportFormat(name, description, source, write))`:
`source(run, outputs)` says what of a finished run it exports (or None when the run offers
nothing for it), `write(ws, plan, out, max_shard_bytes)` writes the folder `out`.

Like every stage, an export makes a run folder (kind `export`, named NAME, its parent the source
run): `recipe.yaml` records what was exported (source, format, name, max_shard_mb), `run.log` and
`progress.jsonl` what happened (tensors or files written), and `run.json` the export under
`outputs.export` (`exports/NAME`, relative to the workspace) with a summary (files, bytes,
seconds). The folder is written atomically (`workbench.export.atomic_folder`): into a hidden
sibling renamed into place at the end, so a failed or killed export leaves nothing at the target;
an existing target is refused before any run is made. `export.json` in the folder records the
source run, the format, the shard size and the export run. The app queues exports as jobs running
this command (`workbench.jobs.JobQueue.submit_export`), so they run in a worker process like
training.

This module imports no torch at import time: the app's web process reads `options`, `plan`,
`target_of` and `list_exports` from it.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from .io import PICKLE_SUFFIXES, atomic_folder, write_json
from .methods import is_adapter_folder, method_of_folder
from .progress import phase as progress_phase
from .workspace import Run, RunNotFound, Workspace

EXPORTS = "exports"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MERGEABLE_ADAPTERS = ("lora", "road")  # adapters that fold into the weights
DEFAULT_MAX_SHARD_MB = 2048


class ExportError(ValueError):
    """An export that cannot be made; the message says why."""


def adapter_kind(folder: Path) -> str | None:
    """The method that saved an adapter folder (lora, road, prompt, mixda, ...), or None."""
    method = method_of_folder(Path(folder)) if is_adapter_folder(Path(folder)) else None
    return method.name if method is not None else None


# ----------------------------------------------------------------------------------------------
# Formats


@dataclass(frozen=True)
class ExportFormat:
    """One export format: what of a finished run it exports, and how it writes the folder.

    `source(run, outputs)` → {"folder": the folder read, "base": the base an adapter merges into
    or None}, or None when the run offers nothing for this format. `write(ws, plan, out,
    max_shard_bytes)` writes the folder `out` (absent before; atomically: a failure leaves nothing)
    from `plan` (the source's fields plus "run" and "kind") and returns what to add to the
    folder's export.json."""

    name: str
    description: str
    source: Callable[[Run, dict], "dict | None"]
    write: Callable[[Workspace, dict, Path, int], dict]


FORMATS: dict[str, ExportFormat] = {}
KINDS: dict[str, str] = {}  # format name → description, in the order a run offers them


def register_format(fmt: ExportFormat) -> ExportFormat:
    FORMATS[fmt.name] = fmt
    KINDS[fmt.name] = fmt.description
    return fmt


def _model_source(run: Run, outputs: dict) -> dict | None:
    if run.info.get("kind") == "quantize":
        return None  # its formats are compressed-tensors and dequantized
    if "model" in outputs:
        return {"folder": run.path(outputs["model"]), "base": None}
    if "adapter" in outputs and adapter_kind(run.path(outputs["adapter"])) in MERGEABLE_ADAPTERS:
        return {"folder": run.path(outputs["adapter"]), "base": outputs.get("base")}
    return None


def _write_model(ws: Workspace, plan: dict, out: Path, max_shard_bytes: int) -> dict:
    if plan["base"] is not None:
        return {"base": _merge_adapter(ws, plan["base"], plan["folder"], out, max_shard_bytes)}
    return _write_resharded(ws, plan, out, max_shard_bytes)


def _write_resharded(ws: Workspace, plan: dict, out: Path, max_shard_bytes: int) -> dict:
    """Every tensor copied as stored into new shards (and the config, tokenizer files)."""
    from merge.streaming import merge_lora_into_base

    merge_lora_into_base(plan["folder"], [], out, max_shard_bytes=max_shard_bytes)
    return {}


def _adapter_source(run: Run, outputs: dict) -> dict | None:
    if run.info.get("kind") == "quantize" or "adapter" not in outputs:
        return None
    return {"folder": run.path(outputs["adapter"]), "base": None}


def _write_adapter(ws: Workspace, plan: dict, out: Path, max_shard_bytes: int) -> dict:
    _copy_adapter(plan["folder"], out)
    return {}


def _quantized_source(output: str) -> Callable[[Run, dict], "dict | None"]:
    def source(run: Run, outputs: dict) -> dict | None:
        if run.info.get("kind") != "quantize" or output not in outputs:
            return None
        return {"folder": run.path(outputs[output]), "base": None}

    return source


register_format(ExportFormat("model", "full model folder (sharded safetensors)", _model_source, _write_model))
register_format(ExportFormat("adapter", "adapter folder (PEFT / MixDA)", _adapter_source, _write_adapter))
register_format(ExportFormat("compressed-tensors", "compressed-tensors pack-quantized folder",
                             _quantized_source("compressed"), _write_resharded))
register_format(ExportFormat("dequantized", "dequantized float model folder",
                             _quantized_source("dequantized"), _write_resharded))


# ----------------------------------------------------------------------------------------------
# What an export reads and where it writes


def _outputs(run: Run) -> dict:
    info = run.info
    if info.get("status") != "done":
        raise ExportError(f"run {run.id} is {run.status}; only a finished run can be exported")
    return info.get("outputs") or {}


def options(run: Run) -> list[str]:
    """The export formats a finished run offers."""
    outputs = _outputs(run)
    return [name for name, fmt in FORMATS.items() if fmt.source(run, outputs) is not None]


def check_name(name: str) -> str:
    name = (name or "").strip()
    if not NAME.fullmatch(name):
        raise ExportError(f"export name {name!r}: use letters, digits, '.', '_' and '-' (one folder "
                          "name, not starting with '.' or '-')")
    return name


def target_of(ws: Workspace, name: str) -> Path:
    """<workspace>/exports/<name>; ExportError if it exists already."""
    target = ws.root / EXPORTS / check_name(name)
    if target.exists():
        raise ExportError(f"{EXPORTS}/{name} already exists; choose another name (an export is "
                          "never written over an existing folder)")
    return target


def plan(ws: Workspace, run_ref: str, kind: str) -> dict:
    """What an export reads: {"run", "kind", "folder" (source), "base" (adapter merges)}."""
    try:
        run = ws.get(run_ref)
    except RunNotFound as err:
        raise ExportError(str(err)) from None
    offered = options(run)
    if kind not in offered:
        raise ExportError(f"run {run.id} ({run.info.get('kind')}) offers "
                          f"{', '.join(offered) or 'no export'}, not {kind!r}")
    return {"run": run, "kind": kind, **FORMATS[kind].source(run, run.info.get("outputs") or {})}


# ----------------------------------------------------------------------------------------------
# The stage


def run_export(ws: Workspace, source: str, kind: str, name: str,
               max_shard_mb: int = DEFAULT_MAX_SHARD_MB, say=print) -> Run:
    """Export run `source` in format `kind` to exports/<name> as an `export` run (see the module
    docstring); returns the finished run. Everything that can be checked first (the run, the
    format, the name, the target) is checked before the run folder is made."""
    if max_shard_mb < 1:
        raise ExportError(f"max_shard_mb must be at least 1 (got {max_shard_mb})")
    max_shard_mb = int(max_shard_mb)
    what = plan(ws, source, kind)
    target = target_of(ws, name)
    name, source_run, folder = target.name, what["run"], what["folder"]
    record = {"kind": "export", "name": name, "source": f"run:{source_run.id}", "format": kind,
              "max_shard_mb": max_shard_mb}
    run = ws.create_run("export", name, yaml.safe_dump(record, sort_keys=False), 0,
                        parents=[source_run.id])
    with ws.running(run):
        started = time.time()
        message = (f"exporting {kind} of run {source_run.id} ({folder.relative_to(ws.root)}) to "
                   f"{EXPORTS}/{name}")
        run.log(message)
        say(message)
        target.parent.mkdir(parents=True, exist_ok=True)
        manifest = {"source_run": source_run.id, "source_kind": source_run.info.get("kind"),
                    "kind": kind, "from": str(folder.relative_to(ws.root)), "max_shard_mb": max_shard_mb,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "run": run.id}
        with atomic_folder(target) as tmp:
            tmp.rmdir()  # each exporter writes `tmp` atomically itself
            manifest.update(FORMATS[kind].write(ws, what, tmp, max_shard_mb * 2**20))
            manifest["files"] = sorted(p.name for p in tmp.iterdir())
            write_json(tmp / "export.json", manifest)
        files = sorted(p for p in target.iterdir() if p.is_file())
        summary = {"format": kind, "source_run": source_run.id, "folder": f"{EXPORTS}/{name}",
                   "files": [p.name for p in files], "bytes": sum(p.stat().st_size for p in files),
                   "seconds": round(time.time() - started, 2)}
        if "base" in manifest:
            summary["base"] = manifest["base"]
        write_json(run.path("summary.json"), summary)
        run.finish(summary, outputs={"export": f"{EXPORTS}/{name}"})
        say(f"written: {target} ({', '.join(manifest['files'])})")
    return run


def export(ws: Workspace, run_ref: str, kind: str, name: str,
           max_shard_mb: int = DEFAULT_MAX_SHARD_MB, say=print) -> Path:
    """`run_export`, returning the exported folder."""
    run = run_export(ws, run_ref, kind, name, max_shard_mb, say)
    return ws.root / run.info["outputs"]["export"]


def _copy_adapter(source: Path, out: Path) -> None:
    """The adapter folder's files (never pickles), written atomically into `out`; a progress
    event per file ("exporting")."""
    files = [p for p in sorted(source.iterdir()) if p.is_file() and not p.name.startswith(".")]
    pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ExportError(f"{source}: pickled files ({', '.join(pickles)}) are not exported")
    with atomic_folder(out) as tmp, progress_phase("exporting", len(files), "file") as events:
        for file in files:
            shutil.copy2(file, tmp / file.name)
            events.advance()


def _merge_adapter(ws: Workspace, base_ref: str, adapter: Path, out: Path, max_shard_bytes: int) -> str:
    """The adapter merged into its base (W + s·B·A, or R·W) as a sharded model folder."""
    from merge.dense import merge_folders
    from workbench.models import resolve_source

    base = resolve_source(base_ref, ws)
    if base.folder is None:
        raise ExportError(f"the adapter's base {base_ref!r} has no model folder to merge into")
    merge_folders(base.folder, [(adapter, 1.0)], out, method="task_arithmetic", output="model",
                  max_shard_bytes=max_shard_bytes, trained_on=[base.folder])
    return base.ref


def list_exports(ws: Workspace) -> list[dict]:
    """Exports in the workspace, newest first: name, folder (its absolute path), relative, kind,
    source run, created, files, bytes. The folder is not under a key `path`: gradio_client takes a
    dict with a `path` for a file to download, and would try to fetch the folder."""
    folder = ws.root / EXPORTS
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if not path.is_dir() or path.name.startswith("."):
            continue
        manifest = {}
        try:
            manifest = json.loads((path / "export.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            pass
        files = sorted(p.name for p in path.iterdir() if p.is_file())
        found.append({"name": path.name, "folder": str(path), "relative": f"{EXPORTS}/{path.name}",
                      "kind": manifest.get("kind"), "source_run": manifest.get("source_run"),
                      "created": manifest.get("created"), "files": files,
                      "bytes": sum((path / f).stat().st_size for f in files)})
    return sorted(found, key=lambda e: e.get("created") or "", reverse=True)
