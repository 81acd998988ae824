"""Runs side by side: the gain-vs-forgetting numbers each run left in its folder.

Definitions (`workbench.evaluate`): domain gain = 100·(1 − ppl_domain / ppl_domain,base), general
forgetting = 100·(ppl_general / ppl_general,base − 1); for classifiers the gain is task accuracy
points over the base and forgetting is 100·(1 − cosine) of general-text embeddings.

Where the numbers come from, per run:

- train, eval, merge and mergekit runs with an evaluation: `summary.json` (`domain_gain_pct` or
  `task_gain_pts`, `general_forgetting_pct`), perplexities from `report.json` / the summary;
- an instruction-vector merge: also its instruct and domain inputs from the side-by-side report;
- a merge with a search and no evaluation: the chosen point's validation numbers;
- a quantize run: every quantized model of `report.json` (RTN, FlexRound, NF4) against the
  full-precision model, with bits and size on disk;
- a run without numbers of its own: the newest finished `eval` run of it (`workbench eval`, or the
  Evaluate button), named in the `source` column.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..workspace import Run, RunNotFound, Workspace

COLUMNS = ["label", "run", "kind", "name", "gain", "gain_unit", "general_forgetting_pct",
           "domain_gain_pct", "task_gain_pts", "general_ppl", "domain_ppl", "weights_mib", "source"]


def _read(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _info(run: Run) -> dict:
    try:
        return run.info
    except (OSError, json.JSONDecodeError):
        return {}


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _row(run: Run, info: dict, label: str, source: str, *, domain_gain=None, forgetting=None,
         task_gain=None, metrics: dict | None = None, weights_bytes=None) -> dict:
    metrics = metrics or {}
    domain_gain, task_gain = _finite(domain_gain), _finite(task_gain)
    gain, unit = (task_gain, "accuracy pts") if task_gain is not None and domain_gain is None \
        else (domain_gain, "% domain ppl")
    return {"label": label, "run": run.id, "kind": info.get("kind"), "name": info.get("name"),
            "gain": gain, "gain_unit": unit if gain is not None else "",
            "general_forgetting_pct": _finite(forgetting), "domain_gain_pct": domain_gain,
            "task_gain_pts": task_gain, "general_ppl": _finite(metrics.get("general_ppl")),
            "domain_ppl": _finite(metrics.get("domain_ppl")),
            "weights_mib": round(weights_bytes / 2**20, 3) if weights_bytes else None,
            "source": source}


def label_of(run_id: str, info: dict) -> str:
    """A short name for plots: kind:name·<last 4 characters of the id>."""
    return f"{info.get('kind')}:{info.get('name')}·{run_id[-4:]}"


def _own_rows(run: Run, info: dict) -> list[dict]:
    """The rows a run's own files give (empty when it recorded no comparison)."""
    summary = info.get("summary") or _read(run.path("summary.json"))
    report = _read(run.path("report.json"))
    label = label_of(run.id, info)
    kind = info.get("kind")
    if kind == "quantize":
        return _quantize_rows(run, info, report, label)
    rows = []
    if "domain_gain_pct" in summary or "task_gain_pts" in summary:
        metrics = report.get("model") or summary.get("model") or summary.get("merged") or \
            summary.get("adapted") or {}
        rows.append(_row(run, info, label, "summary.json", domain_gain=summary.get("domain_gain_pct"),
                         forgetting=summary.get("general_forgetting_pct"),
                         task_gain=summary.get("task_gain_pts"), metrics=metrics))
        side = summary.get("side_by_side") or report.get("side_by_side")
        if side:  # instruction-vector merge: its inputs as well
            for column in ("instruct", "domain"):
                if column in side.get("columns", {}):
                    rows.append(_row(run, info, f"{label} ({column} input)", "report.json side by side",
                                     domain_gain=side["domain_gain_pct"].get(column),
                                     forgetting=side["general_forgetting_pct"].get(column),
                                     metrics=side["columns"][column]))
    elif isinstance(summary.get("search"), dict):
        search = summary["search"]
        rows.append(_row(run, info, f"{label} (search: {search.get('chosen')})",
                         "search validation, chosen point", domain_gain=search.get("domain_gain_pct"),
                         forgetting=search.get("general_forgetting_pct")))
    return rows


def _quantize_rows(run: Run, info: dict, report: dict, label: str) -> list[dict]:
    """One row per quantized model of the report, against the full-precision model."""
    rows_in = report.get("rows") or {}
    setup = report.get("setup") or {}
    bits = (setup.get("weights") or {}).get("bits")
    comparison = report.get("comparison") or {}
    names = {"rtn": "RTN", "flexround": "FlexRound", "nf4": "NF4", "full_precision": "full precision"}
    rows = []
    for key, row in rows_in.items():
        if key == "full_precision":
            continue
        name = names.get(key, key)
        tag = f"{name} W{bits}" if bits and key != "nf4" else name
        if comparison:
            gain = comparison.get("domain_gain_pct", {}).get(name)
            forgetting = comparison.get("general_forgetting_pct", {}).get(name)
        else:  # an encoder: forgetting is 1 − cosine to the full-precision embeddings
            cosine = _finite((row.get("metrics") or {}).get("embedding_cosine"))
            gain, forgetting = None, (100.0 * (1.0 - cosine) if cosine is not None else None)
        exported = " (exported)" if key == setup.get("method") else ""
        rows.append(_row(run, info, f"{label} {tag}{exported}", "report.json vs full precision",
                         domain_gain=gain, forgetting=forgetting, metrics=row.get("metrics"),
                         weights_bytes=row.get("weights_bytes")))
    return rows


def evaluations_of(ws: Workspace, run_id: str) -> list[Run]:
    """Finished eval runs whose model is `run_id`, newest first."""
    found = []
    for run in reversed(ws.runs()):
        info = _info(run)
        if info.get("kind") == "eval" and info.get("status") == "done" and \
                (info.get("parents") or [None])[0] == run_id:
            found.append(run)
    return found


def compare_rows(ws: Workspace, run_ids: list[str]) -> list[dict]:
    """The rows of the chosen runs, in the order given (see the module docstring)."""
    rows = []
    for ref in run_ids or []:
        try:
            run = ws.get(ref)
        except RunNotFound:
            continue
        info = _info(run)
        own = _own_rows(run, info)
        if not own:
            for evaluation in evaluations_of(ws, run.id):
                found = _own_rows(evaluation, _info(evaluation))
                if found:
                    for row in found:
                        row.update(label=label_of(run.id, info), run=run.id, kind=info.get("kind"),
                                   name=info.get("name"), source=f"eval run {evaluation.id}")
                    own = found
                    break
        if not own:
            status = run.status if info else "unreadable"
            own = [_row(run, info, label_of(run.id, info),
                        "no evaluation yet" if status == "done" else f"run {status}")]
        rows += own
    return rows


def search_of(ws: Workspace, run_id: str) -> dict | None:
    """A merge search's files: {"image": pareto.png, "table": search.md text, "summary"}."""
    try:
        run = ws.get(run_id)
    except RunNotFound:
        return None
    image, table = run.path("pareto.png"), run.path("search.md")
    if not (image.is_file() or table.is_file()):
        return None
    summary = (_info(run).get("summary") or {}).get("search") or {}
    return {"run": run.id, "image": str(image) if image.is_file() else None,
            "table": table.read_text(encoding="utf-8") if table.is_file() else "",
            "summary": summary}


def comparable_runs(ws: Workspace) -> list[tuple[str, str]]:
    """(label, run id) of finished runs that may hold numbers: train, eval, merge, mergekit,
    quantize, newest first."""
    found = []
    for run in reversed(ws.runs()):
        info = _info(run)
        if info.get("status") == "done" and info.get("kind") in ("train", "eval", "merge", "mergekit",
                                                                 "quantize"):
            found.append((f"{run.id} ({info.get('kind')} {info.get('name')})", run.id))
    return found
