"""Exports: a finished run's model, adapter or quantized model, written to
`<workspace>/exports/<name>/` by the exporters the runs themselves use.

Kinds (which ones a run offers: `options`):

- `model`: a full Hugging Face folder in shards of at most `max_shard_mb` MB. From a run's model
  folder, every tensor is copied as stored into the new shards (`merge.streaming.
  merge_lora_into_base` with no adapter); from a LoRA or RoAd adapter, the adapter merged into its
  base: W + s·B·A (LoRA) or R·W (RoAd) through `merge.dense.merge_folders`.
- `adapter`: the adapter folder as the run saved it (PEFT: adapter_config.json +
  adapter_model.safetensors; MixDA: mixda_config.json + mixda.safetensors), tokenizer included.
- `compressed-tensors` / `dequantized`: a quantize run's pack-quantized or float folder, re-sharded
  like `model` (quantization_config kept in config.json).

Every export is atomic (`workbench.export.atomic_folder`): it is written into a hidden sibling and
renamed into place at the end, so a failed or killed export leaves nothing at the target; an
existing target is refused. `export.json` in the folder records the source run, the kind and the
shard size. The app queues exports as jobs (`python -m workbench.ui.exporting ...`, see
`workbench.jobs.JobQueue.submit_export`), so they run in a worker process like training.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import shutil
import sys
from pathlib import Path

from ..io import PICKLE_SUFFIXES, atomic_folder
from ..methods import is_adapter_folder, method_of_folder
from ..workspace import Run, RunNotFound, Workspace, write_json

EXPORTS = "exports"
KINDS = {
    "model": "full model folder (sharded safetensors)",
    "adapter": "adapter folder (PEFT / MixDA)",
    "compressed-tensors": "compressed-tensors pack-quantized folder",
    "dequantized": "dequantized float model folder",
}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MERGEABLE_ADAPTERS = ("lora", "road")  # adapters that fold into the weights


class ExportError(ValueError):
    """An export that cannot be made; the message says why."""


def adapter_kind(folder: Path) -> str | None:
    """The method that saved an adapter folder (lora, road, prompt, mixda, ...), or None."""
    method = method_of_folder(Path(folder)) if is_adapter_folder(Path(folder)) else None
    return method.name if method is not None else None


def _outputs(run: Run) -> dict:
    info = run.info
    if info.get("status") != "done":
        raise ExportError(f"run {run.id} is {run.status}; only a finished run can be exported")
    return info.get("outputs") or {}


def options(run: Run) -> list[str]:
    """The export kinds a finished run offers."""
    outputs = _outputs(run)
    found = []
    if run.info.get("kind") == "quantize":
        if "compressed" in outputs:
            found.append("compressed-tensors")
        if "dequantized" in outputs:
            found.append("dequantized")
        return found
    if "model" in outputs:
        found.append("model")
    if "adapter" in outputs:
        if adapter_kind(run.path(outputs["adapter"])) in MERGEABLE_ADAPTERS:
            found.append("model")
        found.append("adapter")
    return found


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
    outputs = run.info.get("outputs") or {}
    if kind == "compressed-tensors":
        return {"run": run, "kind": kind, "folder": run.path(outputs["compressed"]), "base": None}
    if kind == "dequantized":
        return {"run": run, "kind": kind, "folder": run.path(outputs["dequantized"]), "base": None}
    if kind == "adapter":
        return {"run": run, "kind": kind, "folder": run.path(outputs["adapter"]), "base": None}
    if "model" in outputs:
        return {"run": run, "kind": kind, "folder": run.path(outputs["model"]), "base": None}
    return {"run": run, "kind": kind, "folder": run.path(outputs["adapter"]), "base": outputs.get("base")}


def export(ws: Workspace, run_ref: str, kind: str, name: str, max_shard_mb: int = 2048,
           say=print) -> Path:
    """Write the export (see the module docstring); returns its folder."""
    if max_shard_mb < 1:
        raise ExportError(f"max_shard_mb must be at least 1 (got {max_shard_mb})")
    what = plan(ws, run_ref, kind)
    target = target_of(ws, name)
    run, source = what["run"], what["folder"]
    max_shard_bytes = int(max_shard_mb) * 2**20
    say(f"exporting {kind} of run {run.id} ({source.relative_to(ws.root)}) to {EXPORTS}/{target.name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    manifest = {"source_run": run.id, "source_kind": run.info.get("kind"), "kind": kind,
                "from": str(source.relative_to(ws.root)), "max_shard_mb": max_shard_mb,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    with atomic_folder(target) as tmp:
        tmp.rmdir()  # each exporter writes `tmp` atomically itself
        if kind == "adapter":
            _copy_adapter(source, tmp)
        elif what["base"] is not None:
            base = _merge_adapter(ws, what["base"], source, tmp, max_shard_bytes)
            manifest["base"] = base
        else:
            from merge.streaming import merge_lora_into_base

            merge_lora_into_base(source, [], tmp, max_shard_bytes=max_shard_bytes)
        manifest["files"] = sorted(p.name for p in tmp.iterdir())
        write_json(tmp / "export.json", manifest)
    say(f"written: {target} ({', '.join(manifest['files'])})")
    return target


def _copy_adapter(source: Path, out: Path) -> None:
    """The adapter folder's files (never pickles), written atomically into `out`."""
    files = [p for p in sorted(source.iterdir()) if p.is_file() and not p.name.startswith(".")]
    pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ExportError(f"{source}: pickled files ({', '.join(pickles)}) are not exported")
    with atomic_folder(out) as tmp:
        for file in files:
            shutil.copy2(file, tmp / file.name)


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


def main(argv: list[str] | None = None) -> int:
    """The export worker: `python -m workbench.ui.exporting RUN KIND NAME --workspace WS`."""
    parser = argparse.ArgumentParser(prog="python -m workbench.ui.exporting",
                                     description="Export a finished run into <workspace>/exports/NAME.")
    parser.add_argument("run")
    parser.add_argument("kind", choices=list(KINDS))
    parser.add_argument("name")
    parser.add_argument("--max-shard-mb", type=int, default=2048)
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--job", default=None, help="the job this worker runs (for the job queue)")
    args = parser.parse_args(argv)
    try:
        export(Workspace(args.workspace), args.run, args.kind, args.name, args.max_shard_mb,
               say=lambda message: print(message, flush=True))
    except KeyboardInterrupt:
        print("error: export stopped; nothing was written", flush=True)
        return 130
    except (ExportError, ValueError, OSError) as err:
        print(f"error: {err}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
