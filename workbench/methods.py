"""The registry of adapter methods: how the foundation reaches a method it does not know.

Each method (`adapters/lora.py`, `adapters/road.py`, ..., or one a user defines) is an object with
the `AdapterMethod` interface: its name (the recipe's `adapter.method`), its recipe section
(`spec`, a pydantic model with a `method` literal), how it attaches to a model, which parameters
train, how it saves and loads itself, how its saved folder is recognised (`detect`), and how that
folder reads as a task vector (`task_vector`, in the method's own space) and, where it lives in
weight space, as dense deltas per base tensor (`delta_reader`).

Everything that used to ask "what kind of adapter is this folder?" or "which method is this?"
asks here: loading an adapter onto its base, the merge's input kinds and readers, the recipe's
`adapter` union (`workbench.recipes`, rebuilt when a method registers), the app's labels.

The built-in methods are found through the package's entry points (group
`workbench.adapter_methods` in pyproject.toml), so this module names none of them; `register`
adds one at run time (a test's toy method, a user's own).
"""

from __future__ import annotations

import weakref
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch

ENTRY_POINT_GROUP = "workbench.adapter_methods"


@runtime_checkable
class AdapterMethod(Protocol):
    """What every adapter method provides (DESIGN.md section 3)."""

    name: str             # `adapter.method` in a recipe
    spec: type            # its recipe section (pydantic), with `method: Literal[name]`
    label: str            # how a user reads its saved folder: "LoRA adapter", "full model", ...
    config_files: tuple[str, ...]  # files whose presence marks its saved folder

    def detect(self, folder: Path) -> bool:
        """Whether `folder` holds an adapter (or model) this method saved."""

    def attach(self, model: torch.nn.Module, spec, task: str = "causal-lm",
               gradient_checkpointing: bool = False, locate=None) -> torch.nn.Module:
        """The model with the adapter attached and only the adapter trainable. `locate(ref)` turns
        a reference to an earlier run (`run:<id>`, a folder) into that run's adapter folder."""

    def trainable_parameters(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The parameters the optimizer updates, by name."""

    def save(self, model: torch.nn.Module, tokenizer, folder: Path, base_ref: str) -> None:
        """Write the trained adapter (or model) to `folder` in its standard format."""

    def load(self, model: torch.nn.Module, folder: Path, trainable: bool = False) -> torch.nn.Module:
        """Attach a saved folder of this method to its loaded base model."""

    def task_vector(self, folder: Path, base_folder: Path | None = None):
        """The saved folder as a task vector in the method's own space."""

    def delta_reader(self, folder: Path, layout: dict, stack) -> Callable | None:
        """name → the dense weight-space delta of that base tensor (None where untouched), or None
        when the method's vector lives outside weight space (then it merges only with its kind)."""

    # Optional parts (`optional(method, name)` gives their defaults):
    # output: str                 the run's output folder name, "adapter" (default) or "model"
    # objective(spec, masker=None) a training objective replacing next-token loss (default none)
    # prepare(model, spec, validation) -> dict   work before training, recorded in the summary


OPTIONAL_DEFAULTS: dict[str, Any] = {"output": "adapter", "objective": None, "prepare": None}


def optional(method: AdapterMethod, name: str) -> Any:
    """An optional part of a method's interface (`OPTIONAL_DEFAULTS`), or its default."""
    return getattr(method, name, OPTIONAL_DEFAULTS[name])


class ModelState:
    """What a method remembers about a model it attached itself to (a prompt's P_init, MixDA's
    stage and sources), kept here rather than set as attributes on the `nn.Module`: one store per
    method, keyed weakly by the model object, so the state goes when the model goes."""

    def __init__(self, what: str):
        self.what = what
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def set(self, model: torch.nn.Module, state: Any) -> None:
        self._states[model] = state

    def get(self, model: torch.nn.Module) -> Any:
        """The state recorded for `model`; an error naming what is missing when there is none."""
        try:
            return self._states[model]
        except KeyError:
            raise UnknownMethod(f"this model has no {self.what}: attach or load the adapter "
                                "through its method first") from None

    def has(self, model: torch.nn.Module) -> bool:
        return model in self._states


_registry: dict[str, AdapterMethod] = {}
_listeners: list[Callable[[AdapterMethod], None]] = []
_builtins_loaded = False


class UnknownMethod(ValueError):
    """A method name or a folder that no registered method knows."""


def _load_builtins() -> None:
    """Register the methods the installed packages declare as entry points (once)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        if point.name not in _registry:
            register(point.load())


def register(method: Any) -> Any:
    """Add a method (replacing one of the same name); the recipe schema follows."""
    missing = [attr for attr in ("name", "spec", "label", "config_files", "detect", "attach",
                                 "trainable_parameters", "save", "load", "task_vector", "delta_reader")
               if not hasattr(method, attr)]
    if missing:
        raise TypeError(f"{type(method).__name__} is not an adapter method: it lacks {', '.join(missing)}")
    _registry[method.name] = method
    for listener in list(_listeners):
        listener(method)
    return method


def unregister(name: str) -> None:
    """Remove a method added with `register` (a test's toy method, when the test ends)."""
    _registry.pop(name, None)
    for listener in list(_listeners):
        listener(None)


def on_register(listener: Callable[[AdapterMethod | None], None]) -> None:
    """Call `listener` whenever the set of methods changes (the recipe schema rebuilds itself)."""
    _listeners.append(listener)


def methods() -> dict[str, AdapterMethod]:
    """Every registered method by name, built-ins first."""
    _load_builtins()
    return dict(_registry)


def get_method(name: str) -> AdapterMethod:
    """The method registered under `name`."""
    found = methods().get(name)
    if found is None:
        raise UnknownMethod(f"unknown adapter method '{name}' (known: {', '.join(methods())})")
    return found


def method_of_folder(folder: Path) -> AdapterMethod | None:
    """The method whose saved folder this is, or None (checked from its config files only)."""
    folder = Path(folder)
    for method in methods().values():
        if method.detect(folder):
            return method
    return None


def described(name: str) -> str:
    """A method's saved folder as a sentence names it: "a LoRA adapter", "a full model"."""
    method = methods().get(name)
    label = method.label if method is not None else f"{name} folder"
    return f"{'an' if label[:1].lower() in 'aeiou' else 'a'} {label}"


def adapter_config_files() -> tuple[str, ...]:
    """Config files that mark an adapter folder (of a method whose output is not a model)."""
    return tuple(dict.fromkeys(f for m in methods().values() for f in m.config_files
                               if f != "config.json"))


def is_adapter_folder(folder: Path) -> bool:
    """Whether `folder` holds an adapter (anything but a full model folder)."""
    return any((Path(folder) / name).is_file() for name in adapter_config_files())
