"""Files, written the same way everywhere: a reader sees the old content or the new one, never
half of it, and a failed write leaves no temporary file behind.

- `atomic_file`: a temporary sibling, synced and renamed over the target; what writes a file
  through its path (safetensors' `save_file`) writes into it.
- `write_atomic` (text or bytes) and `write_json` on top of it.
- `atomic_folder`: the same for a whole folder.

Part of the workbench's foundation: it knows no training, merging or quantization method.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator


class WriteFailed(OSError):
    """A file could not be written. The message names the file, and says so when the disk is full."""

    def __str__(self) -> str:
        return self.strerror

    @classmethod
    def of(cls, err: OSError, path: Path) -> "WriteFailed":
        """The same failure (same errno) told with the path the caller meant to write."""
        if err.errno == errno.ENOSPC:
            reason = "the disk is full (no space left on device); free some space and try again"
        else:
            reason = err.strerror or str(err)
        return cls(err.errno, f"cannot write {path}: {reason}", str(path))


# ----------------------------------------------------------------------------------------------
# Atomic writes


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write the whole file into; on success it is synced
    to disk and renamed to `path`, so readers see the old content or the new one, never half of it.

    On any failure the temporary file is removed; an OSError (a full disk, no permission) is
    raised as a `WriteFailed` naming `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as err:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteFailed):
            raise WriteFailed.of(err, path) from err
        raise


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data` to `fd` (os.write may write only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file (text as UTF-8) so readers see the old content or the new one, never half of it.

    On failure (a full disk, no permission) the temporary file is removed and a `WriteFailed`
    naming `path` is raised.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_file(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, payload)
        finally:
            os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def partial_folder(folder: Path) -> Path:
    """The hidden sibling `.<name>.partial` that `atomic_folder` writes `folder` into."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.partial")


@contextmanager
def atomic_folder(folder: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield `.<name>.partial` beside `folder` to write into; on success it becomes `folder`.

    Refuses an existing `folder` unless `overwrite` (then the old folder is replaced only after the
    new one is complete). On any exception the partial folder is removed and `folder` is untouched.
    A partial folder left by a killed process is removed by the next write of the same folder.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder}: output folder already exists")
    tmp = partial_folder(folder)
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from an earlier write that was killed
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if folder.exists():
            if not overwrite:  # appeared while writing: leave it as it is
                raise FileExistsError(f"{folder}: output folder already exists")
            old = folder.with_name(f".{folder.name}.old")
            if old.exists():
                shutil.rmtree(old)  # left over from a replacement that was killed
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
