"""Writing folders atomically: write into a hidden sibling, rename it into place at the end.

An export that is killed or fails half-way leaves the target untouched; the hidden partial folder
is removed on failure, or by the next export of the same target if the process was killed.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_folder(folder: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield `.<name>.partial` beside `folder` to write into; on success it becomes `folder`.

    Refuses an existing `folder` unless `overwrite` (then the old folder is replaced only after the
    new one is complete). On any exception the partial folder is removed and `folder` is untouched.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder}: output folder already exists")
    tmp = folder.with_name(f".{folder.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from an earlier export that was killed
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if folder.exists():
            if not overwrite:  # appeared while writing: leave it as it is
                raise FileExistsError(f"{folder}: output folder already exists")
            old = folder.with_name(f".{folder.name}.old")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model_folder(model, tokenizer, folder: Path, max_shard_size: str = "2GB",
                      overwrite: bool = False) -> Path:
    """Save model (sharded safetensors + index), config, generation config and tokenizer."""
    with atomic_folder(folder, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(folder)
