"""The workspace boundary of the app: every path a user types or a recipe names stays inside it.

A typed path is read relative to the workspace, resolved (`..` and symbolic links followed) and
refused when it ends up outside. Recipes submitted from the app are checked the same way, value by
value, before they are validated (a mergekit recipe reads its `config` file while validating) or
queued; their workers run in the workspace folder, so relative paths mean the same there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

REFERENCE_PREFIXES = ("world:", "run:", "stage:", "config:")
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".yaml", ".yml", ".safetensors", ".bin", ".pt", ".csv",
                 ".parquet", ".gguf")
SKIP_DIRS = {"runs", "jobs", ".gradio"}  # listed through their own views, or app internals


class PathRefused(ValueError):
    """A path that leads outside the workspace (or is not allowed there)."""


def inside(root: Path, typed: str, what: str = "path") -> Path:
    """`typed` as an absolute path inside the workspace `root`; PathRefused if it leads outside."""
    if not isinstance(typed, str) or not typed.strip():
        raise PathRefused(f"{what}: empty path")
    if "\0" in typed:
        raise PathRefused(f"{what}: {typed!r} contains a NUL character")
    root = Path(root).resolve()
    path = Path(typed.strip()).expanduser()
    resolved = (path if path.is_absolute() else root / path).resolve()
    if resolved != root and root not in resolved.parents:
        raise PathRefused(f"{what}: {typed!r} is outside the workspace {root}; the app reads and "
                          "writes files only inside it")
    return resolved


def looks_like_path(value: str) -> bool:
    """A recipe string that names a file or folder (not `world:...`, `run:...`, a method name)."""
    if value == "default" or value.startswith(REFERENCE_PREFIXES):
        return False
    return ("/" in value or "\\" in value or value.startswith(("~", ".")) or
            value.lower().endswith(FILE_SUFFIXES))


def _strings(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{key}.{i}")
    elif isinstance(node, str):
        yield key, node


def check_recipe_paths(data: Any, root: Path, source: str = "recipe") -> None:
    """Refuse a recipe (a dict as read from YAML) that names a path outside the workspace.

    Every string value that looks like a path is checked, whatever its key, so new recipe kinds
    are covered without a list of their path fields; mergekit's `model+lora` names both parts.
    """
    for key, value in _strings(data):
        for part in value.split("+") if "+" in value else [value]:
            if part and looks_like_path(part):
                inside(root, part, f"{source}: {key}")


def anchored(data: Any, root: Path) -> Any:
    """A copy of a recipe dict with relative path-like strings made absolute under `root`.

    Workers run in the workspace folder, so that is what a relative path means; validating the
    copy in another process (the app) reads any file the schema opens while validating (a
    mergekit `config` file) from the workspace too, not from that process's folder.
    """
    if isinstance(data, dict):
        return {k: anchored(v, root) for k, v in data.items()}
    if isinstance(data, list):
        return [anchored(v, root) for v in data]
    if isinstance(data, str) and looks_like_path(data) and "+" not in data:
        path = Path(data).expanduser()
        return data if path.is_absolute() else str(Path(root) / path)
    return data


def relative(root: Path, path: Path) -> str:
    """`path` as the user sees it: relative to the workspace."""
    return str(Path(path).relative_to(Path(root).resolve()))


def walk(root: Path, max_depth: int = 3) -> Iterator[tuple[Path, list[str], list[str]]]:
    """os.walk over the workspace to `max_depth`, skipping hidden folders and runs/ and jobs/."""
    root = Path(root).resolve()
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and
                         not (depth == 0 and d in SKIP_DIRS) and depth < max_depth)
        yield Path(folder), dirs, sorted(files)


def data_files(root: Path) -> list[str]:
    """Text and JSONL files in the workspace (outside runs/ and jobs/), relative paths."""
    return [relative(root, folder / f) for folder, _, files in walk(root)
            for f in files if f.endswith((".txt", ".jsonl"))]


def model_folders(root: Path) -> list[str]:
    """Hugging Face model folders in the workspace (config.json and safetensors weights)."""
    found = []
    for folder, _, files in walk(root):
        if "config.json" in files and any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json")
                                          for f in files):
            found.append(relative(root, folder))
    return found


def adapter_folders(root: Path) -> list[str]:
    """Adapter folders in the workspace: PEFT (adapter_config.json) and MixDA (mixda_config.json)."""
    return [relative(root, folder) for folder, _, files in walk(root)
            if "adapter_config.json" in files or "mixda_config.json" in files]


def recipe_files(root: Path) -> list[str]:
    """YAML files in the workspace, then the recipes of its runs (runs/<id>/recipe.yaml)."""
    root = Path(root).resolve()
    found = [relative(root, folder / f) for folder, _, files in walk(root)
             for f in files if f.endswith((".yaml", ".yml"))]
    runs = root / "runs"
    if runs.is_dir():
        found += [f"runs/{p.name}/recipe.yaml" for p in sorted(runs.iterdir(), reverse=True)
                  if (p / "recipe.yaml").is_file()]
    return found
