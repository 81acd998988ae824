"""Recipe forms on the page: Gradio components for a `forms.Form`, plus editors for the fields a
plain widget shows badly (merge inputs, a method's parameters, the searched parameter).

`RecipeForm(service, MergeRecipe, ...)` renders every field of the schema (new fields appear by
themselves); an `Editor` takes over one field: it renders its own components, turns their values
into the field's text in the form state (`Form.text` then writes the recipe YAML as for any field)
and back. The form state is the flat dict of `forms.Form` plus the editors' own keys (`@ed:...`)
and their messages (`@err:<field>`).
"""

from __future__ import annotations

import html
from typing import Any, Callable

import gradio as gr

from ..yamlio import YamlRefused, load_yaml
from .forms import Form, FormField, Section
from .service import Service

MODEL_KEYS = {"model.path", "base.path"}
DATA_KEYS = {"data.train", "data.replay", "train.regularizer.data", "eval.general_text",
             "eval.domain_text", "eval.labelled", "calibration", "search.validation.general_text",
             "search.validation.domain_text"}
MAX_INPUTS = 6  # merge inputs the form shows; more: edit the recipe as YAML (Recipe tab)


def code(text: Any) -> str:
    """Text shown verbatim inside Markdown (user values never become markup)."""
    return "```\n" + str(text).replace("```", "'''") + "\n```"


def error_update(message: str | None) -> dict:
    return gr.update(value=code(message) if message else "", visible=bool(message))


def escape(text: Any) -> str:
    return html.escape(str(text))


class Editor:
    """A field edited through several components (see the module docstring)."""

    field_id: str = ""
    keys: list[str]
    components: list
    choice_kinds: dict[int, str]  # index in components -> "source" | "model" | "data"

    def render(self, form: "RecipeForm", state: dict) -> None:
        raise NotImplementedError

    def to_text(self, state: dict) -> tuple[str, str | None]:
        """The field's widget text for the editor values in `state`, and a problem (or None)."""
        raise NotImplementedError

    def from_text(self, text: str, state: dict) -> dict:
        """The editor values {key: value} showing the field's widget text."""
        raise NotImplementedError

    def triggers(self, form: "RecipeForm") -> list:
        return []

    @property
    def visibility_outputs(self) -> list:
        return []

    def visibility(self, state: dict) -> list:
        return []


class RecipeForm:
    """The form of one recipe kind: components per schema field, editors, preview, errors."""

    def __init__(self, service: Service, model, *, main_keys=(), main_sections=(), open_sections=(),
                 editors: list[Editor] = (), place: Callable | None = None, title: str = ""):
        self.service = service
        self.form = Form.of(model)
        self.kind = self.form.kind
        self.main_keys, self.main_sections = set(main_keys), tuple(main_sections)
        self.open_sections = tuple(open_sections)
        self.editors = {e.field_id: e for e in editors}
        self.place = place  # re-keys schema problems before they are placed: (problems, state) -> problems
        self.title = title or self.kind
        self.components: dict[str, Any] = {}    # field id -> component
        self.switches: dict[str, Any] = {}      # "@on:<id>" / "@tag:<id>" -> component
        self.errors: dict[str, Any] = {}        # field id or "@section:<key>" -> Markdown
        self.groups: dict[str, Any] = {}        # "@on:<id>" -> Column; "@tag:<id>=<tag>" -> Column
        self.choice_fields: list[tuple[Any, str]] = []  # (component, "model" | "data" | "source")

    # -- layout ----------------------------------------------------------------------------
    def render(self, state: dict) -> None:
        root = self.form.root
        self._fields(root.fields, state, main_only=True)
        for child in root.children:
            with gr.Accordion(child.title, open=child.key in self.open_sections):
                if child.info:
                    gr.Markdown(child.info)
                self._section(child, state)

    def _section(self, section: Section, state: dict) -> None:
        if section.optional:
            key = f"@on:{section.id}"
            self.switches[key] = gr.Checkbox(value=state[key], label=f"use {section.key}",
                                             info=section.info or None)
            with gr.Column(visible=state[key]) as column:
                self._section_body(section, state)
            self.groups[key] = column
        else:
            self._section_body(section, state)

    def _section_body(self, section: Section, state: dict) -> None:
        if section.variants is not None:
            key = f"@tag:{section.id}"
            self.switches[key] = gr.Dropdown(choices=list(section.variants), value=state[key],
                                             label=f"{section.key}.{section.tag_key}",
                                             info=section.info or None)
            for tag, variant in section.variants.items():
                with gr.Column(visible=state[key] == tag) as column:
                    if variant.info:
                        gr.Markdown(variant.info)
                    self._section_body(variant, state)
                self.groups[f"{key}={tag}"] = column
            self._section_error(section.key)
            return
        main_only = not section.key.startswith(self.main_sections) if self.main_sections else True
        self._fields(section.fields, state, main_only)
        for child in section.children:
            with gr.Group():
                self._section(child, state)
        self._section_error(section.key)

    def _section_error(self, key: str) -> None:
        name = f"@section:{key}"
        if name not in self.errors:
            self.errors[name] = gr.Markdown("", visible=False, elem_classes=["field-error"])

    def _fields(self, fields: list[FormField], state: dict, main_only: bool) -> None:
        main = [f for f in fields if not main_only or f.key in self.main_keys or f.id in self.editors]
        more = [f for f in fields if f not in main]
        self._grid(main, state)
        if more:
            with gr.Accordion("more settings", open=False):
                self._grid(more, state)

    def _grid(self, fields: list[FormField], state: dict, per_row: int = 2) -> None:
        row: list[FormField] = []

        def flush():
            if row:
                with gr.Row(equal_height=False):
                    for f in row:
                        with gr.Column(min_width=240):
                            self._field(f, state[f.id])
                row.clear()

        for f in fields:
            if f.id in self.editors:  # an editor takes the whole width
                flush()
                self.editors[f.id].render(self, state)
                self.errors[f.id] = gr.Markdown("", visible=False, elem_classes=["field-error"])
                continue
            row.append(f)
            if len(row) == per_row:
                flush()
        flush()

    def _field(self, f: FormField, value: Any) -> None:
        info = (f.info or "")[:300] or None
        label = f.key
        if f.key in MODEL_KEYS or f.key in DATA_KEYS:
            kind = "model" if f.key in MODEL_KEYS else "data"
            component = gr.Dropdown(choices=self.choices(kind), value=value, label=label, info=info,
                                    allow_custom_value=True, filterable=True)
            self.choice_fields.append((component, kind))
        elif f.widget == "dropdown":
            component = gr.Dropdown(choices=f.choices, value=value, label=label, info=info)
        elif f.widget == "multi":
            component = gr.CheckboxGroup(choices=f.choices, value=value, label=label, info=info)
        elif f.widget == "checkbox":
            component = gr.Checkbox(value=value, label=label, info=info)
        elif f.widget in ("int", "float"):
            component = gr.Number(value=value, label=label, info=info,
                                  precision=0 if f.widget == "int" else None)
        else:
            placeholder = "YAML, e.g. [10, 50]" if f.widget == "yaml" else None
            if f.optional:
                placeholder = "empty: not set"
            component = gr.Textbox(value=value, label=label, info=info, placeholder=placeholder,
                                   max_lines=3)
        self.components[f.id] = component
        self.errors[f.id] = gr.Markdown("", visible=False, elem_classes=["field-error"])

    def choices(self, kind: str) -> list:
        if kind == "model":
            return self.service.model_choices()
        if kind == "data":
            return self.service.data_choices()
        return self.service.source_choices()

    def all_choice_fields(self) -> list[tuple[Any, str]]:
        found = list(self.choice_fields)
        for editor in self.editors.values():
            found += [(editor.components[i], kind) for i, kind in editor.choice_kinds.items()]
        return found

    # -- values ----------------------------------------------------------------------------
    @property
    def keys(self) -> list[str]:
        keys = list(self.components) + list(self.switches)
        for editor in self.editors.values():
            keys += editor.keys
        return keys

    @property
    def inputs(self) -> list:
        inputs = list(self.components.values()) + list(self.switches.values())
        for editor in self.editors.values():
            inputs += editor.components
        return inputs

    def state_from(self, values) -> dict:
        """The form state of the components' values (editors' fields filled in)."""
        return self._fill_editors(dict(zip(self.keys, values)))

    def _fill_editors(self, state: dict) -> dict:
        for field_id, editor in self.editors.items():
            state[field_id], problem = editor.to_text(state)
            state[f"@err:{field_id}"] = problem
        return state

    def updates_for(self, state: dict) -> list:
        """The components' values showing a form state (as `Form.state_of` gives it)."""
        values = dict(state)
        for field_id, editor in self.editors.items():
            values.update(editor.from_text(state.get(field_id), state))
        return [values.get(k) for k in self.keys]

    def canonical(self, state: dict) -> dict:
        """A state from `Form.state_of` as the components give it back (so that loading a recipe
        and changing nothing is recognised as unchanged)."""
        state = dict(state)
        for field_id, editor in self.editors.items():
            state.update(editor.from_text(state.get(field_id), state))
        return self._fill_editors(state)

    @property
    def visibility_outputs(self) -> list:
        out = list(self.groups.values())
        for editor in self.editors.values():
            out += editor.visibility_outputs
        return out

    @property
    def visibility_triggers(self) -> list:
        triggers = list(self.switches.values())
        for editor in self.editors.values():
            triggers += [t for t in editor.triggers(self) if t not in triggers]
        return triggers

    def visibility(self, state: dict) -> list:
        out = []
        for key in self.groups:
            if "=" in key:
                switch, tag = key.split("=", 1)
                out.append(gr.update(visible=state.get(switch) == tag))
            else:
                out.append(gr.update(visible=bool(state.get(key))))
        for editor in self.editors.values():
            out += editor.visibility(state)
        return out

    @property
    def error_outputs(self) -> list:
        return list(self.errors.values())

    def text(self, state: dict, loaded: dict | None) -> tuple[str, dict[str, str]]:
        """(recipe YAML, problems by field id) of a state: the form's YAML problems and the
        editors' own."""
        text, problems = self.form.text(state, loaded)
        for field_id in self.editors:
            if state.get(f"@err:{field_id}"):
                problems[field_id] = state[f"@err:{field_id}"]
        return text, problems

    def preview(self, state: dict, loaded: dict | None, save_path: str) -> tuple[str, str, str, list]:
        """(recipe YAML, CLI command, form message, error updates) for a form state."""
        text, own = self.text(state, loaded)
        checked = self.service.check(text)
        problems = [(e["key"], e["message"]) for e in checked["errors"]]
        if self.place is not None:
            problems = self.place(problems, state)
        placed = self.form.place_errors(problems, state)
        for field_id, message in own.items():
            placed[field_id] = f"{placed[field_id]}\n{message}" if field_id in placed else message
        count = len(problems) + len(own)
        message = f"✗ {count} problem(s), shown next to their fields." if count \
            else f"✓ {checked['message']}"
        if "@form" in placed:
            message += "\n\n" + code(placed["@form"])
        updates = [error_update(placed.get(name)) for name in self.errors]
        return text, self.service.command_for(save_path or "recipe.yaml"), message, updates


    def show_problems(self, state: dict, save_path: str) -> None:
        """Set the error slots of a just-rendered form to the problems of `state` (the page then
        opens with them shown, before any edit)."""
        *_, updates = self.preview(state, None, save_path)
        for component, update in zip(self.errors.values(), updates):
            component.value = component.postprocess(update["value"])
            component.visible = update["visible"]


# ----------------------------------------------------------------------------------------------
# merge editors


def _number(value: Any, default: float) -> float:
    if value is None or value == "":
        return default
    return float(value)


class MergeInputsEditor(Editor):
    """`inputs`: up to MAX_INPUTS rows of (run or folder, weight, role)."""

    field_id = "inputs"

    def __init__(self):
        self.keys = ["@ed:inputs:count"]
        for i in range(MAX_INPUTS):
            self.keys += [f"@ed:inputs:path:{i}", f"@ed:inputs:weight:{i}", f"@ed:inputs:role:{i}"]
        self.components, self.rows, self.roles = [], [], []
        self.choice_kinds = {}

    def render(self, form: RecipeForm, state: dict) -> None:
        values = self.from_text(state.get(self.field_id), state)
        iv = state.get("method") == "instruction_vector"
        gr.Markdown("**inputs**: adapters or models to merge (`run:<id>` of a run, or a folder in "
                    "the workspace), each with its weight; instruction_vector marks one `domain` "
                    "and one `instruct` input instead.")
        count = gr.Slider(1, MAX_INPUTS, step=1, value=values["@ed:inputs:count"],
                          label="number of inputs")
        self.components.append(count)
        sources = form.choices("source")
        for i in range(MAX_INPUTS):
            with gr.Row(visible=i < values["@ed:inputs:count"], equal_height=True) as row:
                path = gr.Dropdown(choices=sources, value=values[f"@ed:inputs:path:{i}"] or None,
                                   label=f"inputs.{i}.path", allow_custom_value=True,
                                   filterable=True, scale=4)
                weight = gr.Number(value=values[f"@ed:inputs:weight:{i}"], label=f"inputs.{i}.weight",
                                   scale=1, min_width=100)
                role = gr.Dropdown(choices=[("none", ""), "domain", "instruct"],
                                   value=values[f"@ed:inputs:role:{i}"], label=f"inputs.{i}.role",
                                   visible=iv, scale=1, min_width=120)
            self.choice_kinds[len(self.components)] = "source"
            self.components += [path, weight, role]
            self.rows.append(row)
            self.roles.append(role)

    def to_text(self, state: dict) -> tuple[str, str | None]:
        count = int(state.get("@ed:inputs:count") or 1)
        items, empty = [], []
        for i in range(min(count, MAX_INPUTS)):
            path = (state.get(f"@ed:inputs:path:{i}") or "").strip()
            if not path:
                empty.append(i)
            item = {"path": path, "weight": _number(state.get(f"@ed:inputs:weight:{i}"), 1.0)}
            if state.get(f"@ed:inputs:role:{i}"):
                item["role"] = state[f"@ed:inputs:role:{i}"]
            items.append(item)
        problem = None
        if empty:
            problem = ("choose a run or folder for input " + ", ".join(str(i) for i in empty))
        field = FormField(self.field_id, self.field_id, self.field_id, "yaml", None)
        return Form.to_widget(field, items), problem

    def from_text(self, text: Any, state: dict) -> dict:
        try:
            items = load_yaml(text, "inputs") if isinstance(text, str) and text.strip() else []
        except YamlRefused:
            items = []
        items = [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []
        values: dict[str, Any] = {"@ed:inputs:count": min(len(items), MAX_INPUTS) if items else 2}
        for i in range(MAX_INPUTS):
            item = items[i] if i < len(items) else {}
            values[f"@ed:inputs:path:{i}"] = str(item.get("path") or "")
            weight = item.get("weight", 1.0)
            values[f"@ed:inputs:weight:{i}"] = float(weight) if isinstance(weight, (int, float)) else 1.0
            values[f"@ed:inputs:role:{i}"] = item.get("role") or ""
        return values

    def triggers(self, form: RecipeForm) -> list:
        return [self.components[0], form.components["method"]]

    @property
    def visibility_outputs(self) -> list:
        return self.rows + self.roles

    def visibility(self, state: dict) -> list:
        count = int(state.get("@ed:inputs:count") or 1)
        iv = state.get("method") == "instruction_vector"
        return ([gr.update(visible=i < count) for i in range(MAX_INPUTS)]
                + [gr.update(visible=iv) for _ in range(MAX_INPUTS)])


def merge_parameters() -> dict[str, list]:
    """method -> its `merge.methods.Parameter`s (instruction_vector: alpha), from the registry."""
    from merge.instruction_vector import ALPHA, METHOD
    from merge.methods import METHODS

    found = {name: list(m.parameters) for name, m in METHODS.items()}
    found[METHOD] = [ALPHA]
    return found


class MethodEditor(Editor):
    """An editor whose components all follow the chosen merge method."""

    def triggers(self, form: RecipeForm) -> list:
        return [form.components["method"]]

    @property
    def visibility_outputs(self) -> list:
        return list(self.components)


class MergeParametersEditor(MethodEditor):
    """`parameters`: one control per parameter of the chosen method (merge.methods)."""

    field_id = "parameters"

    def __init__(self):
        self.by_method = merge_parameters()
        self.params = {}
        for params in self.by_method.values():
            for p in params:
                self.params.setdefault(p.name, p)
        self.keys = [f"@ed:parameters:{name}" for name in self.params]
        self.components, self.choice_kinds = [], {}

    def render(self, form: RecipeForm, state: dict) -> None:
        values = self.from_text(state.get(self.field_id), state)
        active = {p.name for p in self.by_method.get(state.get("method"), [])}
        with gr.Row(equal_height=False):
            for name, p in self.params.items():
                label, key = f"parameters.{name}", f"@ed:parameters:{name}"
                info = f"{p.meaning} (default {p.default})"
                if p.choices:
                    component = gr.Dropdown(choices=list(p.choices), value=values[key], label=label,
                                            info=info, visible=name in active, min_width=160)
                else:
                    component = gr.Number(value=values[key], label=label, info=info,
                                          visible=name in active, min_width=160)
                self.components.append(component)

    def to_text(self, state: dict) -> tuple[str, str | None]:
        chosen = {}
        for p in self.by_method.get(state.get("method"), []):
            value = state.get(f"@ed:parameters:{p.name}")
            if value is None or value == "":
                continue
            if not p.choices:
                value = float(value)
            if value != p.default:
                chosen[p.name] = value
        field = FormField(self.field_id, self.field_id, self.field_id, "yaml", {})
        return Form.to_widget(field, chosen), None

    def from_text(self, text: Any, state: dict) -> dict:
        try:
            given = load_yaml(text, "parameters") if isinstance(text, str) and text.strip() else {}
        except YamlRefused:
            given = {}
        given = given if isinstance(given, dict) else {}
        return {f"@ed:parameters:{name}": given.get(name, p.default) for name, p in self.params.items()}

    def visibility(self, state: dict) -> list:
        active = {p.name for p in self.by_method.get(state.get("method"), [])}
        return [gr.update(visible=name in active) for name in self.params]


class SearchParameterEditor(MethodEditor):
    """`search.parameter`: a numeric parameter of the chosen method, or none (sweep weight rows)."""

    field_id = "search.parameter"

    def __init__(self, by_method: dict[str, list]):
        self.by_method = by_method
        self.keys = ["@ed:search.parameter"]
        self.components, self.choice_kinds = [], {}

    def options(self, method: str | None) -> list:
        numeric = [p.name for p in self.by_method.get(method, []) if not p.choices]
        return [("none: sweep search.weights rows", "")] + numeric

    def render(self, form: RecipeForm, state: dict) -> None:
        value = state.get(self.field_id) or ""
        self.components.append(gr.Dropdown(
            choices=self.options(state.get("method")), value=value, label="search.parameter",
            info="the method's parameter to sweep over search.values; none: sweep the input "
                 "weights, one row of search.weights per point", allow_custom_value=True))

    def to_text(self, state: dict) -> tuple[str, str | None]:
        return str(state.get("@ed:search.parameter") or ""), None

    def from_text(self, text: Any, state: dict) -> dict:
        return {"@ed:search.parameter": text or ""}

    def visibility(self, state: dict) -> list:
        return [gr.update(choices=self.options(state.get("method")))]


def place_merge_problems(problems: list[tuple[str, str]], state: dict) -> list[tuple[str, str]]:
    """Whole-recipe merge errors next to the control they are about (parameters, inputs)."""
    method = state.get("method") or ""
    placed = []
    for key, message in problems:
        text = message.removeprefix("Value error, ")
        if not key and (text.startswith(f"{method}: ") or "parameter" in text) \
                and not text.startswith("search"):
            key = "parameters"
        elif not key and ("role" in text or "inputs" in text):
            key = "inputs"
        placed.append((key, message))
    return placed
