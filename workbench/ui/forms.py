"""Recipe forms built from the pydantic schema, without Gradio: fields, values, YAML, errors.

`Form.of(TrainRecipe)` walks the recipe model: scalar fields become form fields (a `Literal` a
choice, `bool` a checkbox, `int` / `float` a number, `str` text, anything else a YAML value typed
in one line: `[10, 50]`, `all-linear`, `{path: run:x, weight: 1}`); a nested model becomes a
section, switched on and off when it may be null (`train.regularizer`, `eval`); a union tagged by
`method` (`adapter`) becomes a choice between variant sections. New schema fields, adapter methods
and recipe kinds therefore show up in the form without changes here.

A form's state is a flat dict {field id: widget value, "@on:<section>": bool, "@tag:<section>":
variant}. `Form.text(state, loaded)` turns it into the recipe YAML the app runs: the loaded file
verbatim while nothing changed (so a recipe loaded and saved back is byte-for-byte the same), else
the loaded recipe with only the changed values replaced; a fresh form gives only the values that
differ from the schema's defaults.
"""

from __future__ import annotations

import copy
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined, to_jsonable_python

from ..recipes import RecipeError, parse_recipe
from ..yamlio import YamlRefused, load_yaml

SOURCE = "recipe"  # the name errors carry: `recipe: train.lr: ...`


@dataclass
class FormField:
    id: str                 # unique in the form: `train.lr`, `adapter[road].group_size`
    key: str                # the recipe key path: `train.lr`, `adapter.group_size`
    label: str
    widget: str             # dropdown | multi | checkbox | int | float | text | yaml
    default: Any            # the schema default, as a JSON value
    info: str = ""
    choices: list | None = None
    optional: bool = False  # None is allowed


@dataclass
class Section:
    id: str                 # unique in the form (variants: `adapter[road]`)
    key: str                # the recipe key path; "" for the recipe's top level
    title: str
    model: type[BaseModel]
    fields: list[FormField] = field(default_factory=list)
    children: list["Section"] = field(default_factory=list)
    optional: bool = False  # may be null: the form shows an on/off switch
    default_on: bool = True
    variants: dict[str, "Section"] | None = None  # a tagged union: tag -> its section
    tag_key: str | None = None
    info: str = ""

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()
        for variant in (self.variants or {}).values():
            yield from variant.walk()


def _split_optional(annotation: Any) -> tuple[Any, bool]:
    """(annotation without None, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) == 1:
            return args[0], optional
        return Union[tuple(args)], optional
    return annotation, False


def _strip_annotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _union_models(annotation: Any) -> list[type[BaseModel]] | None:
    """The models of a union of models (each possibly Annotated with a Tag), else None."""
    annotation = _strip_annotated(annotation)
    if typing.get_origin(annotation) not in (Union, types.UnionType):
        return None
    models = [_strip_annotated(a) for a in typing.get_args(annotation)]
    if all(isinstance(m, type) and issubclass(m, BaseModel) for m in models):
        return models
    return None


def _default(info) -> Any:
    value = info.get_default(call_default_factory=True)
    return None if value is PydanticUndefined else to_jsonable_python(value)


def _tag_of(model: type[BaseModel]) -> tuple[str, Any] | None:
    for key in ("method", "kind"):
        if key in model.model_fields:
            return key, model.model_fields[key].default
    return None


def _first_line(text: str | None) -> str:
    return (text or "").strip().split("\n\n")[0].replace("\n", " ")


class Form:
    """The form of one recipe model (see the module docstring)."""

    def __init__(self, root: Section, kind: str):
        self.root, self.kind = root, kind
        self.sections = list(root.walk())
        self.fields = [f for s in self.sections for f in s.fields]
        self.by_id = {f.id: f for f in self.fields}

    @classmethod
    def of(cls, model: type[BaseModel]) -> "Form":
        kind = model.model_fields["kind"].default
        return cls(cls._section(model, "", "recipe", skip=("kind",)), kind)

    @classmethod
    def _section(cls, model: type[BaseModel], key: str, title: str, id_prefix: str | None = None,
                 skip: tuple = ()) -> Section:
        id_prefix = key if id_prefix is None else id_prefix
        section = Section(id=id_prefix, key=key, title=title, model=model,
                          info=_first_line(model.__doc__))
        for name, info in model.model_fields.items():
            if name in skip:
                continue
            sub_key = f"{key}.{name}" if key else name
            sub_id = f"{id_prefix}.{name}" if id_prefix else name
            annotation, optional = _split_optional(info.annotation)
            annotation = _strip_annotated(annotation)
            default = _default(info)
            union = _union_models(info.annotation if not optional else annotation)
            if union and all(_tag_of(m) for m in union):
                tag_key = _tag_of(union[0])[0]
                child = Section(id=sub_id, key=sub_key, title=name, model=union[0], optional=optional,
                                default_on=default is not None, tag_key=tag_key,
                                info=info.description or "", variants={})
                for m in union:
                    tag = _tag_of(m)[1]
                    child.variants[tag] = cls._section(m, sub_key, f"{name}: {tag}",
                                                       id_prefix=f"{sub_id}[{tag}]", skip=(tag_key,))
                section.children.append(child)
                continue
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                child = cls._section(annotation, sub_key, name, id_prefix=sub_id)
                child.optional, child.default_on = optional, default is not None
                child.info = info.description or child.info
                section.children.append(child)
                continue
            section.fields.append(cls._field(sub_id, sub_key, name, annotation, optional, default,
                                             info.description or ""))
        return section

    @staticmethod
    def _field(fid: str, key: str, name: str, annotation: Any, optional: bool, default: Any,
               description: str) -> FormField:
        origin = typing.get_origin(annotation)
        if origin is list and not optional:
            (item,) = typing.get_args(annotation) or (Any,)
            if typing.get_origin(item) is Literal:  # a set of choices: `export: [dequantized]`
                return FormField(fid, key, name, "multi", default, description,
                                 choices=list(typing.get_args(item)))
        if origin is Literal and not optional:
            return FormField(fid, key, name, "dropdown", default, description,
                             choices=list(typing.get_args(annotation)))
        if annotation is bool and not optional:
            return FormField(fid, key, name, "checkbox", default, description)
        if annotation in (int, float) and not optional:
            return FormField(fid, key, name, annotation.__name__, default, description)
        if annotation is str:
            return FormField(fid, key, name, "text", default, description, optional=optional)
        return FormField(fid, key, name, "yaml", default, description, optional=optional)

    # -- values ----------------------------------------------------------------------------
    @staticmethod
    def to_widget(f: FormField, value: Any) -> Any:
        """A recipe value as the field's widget shows it."""
        if f.widget == "yaml":
            if value is None:
                return ""
            if isinstance(value, str):
                return value
            text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6)
            return text.removesuffix("\n...\n").strip()  # a scalar ends its document with "..."
        if f.widget == "text":
            return "" if value is None else str(value)
        return value

    @staticmethod
    def from_widget(f: FormField, raw: Any) -> Any:
        """A widget value as the recipe value; ValueError for text that is not YAML."""
        if f.widget == "text":
            return None if f.optional and (raw is None or not str(raw).strip()) else (raw or "")
        if f.widget == "yaml":
            text = "" if raw is None else str(raw).strip()
            if not text:
                if f.optional:
                    return None
                return [] if isinstance(f.default, list) else {} if isinstance(f.default, dict) else None
            try:
                return load_yaml(text, "value")
            except YamlRefused as err:
                problem = str(err).partition("not valid YAML: ")[2] or str(err)
                raise ValueError(f"not a valid YAML value ({problem.splitlines()[0]}): {text!r}") from None
        if f.widget == "int" and isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if f.widget == "multi":  # in the order of the choices, as the schema lists them
            chosen = list(raw or [])
            return [c for c in f.choices if c in chosen] + [c for c in chosen if c not in f.choices]
        return raw

    def state_of(self, data: dict | None) -> dict:
        """The form state showing a recipe dict (a full dump; missing values take defaults)."""
        state: dict[str, Any] = {}
        self._fill(self.root, data or {}, state)
        return state

    def defaults(self) -> dict:
        return self.state_of({})

    def _fill(self, section: Section, data: Any, state: dict) -> None:
        for f in section.fields:
            value = _get(data, f.key.rsplit(".", 1)[-1], f.default) if isinstance(data, dict) else f.default
            state[f.id] = self.to_widget(f, value)
        for child in section.children:
            name = child.key.rsplit(".", 1)[-1]
            present = isinstance(data, dict) and name in data
            value = data.get(name) if present else None
            if child.optional:
                state[f"@on:{child.id}"] = (value is not None) if present else child.default_on
            if child.variants is not None:
                tag = value.get(child.tag_key) if isinstance(value, dict) else None
                if tag not in child.variants:
                    tag = next(iter(child.variants))
                state[f"@tag:{child.id}"] = tag
                for t, variant in child.variants.items():
                    self._fill(variant, value if t == tag and isinstance(value, dict) else {}, state)
            else:
                self._fill(child, value if isinstance(value, dict) else {}, state)

    def recipe_of(self, state: dict) -> tuple[dict, dict[str, str]]:
        """The full recipe dict of a form state, and the fields whose text is not valid YAML."""
        errors: dict[str, str] = {}
        data = self._collect(self.root, state, errors)
        return {"kind": self.kind, **data}, errors

    def _collect(self, section: Section, state: dict, errors: dict) -> dict:
        out: dict[str, Any] = {}
        for f in section.fields:
            try:
                out[f.key.rsplit(".", 1)[-1]] = self.from_widget(f, state.get(f.id))
            except ValueError as err:
                errors[f.id] = str(err)
        for child in section.children:
            name = child.key.rsplit(".", 1)[-1]
            if child.optional and not state.get(f"@on:{child.id}", child.default_on):
                out[name] = None
                continue
            if child.variants is not None:
                tag = state.get(f"@tag:{child.id}") or next(iter(child.variants))
                out[name] = {child.tag_key: tag, **self._collect(child.variants[tag], state, errors)}
            else:
                out[name] = self._collect(child, state, errors)
        return out

    # -- YAML ------------------------------------------------------------------------------
    def text(self, state: dict, loaded: dict | None = None) -> tuple[str, dict[str, str]]:
        """The recipe YAML of a form state (see the module docstring) and the fields' YAML errors.

        `loaded`: {"text": the file as read, "data": its dict, "state": the form state it showed}.
        """
        new, errors = self.recipe_of(state)
        if loaded and loaded.get("text") is not None and state == loaded.get("state"):
            return loaded["text"], errors
        if loaded:
            base = copy.deepcopy(loaded["data"])
            old, _ = self.recipe_of(loaded["state"])
        else:
            base = {"kind": self.kind}
            old, _ = self.recipe_of(self.defaults())
        _apply_changes(base, new, old, self._defaults_of)
        return yaml.safe_dump(base, sort_keys=False, allow_unicode=True), errors

    def _defaults_of(self, key: str, tag: Any = None) -> dict:
        """The schema defaults of the section at `key` (of variant `tag`), as a recipe dict."""
        for section in self.sections:  # a union comes before its variants, which share its key
            if section.key != key:
                continue
            if section.variants is None:
                return self._collect_defaults(section)
            if tag in section.variants:
                return {section.tag_key: tag, **self._collect_defaults(section.variants[tag])}
            return {}
        return {}

    def _collect_defaults(self, section: Section) -> dict:
        state: dict = {}
        self._fill(section, {}, state)
        return self._collect(section, state, {})

    # -- validation ------------------------------------------------------------------------
    def validate(self, text: str) -> tuple[Any, list[tuple[str, str]]]:
        """(the validated recipe or None, [(recipe key, message)]) for a YAML recipe text."""
        try:
            data = load_yaml(text, SOURCE)
        except YamlRefused as err:
            return None, [("", str(err).removeprefix(f"{SOURCE}: "))]
        try:
            return parse_recipe(data, SOURCE), []
        except RecipeError as err:
            return None, split_errors(str(err))

    def place_errors(self, problems: list[tuple[str, str]], state: dict) -> dict[str, str]:
        """Errors keyed by where the form shows them: a field id, `@section:<key>` or `@form`."""
        placed: dict[str, list[str]] = {}
        active = self.active_fields(state)
        section_keys = {s.key for s in self.sections if s.key}
        for key, message in problems:
            target = next((f.id for f in active if f.key == key), None)
            if target is None and key:  # inside a field's value: `inputs.1.path` → `inputs`
                target = next((f.id for f in sorted(active, key=lambda f: -len(f.key))
                               if key.startswith(f"{f.key}.")), None)
            if target is None:  # a model-level error often names the field in its message
                target = next((f.id for f in sorted(active, key=lambda f: -len(f.key))
                               if f.key and f.key in message and f.key.startswith(key)), None)
            if target is None:
                prefix = key
                while prefix and prefix not in section_keys:
                    prefix = prefix.rsplit(".", 1)[0] if "." in prefix else ""
                target = f"@section:{prefix}" if prefix else "@form"
            placed.setdefault(target, []).append(f"{key}: {message}" if target.startswith("@") and key
                                                 else message)
        return {k: "\n".join(v) for k, v in placed.items()}

    def active_fields(self, state: dict) -> list[FormField]:
        """The fields that take part in the recipe (their section on, their variant chosen)."""
        found: list[FormField] = []

        def visit(section: Section) -> None:
            found.extend(section.fields)
            for child in section.children:
                if child.optional and not state.get(f"@on:{child.id}", child.default_on):
                    continue
                if child.variants is not None:
                    visit(child.variants[state.get(f"@tag:{child.id}") or next(iter(child.variants))])
                else:
                    visit(child)

        visit(self.root)
        return found


def split_errors(message: str) -> list[tuple[str, str]]:
    """`recipe: key.path: message` lines (format_validation_error) as (key path, message)."""
    problems = []
    for line in message.splitlines():
        if not line.strip():
            continue
        rest = line.split(": ", 1)[1] if line.startswith(f"{SOURCE}: ") else line
        key, _, text = rest.partition(": ")
        if not text or " " in key or key == "(top level)":
            problems.append(("", rest if key != "(top level)" else text))
        else:
            problems.append((key, text))
    return problems


def _get(data: dict, name: str, default: Any) -> Any:
    return data[name] if name in data else default


def _apply_changes(base: dict, new: dict, old: dict, defaults_of, key: str = "") -> None:
    """Write into `base` the values where `new` differs from `old` (both full recipe dicts);
    a key `old` has and `new` no longer has (a merge parameter of another method) is removed."""
    for name in [n for n in old if n not in new and n in base]:
        del base[name]
    for name, value in new.items():
        sub = f"{key}.{name}" if key else name
        before = old.get(name, _MISSING)
        if value == before:
            continue
        if isinstance(value, dict) and isinstance(before, dict) and \
                _same_tag(value, before) and isinstance(base.get(name), dict):
            _apply_changes(base[name], value, before, defaults_of, sub)
        elif isinstance(value, dict):
            tag = value.get("method", value.get("kind"))
            base[name] = _compact(value, defaults_of(sub, tag))
        else:
            base[name] = value


def _same_tag(a: dict, b: dict) -> bool:
    return all(a.get(t) == b.get(t) for t in ("method", "kind"))


def _compact(value: dict, defaults: dict) -> dict:
    """Only what differs from the defaults (tags always kept)."""
    out = {}
    for name, v in value.items():
        d = defaults.get(name, _MISSING)
        if name in ("method", "kind"):
            out[name] = v
        elif isinstance(v, dict) and isinstance(d, dict) and _same_tag(v, d):
            inner = _compact(v, d)
            if inner:
                out[name] = inner
        elif v != d:
            out[name] = v
    return out


_MISSING = object()
