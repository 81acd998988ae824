"""The tabs that read the workspace rather than edit a recipe: Evaluate & compare, Playground,
Export. Each `*_tab` lays out its components and returns them (with `refresh`, the values a page
load sets, and `refresh_outputs`, where they go); each `wire_*` connects its events."""

from __future__ import annotations

import math
from typing import Any

import gradio as gr
import pandas as pd

from . import compare as compare_mod
from ..exporting import KINDS as EXPORT_KINDS
from .playground import MAX_NEW_TOKENS
from .service import Refused, Service
from .widgets import code, escape

COMPARE_TABLE = ["label", "gain", "gain_unit", "general_forgetting_pct", "domain_gain_pct",
                 "task_gain_pts", "general_ppl", "domain_ppl", "weights_mib", "source", "run"]
COMPARE_HEADERS = {"gain_unit": "unit", "general_forgetting_pct": "forgetting %",
                   "domain_gain_pct": "domain gain %", "task_gain_pts": "task gain pts",
                   "general_ppl": "general ppl", "domain_ppl": "domain ppl", "weights_mib": "MiB"}
ANSWERS = ["model", "answer", "seconds", "mixed batch answer", "same as alone"]
EXPORTS = ["name", "kind", "source run", "files", "MiB", "folder"]
PRIVATE = dict(api_visibility="private")


def _rounded(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) and math.isfinite(value) else value


def compare_frame(rows: list[dict]) -> pd.DataFrame:
    """The table of the rows; columns no row has a value for are left out (always: label, gain,
    forgetting, source)."""
    keep = [c for c in COMPARE_TABLE if c in ("label", "gain", "general_forgetting_pct", "source")
            or any(r.get(c) not in (None, "") for r in rows)]
    return pd.DataFrame([[_rounded(r.get(c)) for c in keep] for r in rows],
                        columns=[COMPARE_HEADERS.get(c, c) for c in keep])


def scatter_frame(rows: list[dict]) -> pd.DataFrame:
    """The points of the gain-vs-forgetting plot: rows with both numbers."""
    points = [{"general forgetting %": r["general_forgetting_pct"], "gain": r["gain"], "run": r["label"]}
              for r in rows if r.get("gain") is not None and r.get("general_forgetting_pct") is not None]
    frame = pd.DataFrame(points, columns=["general forgetting %", "gain", "run"])
    return frame.astype({"general forgetting %": "float64", "gain": "float64", "run": "str"})


def scatter_figure(rows: list[dict]):
    """Gain (y) against general forgetting (x), one labelled point per row with both numbers
    (matplotlib, drawn in memory; imported on first use)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = scatter_frame(rows)
    figure = Figure(figsize=(7.5, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.axhline(0, color="0.75", linewidth=1)
    axes.axvline(0, color="0.75", linewidth=1)
    for _, point in points.iterrows():
        axes.scatter([point["general forgetting %"]], [point["gain"]], s=40, zorder=3)
        axes.annotate(point["run"], (point["general forgetting %"], point["gain"]), fontsize=7,
                      textcoords="offset points", xytext=(5, 4))
    if points.empty:
        axes.text(0.5, 0.5, "no chosen run has both numbers yet", ha="center", va="center",
                  transform=axes.transAxes, color="0.4")
    units = sorted({r["gain_unit"] for r in rows if r.get("gain") is not None})
    axes.set_xlabel("general forgetting (%): worse than the base on general text →")
    axes.set_ylabel(f"gain ({' or '.join(units) or '%'}) →")
    axes.set_title("gain vs general forgetting (up and to the left is better)")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    return figure


# ----------------------------------------------------------------------------------------------
# Evaluate & compare


def compare_tab(service: Service) -> dict:
    ui: dict[str, Any] = {}
    with gr.Tab("Evaluate & compare", id="compare"):
        gr.Markdown("Pick runs to put side by side. **Gain**: domain gain in % (lower domain "
                    "perplexity than the base) or, for classifiers, task accuracy points; "
                    "**general forgetting**: higher general perplexity than the base in % (classifiers: "
                    "1 − cosine of general-text embeddings). Quantized models are compared with their "
                    "full-precision model. A run with no numbers of its own shows those of its newest "
                    "eval run (queue one below).")
        with gr.Row():
            ui["runs"] = gr.Dropdown(choices=service.comparable_runs(), value=[], multiselect=True,
                                     label="runs", scale=4, elem_id="compare-runs")
            ui["reload"] = gr.Button("Refresh", scale=1, size="sm")
        ui["table"] = gr.Dataframe(compare_frame([]), label="gain vs forgetting", interactive=False,
                                   wrap=True, elem_id="compare-table")
        ui["plot"] = gr.Plot(None, label="gain vs general forgetting", format="png",
                             elem_id="compare-plot")
        with gr.Accordion("merge search (Pareto front)", open=True):
            ui["search_run"] = gr.Dropdown(choices=[], value=None, label="merge run with a search")
            ui["pareto"] = gr.Image(None, label="pareto.png", type="filepath", interactive=False,
                                    buttons=["download"], height=420)
            ui["search_table"] = gr.Markdown("")
        with gr.Accordion("evaluate a run", open=False):
            gr.Markdown("Queues an `eval` recipe: the run's model or adapter against its base on the "
                        "held-out sets (the embedded world's, at the size chosen).")
            with gr.Row():
                ui["eval_run"] = gr.Dropdown(choices=[], value=None, label="run", scale=3)
                ui["eval_size"] = gr.Radio(["default", "tiny"], value="default", label="world size",
                                           scale=1)
                ui["eval_tokens"] = gr.Number(16384, label="eval.max_tokens", precision=0, scale=1)
                ui["eval_questions"] = gr.Number(100, label="eval.max_questions", precision=0, scale=1)
                ui["eval_go"] = gr.Button("Evaluate (queue the job)", scale=1)
            ui["eval_message"] = gr.Markdown("")

    def refresh():
        return [gr.update(choices=service.comparable_runs()), gr.update(choices=_model_runs(service))]

    return {**ui, "refresh": refresh, "refresh_outputs": [ui["runs"], ui["eval_run"]]}


def _model_runs(service: Service) -> list[tuple[str, str]]:
    return [(label, value.removeprefix("run:")) for label, value in service.source_choices()
            if value.startswith("run:")]


def wire_compare(ui: dict, service: Service, tabs, jobs: dict, job_choices) -> None:
    def show_comparison(run_ids):
        found = service.compare(run_ids or [])
        rows, searches = found["rows"], found["searches"]
        choices = [s["run"] for s in searches]
        first = choices[0] if choices else None
        return [compare_frame(rows), scatter_figure(rows), gr.update(choices=choices, value=first),
                *search_panel(first)]

    def search_panel(run_id):
        found = compare_mod.search_of(service.ws, run_id) if run_id else None
        if not found:
            return [None, "" if not run_id else "No search files in this run."]
        summary = found["summary"]
        head = (f"Chose **{escape(summary.get('chosen'))}** ({escape(summary.get('reason'))}).\n\n"
                if summary.get("chosen") else "")
        return [found["image"], head + found["table"]]

    outputs = [ui["table"], ui["plot"], ui["search_run"], ui["pareto"], ui["search_table"]]
    ui["runs"].change(show_comparison, [ui["runs"]], outputs, **PRIVATE)

    def refresh_and_compare(run_ids):
        """Re-read the runs (a job may have finished since) and compare again."""
        return [gr.update(choices=service.comparable_runs()),
                gr.update(choices=_model_runs(service)), *show_comparison(run_ids)]

    ui["reload"].click(refresh_and_compare, [ui["runs"]], [ui["runs"], ui["eval_run"], *outputs],
                       **PRIVATE)
    ui["search_run"].input(search_panel, [ui["search_run"]], [ui["pareto"], ui["search_table"]],
                           **PRIVATE)

    def evaluate(run_id, size, tokens, questions):
        try:
            job = service.evaluate(run_id or "", size or "default", int(tokens or 16384),
                                   int(questions or 100))
        except (Refused, ValueError) as err:
            return f"✗ {code(err)}", gr.update(), gr.update()
        return (f"Queued job `{job['id']}`: eval of run `{run_id}`. Its numbers show here once it is "
                "done.", gr.Tabs(selected="jobs"), gr.update(choices=job_choices(service), value=job["id"]))

    ui["eval_go"].click(evaluate, [ui["eval_run"], ui["eval_size"], ui["eval_tokens"], ui["eval_questions"]],
                        [ui["eval_message"], tabs, jobs["job"]], **PRIVATE)


# ----------------------------------------------------------------------------------------------
# Playground


def playground_tab(service: Service) -> dict:
    ui: dict[str, Any] = {}
    with gr.Tab("Playground", id="playground"):
        gr.Markdown("One prompt, two or more models or adapters of the workspace, greedy answers side "
                    "by side. Generation runs in a separate worker process (the first request loads "
                    "the libraries and the models); requests go one at a time.")
        ui["prompt"] = gr.Textbox("", label="prompt", lines=3, elem_id="playground-prompt")
        with gr.Row():
            ui["models"] = gr.Dropdown(choices=service.playground_choices(), value=["default"],
                                       multiselect=True, label="models and adapters", scale=4)
            ui["tokens"] = gr.Slider(1, min(128, MAX_NEW_TOKENS), value=32, step=1,
                                     label="max_new_tokens", scale=2)
        with gr.Row():
            ui["mixed"] = gr.Checkbox(False, label="also as one mixed-adapter batch",
                                      info="LoRA or RoAd adapters of one base (and that base) in one "
                                           "batch, row i through adapter i (PEFT adapter_names)")
            ui["go"] = gr.Button("Generate", variant="primary")
        ui["message"] = gr.Markdown("")
        ui["answers"] = gr.Dataframe(pd.DataFrame([], columns=ANSWERS), label="answers",
                                     interactive=False, wrap=True, elem_id="playground-answers")

    def refresh():
        return [gr.update(choices=service.playground_choices())]

    return {**ui, "refresh": refresh, "refresh_outputs": [ui["models"]]}


def answers_frame(reply: dict) -> pd.DataFrame:
    separate = reply.get("separate") or []
    mixed = {a["model"]: a for a in reply.get("mixed") or []}
    rows = []
    for answer in separate or list(mixed.values()):
        in_batch = mixed.get(answer["model"])
        rows.append([answer["model"], answer["text"] if separate else "", answer["seconds"],
                     in_batch["text"] if in_batch else "",
                     ("yes" if in_batch["text"] == answer["text"] else "no") if in_batch and separate else ""])
    return pd.DataFrame(rows, columns=ANSWERS)


def wire_playground(ui: dict, service: Service) -> None:
    def play(prompt, models, tokens, mixed):
        try:
            reply = service.generate(prompt or "", list(models or []), int(tokens or 32), bool(mixed))
        except (Refused, ValueError) as err:
            return f"✗ {code(err)}", gr.update()
        note = ""
        if reply.get("mixed"):
            same = all(m["text"] == s["text"] for m, s in zip(reply["mixed"], reply["separate"] or []))
            note = (" The mixed batch gave each adapter the same answer as on its own." if same else
                    " The mixed batch differs from the separate answers where marked.")
        return f"Answered by {len(reply['models'])} model(s).{note}", answers_frame(reply)

    ui["go"].click(play, [ui["prompt"], ui["models"], ui["tokens"], ui["mixed"]],
                   [ui["message"], ui["answers"]], concurrency_limit=1, **PRIVATE)


# ----------------------------------------------------------------------------------------------
# Export


def export_tab(service: Service) -> dict:
    ui: dict[str, Any] = {}
    with gr.Tab("Export", id="export"):
        gr.Markdown("Writes a finished run's model, adapter or quantized model into "
                    f"`{service.root}/exports/<name>` as a job. The folder is written atomically "
                    "(nothing appears there until it is complete) and never over an existing one.")
        with gr.Row():
            ui["run"] = gr.Dropdown(choices=service.exportable_runs(), value=None, label="run", scale=3,
                                    elem_id="export-run")
            ui["kind"] = gr.Radio(choices=[], value=None, label="export", scale=2)
        with gr.Row():
            ui["name"] = gr.Textbox("", label="name (exports/<name>)", scale=2)
            ui["shard"] = gr.Number(2048, label="shard size (MB)", precision=0, minimum=1, scale=1)
            ui["go"] = gr.Button("Export (queue the job)", variant="primary", scale=1)
        ui["kinds_help"] = gr.Markdown("\n".join(f"- `{k}`: {v}" for k, v in EXPORT_KINDS.items()))
        ui["message"] = gr.Markdown("", elem_id="export-message")
        ui["job"] = gr.State(None)
        ui["table"] = gr.Dataframe(exports_frame(service.exports()), label="exports in the workspace",
                                   interactive=False, wrap=True, elem_id="exports-table")
        ui["timer"] = gr.Timer(3.0)

    def refresh():
        return [gr.update(choices=service.exportable_runs()), exports_frame(service.exports())]

    return {**ui, "refresh": refresh, "refresh_outputs": [ui["run"], ui["table"]]}


def exports_frame(exports: list[dict]) -> pd.DataFrame:
    rows = [[e["name"], e.get("kind"), e.get("source_run"), ", ".join(e["files"]),
             round(e["bytes"] / 2**20, 3), e["folder"]] for e in exports]
    return pd.DataFrame(rows, columns=EXPORTS)


def _export_status(service: Service, job_id: str | None) -> str:
    if not job_id:
        return ""
    try:
        view = service.job(job_id, log_lines=4)
    except Refused as err:
        return f"✗ {code(err)}"
    where = f"{service.root}/{view.get('output')}"
    if view["status"] == "done":
        return f"✓ exported to `{where}`"
    if view["status"] in ("failed", "cancelled", "stopped"):
        return f"✗ export {view['status']}: {code(view.get('error') or view['log_tail'])}"
    return f"{view['status']} · job `{job_id}` → `{where}`"


def wire_export(ui: dict, service: Service, tabs, jobs: dict, job_choices) -> None:
    def pick_run(run_id):
        if not run_id:
            return gr.update(choices=[], value=None), ""
        try:
            kinds = service.export_options(run_id)
        except Refused as err:
            return gr.update(choices=[], value=None), f"✗ {code(err)}"
        name = f"{run_id.split('-', 2)[-1]}"[:60]
        return gr.update(choices=kinds, value=kinds[0] if kinds else None), \
            gr.update(value=name)

    ui["run"].input(pick_run, [ui["run"]], [ui["kind"], ui["name"]], **PRIVATE)

    def export(run_id, kind, name, shard):
        try:
            job = service.export(run_id or "", kind or "", name or "", int(shard or 0))
        except (Refused, ValueError, TypeError) as err:
            return f"✗ {code(err)}", None, gr.update()
        return _export_status(service, job["id"]), job["id"], gr.update(choices=job_choices(service))

    ui["go"].click(export, [ui["run"], ui["kind"], ui["name"], ui["shard"]],
                   [ui["message"], ui["job"], jobs["job"]], **PRIVATE)

    def tick(job_id):
        if not job_id:
            return gr.update(), gr.update()
        return _export_status(service, job_id), exports_frame(service.exports())

    ui["timer"].tick(tick, [ui["job"]], [ui["message"], ui["table"]], show_progress="hidden",
                     concurrency_limit=None, **PRIVATE)
