"""Progress of a run as a stream of structured events: `<run>/progress.jsonl`.

Every stage appends one JSON object a line while it works:

    {"phase": "training", "step": 12, "total": 200, "unit": "step", "loss": 3.21, "time": 1718000000.5}

- `phase`: what the run is doing, in words a user can read ("training", "evaluating", "merging
  tensors", "writing shards", "quantizing blocks", "quantizing layers", "building the embedded
  base", "exporting").
- `step` of `total` in `unit`s ("step", "batch", "tensor", "block", "layer", "file", ...): the
  step counts up to the total within one pass of a phase; a phase that starts again (the base and
  then the adapted model evaluated, a resumed training run) starts its count again.
- `loss`: present where the phase has one (training steps).
- `time`: seconds since the epoch when the event was written.

A pass writes its first event when it starts and its last one (step == total) when it ends; in
between at most one event every `MIN_INTERVAL_S` seconds, so a fast loop does not spend its time
writing progress. Readers (`read_events`, `state`) go through the workspace's JSONL reader, which
skips a torn last line.

Where the events go: `phase(...)` writes into the run folder given, or else into the one the code
runs under (`recording(folder)`, which `Workspace.running` enters for every run), and nowhere
outside a run (library calls from tests or notebooks cost nothing).

A foundation module: it imports nothing from the stages, the CLI, the job queue or the UI, nor
from adapters/, merge/ or quant/, which all import it.
"""

from __future__ import annotations

import contextvars
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .io import cut_torn_tail, read_jsonl

PROGRESS_FILE = "progress.jsonl"
MIN_INTERVAL_S = 0.5  # between two events of one pass, except its first and its last

_folder: contextvars.ContextVar[Path | None] = contextvars.ContextVar("workbench_progress", default=None)
_checked: set[Path] = set()  # files whose torn tail this process has cut before appending


@contextmanager
def recording(folder: Path | None) -> Iterator[None]:
    """Inside the block, `phase(...)` without a folder writes into `<folder>/progress.jsonl`
    (None: nowhere). Nested blocks (a pipeline's stages) write into their own run folder."""
    token = _folder.set(Path(folder) if folder is not None else None)
    try:
        yield
    finally:
        _folder.reset(token)


def current_folder() -> Path | None:
    """The run folder progress events go to here, or None outside a run."""
    return _folder.get()


class Phase:
    """One pass of a phase: `update(step)` / `advance()` as the work goes, `finish()` at the end
    (or use it as a context manager). Does nothing when it has no file to write to."""

    def __init__(self, path: Path | None, name: str, total: int, unit: str = "step", step: int = 0,
                 min_interval: float = MIN_INTERVAL_S):
        self.path, self.name, self.unit = path, name, unit
        self.total, self.step = max(0, int(total)), int(step)
        self.min_interval = min_interval
        self._written_at: float | None = None  # monotonic time of the last write
        self._pending = False  # a step not written yet (throttled)
        self._loss: float | None = None
        self._emit(force=True)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def update(self, step: int, loss: float | None = None) -> None:
        """The pass reached `step` (of `total`); `loss` when the phase has one."""
        self.step, self._loss, self._pending = int(step), loss, True
        self._emit(force=self.step >= self.total)

    def advance(self, count: int = 1, loss: float | None = None) -> None:
        self.update(self.step + count, loss)

    def finish(self) -> None:
        """Write the last step reached if it was held back."""
        if self._pending:
            self._emit(force=True)

    def __enter__(self) -> "Phase":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()

    def _emit(self, force: bool) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if not force and self._written_at is not None and now - self._written_at < self.min_interval:
            return
        event = {"phase": self.name, "step": self.step, "total": self.total, "unit": self.unit}
        if self._loss is not None:
            event["loss"] = round(float(self._loss), 6)
        event["time"] = round(time.time(), 3)
        append_event(self.path, event)
        self._written_at, self._pending = now, False


def phase(name: str, total: int, unit: str = "step", step: int = 0, folder: Path | None = None,
          enabled: bool = True) -> Phase:
    """Start a pass of phase `name` with `total` `unit`s (from `step`), writing into `folder`'s
    progress.jsonl, or the current run's (`recording`); a no-op Phase when neither is set or
    `enabled` is false (e.g. on processes other than the main one)."""
    folder = Path(folder) if folder is not None else current_folder()
    path = folder / PROGRESS_FILE if enabled and folder is not None else None
    return Phase(path, name, total, unit, step)


def append_event(path: Path, event: dict) -> None:
    """Append one event line. A torn last line an earlier process left (killed mid-write) is cut
    first, once per process and file, so the new line never glues onto it. A progress file that
    cannot be written never stops the work it reports on."""
    path = Path(path)
    try:
        if path not in _checked:
            if path.exists():
                cut_torn_tail(path)
            _checked.add(path)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
    except OSError:
        pass


def read_events(folder: Path) -> list[dict]:
    """The progress events of a run folder, oldest first ([] when there are none); a torn last
    line (being written right now, or cut short) is left out."""
    path = Path(folder) / PROGRESS_FILE
    if not path.is_file():
        return []
    try:
        return read_jsonl(path, on_torn_tail=lambda message: None)
    except (OSError, ValueError):
        return []


def current_pass(events: list[dict]) -> list[dict]:
    """The events of the last pass: the last event and those before it of the same phase and
    total whose steps lead up to it without going back."""
    if not events:
        return []
    last = events[-1]
    start = len(events) - 1
    while start > 0:
        before, after = events[start - 1], events[start]
        if before.get("phase") != last.get("phase") or before.get("total") != last.get("total") \
                or before.get("step", 0) > after.get("step", 0):
            break
        start -= 1
    return events[start:]


def eta_seconds(events: list[dict], now: float | None = None) -> float | None:
    """Seconds left in the current pass at the rate its events show so far (less the time since
    its last event), 0 once step == total; None while the rate is unknown."""
    run = current_pass(events)
    if not run:
        return None
    last = run[-1]
    step, total = last.get("step", 0), last.get("total") or 0
    if step >= total:
        return 0.0
    first = run[0]
    done, seconds = step - first.get("step", 0), last.get("time", 0) - first.get("time", 0)
    if done <= 0 or seconds <= 0:
        return None
    left = (total - step) * seconds / done
    since = max(0.0, (time.time() if now is None else now) - last.get("time", 0))
    return round(max(0.0, left - since), 1)


def state(events: list[dict], now: float | None = None) -> dict:
    """Where a run stands: {phase, step, total, unit, eta_s} from its events (the last one);
    phase None, step 0 and total None before the first event."""
    if not events:
        return {"phase": None, "step": 0, "total": None, "unit": None, "eta_s": None}
    last = events[-1]
    return {"phase": last.get("phase"), "step": last.get("step", 0), "total": last.get("total"),
            "unit": last.get("unit"), "eta_s": eta_seconds(events, now)}
