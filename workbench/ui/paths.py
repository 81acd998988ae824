"""What the workspace holds, as the app's pickers list it: data files, model and adapter folders,
recipes. Paths are shown relative to the workspace; what a request names is checked by the
app's resolver (`workbench.resolver`), not here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from ..methods import adapter_config_files

SKIP_DIRS = {"runs", "jobs", ".gradio"}  # listed through their own views, or app internals


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
    """Adapter folders in the workspace: those with a registered method's config file."""
    marks = set(adapter_config_files())
    return [relative(root, folder) for folder, _, files in walk(root) if marks & set(files)]


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
