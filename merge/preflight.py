"""Pre-flight checks of merge inputs against the base, from configs and tokenizer files only.

Merged models must share one tokenizer: the same vocabulary (token → id) and the same added
tokens, and the same `vocab_size` in their configs. Tensor names and shapes are checked from the
safetensors headers by `merge.dense` and `merge.streaming` before any weight is read.
"""

from __future__ import annotations

import json
from pathlib import Path


def _tokenizer_identity(folder: Path) -> tuple | None:
    """(vocabulary, added tokens) from tokenizer.json, or None when the folder has none."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    added = sorted((t["id"], t["content"]) for t in data.get("added_tokens", []))
    return data.get("model", {}).get("vocab"), added


def _vocab_size(folder: Path) -> int | None:
    path = folder / "config.json"
    return json.loads(path.read_text()).get("vocab_size") if path.is_file() else None


def check_same_tokenizer(base_folder: Path, inputs: list[Path]) -> None:
    """Refuse an input whose tokenizer or vocab size differs from the base's, naming its file."""
    base_folder = Path(base_folder)
    base_tokenizer, base_vocab = _tokenizer_identity(base_folder), _vocab_size(base_folder)
    for folder in map(Path, inputs):
        vocab = _vocab_size(folder)
        if base_vocab is not None and vocab is not None and vocab != base_vocab:
            raise ValueError(f"{folder / 'config.json'}: vocab_size {vocab}, but the base "
                             f"{base_folder} has {base_vocab}; merged models must share a vocabulary")
        tokenizer = _tokenizer_identity(folder)
        if base_tokenizer is not None and tokenizer is not None and tokenizer != base_tokenizer:
            raise ValueError(f"{folder / 'tokenizer.json'}: a different tokenizer from the base's "
                             f"({base_folder / 'tokenizer.json'}); merged models must share one")
