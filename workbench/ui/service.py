"""What the app does, as plain Python over one workspace: the Gradio layer and its API call these.

Every path a caller gives, and every recipe value that names a file (inside files a recipe names
too), goes through one resolver (`workbench.resolver`, confined to the workspace, with remote code
and pickles only as the app's launch flags allow) while the recipe is validated, before it is
queued; the job workers run under the same policy. Training,
merging, quantizing, evaluating and exporting run as jobs in worker processes (`workbench.jobs`);
the playground generates in its own worker process (`playground`). The web process itself never
imports torch for these.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from .. import exporting
from ..io import JsonlError, write_atomic
from ..jobs import JobError, JobQueue
from ..recipes import KINDS, RecipeError, parse_recipe, recipe_to_yaml
from ..resolver import PathRefused, Resolver, using
from ..workspace import RunNotFound, Workspace, headline
from ..yamlio import MAX_YAML_BYTES, YamlRefused, load_yaml
from ..world import SPLITS, TOPIC_SPLITS
from . import compare, paths
from .forms import SOURCE, split_errors

RECIPE_SUFFIXES = (".yaml", ".yml")
DATA_SUFFIXES = (".txt", ".jsonl")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"  # present in a source checkout


class Refused(ValueError):
    """A request the app will not carry out; the message says why (shown to the user as is)."""


class Service:
    """The app's actions over one workspace and its job queue."""

    def __init__(self, ws: Workspace, queue: JobQueue | None = None, playground=None,
                 resolver: Resolver | None = None):
        from .playground import PlaygroundWorker

        self.ws = ws
        self.root = ws.root
        self.resolver = resolver or (queue.resolver if queue is not None else Resolver.confined(ws.root))
        if not self.resolver.is_confined:
            raise ValueError("the app's resolver must be confined to the workspace")
        self.queue = queue or JobQueue(ws, resolver=self.resolver)
        self.playground = playground or PlaygroundWorker(ws.root, worker_flags=self.resolver.worker_flags())

    def get_run(self, ref: str):
        """A run of this workspace by id (or unique prefix, or `run:<id>`); Refused for anything
        that is not a plain run id, so that no reference leads out of runs/."""
        try:
            name = self.resolver.run_id(ref.strip() if isinstance(ref, str) else ref, "run")
        except PathRefused:
            raise Refused(f"no run {ref!r}: give a run id as the Runs tab lists it") from None
        try:
            return self.ws.get(name)
        except RunNotFound as err:
            raise Refused(str(err)) from None

    # -- recipes ---------------------------------------------------------------------------
    def check(self, text: str) -> dict:
        """Validate a YAML recipe: {ok, kind, name, errors: [{key, message}], message, recipe}.

        `recipe` is the full recipe with every value spelled out (relative paths written as the
        workspace paths they mean: workers run in the workspace folder).
        """
        def refused(problems: list[tuple[str, str]]) -> dict:
            return {"ok": False, "kind": None, "name": None, "recipe": None,
                    "errors": [{"key": k, "message": m} for k, m in problems],
                    "message": "\n".join(f"{k}: {m}" if k else m for k, m in problems)}

        if not isinstance(text, str) or not text.strip():
            return refused([("", "empty recipe")])
        try:
            data = load_yaml(text, SOURCE)
        except YamlRefused as err:
            return refused([("", str(err).removeprefix(f"{SOURCE}: "))])
        try:
            with using(self.resolver):
                recipe = parse_recipe(data, SOURCE)
        except RecipeError as err:
            return refused(split_errors(str(err)))
        return {"ok": True, "kind": recipe.kind, "name": recipe.name, "errors": [],
                "message": f"valid {recipe.kind} recipe '{recipe.name}'",
                "recipe": recipe_to_yaml(recipe)}

    def submit(self, text: str, source: str = "app") -> dict:
        """Queue a YAML recipe as a job; Refused (with every problem) when it does not validate."""
        checked = self.check(text)
        if not checked["ok"]:
            raise Refused(checked["message"])
        with using(self.resolver):
            return self.queue.submit(text, source=source)

    def read_recipe(self, path: str) -> str:
        """The text of a recipe file in the workspace."""
        file = self.resolver.path(path, "recipe file")
        if file.suffix not in RECIPE_SUFFIXES:
            raise Refused(f"recipe file: {path!r} is not a .yaml / .yml file")
        if not file.is_file():
            raise Refused(f"recipe file: {path!r} not found in the workspace {self.root}")
        return file.read_text(encoding="utf-8")

    def save_recipe(self, path: str, text: str) -> str:
        """Write a recipe file in the workspace (atomically), exactly as given; the run folders and
        the job queue are not writable. Returns the path relative to the workspace."""
        if not isinstance(text, str) or len(text.encode("utf-8")) > MAX_YAML_BYTES:
            raise Refused(f"save to: a recipe is at most {MAX_YAML_BYTES:,} bytes")
        file = self.resolver.path(path, "save to")
        if file.suffix not in RECIPE_SUFFIXES:
            raise Refused(f"save to: {path!r} must end in .yaml or .yml")
        relative = paths.relative(self.root, file)
        if relative.split("/")[0] in ("runs", "jobs") or any(p.startswith(".") for p in relative.split("/")):
            raise Refused(f"save to: {relative!r}: runs/, jobs/ and hidden folders are kept by the "
                          "workbench; save recipes elsewhere (for example recipes/)")
        if file.is_dir():
            raise Refused(f"save to: {relative!r} is a folder")
        write_atomic(file, text)
        return relative

    def templates(self) -> list[str]:
        """Starting points for the recipe editor: each kind's defaults, then the examples."""
        names = [f"{kind} (defaults)" for kind in KINDS]
        if EXAMPLES.is_dir():
            names += [f"example: {file.name}" for file in sorted(EXAMPLES.glob("*.yaml"))]
        return names

    def template(self, name: str) -> str:
        """The text of a template: an example file, or a kind with every default spelled out (the
        values a kind requires, such as merge inputs, left empty to fill in)."""
        if name.startswith("example: "):
            file = EXAMPLES / Path(name.removeprefix("example: ")).name
            if file.suffix == ".yaml" and file.is_file():
                return file.read_text(encoding="utf-8")
            raise Refused(f"no example {name!r}")
        kind = name.removesuffix(" (defaults)")
        if kind not in KINDS:
            raise Refused(f"no template {name!r}")
        try:
            return recipe_to_yaml(parse_recipe({"kind": kind}))
        except RecipeError as err:
            required = [key for key, message in split_errors(str(err)) if "Field required" in message]
            skeleton = yaml.safe_dump({"kind": kind, **{key: None for key in required}}, sort_keys=False)
            return f"# {kind}: fill in {', '.join(required) or 'the values below'}\n{skeleton}"

    def command_for(self, saved_path: str) -> str:
        """The CLI command that runs a recipe saved at `saved_path` the way the app runs it."""
        root = shlex.quote(str(self.root))
        return f"cd {root} && workbench run {shlex.quote(saved_path)} --workspace {root}"

    # -- choices ---------------------------------------------------------------------------
    def model_choices(self) -> list[tuple[str, str]]:
        """(label, value): the embedded default, models produced by runs, folders in the workspace."""
        choices = [("default (the embedded base)", "default")]
        for run in reversed(self.ws.runs()):
            info = _info(run)
            if info.get("status") == "done" and "model" in (info.get("outputs") or {}):
                choices.append((f"run:{run.id} ({info.get('kind')} {info.get('name')})", f"run:{run.id}"))
        choices += [(folder, folder) for folder in paths.model_folders(self.root)]
        return choices

    def source_choices(self) -> list[tuple[str, str]]:
        """(label, value): what a merge or the playground takes: finished runs with a model or an
        adapter, then model and adapter folders in the workspace (exports included)."""
        choices = []
        for run in reversed(self.ws.runs()):
            info = _info(run)
            outputs = info.get("outputs") or {}
            if info.get("status") != "done" or not ({"model", "adapter"} & set(outputs)):
                continue
            what = "model" if "model" in outputs else \
                f"{exporting.adapter_kind(run.path(outputs['adapter'])) or ''} adapter".strip()
            choices.append((f"run:{run.id} ({info.get('kind')} {info.get('name')}: {what})",
                            f"run:{run.id}"))
        choices += [(f"{folder} (model folder)", folder) for folder in paths.model_folders(self.root)]
        choices += [(f"{folder} (adapter folder)", folder) for folder in paths.adapter_folders(self.root)]
        return choices

    def data_choices(self) -> list[tuple[str, str]]:
        """(label, value): the embedded world's splits and the text / JSONL files in the workspace."""
        choices = [(f"world:{s}", f"world:{s}") for s in (*SPLITS, *TOPIC_SPLITS)]
        return choices + [(f, f) for f in paths.data_files(self.root)]

    def recipe_choices(self) -> list[str]:
        return paths.recipe_files(self.root)

    def add_data(self, uploaded: str, name: str | None = None) -> str:
        """Copy an uploaded .txt / .jsonl file into <workspace>/data/ (never over an existing one).
        Uploads land in <workspace>/.gradio/uploads: a path elsewhere is refused."""
        source = self.resolver.path(uploaded, "upload")
        name = Path(name or source.name).name
        if Path(name).suffix not in DATA_SUFFIXES:
            raise Refused(f"data file: {name!r}: only .txt (one document per line) and .jsonl")
        target = self.resolver.path(f"data/{name}", "data file")
        if target.exists():
            raise Refused(f"data file: data/{name} already exists; runs that used it keep their "
                          "meaning only if it does not change. Rename the file")
        write_atomic(target, source.read_bytes())
        return paths.relative(self.root, target)

    # -- jobs ------------------------------------------------------------------------------
    def jobs(self) -> list[dict]:
        """Jobs, newest first."""
        return list(reversed(self.queue.jobs()))

    def job(self, job_id: str, log_lines: int = 40) -> dict:
        try:
            return self.queue.view(job_id, log_lines=log_lines)
        except (JobError, JsonlError) as err:  # JsonlError: a damaged metrics.jsonl, named
            raise Refused(str(err)) from None

    def stop(self, job_id: str) -> dict:
        return self._job_action(self.queue.stop, job_id)

    def cancel(self, job_id: str) -> dict:
        return self._job_action(self.queue.cancel, job_id)

    def resume(self, run_id: str) -> dict:
        try:
            return self.queue.resume(self.get_run(run_id).id)
        except (JobError, RunNotFound) as err:
            raise Refused(str(err)) from None

    def _job_action(self, action, job_id: str) -> dict:
        try:
            action(job_id)
        except JobError as err:
            raise Refused(str(err)) from None
        self.queue.tick()
        return self.queue.view(job_id)

    # -- evaluate and compare ----------------------------------------------------------------
    def comparable_runs(self) -> list[tuple[str, str]]:
        return compare.comparable_runs(self.ws)

    def compare(self, run_ids: list[str]) -> dict:
        """{"rows": gain-vs-forgetting rows of the runs, "searches": their merge searches}."""
        found = []
        for ref in run_ids or []:
            try:
                found.append(self.get_run(ref).id)
            except Refused:
                continue  # a run deleted meanwhile, or not a run id: nothing to show
        run_ids = found
        rows = compare.compare_rows(self.ws, run_ids)
        searches = [found for found in (compare.search_of(self.ws, r) for r in run_ids) if found]
        return {"rows": rows, "searches": searches}

    def evaluate(self, run_id: str, world_size: str = "default", max_tokens: int = 16384,
                 max_questions: int = 100) -> dict:
        """Queue an eval job for a finished run's model or adapter (against its base where the run
        records one); its numbers then show in the comparison of that run."""
        text = self.evaluation_recipe(run_id, world_size, max_tokens, max_questions)
        return self.submit(text, source=f"evaluate {yaml.safe_load(text)['model']['path']}")

    def evaluation_recipe(self, run_id: str, world_size: str = "default", max_tokens: int = 16384,
                          max_questions: int = 100) -> str:
        """The eval recipe `evaluate` queues: the run's adapter against its base (PEFT's adapter
        switched off), or its model against the base the run records."""
        run = self.get_run(run_id)
        info = _info(run)
        outputs = info.get("outputs") or {}
        if info.get("status") != "done" or not ({"model", "adapter"} & set(outputs)):
            raise Refused(f"run {run.id} has no finished model or adapter to evaluate")
        recipe: dict = {"kind": "eval", "name": f"eval-{info.get('name')}"[:60],
                        "model": {"path": f"run:{run.id}"}, "world": {"size": world_size},
                        "eval": {"max_tokens": int(max_tokens), "max_questions": int(max_questions)}}
        if "model" in outputs:
            base = outputs.get("base") or (info.get("summary") or {}).get("base") or \
                (info.get("summary") or {}).get("model")
            if base and base != f"run:{run.id}":
                recipe["base"] = {"path": self._as_ref(base)}
        return yaml.safe_dump(recipe, sort_keys=False)

    def _as_ref(self, path: str) -> str:
        """A model path recorded by a run, as `run:<id>` when it is a run's folder (as written,
        before symbolic links are followed), else as it is."""
        prefix = f"{self.ws.runs_dir}/"
        if path.startswith(prefix):
            return f"run:{path[len(prefix):].split('/')[0]}"
        return path

    # -- playground ------------------------------------------------------------------------
    def playground_choices(self) -> list[tuple[str, str]]:
        return [("default (the embedded base)", "default")] + self.source_choices()

    def generate(self, prompt: str, models: list[str], max_new_tokens: int = 32,
                 mixed: bool = False, separate: bool = True) -> dict:
        """Answers of each model (and, with `mixed`, of one mixed-adapter batch), side by side."""
        from .playground import PlaygroundError

        refs = []
        for ref in models or []:
            if not isinstance(ref, str) or not ref.strip():
                continue
            ref = ref.strip()
            if ref == "default" or ref.startswith("run:"):
                if ref.startswith("run:"):
                    ref = f"run:{self.get_run(ref).id}"
                refs.append(ref)
            else:
                folder = self.resolver.path(ref, "model")
                self.resolver.folder_contents(folder, "model")
                refs.append(str(folder))
        request = {"prompt": prompt, "models": refs, "max_new_tokens": max_new_tokens,
                   "mixed": bool(mixed), "separate": bool(separate) or not mixed}
        try:
            reply = self.playground.request(request)
        except PlaygroundError as err:
            raise Refused(str(err)) from None
        if not reply.get("ok"):
            raise Refused(reply.get("error") or "the playground could not answer")
        return {"separate": reply.get("separate"), "mixed": reply.get("mixed"), "models": refs}

    # -- exports ---------------------------------------------------------------------------
    def exportable_runs(self) -> list[tuple[str, str]]:
        """(label, run id) of finished runs with something to export, newest first."""
        found = []
        for run in reversed(self.ws.runs()):
            info = _info(run)
            if info.get("status") != "done":
                continue
            try:
                kinds = exporting.options(run)
            except (exporting.ExportError, OSError, json.JSONDecodeError):
                continue
            if kinds:
                found.append((f"{run.id} ({info.get('kind')} {info.get('name')}: "
                              f"{', '.join(kinds)})", run.id))
        return found

    def export_options(self, run_id: str) -> list[str]:
        try:
            return exporting.options(self.get_run(run_id))
        except exporting.ExportError as err:
            raise Refused(str(err)) from None

    def export(self, run_id: str, kind: str, name: str, max_shard_mb: int = 2048) -> dict:
        """Queue an export of a finished run into exports/<name> (refused if that exists)."""
        run = self.get_run(run_id)
        try:
            exporting.plan(self.ws, run.id, kind)
            exporting.target_of(self.ws, name)
            if not isinstance(max_shard_mb, (int, float)) or int(max_shard_mb) < 1:
                raise exporting.ExportError(f"max_shard_mb must be at least 1 (got {max_shard_mb!r})")
            return self.queue.submit_export(run.id, kind, name.strip(), int(max_shard_mb),
                                            source="export")
        except (exporting.ExportError, JobError) as err:
            raise Refused(str(err)) from None

    def exports(self) -> list[dict]:
        return exporting.list_exports(self.ws)

    # -- runs ------------------------------------------------------------------------------
    def runs(self) -> list[dict]:
        """Every run, newest first: id, kind, name, status, parents, result, created."""
        rows = []
        for run in reversed(self.ws.runs()):
            info = _info(run)
            rows.append({"id": run.id, "kind": info.get("kind"), "name": info.get("name"),
                         "status": run.status if info else "unreadable",
                         "parents": info.get("parents", []), "result": headline(info),
                         "created": info.get("created"), "summary": info.get("summary")})
        return rows

    def run(self, run_id: str, log_lines: int = 60) -> dict:
        """One run: its record, recipe, lineage (ancestors and children), loss curve, log tail."""
        from ..jobs import loss_curve, tail

        run = self.get_run(run_id)
        info = run.info
        infos = {r.id: _info(r) for r in self.ws.runs()}
        recipe = run.path("recipe.yaml")
        files = sorted(p.name for p in run.folder.iterdir() if not p.name.startswith("."))
        try:
            loss = loss_curve(run)
        except JsonlError as err:  # a damaged metrics.jsonl: the message names file and line
            raise Refused(str(err)) from None
        return {
            "id": run.id, "info": {**info, "status": run.status}, "result": headline(info),
            "recipe": recipe.read_text(encoding="utf-8") if recipe.is_file() else "",
            "lineage": {"parents": info.get("parents", []), "ancestors": _ancestors(run.id, infos),
                        "children": [i for i, x in infos.items() if run.id in x.get("parents", [])]},
            "loss": loss,
            "log_tail": tail(run.path("run.log"), max_lines=log_lines),
            "files": files,
        }


def _info(run) -> dict:
    try:
        return run.info
    except (OSError, json.JSONDecodeError):
        return {}


def _ancestors(run_id: str, infos: dict[str, dict]) -> list[dict]:
    """Every run this one came from, nearest first: [{id, kind, name, via}]."""
    found, seen, frontier = [], {run_id}, [run_id]
    while frontier:
        current = frontier.pop(0)
        for parent in infos.get(current, {}).get("parents", []):
            if parent in seen:
                continue
            seen.add(parent)
            info = infos.get(parent, {})
            found.append({"id": parent, "kind": info.get("kind"), "name": info.get("name"),
                          "via": current})
            frontier.append(parent)
    return found


def recipe_from_file_text(text: str) -> Any:
    """The dict of a recipe text, or None when it is not a YAML mapping."""
    try:
        data = load_yaml(text)
    except YamlRefused:
        return None
    return data if isinstance(data, dict) else None
