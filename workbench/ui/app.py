"""The Gradio workbench: a thin layer over `Service` (recipes, jobs, runs) and the schema forms.

Tabs: Train, Merge and Quantize (each a recipe kind as a form built from its schema, with the
recipe YAML it runs and the equivalent command beside it; recipes load into the form and save back
unchanged), Jobs (the queue; a job's progress, loss curve and log, stop / cancel / resume), Runs
(history with lineage, metrics and recipes), Evaluate & compare (gain vs forgetting across runs,
a merge search's Pareto front), Playground (one prompt, several models or adapters side by side,
a mixed-adapter batch), Export (a finished run's model, adapter or quantized model into
exports/<name>), Recipe (any recipe kind as YAML) and Models & data (what the workspace holds;
upload text / JSONL data). The API endpoints (`gr.api`, listed in API_NAMES) give scripts the same
actions through `gradio_client`.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr
import pandas as pd

from ..recipes import MergeRecipe, QuantizeRecipe, TrainRecipe
from ..yamlio import load_yaml
from . import tabs as more_tabs
from .service import Refused, Service, recipe_from_file_text
from .widgets import (MAX_INPUTS, MergeInputsEditor, MergeParametersEditor, RecipeForm,
                      SearchParameterEditor, code, merge_parameters, place_merge_problems)

API_NAMES = ("validate_recipe", "submit_recipe", "job_status", "list_jobs", "stop_job", "cancel_job",
             "resume_run", "list_runs", "get_run", "read_recipe", "save_recipe", "list_sources",
             "compare_runs", "evaluate_run", "generate", "export_options", "export_run",
             "list_exports")

# Fields shown up front; the rest of each section sits under "more settings".
TRAIN_MAIN_KEYS = {"name", "model.path", "data.train", "data.replay", "data.replay_ratio", "data.format",
                   "data.seq_len", "train.lr", "train.max_steps", "train.batch_size", "train.schedule",
                   "train.warmup_ratio"}
MERGE_MAIN_KEYS = {"name", "method", "output", "rank", "base.path", "search.weights", "search.values",
                   "search.choose", "search.max_forgetting_pct", "world.size", "eval.max_tokens",
                   "search.validation.max_tokens"}
QUANTIZE_MAIN_KEYS = {"name", "model.path", "method", "layers", "export", "max_shard_mb", "calibration",
                      "nf4_baseline", "weights.bits", "weights.symmetric", "weights.granularity",
                      "weights.group_size", "weights.clipping", "flexround.preset", "world.size",
                      "eval.max_tokens"}
LOG_LINES = 16
CSS = """
.field-error, .field-error p { color: #b91c1c !important; font-size: 0.9em; margin-top: -6px; }
.form-ok p { color: #15803d; }
"""
_code = code


def _loss_frame(rows: list[dict]) -> pd.DataFrame:
    """The loss curve with numeric columns even when empty (the plot keeps the axis types of the
    first frame it draws: an empty untyped frame would make them categories)."""
    frame = pd.DataFrame(rows or [], columns=["step", "loss"])
    return frame.astype({"step": "int64", "loss": "float64"})


def make_forms(service: Service) -> dict[str, RecipeForm]:
    """The recipe forms of the page, by kind."""
    by_method = merge_parameters()
    return {
        "train": RecipeForm(service, TrainRecipe, main_keys=TRAIN_MAIN_KEYS,
                            main_sections=("adapter", "train.regularizer"),
                            open_sections=("model", "data", "adapter", "train")),
        "merge": RecipeForm(service, MergeRecipe, main_keys=MERGE_MAIN_KEYS,
                            open_sections=("search",),
                            editors=[MergeInputsEditor(), MergeParametersEditor(),
                                     SearchParameterEditor(by_method)],
                            place=place_merge_problems),
        "quantize": RecipeForm(service, QuantizeRecipe, main_keys=QUANTIZE_MAIN_KEYS,
                               open_sections=("model", "weights", "flexround")),
    }


FORM_TABS = {  # kind -> (tab label, tab id, first save path, submit label)
    "train": ("Train", "train", "recipes/demo-lora-cpt-quick.yaml", "Train (queue the job)"),
    "merge": ("Merge", "merge", "recipes/merge.yaml", "Merge (queue the job)"),
    "quantize": ("Quantize", "quantize", "recipes/quantize.yaml", "Quantize (queue the job)"),
}


def _start_state(kind: str, form: RecipeForm) -> dict:
    """The recipe a form shows first: the quick demo (train), the schema defaults otherwise."""
    if kind == "train":
        from ..demo import demo_recipe

        data = demo_recipe(quick=True).model_dump(mode="json")
    elif kind == "quantize":
        data = QuantizeRecipe().model_dump(mode="json")
    else:
        data = {"kind": kind, "name": kind}
    return form.canonical(form.form.state_of(data))


def build_app(service: Service) -> gr.Blocks:
    """The Blocks app over one workspace (launch it with `launch.launch_app`)."""
    forms = make_forms(service)
    # uploads (kept in <workspace>/.gradio) are deleted a day after they arrive
    with gr.Blocks(title="Adapter workbench", analytics_enabled=False,
                   delete_cache=(86400, 86400)) as demo:
        gr.Markdown(f"## Adapter workbench\nWorkspace: `{service.root}`. Jobs run one at a time in "
                    "worker processes and keep running when this page or the app closes.")
        with gr.Tabs() as tabs:
            form_uis = {kind: _form_tab(kind, form, service) for kind, form in forms.items()}
            jobs = _jobs_tab(service)
            runs = _runs_tab(service)
            compare = more_tabs.compare_tab(service)
            playground = more_tabs.playground_tab(service)
            export = more_tabs.export_tab(service)
            recipe = _recipe_tab(service)
            data = _data_tab(service)
        loaders = {kind: _wire_form(kind, forms[kind], form_uis[kind], service, tabs, jobs)
                   for kind in forms}
        _wire(demo, tabs, forms, loaders, service, recipe, jobs, runs, data,
              [compare, playground, export])
        more_tabs.wire_compare(compare, service, tabs, jobs, _job_choices)
        more_tabs.wire_playground(playground, service)
        more_tabs.wire_export(export, service, tabs, jobs, _job_choices)
        _api(service)
    return demo


# ----------------------------------------------------------------------------------------------
# tabs


def _form_tab(kind: str, form: RecipeForm, service: Service) -> dict:
    label, tab_id, save_path, submit_label = FORM_TABS[kind]
    start = _start_state(kind, form)
    text, command, message, _ = form.preview(start, None, save_path)
    ui: dict[str, Any] = {}
    with gr.Tab(label, id=tab_id):
        with gr.Row():
            with gr.Column(scale=3):
                ui["form_message"] = gr.Markdown(message)
                if kind == "merge":
                    with gr.Row():
                        ui["preset"] = gr.Button("Instruction-vector preset", size="sm", scale=1)
                        gr.Markdown("θ = θ_domain + α(θ_inst − θ_base) (Hirano & Imajo 2024): two "
                                    "inputs, roles domain and instruct, α in parameters.alpha.",
                                    container=False)
                form.render(start)
                form.show_problems(start, save_path)
            with gr.Column(scale=2):
                with gr.Group():
                    ui["load_path"] = gr.Dropdown(choices=service.recipe_choices(), value=None,
                                                  label="recipe file in the workspace",
                                                  allow_custom_value=True, filterable=True)
                    with gr.Row():
                        ui["load"] = gr.Button("Load into the form", size="sm")
                        ui["upload"] = gr.UploadButton("Upload a recipe", file_types=[".yaml", ".yml"],
                                                       size="sm")
                ui["preview"] = gr.Code(text, language="yaml", label="recipe this form runs",
                                        interactive=False)
                ui["command"] = gr.Textbox(command, label="the same from a terminal",
                                           interactive=False, buttons=["copy"])
                ui["save_path"] = gr.Textbox(save_path, label="save as (inside the workspace)")
                with gr.Row():
                    ui["save"] = gr.Button("Save recipe")
                    ui["submit"] = gr.Button(submit_label, variant="primary")
                ui["message"] = gr.Markdown("")
        ui["loaded"] = gr.State(None)
    return ui


def _recipe_tab(service: Service) -> dict:
    ui: dict[str, Any] = {}
    with gr.Tab("Recipe", id="recipe"):
        gr.Markdown("Any recipe kind (train, eval, merge, mergekit, quantize, pretrain, pipeline) as "
                    "YAML: validated by the same schema as `workbench run`, then queued as a job.")
        with gr.Row():
            ui["template"] = gr.Dropdown(choices=service.templates(), value=None, label="start from")
            ui["load_path"] = gr.Dropdown(choices=service.recipe_choices(), value=None,
                                          label="or a recipe file in the workspace",
                                          allow_custom_value=True, filterable=True)
            ui["upload"] = gr.UploadButton("Upload a recipe", file_types=[".yaml", ".yml"])
        ui["editor"] = gr.Code("", language="yaml", label="recipe", interactive=True, lines=18)
        with gr.Row():
            ui["save_path"] = gr.Textbox("recipes/recipe.yaml", label="save as (inside the workspace)")
            ui["validate"] = gr.Button("Validate")
            ui["save"] = gr.Button("Save")
            ui["to_form"] = gr.Button("Edit in its form")
            ui["submit"] = gr.Button("Run (queue the job)", variant="primary")
        ui["message"] = gr.Markdown("")
    return ui


def _jobs_tab(service: Service) -> dict:
    ui: dict[str, Any] = {}
    with gr.Tab("Jobs", id="jobs"):
        with gr.Row():
            ui["job"] = gr.Dropdown(choices=[], value=None, label="job", scale=3)
            ui["stop"] = gr.Button("Stop (resumable)", scale=1)
            ui["cancel"] = gr.Button("Cancel (kill)", variant="stop", scale=1)
            ui["resume"] = gr.Button("Resume its run", scale=1)
        ui["status"] = gr.Markdown("No job selected.", elem_id="job-status")
        ui["progress"] = gr.HTML("", elem_id="job-progress")
        ui["plot"] = gr.LinePlot(_loss_frame([]), x="step", y="loss", title="training loss",
                                 height=260, y_axis_format=".3f", elem_id="job-loss-plot")
        ui["log"] = gr.Textbox("", label="log (last lines)", lines=LOG_LINES, max_lines=LOG_LINES,
                               interactive=False, autoscroll=True)
        ui["table"] = gr.Dataframe(headers=["id", "kind", "name", "status", "run", "submitted"],
                                   label="queue and history", interactive=False)
        ui["timer"] = gr.Timer(2.0)
    return ui


def _runs_tab(service: Service) -> dict:
    ui: dict[str, Any] = {}
    with gr.Tab("Runs", id="runs"):
        ui["table"] = gr.Dataframe(headers=["id", "kind", "name", "status", "parents", "result",
                                            "created"], label="runs (newest first; click a row)",
                                   interactive=False, elem_id="runs-table")
        with gr.Row():
            ui["run"] = gr.Dropdown(choices=[], value=None, label="run", scale=3)
            ui["resume"] = gr.Button("Resume", scale=1)
            ui["edit"] = gr.Button("Open its recipe in the Recipe tab", scale=1)
        ui["summary"] = gr.Markdown("")
        with gr.Row():
            ui["recipe"] = gr.Code("", language="yaml", label="recipe.yaml", interactive=False)
            ui["plot"] = gr.LinePlot(_loss_frame([]), x="step", y="loss", title="training loss",
                                     height=260, y_axis_format=".3f")
        ui["record"] = gr.JSON(label="run.json")
        ui["log"] = gr.Textbox("", label="run.log (last lines)", lines=LOG_LINES,
                               max_lines=LOG_LINES, interactive=False, autoscroll=True)
        ui["timer"] = gr.Timer(5.0)
    return ui


def _data_tab(service: Service) -> dict:
    ui: dict[str, Any] = {}
    with gr.Tab("Models & data", id="data"):
        ui["listing"] = gr.Markdown(_listing(service))
        ui["upload"] = gr.File(label="add a .txt (one document per line) or .jsonl file to data/",
                               file_types=[".txt", ".jsonl"], type="filepath")
        ui["message"] = gr.Markdown("")
    return ui


def _listing(service: Service) -> str:
    models = "\n".join(f"- `{value}` {label.removeprefix(value).strip()}"
                       for label, value in service.model_choices())
    data = "\n".join(f"- `{value}`" for _, value in service.data_choices())
    return (f"**Models** (for `model.path`; put Hugging Face folders anywhere in the workspace)\n\n"
            f"{models}\n\n**Data** (for `data.train`, `data.replay`, `eval.*`)\n\n{data}")


# ----------------------------------------------------------------------------------------------
# events


def _wire_form(kind: str, form: RecipeForm, ui: dict, service: Service, tabs, jobs: dict) -> dict:
    """The events of one form tab; returns {"load_text", "outputs"} for loading a recipe into it
    from elsewhere (the Recipe tab)."""
    n = len(form.keys)
    preview_outputs = [ui["preview"], ui["command"], ui["form_message"], *form.error_outputs]

    def preview(*values):
        state = form.state_from(values[:n])
        text, command, message, updates = form.preview(state, values[n], values[n + 1])
        return [text, command, message, *updates]

    private = dict(api_visibility="private", show_progress="hidden", queue=False)
    form_inputs = [*form.inputs, ui["loaded"], ui["save_path"]]
    # user edits only (.input, and leaving a text field: a paste may not count as input); a loaded
    # recipe fills the form and computes its preview at once
    editable = (*form.inputs, ui["save_path"])
    gr.on([c.input for c in editable] + [c.blur for c in editable if isinstance(c, (gr.Textbox, gr.Number))],
          preview, form_inputs, preview_outputs,
          trigger_mode="always_last", **private)

    def visibility(*values):
        return form.visibility(form.state_from(values))

    gr.on([c.change for c in form.visibility_triggers], visibility, form.inputs,
          form.visibility_outputs, **private)

    load_text, load_outputs = _wire_form_loading(kind, form, ui, service, preview_outputs)
    _wire_form_actions(kind, form, ui, service, tabs, jobs, form_inputs)
    if "preset" in ui:
        _wire_preset(form, ui, form_inputs, preview_outputs)
    return {"load_text": load_text, "outputs": load_outputs, "ui": ui}


def _wire_form_loading(kind: str, form: RecipeForm, ui: dict, service: Service,
                       preview_outputs: list) -> tuple:
    """Loading a recipe file or an upload into a form tab; returns (load_text, its outputs)."""
    load_outputs = [*form.inputs, ui["loaded"], ui["save_path"], ui["message"], *preview_outputs]

    def unchanged(message: str) -> list:
        return [gr.update()] * (len(form.inputs) + 2) + [message] + [gr.update()] * len(preview_outputs)

    def load_text(text: str, path: str | None):
        data = recipe_from_file_text(text)
        if data is None or data.get("kind") != kind:
            other = data.get("kind") if data else None
            where = f"the {FORM_TABS[other][0]} tab" if other in FORM_TABS else "the Recipe tab"
            return unchanged(f"✗ `{path or 'upload'}` is a {other} recipe; open it in {where}"
                             if other else f"✗ `{path or 'upload'}` is not a YAML recipe")
        if kind == "merge" and isinstance(data.get("inputs"), list) and len(data["inputs"]) > MAX_INPUTS:
            return unchanged(f"✗ `{path or 'upload'}` merges {len(data['inputs'])} inputs; the form "
                             f"shows {MAX_INPUTS}: edit it in the Recipe tab")
        checked = service.check(text)
        shown = load_yaml(checked["recipe"]) if checked["ok"] else data
        state = form.canonical(form.form.state_of(shown))
        loaded = {"text": text, "data": data, "state": state, "path": path}
        save_path = _save_name(path) if path else f"recipes/{data.get('name', kind)}.yaml"
        preview_values = form.preview(state, loaded, save_path)
        message = f"Loaded `{path or 'upload'}`" + ("" if checked["ok"] else " (it has problems; see the fields)")
        return [*form.updates_for(state), loaded, save_path, message, *preview_values[:3],
                *preview_values[3]]

    def load_path(path):
        try:
            return load_text(service.read_recipe(path or ""), path)
        except (Refused, ValueError, OSError) as err:
            return unchanged(f"✗ {_code(err)}")

    def load_upload(file):
        path = getattr(file, "name", file)
        with open(path, encoding="utf-8") as f:
            return load_text(f.read(), None)

    ui["load"].click(load_path, [ui["load_path"]], load_outputs, api_visibility="private")
    ui["upload"].upload(load_upload, [ui["upload"]], load_outputs, api_visibility="private")

    return load_text, load_outputs


def _wire_form_actions(kind: str, form: RecipeForm, ui: dict, service: Service, tabs, jobs: dict,
                       form_inputs: list) -> None:
    """Saving a form's recipe and queueing it as a job."""
    n = len(form.keys)

    def save_form(*values):
        state = form.state_from(values[:n])
        loaded, path = values[n], values[n + 1]
        text, problems = form.text(state, loaded)
        if problems:
            return loaded, "✗ fix the fields marked in red first", gr.update()
        try:
            saved = service.save_recipe(path, text)
        except (Refused, ValueError, OSError) as err:
            return loaded, f"✗ {_code(err)}", gr.update()
        loaded = {"text": text, "data": load_yaml(text), "state": state, "path": saved}
        return loaded, f"Saved `{saved}`", gr.update(choices=service.recipe_choices())

    ui["save"].click(save_form, form_inputs, [ui["loaded"], ui["message"], ui["load_path"]],
                     api_visibility="private")

    def submit_form(*values):
        state = form.state_from(values[:n])
        text, problems = form.text(state, values[n])
        if problems:
            return "✗ fix the fields marked in red first", gr.update(), gr.update()
        try:
            job = service.submit(text, source=f"{kind} form")
        except Refused as err:
            return f"✗ not queued:\n\n{_code(err)}", gr.update(), gr.update()
        return (f"Queued job `{job['id']}` ({job['status']}).",
                gr.Tabs(selected="jobs"), gr.update(choices=_job_choices(service), value=job["id"]))

    ui["submit"].click(submit_form, form_inputs, [ui["message"], tabs, jobs["job"]],
                       api_visibility="private")


def _wire_preset(form: RecipeForm, ui: dict, form_inputs: list, preview_outputs: list) -> None:
    """The merge form's instruction-vector preset button."""
    n = len(form.keys)

    def instruction_vector_preset(*values):
        """Method instruction_vector, two inputs marked domain and instruct, weights 1."""
        current = dict(zip(form.keys, values[:n]))
        current["method"] = "instruction_vector"
        current["@ed:inputs:count"] = 2
        for i, role in enumerate(("domain", "instruct")):
            current[f"@ed:inputs:role:{i}"] = role
            current[f"@ed:inputs:weight:{i}"] = 1.0
        for i in range(2, MAX_INPUTS):
            current[f"@ed:inputs:role:{i}"] = ""
        if current.get("@ed:parameters:alpha") in (None, ""):
            current["@ed:parameters:alpha"] = 1.0
        fields = [current.get(k) for k in form.keys]
        state = form.state_from(fields)
        text, command, message, updates = form.preview(state, values[n], values[n + 1])
        return [*fields, text, command, message, *updates, *form.visibility(state)]

    ui["preset"].click(instruction_vector_preset, form_inputs,
                       [*form.inputs, *preview_outputs, *form.visibility_outputs],
                       api_visibility="private")


def _wire(demo, tabs, forms: dict[str, RecipeForm], loaders: dict, service: Service, recipe: dict,
          jobs: dict, runs: dict, data: dict, extra: list[dict]) -> None:
    """Every event of the page outside the form tabs."""
    _wire_editor_files(service, recipe)
    _wire_editor_actions(service, tabs, forms, loaders, recipe, jobs)
    _wire_jobs(service, jobs)
    _wire_runs(service, tabs, recipe, jobs, runs)
    _wire_reload(demo, forms, loaders, service, recipe, jobs, runs, data, extra)


def _wire_editor_files(service: Service, recipe: dict) -> None:
    """The Recipe tab's files: start from a template, load, upload, validate, save."""
    def use_template(name):
        try:
            return service.template(name or ""), f"Started from {name}"
        except Refused as err:
            return gr.update(), f"✗ {_code(err)}"

    recipe["template"].input(use_template, [recipe["template"]], [recipe["editor"], recipe["message"]],
                             api_visibility="private")

    def editor_load(path):
        try:
            return service.read_recipe(path or ""), f"Loaded `{path}`", _save_name(path)
        except (Refused, ValueError, OSError) as err:
            return gr.update(), f"✗ {_code(err)}", gr.update()

    recipe["load_path"].input(editor_load, [recipe["load_path"]],
                              [recipe["editor"], recipe["message"], recipe["save_path"]],
                              api_visibility="private")

    def editor_upload(file):
        with open(getattr(file, "name", file), encoding="utf-8") as f:
            return f.read(), "Loaded the uploaded file (not saved yet)"

    recipe["upload"].upload(editor_upload, [recipe["upload"]], [recipe["editor"], recipe["message"]],
                            api_visibility="private")

    def editor_validate(text):
        checked = service.check(text or "")
        return f"✓ {checked['message']}" if checked["ok"] else f"✗\n\n{_code(checked['message'])}"

    recipe["validate"].click(editor_validate, [recipe["editor"]], [recipe["message"]],
                             api_visibility="private")

    def editor_save(text, path):
        try:
            saved = service.save_recipe(path, text or "")
        except (Refused, ValueError, OSError) as err:
            return f"✗ {_code(err)}", gr.update()
        return f"Saved `{saved}`", gr.update(choices=service.recipe_choices())

    recipe["save"].click(editor_save, [recipe["editor"], recipe["save_path"]],
                         [recipe["message"], recipe["load_path"]], api_visibility="private")



def _wire_editor_actions(service: Service, tabs, forms: dict[str, RecipeForm], loaders: dict,
                         recipe: dict, jobs: dict) -> None:
    """The Recipe tab's actions: queue the recipe, or open it in the form of its kind."""
    def editor_submit(text):
        try:
            job = service.submit(text or "", source="recipe editor")
        except Refused as err:
            return f"✗ not queued:\n\n{_code(err)}", gr.update(), gr.update()
        return (f"Queued job `{job['id']}`.", gr.Tabs(selected="jobs"),
                gr.update(choices=_job_choices(service), value=job["id"]))

    recipe["submit"].click(editor_submit, [recipe["editor"]], [recipe["message"], tabs, jobs["job"]],
                           api_visibility="private")

    def editor_to_form(text, path):
        """Open the editor's recipe in the form of its kind (train, merge, quantize)."""
        data = recipe_from_file_text(text or "")
        kind = data.get("kind") if data else None
        source = path if path and path.endswith((".yaml", ".yml")) else None
        out, switch, message = [], gr.update(), None
        for name, loader in loaders.items():
            if name != kind:
                out += [gr.update()] * len(loader["outputs"])
                continue
            values = loader["load_text"](text or "", source)
            loaded = values[len(forms[name].inputs)]
            if isinstance(loaded, dict) and "text" in loaded:
                switch = gr.Tabs(selected=FORM_TABS[name][1])
            message = values[len(forms[name].inputs) + 2]
            out += values
        if message is None:
            message = (f"✗ a {kind} recipe has no form; edit it here" if kind
                       else "✗ not a YAML recipe")
        return [*out, switch, message]

    form_outputs = [c for loader in loaders.values() for c in loader["outputs"]]
    recipe["to_form"].click(editor_to_form, [recipe["editor"], recipe["save_path"]],
                            [*form_outputs, tabs, recipe["message"]], api_visibility="private")



def _wire_jobs(service: Service, jobs: dict) -> None:
    """The Jobs tab: the job list, the selected job's panel, stop / cancel / resume."""
    job_outputs = [jobs["status"], jobs["progress"], jobs["plot"], jobs["log"], jobs["stop"],
                   jobs["cancel"], jobs["resume"]]

    def job_panel(job_id):
        if not job_id:
            return ["No job selected.", "", _loss_frame([]), "", *[gr.update(interactive=False)] * 3]
        try:
            view = service.job(job_id, log_lines=LOG_LINES)
        except Refused as err:
            return [f"✗ {_code(err)}", "", _loss_frame([]), "", *[gr.update(interactive=False)] * 3]
        active = view["status"] in ("queued", "running")
        resumable = view["status"] in ("stopped", "failed", "cancelled") and view.get("run") \
            and view.get("run_status") not in ("done", None)
        return [_job_markdown(view), _progress_html(view), _loss_frame(view["loss"]),
                view["log_tail"], gr.update(interactive=active), gr.update(interactive=active),
                gr.update(interactive=bool(resumable))]

    def jobs_refresh(job_id):
        # choices only: a value written back here could undo a selection made meanwhile (a job
        # just submitted from a form) with the one this tick started from
        return [gr.update(choices=_job_choices(service)), _jobs_frame(service), *job_panel(job_id)]

    jobs["job"].change(job_panel, [jobs["job"]], job_outputs, api_visibility="private",
                       show_progress="hidden")
    jobs["timer"].tick(jobs_refresh, [jobs["job"]], [jobs["job"], jobs["table"], *job_outputs],
                       api_visibility="private", show_progress="hidden", concurrency_limit=None)

    def job_action(action):
        def handler(job_id):
            try:
                getattr(service, action)(job_id or "")
            except Refused as err:
                gr.Warning(str(err))
            return job_panel(job_id)
        return handler

    jobs["stop"].click(job_action("stop"), [jobs["job"]], job_outputs, api_visibility="private")
    jobs["cancel"].click(job_action("cancel"), [jobs["job"]], job_outputs, api_visibility="private")

    def resume_job(job_id):
        try:
            run_id = service.job(job_id or "").get("run")
            job = service.resume(run_id or "")
        except Refused as err:
            gr.Warning(str(err))
            return gr.update()
        return gr.update(choices=_job_choices(service), value=job["id"])

    jobs["resume"].click(resume_job, [jobs["job"]], [jobs["job"]], api_visibility="private")



def _wire_runs(service: Service, tabs, recipe: dict, jobs: dict, runs: dict) -> None:
    """The Runs tab: the run list, the selected run's panel, resume, edit its recipe."""
    run_outputs = [runs["summary"], runs["recipe"], runs["plot"], runs["record"], runs["log"],
                   runs["resume"]]

    def run_panel(run_id):
        if not run_id:
            return ["Pick a run.", "", _loss_frame([]), None, "", gr.update(interactive=False)]
        try:
            view = service.run(run_id, log_lines=LOG_LINES)
        except Refused as err:
            return [f"✗ {_code(err)}", "", _loss_frame([]), None, "", gr.update(interactive=False)]
        status = view["info"].get("status")
        return [_run_markdown(view), view["recipe"], _loss_frame(view["loss"]), view["info"],
                view["log_tail"], gr.update(interactive=status in ("failed", "stopped", "interrupted"))]

    def runs_refresh(run_id):
        rows = service.runs()
        return [_runs_frame(rows), gr.update(choices=[r["id"] for r in rows])]  # choices only

    runs["run"].change(run_panel, [runs["run"]], run_outputs, api_visibility="private",
                       show_progress="hidden")
    runs["timer"].tick(runs_refresh, [runs["run"]], [runs["table"], runs["run"]],
                       api_visibility="private", show_progress="hidden", concurrency_limit=None)

    def pick_row(evt: gr.SelectData, frame):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        try:
            return frame.iloc[row]["id"]
        except (IndexError, KeyError, AttributeError):
            return gr.update()

    runs["table"].select(pick_row, [runs["table"]], [runs["run"]], api_visibility="private")

    def resume_from_runs(run_id):
        try:
            job = service.resume(run_id or "")
        except Refused as err:
            gr.Warning(str(err))
            return gr.update(), gr.update()
        return gr.Tabs(selected="jobs"), gr.update(choices=_job_choices(service), value=job["id"])

    runs["resume"].click(resume_from_runs, [runs["run"]], [tabs, jobs["job"]],
                         api_visibility="private")

    def edit_run_recipe(run_id):
        if not run_id:
            return gr.update(), gr.update(), gr.update(), gr.update()
        path = f"runs/{run_id}/recipe.yaml"
        try:
            text = service.read_recipe(path)
        except (Refused, ValueError, OSError) as err:
            return gr.update(), gr.update(), f"✗ {_code(err)}", gr.update()
        return gr.Tabs(selected="recipe"), text, f"Recipe of run `{run_id}`", _save_name(path)

    runs["edit"].click(edit_run_recipe, [runs["run"]],
                       [tabs, recipe["editor"], recipe["message"], recipe["save_path"]],
                       api_visibility="private")



def _wire_reload(demo, forms: dict[str, RecipeForm], loaders: dict, service: Service, recipe: dict,
                 jobs: dict, runs: dict, data: dict, extra: list[dict]) -> None:
    """Models and data choices, adding data, and what a page (re)load fills in."""
    choice_fields = [(c, k) for form in forms.values() for c, k in form.all_choice_fields()]
    load_paths = [loader["ui"]["load_path"] for loader in loaders.values()] + [recipe["load_path"]]

    def choices_refresh():
        choices = {"model": service.model_choices(), "data": service.data_choices(),
                   "source": service.source_choices()}
        out = [gr.update(choices=choices[kind]) for _, kind in choice_fields]
        recipes = service.recipe_choices()
        return [*out, *[gr.update(choices=recipes)] * len(load_paths), _listing(service)]

    refresh_outputs = [*[c for c, _ in choice_fields], *load_paths, data["listing"]]

    def add_data(file):
        if not file:
            return gr.update(), *[gr.update()] * len(refresh_outputs)
        try:
            saved = service.add_data(getattr(file, "name", file))
        except (Refused, ValueError, OSError) as err:
            return f"✗ {_code(err)}", *[gr.update()] * len(refresh_outputs)
        return f"Added `{saved}`", *choices_refresh()

    data["upload"].upload(add_data, [data["upload"]], [data["message"], *refresh_outputs],
                          api_visibility="private")

    # a page (re)load reconnects: current choices, the running (or latest) job, the runs, and the
    # choices of the compare, playground and export tabs
    extra_outputs = [c for tab in extra for c in tab["refresh_outputs"]]

    def on_load():
        all_jobs = service.jobs()
        running = [j for j in all_jobs if j["status"] == "running"]
        current = (running or all_jobs or [{"id": None}])[0]["id"]
        rows = service.runs()
        refreshed = [value for tab in extra for value in tab["refresh"]()]
        return [*choices_refresh(), gr.update(choices=_job_choices(service), value=current),
                _jobs_frame(service), _runs_frame(rows),
                gr.update(choices=[r["id"] for r in rows], value=rows[0]["id"] if rows else None),
                *refreshed]

    demo.load(on_load, [], [*refresh_outputs, jobs["job"], jobs["table"], runs["table"], runs["run"],
                            *extra_outputs],
              api_visibility="private", show_progress="hidden")


def _save_name(path: str | None) -> Any:
    """Where "save" writes a recipe loaded from `path`: the same file, except for a run's or a
    job's recipe (kept by the workbench), which goes to recipes/<run or job id>.yaml."""
    if not path:
        return gr.update()
    parts = path.split("/")
    if parts[0] in ("runs", "jobs") and len(parts) > 1:
        return f"recipes/{parts[1].removesuffix('.yaml')}.yaml"
    return path


def _job_choices(service: Service) -> list[tuple[str, str]]:
    return [(f"{j['id']} · {j.get('kind')} {j.get('name')} · {j['status']}", j["id"])
            for j in service.jobs()]


def _jobs_frame(service: Service) -> pd.DataFrame:
    rows = [[j["id"], j.get("kind"), j.get("name"), j["status"], j.get("run") or "",
             j.get("submitted")] for j in service.jobs()]
    return pd.DataFrame(rows, columns=["id", "kind", "name", "status", "run", "submitted"])


def _runs_frame(rows: list[dict]) -> pd.DataFrame:
    table = [[r["id"], r["kind"], r["name"], r["status"], ", ".join(r["parents"]), r["result"],
              r["created"]] for r in rows]
    return pd.DataFrame(table, columns=["id", "kind", "name", "status", "parents", "result", "created"])


def _job_markdown(view: dict) -> str:
    lines = [f"**{html.escape(view['status'])}** · job `{view['id']}` · {view.get('kind')} "
             f"`{view.get('name')}`"]
    if view["status"] == "queued":
        lines.append(f"Position in the queue: {view.get('queue_position')}.")
    if view.get("action") == "export":
        lines.append(f"Export of run `{(view.get('export') or {}).get('run')}` "
                     f"({(view.get('export') or {}).get('kind')}) to `{view.get('output')}`")
    if view.get("run"):
        lines.append(f"Run `{view['run']}` ({view.get('run_status')}); runs of this job: "
                     + ", ".join(f"`{r}`" for r in view.get("runs", [])))
    if view.get("error"):
        lines.append(_code(view["error"]))
    if view.get("summary"):
        keys = [k for k in ("domain_gain_pct", "general_forgetting_pct", "task_gain_pts", "final_loss",
                            "steps", "train_seconds") if view["summary"].get(k) is not None]
        lines.append(" · ".join(f"{k}: {view['summary'][k]:.4g}" if isinstance(view['summary'][k], float)
                                else f"{k}: {view['summary'][k]}" for k in keys))
    lines.append(f"Command: `{view['display_command']}`")
    return "\n\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _progress_html(view: dict) -> str:
    """The phase the job's current run is in, its step / total and the time left (from the run's
    progress events)."""
    step, total = view.get("step") or 0, view.get("total")
    if view["status"] == "queued":
        return "<div>waiting in the queue</div>"
    if not total:
        if view["status"] != "running":
            return f"<div>{html.escape(view['status'])}</div>"
        if view.get("action") == "export":
            return f"<div>exporting to {html.escape(str(view.get('output')))}</div>"
        if not view.get("current_run"):
            return "<div>starting the worker (loading libraries and the model)</div>"
        return "<div>running (this kind of job has no step count)</div>"
    pct = 100.0 * min(step, total) / total
    phase = f"{html.escape(str(view['phase']))}: " if view.get("phase") else ""
    unit = html.escape(str(view.get("unit") or "step"))
    eta = f" · about {_duration(view['eta_s'])} left" if view.get("eta_s") else ""
    return (f"<div><progress value='{step}' max='{total}' style='width:100%;height:18px'></progress>"
            f"<div>{phase}{unit} {step} / {total} ({pct:.0f}%){eta}</div></div>")


def _run_markdown(view: dict) -> str:
    info = view["info"]
    lineage = view["lineage"]
    parts = [f"**{html.escape(str(info.get('status')))}** · {info.get('kind')} `{info.get('name')}` · "
             f"run `{view['id']}`"]
    if view.get("result"):
        parts.append(f"Result: {html.escape(view['result'])}")
    if lineage["ancestors"]:
        parts.append("Came from: " + " ← ".join(f"`{a['id']}` ({a['kind']} {a['name']})"
                                                for a in lineage["ancestors"]))
    if lineage["children"]:
        parts.append("Used by: " + ", ".join(f"`{c}`" for c in lineage["children"]))
    if info.get("error"):
        parts.append(_code(info["error"]))
    parts.append("Files: " + ", ".join(f"`{f}`" for f in view["files"]))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------------------------
# the API (gradio_client)


def _refusing(fn):
    """`fn` with a refusal shown to the API caller as its message (no server traceback)."""
    def call(*args):
        try:
            return fn(*args)
        except (Refused, ValueError, OSError) as err:
            raise gr.Error(str(err), print_exception=False) from None
    return call


def _job_api(service: Service) -> list:
    """Recipes and jobs: validate, submit, follow, stop, cancel, resume."""
    refusing = _refusing

    def validate_recipe(recipe_yaml: str) -> dict:
        """Validate a YAML recipe: {ok, kind, name, errors: [{key, message}], message, recipe}."""
        return service.check(recipe_yaml)

    def submit_recipe(recipe_yaml: str) -> dict:
        """Validate and queue a YAML recipe; returns the job record (an error when invalid)."""
        return refusing(service.submit)(recipe_yaml, "api")

    def job_status(job_id: str) -> dict:
        """A job: status, run ids, step / total, loss curve, log tail, summary when done."""
        return refusing(service.job)(job_id)

    def list_jobs() -> list[dict]:
        """Every job, newest first."""
        return service.jobs()

    def stop_job(job_id: str) -> dict:
        """Stop a job (SIGINT: the run is marked stopped and can be resumed)."""
        return refusing(service.stop)(job_id)

    def cancel_job(job_id: str) -> dict:
        """Cancel a job (the worker is killed)."""
        return refusing(service.cancel)(job_id)

    def resume_run(run_id: str) -> dict:
        """Queue `workbench resume RUN` for a stopped, failed or interrupted run."""
        return refusing(service.resume)(run_id)

    return [validate_recipe, submit_recipe, job_status, list_jobs, stop_job, cancel_job, resume_run]


def _run_api(service: Service) -> list:
    """Runs, recipe files, sources, comparison, evaluation and exports."""
    refusing = _refusing

    def list_runs() -> list[dict]:
        """Every run, newest first: id, kind, name, status, parents, result, created, summary."""
        return service.runs()

    def get_run(run_id: str) -> dict:
        """One run: record, recipe, lineage, loss curve, log tail, files."""
        return refusing(service.run)(run_id)

    def read_recipe(path: str) -> str:
        """The text of a recipe file inside the workspace."""
        return refusing(service.read_recipe)(path)

    def save_recipe(path: str, recipe_yaml: str) -> str:
        """Write a recipe file inside the workspace; returns its path relative to the workspace."""
        return refusing(service.save_recipe)(path, recipe_yaml)

    def list_sources() -> list[dict]:
        """Models and adapters a merge or the playground can take: [{label, value}] (`default`,
        `run:<id>`, folders in the workspace)."""
        return [{"label": label, "value": value} for label, value in service.playground_choices()]

    def compare_runs(run_ids: list[str]) -> dict:
        """Gain vs forgetting of the runs: {rows: [{label, run, gain, general_forgetting_pct,
        domain_gain_pct, task_gain_pts, general_ppl, domain_ppl, weights_mib, source, ...}],
        searches: [{run, image, table, summary}]} (a merge search's pareto.png and search.md)."""
        return service.compare(run_ids)

    def evaluate_run(run_id: str, world_size: str = "default", max_tokens: int = 16384,
                     max_questions: int = 100) -> dict:
        """Queue an eval job of a finished run's model or adapter against its base; the job."""
        return refusing(service.evaluate)(run_id, world_size, max_tokens, max_questions)

    return [list_runs, get_run, read_recipe, save_recipe, list_sources, compare_runs, evaluate_run,
            *_export_api(service)]


def _generate_api(service: Service):
    """The playground's generation, one request at a time."""
    def generate(prompt: str, models: list[str], max_new_tokens: int = 32, mixed: bool = False) -> dict:
        """Greedy answers of each model (`default`, `run:<id>`, a folder) to one prompt:
        {separate: [{model, text, seconds}], mixed: [...] or None (one mixed-adapter batch of LoRA
        or RoAd adapters of one base, row i through model i)}."""
        return _refusing(service.generate)(prompt, models, max_new_tokens, mixed)

    return generate


def _export_api(service: Service) -> list:
    """What a run can be exported as, exporting it, and the exports made."""
    refusing = _refusing

    def export_options(run_id: str) -> list[str]:
        """The exports a finished run offers: model, adapter, compressed-tensors, dequantized."""
        return refusing(service.export_options)(run_id)

    def export_run(run_id: str, kind: str, name: str, max_shard_mb: int = 2048) -> dict:
        """Queue an export of a finished run into exports/<name> (refused if it exists); the job
        (its `output` is the folder, relative to the workspace)."""
        return refusing(service.export)(run_id, kind, name, max_shard_mb)

    def list_exports() -> list[dict]:
        """Exports in the workspace, newest first: name, folder, relative, kind, source_run,
        created, files, bytes."""
        return service.exports()

    return [export_options, export_run, list_exports]


def _api(service: Service) -> None:
    """The named API endpoints gradio_client calls."""
    for fn in (*_job_api(service), *_run_api(service)):
        gr.api(fn, api_name=fn.__name__, concurrency_limit=None)
    # generation is one request at a time (the playground worker); the queue waits, not the server
    gr.api(_generate_api(service), api_name="generate", concurrency_limit=1)
