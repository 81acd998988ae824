"""Merge search: sweep the merge weights or one merge parameter (λ, α, ...) on validation sets and
keep the points on the domain-gain vs general-forgetting Pareto front.

Every candidate is merged in memory (nothing is written) and scored by a metrics function (the
workbench's held-out evaluation on the validation sets); against the base's metrics on the same
sets,

    gain_p       = 100·(1 − domain_ppl_p / domain_ppl_base)
    forgetting_p = 100·(general_ppl_p / general_ppl_base − 1)

(`workbench.evaluate.gain_forgetting`). Point p is on the Pareto front when no point q has
gain_q ≥ gain_p and forgetting_q ≤ forgetting_p with at least one of the two strict; points with
equal objectives are all kept; a point with a NaN objective is never on the front.

Choice rules (the chosen point is always on the front):

- `max_gain`: the largest gain among the points whose forgetting is at most `max_forgetting_pct`
  (ties: less forgetting, then the earlier point); when no point is within the bound, the point
  with the least forgetting (ties: more gain, then the earlier point).
- `knee`: rescale gain and forgetting to [0, 1] over the front; take the front point farthest
  from the straight line through the front's two end points (the largest- and the
  smallest-gain point), that is the point where more gain starts to cost the most forgetting.
  With fewer than three points on the front, the `max_gain` rule.

Outputs in the run folder: `search.json` (every point with its metrics, the front, the choice and
why), `search.md` (the same as a table) and `pareto.png` (forgetting against gain, the front drawn
as a line, the chosen point starred).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from workbench.evaluate import gain_forgetting
from workbench.io import write_atomic, write_json

Tensors = Iterable[tuple[str, torch.Tensor]]
RULES = ("max_gain", "knee")


@dataclass
class Candidate:
    """One point of the sweep: the inputs' weights and the method's parameters."""

    label: str
    weights: list[float]
    parameters: dict


@dataclass
class SearchPoint:
    label: str
    weights: list[float]
    parameters: dict
    metrics: dict
    domain_gain_pct: float
    general_forgetting_pct: float
    on_front: bool = False


@dataclass
class SearchResult:
    points: list[SearchPoint]
    front: list[int]
    chosen: int
    rule: str
    max_forgetting_pct: float
    reason: str
    reference: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"objective": "maximise domain_gain_pct, minimise general_forgetting_pct",
                "rule": self.rule, "max_forgetting_pct": self.max_forgetting_pct,
                "reference": self.reference, "front": self.front, "chosen": self.chosen,
                "reason": self.reason, "points": [asdict(p) for p in self.points]}


def pareto_front(objectives: list[tuple[float, float]]) -> list[int]:
    """Indices of the (gain, forgetting) pairs no other pair dominates (more gain is better, less
    forgetting is better), in input order."""
    front = []
    for i, (gain, forgetting) in enumerate(objectives):
        if math.isnan(gain) or math.isnan(forgetting):
            continue
        dominated = any(g >= gain and f <= forgetting and (g > gain or f < forgetting)
                        for j, (g, f) in enumerate(objectives)
                        if j != i and not (math.isnan(g) or math.isnan(f)))
        if not dominated:
            front.append(i)
    return front


def choose_point(objectives: list[tuple[float, float]], rule: str = "max_gain",
                 max_forgetting_pct: float = 5.0) -> tuple[int, str]:
    """The index of the chosen point and a sentence saying why (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"unknown choice rule {rule!r}; known rules: {', '.join(RULES)}")
    front = pareto_front(objectives)
    if not front:
        raise ValueError("no search point has finite domain gain and general forgetting")
    if rule == "knee" and len(front) >= 3:
        gains = [objectives[i][0] for i in front]
        losses = [objectives[i][1] for i in front]

        def unit(value: float, values: list[float]) -> float:
            low, high = min(values), max(values)
            return 0.0 if high == low or not math.isfinite(high - low) else (value - low) / (high - low)

        points = [(unit(objectives[i][1], losses), unit(objectives[i][0], gains)) for i in front]
        (x0, y0), (x1, y1) = min(points, key=lambda p: p[1]), max(points, key=lambda p: p[1])
        length = math.hypot(x1 - x0, y1 - y0)
        if length > 0:
            distances = [abs((x1 - x0) * (y0 - y) - (x0 - x) * (y1 - y0)) / length for x, y in points]
            best = max(range(len(front)), key=lambda k: (distances[k], -k))
            return front[best], (f"knee of the Pareto front ({len(front)} points): the point farthest "
                                 "from the line through the front's end points, both axes rescaled to [0, 1]")
    within = [i for i in front if objectives[i][1] <= max_forgetting_pct]
    prefix = "" if rule == "max_gain" else "fewer than three points on the front, so max_gain: "
    if within:
        best = max(within, key=lambda i: (objectives[i][0], -objectives[i][1], -i))
        return best, (prefix + f"largest domain gain among the points with general forgetting "
                      f"≤ {max_forgetting_pct:g}%")
    best = min(front, key=lambda i: (objectives[i][1], -objectives[i][0], i))
    return best, (prefix + f"no point has general forgetting ≤ {max_forgetting_pct:g}%; "
                  "took the one with the least forgetting")


def run_search(candidates: list[Candidate], merged: Callable[[Candidate], Tensors],
               score: Callable[[Tensors], dict], reference: dict, rule: str = "max_gain",
               max_forgetting_pct: float = 5.0, log: Callable[[str], None] = print) -> SearchResult:
    """Score every candidate's in-memory merge and choose a point.

    `merged(candidate)` yields the merged tensors (name, tensor) of that candidate, `score` turns
    such a stream into metrics with at least domain_ppl and general_ppl, and `reference` is the
    base's metrics on the same sets.
    """
    if not candidates:
        raise ValueError("search: no points to evaluate")
    points = []
    for k, candidate in enumerate(candidates, start=1):
        metrics = score(merged(candidate))
        report = gain_forgetting(reference, metrics)
        point = SearchPoint(candidate.label, list(candidate.weights), dict(candidate.parameters), metrics,
                            report["domain_gain_pct"], report["general_forgetting_pct"])
        points.append(point)
        log(f"search {k}/{len(candidates)} {candidate.label}: domain gain {point.domain_gain_pct:+.2f}%, "
            f"general forgetting {point.general_forgetting_pct:+.2f}%")
    objectives = [(p.domain_gain_pct, p.general_forgetting_pct) for p in points]
    front = pareto_front(objectives)
    for i in front:
        points[i].on_front = True
    chosen, reason = choose_point(objectives, rule, max_forgetting_pct)
    return SearchResult(points, front, chosen, rule, max_forgetting_pct, reason, reference)


# ----------------------------------------------------------------------------------------------
# Files


def search_table(result: SearchResult) -> str:
    """The points as a Markdown table: objectives, accuracies, front membership, the choice."""
    accuracies = sorted({k for p in result.points for k in p.metrics if k.startswith("acc_")})
    head = (["#", "point", "domain gain %", "general forgetting %", "domain ppl", "general ppl"]
            + [k.replace("acc_", "accuracy ") for k in accuracies] + ["Pareto front", "chosen"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, p in enumerate(result.points):
        cells = [str(i), p.label, f"{p.domain_gain_pct:+.2f}", f"{p.general_forgetting_pct:+.2f}",
                 f"{p.metrics.get('domain_ppl', float('nan')):.3f}",
                 f"{p.metrics.get('general_ppl', float('nan')):.3f}"]
        cells += [f"{100 * p.metrics[k]:.1f}%" if k in p.metrics else "" for k in accuracies]
        cells += ["yes" if p.on_front else "", "**yes**" if i == result.chosen else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([
        "# Merge search", "",
        "Domain gain and general forgetting against the base on the validation sets "
        f"(base domain ppl {result.reference.get('domain_ppl', float('nan')):.3f}, "
        f"general ppl {result.reference.get('general_ppl', float('nan')):.3f}).", "",
        *lines, "",
        f"Chosen: point {result.chosen} ({result.points[result.chosen].label}), rule `{result.rule}`: "
        f"{result.reason}.", ""])


def plot_front(result: SearchResult, path: Path, title: str = "Merge search") -> Path:
    """pareto.png: general forgetting (x) against domain gain (y), front joined, choice starred."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    finite = [p for p in result.points
              if math.isfinite(p.domain_gain_pct) and math.isfinite(p.general_forgetting_pct)]
    axes.scatter([p.general_forgetting_pct for p in finite], [p.domain_gain_pct for p in finite],
                 color="0.6", label="search points", zorder=2)
    front = sorted((result.points[i] for i in result.front
                    if result.points[i] in finite), key=lambda p: p.general_forgetting_pct)
    axes.plot([p.general_forgetting_pct for p in front], [p.domain_gain_pct for p in front],
              "o-", color="tab:blue", label="Pareto front", zorder=3)
    chosen = result.points[result.chosen]
    axes.scatter([chosen.general_forgetting_pct], [chosen.domain_gain_pct], marker="*", s=240,
                 color="tab:red", label=f"chosen ({chosen.label})", zorder=4)
    for p in finite:
        axes.annotate(p.label, (p.general_forgetting_pct, p.domain_gain_pct), fontsize=7,
                      textcoords="offset points", xytext=(4, 4))
    if result.rule == "max_gain" and math.isfinite(result.max_forgetting_pct):
        axes.axvline(result.max_forgetting_pct, color="0.4", linestyle="--", linewidth=1,
                     label=f"forgetting bound {result.max_forgetting_pct:g}%")
    axes.set_xlabel("general forgetting (%): higher general perplexity than the base")
    axes.set_ylabel("domain gain (%): lower domain perplexity than the base")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomic(Path(path), buffer.getvalue())
    return Path(path)


def write_search_files(folder: Path, result: SearchResult, title: str = "Merge search") -> list[Path]:
    """search.json, search.md and pareto.png in `folder`, each written atomically."""
    folder = Path(folder)
    write_json(folder / "search.json", result.as_dict())
    write_atomic(folder / "search.md", search_table(result))
    plot_front(result, folder / "pareto.png", title)
    return [folder / "search.json", folder / "search.md", folder / "pareto.png"]


def read_search(folder: Path) -> SearchResult | None:
    """The result a finished search wrote into `folder` (for a resumed run), or None."""
    path = Path(folder) / "search.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    points = [SearchPoint(**p) for p in data["points"]]
    return SearchResult(points, data["front"], data["chosen"], data["rule"],
                        data["max_forgetting_pct"], data["reason"], data.get("reference", {}))

