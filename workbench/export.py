"""Saving a loaded model as a Hugging Face folder, atomically (`workbench.io.atomic_folder`).

An export that is killed or fails half-way leaves the target untouched; the hidden partial folder
is removed on failure, or by the next export of the same target if the process was killed.
"""

from __future__ import annotations

from pathlib import Path

from .io import atomic_folder


def save_model_folder(model, tokenizer, folder: Path, max_shard_size: str = "2GB",
                      overwrite: bool = False) -> Path:
    """Save model (sharded safetensors + index), config, generation config and tokenizer."""
    with atomic_folder(folder, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(folder)
