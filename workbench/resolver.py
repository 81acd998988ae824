"""The one place where a string from a recipe, or from a file a recipe names, becomes a path.

Every recipe value that can name a file or folder goes through the `Resolver` in force: model
paths, data sources, merge inputs and bases, prompt-vector and MixDA inputs, importance files,
mergekit config files and every model reference inside them, and the base an adapter's
`adapter_config.json` names. The recipe schema checks each such value when a recipe is validated
(`workbench.recipes`), and the code that opens the file resolves it again through the same object
when the stage runs, so a value cannot mean one thing when checked and another when used.

Two policies:

- **open** (`Resolver()`, the CLI and Python): the user typed the recipe. Relative paths are read
  from the current folder, `~` is expanded, any folder may be read, and `model.trust_remote_code`
  and `model.allow_pickle` do what the recipe says.
- **confined** (`Resolver.confined(workspace)`, the app and the job workers it starts):
  requests come from a browser and are hostile until checked. A value is read relative to the
  workspace; after `..` and every symbolic link (chains and dangling links included) are followed,
  it must lie inside the workspace or one of the read-only roots declared at launch; `~` and NUL
  are refused; a model folder may not hold links that lead outside. `trust_remote_code` and
  pickled checkpoints need the app's launch flags (`--allow-remote-code`, `--allow-pickle`).

In both, a `run:` reference is a run id or a unique prefix of one (letters, digits, `-`, `_`, `.`,
not starting with a dot), never a path. What the workbench itself recorded in a run's `run.json`
(a run's output folders, the base it trained on) is the workspace's own record, not a recipe
string, and is read as recorded.

The resolver in force is the one installed for the process (`install`; the job worker installs
the confined one at start), or the one a `using` block sets for the current thread of work (the
app validates a browser's recipe inside one).
"""

from __future__ import annotations

import contextvars
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
REMOTE_CODE_FLAG = "--allow-remote-code"
PICKLE_FLAG = "--allow-pickle"
CONFINED_FLAG = "--workspace-only"


class PathRefused(ValueError):
    """A recipe value that names something the resolver in force does not allow."""


@dataclass(frozen=True)
class Resolver:
    """Turns recipe strings into paths under one policy (see the module docstring).

    `base`: where relative paths are read (None: the current folder). `roots`: the folders that may
    be read, symbolic links followed (None: any). The flags say whether recipes may turn on remote
    code and pickled checkpoints.
    """

    base: Path | None = None
    roots: tuple[Path, ...] | None = None
    allow_remote_code: bool = True
    allow_pickle: bool = True

    @classmethod
    def confined(cls, workspace: str | Path, read_roots: tuple[str | Path, ...] = (),
                 allow_remote_code: bool = False, allow_pickle: bool = False) -> "Resolver":
        """The app's policy: the workspace (and read-only `read_roots`) only."""
        root = Path(workspace).expanduser().resolve()
        extra = tuple(Path(r).expanduser().resolve() for r in read_roots)
        return cls(base=root, roots=(root, *extra), allow_remote_code=allow_remote_code,
                   allow_pickle=allow_pickle)

    @property
    def is_confined(self) -> bool:
        return self.roots is not None

    # -- paths ---------------------------------------------------------------------------------
    def path(self, value: str, what: str = "path") -> Path:
        """`value` as an absolute path with `..` and links resolved; PathRefused where not allowed."""
        if not isinstance(value, str) or not value.strip():
            raise PathRefused(f"{what}: empty path")
        if "\0" in value:
            raise PathRefused(f"{what}: {value!r} contains a NUL character")
        text = value.strip()
        if self.is_confined and text.startswith("~"):
            raise PathRefused(f"{what}: {value!r}: home-folder paths are outside the workspace; "
                              f"{self._where()}")
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = (self.base or Path.cwd()) / path
        resolved = path.resolve()
        if self.is_confined and not any(_within(resolved, root) for root in self.roots):
            raise PathRefused(f"{what}: {value!r} leads outside the workspace (to {resolved}); "
                              f"{self._where()}")
        return resolved

    def folder_contents(self, folder: Path, what: str = "folder") -> None:
        """Refuse a folder (model, adapter) that holds links leading outside the allowed roots."""
        if not self.is_confined or not Path(folder).is_dir():
            return
        for entry in Path(folder).iterdir():
            if entry.is_symlink():
                self.path(str(entry), f"{what}: {entry.name}")

    def _where(self) -> str:
        roots = ", ".join(str(r) for r in self.roots or ())
        return f"the app reads files only inside {roots}"

    # -- references ----------------------------------------------------------------------------
    def run_id(self, ref: str, what: str = "run") -> str:
        """The id (or prefix) of a `run:<id>` reference; PathRefused for anything path-like."""
        name = ref.removeprefix("run:") if isinstance(ref, str) else ""
        if not RUN_ID.fullmatch(name):
            raise PathRefused(f"{what}: {ref!r} is not a run reference: `run:` takes a run id or "
                              "a unique prefix of one, as `workbench runs` lists them")
        return name

    def check_model(self, value: str, what: str = "model") -> None:
        """A model or adapter reference as a recipe may give it: `default`, `config:<name>`,
        `stage:<name>`, `run:<id>`, a folder the policy allows, or a hub id (org/name) that names
        no local folder."""
        if value == "default" or value.startswith(("config:", "stage:")):
            return
        if value.startswith("run:"):
            self.run_id(value, what)
            return
        self.path(value, what)

    def check_data(self, value: str, what: str = "data") -> None:
        """A data source: `world:<split>`, `stage:<name>`, `run:<id>` or a file the policy allows."""
        if value.startswith(("world:", "stage:")):
            return
        if value.startswith("run:"):
            self.run_id(value, what)
            return
        self.path(value, what)

    # -- what a recipe may turn on ---------------------------------------------------------------
    def check_remote_code(self, wanted: bool, what: str = "model.trust_remote_code") -> None:
        if wanted and not self.allow_remote_code:
            raise PathRefused(f"{what}: remote code (Python files shipped with a model) is off in "
                              f"the app; start it with {REMOTE_CODE_FLAG} to let recipes turn it on")

    def check_pickle(self, wanted: bool, what: str = "model.allow_pickle") -> None:
        if wanted and not self.allow_pickle:
            raise PathRefused(f"{what}: pickled checkpoints can run code when loaded and are off "
                              f"in the app; start it with {PICKLE_FLAG} to let recipes allow them")

    def worker_flags(self) -> list[str]:
        """The `workbench run` / `resume` options that install this policy in a job worker."""
        if not self.is_confined:
            return []
        flags = [CONFINED_FLAG]
        for root in self.roots[1:]:
            flags += ["--read-root", str(root)]
        if self.allow_remote_code:
            flags.append(REMOTE_CODE_FLAG)
        if self.allow_pickle:
            flags.append(PICKLE_FLAG)
        return flags


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


# -- the resolver in force ---------------------------------------------------------------------

_installed = Resolver()
_scoped: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar("resolver", default=None)


def current() -> Resolver:
    """The resolver in force: the scoped one (`using`), else the process's (`install`)."""
    return _scoped.get() or _installed


def install(resolver: Resolver) -> None:
    """Make `resolver` the process's policy, every thread included (the app does this at launch)."""
    global _installed
    _installed = resolver


@contextmanager
def installed(resolver: Resolver) -> Iterator[Resolver]:
    """`install` for the code inside the block, then the previous policy again (a worker's
    command, which may run inside a longer-lived process such as a test)."""
    previous = _installed
    install(resolver)
    try:
        yield resolver
    finally:
        install(previous)


@contextmanager
def using(resolver: Resolver) -> Iterator[Resolver]:
    """Put `resolver` in force for the code inside the block (this thread of work only)."""
    token = _scoped.set(resolver)
    try:
        yield resolver
    finally:
        _scoped.reset(token)


@contextmanager
def workspace_record() -> Iterator[None]:
    """Read paths the workbench recorded itself (a run's outputs and base) as recorded."""
    with using(Resolver(allow_remote_code=current().allow_remote_code,
                        allow_pickle=current().allow_pickle)):
        yield



def add_policy_arguments(parser) -> None:
    """The options with which the app starts its workers under its own policy (`worker_flags`)."""
    group = parser.add_argument_group("policy of the app's workers")
    group.add_argument(CONFINED_FLAG, dest="workspace_only", action="store_true",
                       help="read files only inside the workspace (and --read-root folders), as "
                            "the app does; remote code and pickles then need the flags below")
    group.add_argument("--read-root", action="append", default=[], metavar="DIR",
                       help="with --workspace-only: another folder that may be read")
    group.add_argument(REMOTE_CODE_FLAG, action="store_true",
                       help="with --workspace-only: let recipes set model.trust_remote_code")
    group.add_argument(PICKLE_FLAG, action="store_true",
                       help="with --workspace-only: let recipes set model.allow_pickle")


def policy_from_arguments(args, workspace: str | Path) -> Resolver:
    """The resolver the options of `add_policy_arguments` ask for (open without --workspace-only)."""
    if not getattr(args, "workspace_only", False):
        return Resolver()
    return Resolver.confined(workspace, tuple(args.read_root), allow_remote_code=args.allow_remote_code,
                             allow_pickle=args.allow_pickle)
