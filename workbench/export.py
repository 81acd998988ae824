"""Writing Hugging Face model folders atomically: write into a hidden sibling, rename at the end.

An export that is killed half-way leaves the target untouched (only the hidden temporary folder,
which the next export of the same target removes).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def save_model_folder(model, tokenizer, folder: Path, max_shard_size: str = "2GB",
                      overwrite: bool = False) -> Path:
    """Save model (sharded safetensors + index), config, generation config and tokenizer."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder}: output folder already exists")
    tmp = folder.with_name(f".{folder.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)
    return folder
