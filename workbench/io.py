"""Files, written and read the same way everywhere: atomic writes, safetensors headers, sharded
safetensors folders, and the check for NaN / inf weights.

- Atomic writes: `atomic_file` (a temporary sibling renamed over the target; what writes a file
  through its path, such as safetensors' `save_file`, writes into it), `write_atomic` (text or
  bytes), `write_json`, and `atomic_folder` for a whole folder. A reader sees the old content or
  the new one, never half of it; a failed write leaves no temporary file behind.
- Safetensors: `read_safetensors_header` checks a file's header before any weight is read;
  `model_layout` lists every tensor of a (sharded) model folder from the headers;
  `peft_adapter_header` checks that a folder holds a PEFT adapter (config and safetensors weights).
- Sharded folders: `write_sharded` writes tensors as they are produced into `model.safetensors`,
  or `model-0000k-of-0000N.safetensors` plus `model.safetensors.index.json` past the shard size
  (the layout transformers writes and reads).
- Finite weights: `all_finite` and `nonfinite_counts` (which tensors hold NaN / inf, and how many).

Part of the workbench's foundation: it knows no training, merging or quantization method. torch
is imported only by the functions that handle tensors, so that writing a JSON file does not load it.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import math
import os
import queue
import shutil
import struct
import sys
import threading
import weakref
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

if TYPE_CHECKING:
    import torch

SINGLE_NAME = "model.safetensors"  # an unsharded model's weights
INDEX_NAME = "model.safetensors.index.json"  # tensor name → shard file of a sharded model
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # pickled weights: loading can run code
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors dtypes of floating-point tensors


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded: the message says which path or file and why."""


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


# ----------------------------------------------------------------------------------------------
# Reading safetensors headers


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(header, offset of the data buffer in the file) of a checked safetensors file; see
    `read_safetensors_header`."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path}: corrupt safetensors file (shorter than its 8-byte header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 512 * 1024 * 1024:
            raise ModelLoadError(f"{path}: corrupt or truncated safetensors file "
                                 f"(header claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelLoadError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupt safetensors header (not a JSON object)")
    ends = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise ModelLoadError(f"{path}: corrupt safetensors header (bad entry for tensor '{name}')")
        ends.append(offsets[1])
    expected = 8 + n + (max(ends) if ends else 0)
    if size != expected:
        raise ModelLoadError(f"{path}: truncated or corrupt safetensors file "
                             f"({size} bytes on disk, header describes {expected})")
    return header, 8 + n


def read_safetensors_header(path: Path) -> dict:
    """Parse and check a safetensors header; raise ModelLoadError naming the file if corrupt.

    Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets}}, then the data buffer, whose size must equal the largest end offset.
    """
    return safetensors_header(path)[0]


def peft_adapter_header(folder: Path) -> dict:
    """The checked safetensors header of a PEFT adapter folder's weights. FileNotFoundError when
    the folder lacks adapter_config.json or adapter_model.safetensors (pickled weights are not
    read), ModelLoadError when the weights file is damaged."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder}: no adapter_config.json (not a PEFT adapter folder)")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors (pickled adapters are refused)")
    return read_safetensors_header(weights)


def tensor_header(path: Path) -> dict:
    """A safetensors header without its metadata; FileNotFoundError naming the file if absent."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: file not found")
    return {k: v for k, v in read_safetensors_header(path).items() if k != "__metadata__"}


def base_shape(base_layout: dict, name: str, folder: Path, what: str) -> list[int]:
    """The shape of base tensor `name`; ValueError when the base lacks what `folder` `what`s."""
    if name not in base_layout:
        raise ValueError(f"tensor {name}: {what} {folder} but not in the base model")
    return base_layout[name][2]


def read_json_object(path: Path) -> dict:
    """A JSON object from a file; ValueError naming the file when unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def model_layout(folder: Path) -> dict[str, tuple[Path, str, list[int], int]]:
    """Every tensor of a model folder: (shard, safetensors dtype, shape, byte size), in storage order."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: base model folder not found")
    index_path = folder / INDEX_NAME
    weight_map = None
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index_path}: unreadable shard index ({type(err).__name__}: {err})") from None
        shard_files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in shard_files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: shard {missing[0]} is listed in {INDEX_NAME} but "
                                    f"missing from the folder ({len(missing)} missing: "
                                    f"{', '.join(missing[:3])})")
    else:
        shard_files = sorted(folder.glob("*.safetensors"))
    if not shard_files:
        raise FileNotFoundError(f"{folder}: no safetensors weights in the base model folder")
    layout: dict[str, tuple[Path, str, list[int], int]] = {}
    for shard in shard_files:
        header = read_safetensors_header(shard)
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0])
        for name, entry in entries:
            if name in layout:
                raise ValueError(f"{folder}: tensor {name} is stored twice "
                                 f"({layout[name][0].name} and {shard.name})")
            start, end = entry["data_offsets"]
            layout[name] = (shard, entry["dtype"], list(entry["shape"]), end - start)
    if weight_map is not None:
        for name, file_name in weight_map.items():
            if name not in layout or layout[name][0].name != file_name:
                raise ValueError(f"tensor {name}: {INDEX_NAME} in {folder} places it in {file_name}, "
                                 f"but that shard's header does not hold it")
    return layout


# ----------------------------------------------------------------------------------------------
# Writing sharded safetensors folders


@functools.cache
def safetensors_dtypes() -> dict[str, "torch.dtype"]:
    """safetensors dtype name → torch dtype, for the dtypes read and written here byte for byte."""
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
            "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
            "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def tensor_nbytes(dtype: str, shape: list[int]) -> int:
    """Bytes of a tensor of safetensors dtype `dtype` and shape `shape`."""
    return math.prod(shape) * safetensors_dtypes()[dtype].itemsize


def shard_name(k: int, n: int) -> str:
    """The file name of shard k (from 1) of n, as transformers names them; `SINGLE_NAME` if n = 1."""
    return SINGLE_NAME if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names (from (name, byte size) pairs) grouped into shards, greedily and in order: a
    new shard starts when the next tensor would take this one past `max_shard_bytes` (a tensor
    larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_sharded(folder: Path, specs: list[tuple[str, str, list[int]]],
                  tensors: Iterable["torch.Tensor | Iterable[torch.Tensor]"], max_shard_bytes: int,
                  metadata: dict[str, str] | None = None) -> dict[str, str]:
    """Write the tensors of `specs` ((name, safetensors dtype, shape), in order) into `folder` as
    `tensors` produces them (each a tensor or its blocks of rows, see `write_shard`): shards of at
    most `max_shard_bytes` (`plan_shards`) named by `shard_name`, and `INDEX_NAME` when there is
    more than one. Returns the weight map (tensor name → shard file name).

    Meant for the partial folder of `atomic_folder`: a failed write of a shard is raised as an
    OSError naming the shard, and the caller's partial folder is removed.
    """
    folder = Path(folder)
    sizes = [(name, tensor_nbytes(dtype, shape)) for name, dtype, shape in specs]
    shards = plan_shards(sizes, max_shard_bytes)
    by_name = {spec[0]: spec for spec in specs}
    produced = iter(tensors)
    n = len(shards)
    weight_map: dict[str, str] = {}
    for k, names in enumerate(shards, start=1):
        file_name = shard_name(k, n)
        weight_map.update({name: file_name for name in names})
        try:
            write_shard(folder / file_name, [by_name[name] for name in names],
                        itertools.islice(produced, len(names)), metadata=metadata)
        except OSError as err:  # disk full, quota, I/O error: say which file, then clean up
            raise OSError(err.errno, f"writing {file_name} (shard {k} of {n}) failed: "
                          f"{err.strerror or err}; the export stopped and its partial folder "
                          "is removed, the target was not created", str(folder / file_name)) from err
    if n > 1:
        index = {"metadata": {"total_size": sum(nbytes for _, nbytes in sizes)}, "weight_map": weight_map}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return weight_map


def write_tensors_sharded(tensors: dict[str, "torch.Tensor"], folder: Path, max_shard_bytes: int,
                          metadata: dict[str, str] | None = None) -> dict[str, str]:
    """`write_sharded` of tensors held in memory (name → tensor, written in this order)."""
    names = {dtype: name for name, dtype in safetensors_dtypes().items()}
    specs = []
    for name, tensor in tensors.items():
        if tensor.dtype not in names:
            raise ValueError(f"tensor {name}: dtype {tensor.dtype} cannot be written "
                             f"(supported: {', '.join(map(str, names))})")
        specs.append((name, names[tensor.dtype], list(tensor.shape)))
    return write_sharded(folder, specs, tensors.values(), max_shard_bytes, metadata)


def write_shard(path: Path, specs: list[tuple[str, str, list[int]]],
                tensors: Iterator["torch.Tensor | Iterable[torch.Tensor]"],
                metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor: the header first (offsets follow from the names,
    dtypes and shapes in `specs`), then each tensor's bytes as `tensors` produces it. An item of
    `tensors` may also be an iterable of row blocks (consecutive slices along dim 0), written as
    they come.

    Written by hand because `safetensors.torch.save_file` needs every tensor at once and copies them
    all into bytes before writing, so a shard would sit in memory twice; here at most one tensor is
    held. The file is the standard format (8-byte little-endian header length, JSON header padded
    with spaces to 8 bytes, tensors back to back in header order).
    """
    import torch

    dtypes = safetensors_dtypes()
    header: dict = {}
    begin = 0
    for name, dtype, shape in specs:
        size = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, begin + size]}
        begin += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f, BackgroundWriter(f) as out:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, dtype, shape), item in zip(specs, tensors, strict=True):
            blocks = (item,) if isinstance(item, torch.Tensor) else item
            rows = 0
            for block in blocks:
                whole = block is item
                if block.dtype != dtypes[dtype] or \
                        list(block.shape[int(not whole):]) != list(shape[int(not whole):]):
                    raise ValueError(f"tensor {name}: produced {block.dtype} {list(block.shape)}"
                                     f"{'' if whole else ' (a block of rows)'}, the header says "
                                     f"{dtype} {list(shape)}")
                rows += block.shape[0] if block.dim() and not whole else 0
                out.write(block.detach().cpu().contiguous().reshape(-1).view(torch.uint8))
                del block
            if not isinstance(item, torch.Tensor) and rows != (shape[0] if shape else 0):
                raise ValueError(f"tensor {name}: produced {rows} rows, the header says {list(shape)}")


class BackgroundWriter:
    """Writes byte tensors to an open file on a second thread, in order, while the caller computes
    the next ones (the write system call releases the GIL). At most `depth` tensors wait at a time.
    An error of the write (disk full, ...) is raised in the caller by its next `write` or at the
    end of the `with` block; leaving the block waits until everything queued is written."""

    def __init__(self, file, depth: int = 8):
        self.file, self.error = file, None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)

    def __enter__(self) -> "BackgroundWriter":
        self._thread.start()
        return self

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is None:  # after an error, only drain the queue
                try:
                    self.file.write(item.numpy().data)
                except BaseException as err:  # noqa: BLE001 (handed over to the caller)
                    self.error = err

    def write(self, data: "torch.Tensor") -> None:
        """Queue the bytes of a uint8 tensor (kept alive until written)."""
        if self.error is not None:
            raise self.error
        self._queue.put(data)

    def __exit__(self, *exc) -> None:
        self._queue.put(None)
        self._thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error


# ----------------------------------------------------------------------------------------------
# Finite weights


def all_finite(t: "torch.Tensor", limit: float = math.inf) -> bool:
    """No NaN or inf in `t` (and |t| ≤ `limit`): one min/max pass (NaN propagates through it),
    several times faster on the CPU than torch.isfinite."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    low, high = t.detach().aminmax()
    return bool(-limit <= float(low) and float(high) <= limit) and \
        math.isfinite(float(low)) and math.isfinite(float(high))


def nonfinite_counts(named_tensors: Iterable[tuple[str, "torch.Tensor"]]) -> list[tuple[str, int]]:
    """(name, count of NaN / inf values) for each floating-point tensor that holds any."""
    return [(name, int((~tensor.isfinite()).sum())) for name, tensor in named_tensors
            if not all_finite(tensor)]


class ShardReader:
    """Tensors of one model by name (`model_layout`), each read with one positioned read into its
    own buffer.

    Not memory-mapped on purpose: the pages of a mapped safetensors file count towards the
    process's resident memory for as long as the file stays mapped, so a merge streaming several
    models would hold their shards resident; here only the tensors still alive do. One file is
    open at a time (reads follow storage order). Dtypes torch has no plain equivalent for (FP8,
    ...) fall back to safetensors' own reader.

    Readers share what they read: while a tensor read by any reader is still alive, reading the
    same tensor of the same unchanged file (path, inode, size and modification time) returns it
    again instead of reading it twice. A merge streams the base and its task vectors subtract the
    base from every input, so the base is read once instead of once per input. The memo holds
    weak references only: it never keeps a tensor alive. Tensors handed out are therefore shared
    and must not be modified in place.
    """

    _alive: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()

    def __init__(self, layout: dict):
        self.layout = layout
        self._starts: dict[Path, int] = {}  # shard → where its data buffer begins
        self._offsets: dict[Path, dict] = {}
        self._identity: dict[Path, tuple] = {}  # shard → (path, inode, size, mtime), for the memo
        self._path: Path | None = None
        self._file = None

    def _open(self, path: Path):
        if path != self._path:
            self.close()
            self._file, self._path = open(path, "rb"), path
            if path not in self._offsets:
                header, self._starts[path] = safetensors_header(path)
                self._offsets[path] = {k: v["data_offsets"][0] for k, v in header.items()
                                       if k != "__metadata__"}
            stat = os.fstat(self._file.fileno())
            self._identity[path] = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        return self._file

    def __call__(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `name`, or only its rows [start, stop) along dim 0 (`rows`), which lie
        contiguously in the file."""
        import torch
        from safetensors import safe_open

        path, dtype, shape, nbytes = self.layout[name]
        dtypes = safetensors_dtypes()
        if dtype not in dtypes or sys.byteorder != "little":
            with safe_open(path, framework="pt") as f:
                tensor = f.get_tensor(name)
            return tensor if rows is None else tensor[rows[0]:rows[1]]
        f = self._open(path)
        key = (*self._identity[path], name, rows)
        tensor = self._alive.get(key)
        if tensor is not None:
            return tensor
        skip = 0
        if rows is not None:
            row_bytes = nbytes // shape[0] if shape and shape[0] else 0
            skip, nbytes = rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
            shape = [rows[1] - rows[0], *shape[1:]]
        raw = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            f.seek(self._starts[path] + self._offsets[path][name] + skip)
            if f.readinto(memoryview(raw.numpy())) != nbytes:
                raise OSError(f"{path}: tensor {name} is truncated")
        tensor = raw.view(dtypes[dtype]).reshape(shape)
        self._alive[key] = tensor
        return tensor

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._path = self._file = None


# ----------------------------------------------------------------------------------------------
# JSON lines


class JsonlError(ValueError):
    """A line of a JSONL file is not a JSON object: the message names the file and the line."""

    def __init__(self, path: Path, number: int, problem: str):
        super().__init__(f"{path}: line {number} {problem}")
        self.path, self.number, self.problem = Path(path), number, problem


def _jsonl_record(path: Path, number: int, line: bytes) -> dict:
    """One line parsed as a JSON object, or a JsonlError naming the file and the line."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise JsonlError(path, number, "is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise JsonlError(path, number, f"is not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise JsonlError(path, number, "is not a JSON object")
    return record


def _is_record(line: bytes) -> bool:
    """Whether a line parses as a JSON object."""
    try:
        _jsonl_record(Path(), 0, line)
    except JsonlError:
        return False
    return True


def torn_line_message(path: Path, number: int, line: bytes) -> str:
    """What a reader says when it skips a torn last line."""
    preview = line[:60].decode("utf-8", errors="replace") + ("..." if len(line) > 60 else "")
    return (f"{path}: skipped its torn last line {number} ({len(line)} bytes: {preview!r}), "
            "left by a write that was cut short (full disk, power loss or a killed process)")


def read_jsonl_numbered(path: Path, on_torn_tail: Callable[[str], None] | None = None
                        ) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line of a JSONL file. Line numbers are the
    file's own: blank lines are counted, and only `\n` ends a line.

    With `on_torn_tail`, a last line that does not parse is taken for what an interrupted append
    leaves: it is skipped and `on_torn_tail(message)` is told. Any other bad line, or a bad last
    line without `on_torn_tail`, raises a JsonlError naming the file and the line.
    """
    path = Path(path)
    lines = [(number, line) for number, line in enumerate(path.read_bytes().split(b"\n"), start=1)
             if line.strip()]
    records = []
    for number, line in lines:
        try:
            records.append((number, _jsonl_record(path, number, line)))
        except JsonlError:
            if on_torn_tail is None or number != lines[-1][0]:
                raise
            on_torn_tail(torn_line_message(path, number, line))
    return records


def read_jsonl(path: Path, on_torn_tail: Callable[[str], None] | None = None) -> list[dict]:
    """The records of a JSONL file (see `read_jsonl_numbered` for torn last lines and errors)."""
    return [record for _, record in read_jsonl_numbered(path, on_torn_tail)]


def _last_line_start(f, end: int, chunk: int = 4096) -> int:
    """Offset just after the last newline before offset `end` of an open binary file (0 if none)."""
    while end > 0:
        start = max(0, end - chunk)
        f.seek(start)
        found = f.read(end - start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


def cut_torn_tail(path: Path) -> bytes:
    """Make a JSONL file end with a whole, valid line before something is appended to it.

    A last line that does not parse is what an interrupted append leaves: it is cut off and
    returned, so the next row starts a line of its own instead of being glued to the fragment.
    A valid last line that only lacks its newline gets one. Returns b"" when nothing was cut.
    """
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        start = _last_line_start(f, size - 1) if size else 0  # the last line and its newline
        f.seek(start)
        last = f.read()
        if not last.strip() or _is_record(last):
            if last and not last.endswith(b"\n"):
                f.write(b"\n")
            return b""
        f.truncate(start)
        return last
