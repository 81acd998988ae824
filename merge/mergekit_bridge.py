"""The mergekit bridge: any mergekit YAML as a stage, and our own merges written as mergekit YAML.

Running mergekit (`run_mergekit_config`), as a library (mergekit ≥ 0.1.5, `mergekit.merge.run_merge`):

1. The YAML is checked by mergekit's own `MergeConfiguration`, plus what mergekit lets through
   silently: unknown keys, an unknown `merge_method`, parameter names the method does not have.
   Every problem is one line naming its key (`models.1.parameters.densty: ...`).
2. Model references are resolved to local folders before mergekit sees them: `run:<id>`,
   `stage:<name>` (bound by the pipeline), `default`, a path relative to the workspace or the
   current folder, or a hub id (fetched by the workbench, offline-aware). A LoRA run or adapter
   folder on its own stands for mergekit's `base+lora`. Pickled weights are refused, and
   `trust_remote_code` stays off.
3. mergekit writes into a hidden partial folder beside the target (`workbench.export.atomic_folder`),
   renamed into place only when complete; tokenizer and generation config are copied from the base
   (or first) model when mergekit did not write them. mergekit's process-wide loader cache is emptied
   afterwards and the caller's random state is restored (mergekit reseeds the global generators).

Writing ours as mergekit YAML (`to_mergekit_yaml`), option by option (mergekit 0.1.5,
`merge_methods/registry.py` and `generalized_task_arithmetic.py`):

| ours | mergekit |
|---|---|
| `task_arithmetic`, λ = `scale` | `task_arithmetic`, `lambda`, `normalize: false` |
| `ties`, `density` | `ties`, `density` per model, `rescale: false` |
| `dare` (p) | `dare_linear`, `density` = 1 − p, `normalize: false` |
| `dare_ties` (p) | `dare_ties`, `density` = 1 − p |
| `sign_vote: weighted` | mergekit's only vote (`consensus_method=sum` on weighted deltas) |
| `sign_vote: unweighted` | the same vote when every weight is 1, else refused |
| `ties_divisor: weight_sum` / `none` | `normalize: true` / `normalize: false` |
| `ties_divisor: count` | `normalize: true` when every weight is 1 (Σ a_i w_i = Σ a_i), else refused |
| `dare_rescale: l1_norm` | `rescale: true` (`RescaleNorm.l1`) |
| `dare_rescale: inverse_keep` | refused (mergekit's `rescale: false` does not rescale at all), except p = 0 |
| `instruction_vector`, α | `task_arithmetic` on the base, weights 1 (domain) and α (instruct) |
| LoRA input (s·B·A) | `<base>+<adapter>`: PEFT's merge_and_unload gives W + s·B·A, so (W + s·B·A) − W |
| float32 accumulation | `dtype: float32`; `out_dtype` = the base's storage dtype |

The file's first comment is the command that runs it with mergekit's CLI (`mergekit_command`):
`mergekit-yaml mergekit.yaml mergekit-merged`, plus `--lora-merge-cache` and `--lora-merge-dtype
float32` when LoRA inputs are merged as `base+lora` (mergekit refuses adapters without a cache
folder) and `--random-seed` for DARE.

mergekit computes each tensor as we do (delta, weights, vote, divisor, λ in float32, added to the
base, cast once to the storage dtype), so task arithmetic and TIES over full models agree bit for bit
except where TIES's top-k cut falls among equal non-zero magnitudes (we keep the earlier entries,
mergekit's argsort is not stable; common in bfloat16, rare in float32). LoRA inputs and
instruction_vector agree to float32 rounding (W + s·B·A is rounded once more; θ_domain is the
anchor of our instruction-vector merge). DARE's drop masks cannot be matched: mergekit
draws them with `torch.bernoulli` from the global generator in its execution order, we draw them from
a generator seeded per tensor name; DARE with p > 0 is written (the same law: density, rescale,
vote, divisor) but equals ours in distribution, not tensor for tensor, and the YAML says so.
"""

from __future__ import annotations

import copy
import difflib
import json
import random
import shlex
import shutil
import tempfile
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from workbench import resolver
from workbench.io import ModelLoadError, atomic_folder, model_layout, peft_adapter_header, write_atomic
from workbench.yamlio import YamlRefused, read_yaml_file

MIN_MERGEKIT = "0.1.5"
INSTRUCTION_VECTOR = "instruction_vector"
OUR_METHODS = {"task_arithmetic": "task_arithmetic", "ties": "ties", "dare": "dare_linear",
               "dare_ties": "dare_ties"}
STORAGE_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja")
TAGALONG_FILES = ("generation_config.json",)
MERGEKIT_OUT = "mergekit-merged"          # where the written command puts mergekit's model
MERGEKIT_LORA_CACHE = "mergekit-lora-cache"  # and the LoRA inputs merged into their base


class MergekitConfigError(ValueError):
    """A mergekit YAML that does not validate; one line per problem, each naming its key."""


class MergekitUnsupported(ValueError):
    """One of our merges that mergekit cannot express exactly; the message names the option."""


class MergekitRunError(RuntimeError):
    """mergekit itself failed while merging; the message carries its error."""


# ----------------------------------------------------------------------------------------------
# Reading and checking a mergekit YAML


def _mergekit():
    try:
        import mergekit.config
        import mergekit.merge
        import mergekit.merge_methods.registry
    except ImportError as err:
        raise MergekitConfigError(f"the mergekit bridge needs the mergekit package "
                                  f"(pip install 'mergekit>={MIN_MERGEKIT}'): {err}") from None
    return mergekit


def read_mergekit_config(path: str | Path) -> dict:
    """A mergekit YAML file as a mapping (the path through the resolver in force, the text within
    the YAML bounds); a clear error for a missing, refused or malformed file."""
    path = resolver.current().path(str(path), "config")
    if not path.is_file():
        raise MergekitConfigError(f"mergekit YAML file '{path}' not found")
    try:
        data = read_yaml_file(path)
    except YamlRefused as err:
        raise MergekitConfigError(str(err)) from None
    if not isinstance(data, dict):
        raise MergekitConfigError(f"{path}: a mergekit config is a mapping with a merge_method key")
    return data


def _nested(annotation) -> Any:
    """The pydantic model inside a field's annotation: a class, ("list", shape), ("dict", shape),
    or None when there is none or several (then its keys are left to pydantic)."""
    from pydantic import BaseModel

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        shapes = [s for s in map(_nested, args) if s is not None]
        return shapes[0] if len(shapes) == 1 else None
    if origin in (list, typing.List) and args:
        inner = _nested(args[0])
        return ("list", inner) if inner is not None else None
    if origin in (dict, typing.Dict) and len(args) == 2:
        inner = _nested(args[1])
        return ("dict", inner) if inner is not None else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _unknown_keys(node: Any, shape: Any, where: str) -> list[str]:
    """Keys mergekit's models would silently ignore, with a did-you-mean."""
    problems: list[str] = []
    if isinstance(shape, tuple):
        kind, inner = shape
        items = enumerate(node) if kind == "list" and isinstance(node, list) else \
            node.items() if kind == "dict" and isinstance(node, dict) else ()
        for key, value in items:
            problems += _unknown_keys(value, inner, f"{where}.{key}" if where else str(key))
        return problems
    if shape is None or not isinstance(node, dict):
        return problems
    fields = shape.model_fields
    for key, value in node.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"{path}: unknown key '{key}'{hint} Allowed here: {', '.join(fields)}")
        elif key != "parameters":
            problems += _unknown_keys(value, _nested(fields[key].annotation), path)
    return problems


def _parameter_tables(node: Any, where: str = "") -> Iterator[tuple[str, dict]]:
    """Every `parameters:` mapping in the config, with its key path."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            if key == "parameters" and isinstance(value, dict):
                yield path, value
            elif key != "tokenizer":
                yield from _parameter_tables(value, path)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _parameter_tables(value, f"{where}.{i}")


def check_mergekit_config(data: Any, source: str = ""):
    """Validate a mergekit config mapping; return mergekit's `MergeConfiguration`.

    Raises MergekitConfigError with one line per problem, each naming its key path (prefixed by
    `source` when given).
    """
    from pydantic import ValidationError

    mk = _mergekit()
    prefix = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise MergekitConfigError(f"{prefix}a mergekit config is a mapping with a merge_method key")
    problems = _unknown_keys(data, mk.config.MergeConfiguration, "")
    methods = {m.spec.name: m for m in mk.merge_methods.registry.registered_methods()}
    method = data.get("merge_method")
    if method is None:
        problems.append(f"merge_method: missing (one of: {', '.join(sorted(methods))})")
    elif method not in methods:
        close = difflib.get_close_matches(str(method), list(methods), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (one of: {', '.join(sorted(methods))})"
        problems.append(f"merge_method: unknown method {method!r}{hint}")
    else:
        known = [p.name for p in methods[method].spec.parameters]
        for where, table in _parameter_tables(data):
            for name in table:
                if name not in known:
                    close = difflib.get_close_matches(str(name), known, n=1)
                    hint = f"; did you mean '{close[0]}'?" if close else ""
                    problems.append(f"{where}.{name}: unknown parameter of {method}{hint} "
                                    f"({method} takes: {', '.join(known) or 'none'})")
    if not problems:
        try:
            return mk.config.MergeConfiguration.model_validate(copy.deepcopy(data))
        except ValidationError as err:
            for e in err.errors():
                key = ".".join(str(p) for p in e["loc"]) or "(top level)"
                got = e.get("input")
                shown = "" if isinstance(got, (dict, list)) or e["type"] == "missing" else f" (got {got!r})"
                problems.append(f"{key}: {e['msg']}{shown}")
        except (RuntimeError, ValueError, TypeError) as err:  # mergekit's own validators raise these
            problems.append(f"(top level): {err}")
    raise MergekitConfigError("\n".join(prefix + p for p in dict.fromkeys(problems)))


# ----------------------------------------------------------------------------------------------
# Resolving model references


@dataclass
class ResolvedConfig:
    """A mergekit config whose model references are all local folders."""

    config: dict
    parents: list[str] = field(default_factory=list)   # workspace runs it reads
    base: str | None = None                             # base_model as written
    inputs: list[str] = field(default_factory=list)     # the merged models as written
    donor: Path | None = None                           # the folder tokenizer files come from
    reference: str | None = None  # base_model (else the first model) as a `ModelSpec.path`:
    # run:<id>, a folder or a hub id; None when written as an explicit model+lora

    @property
    def yaml(self) -> str:
        return yaml.safe_dump(self.config, sort_keys=False)


def _reference_slots(config: dict) -> Iterator[tuple[dict, str, str]]:
    """(mapping, key, key path) of every model reference in a (validated) mergekit config."""

    def slices(items, where):
        for i, s in enumerate(items or []):
            if s.get("base_model") is not None:
                yield s, "base_model", f"{where}slices.{i}.base_model"
            for j, src in enumerate(s.get("sources") or []):
                yield src, "model", f"{where}slices.{i}.sources.{j}.model"

    def module(m, where):
        for i, item in enumerate(m.get("models") or []):
            yield item, "model", f"{where}models.{i}.model"
        yield from slices(m.get("slices"), where)

    if config.get("base_model") is not None:
        yield config, "base_model", "base_model"
    yield from module(config, "")
    for name, m in (config.get("modules") or {}).items():
        yield from module(m, f"modules.{name}.")
    if config.get("tokenizer_source") not in (None, "union", "base"):
        yield config, "tokenizer_source", "tokenizer_source"
    tokenizer = config.get("tokenizer") or {}
    if tokenizer.get("source") not in (None, "union", "base"):
        yield tokenizer, "source", "tokenizer.source"
    for name, token in (tokenizer.get("tokens") or {}).items():
        src = token.get("source")
        if isinstance(src, dict) and src.get("kind") == "model_token":
            yield src, "model", f"tokenizer.tokens.{name}.source.model"
        elif isinstance(src, str) or (isinstance(src, dict) and "kind" not in src):
            yield token, "source", f"tokenizer.tokens.{name}.source"


def reference_paths(config: dict) -> Iterator[tuple[str, str]]:
    """(key path, reference) of every model and LoRA reference in a validated mergekit config,
    a `model+lora` reference as its two parts: what the resolver checks before anything runs."""
    from mergekit.common import ModelReference

    for node, key, where in _reference_slots(config):
        try:
            reference = ModelReference.model_validate(node[key])
        except (RuntimeError, ValueError):
            continue  # check_mergekit_config has said what is wrong with it
        for part in (reference.model, reference.lora):
            if part is not None:
                yield where, part.path


def _in_workspace(ref: str, workspace) -> str:
    """A relative path that exists under the workspace root becomes that folder."""
    if workspace is None or ref == "default" or ref.startswith(("run:", "stage:", "config:")):
        return ref
    path = Path(ref).expanduser()
    if not path.is_absolute() and (workspace.root / path).exists():
        return str(workspace.root / path)
    return ref


def _run_of(folder: Path, workspace) -> str | None:
    """The id of the workspace run a folder belongs to, if any."""
    if workspace is None:
        return None
    try:
        run_id = Path(folder).relative_to(workspace.runs_dir).parts[0]
    except (ValueError, IndexError):
        return None
    return run_id if (workspace.runs_dir / run_id / "run.json").is_file() else None


def _adapter_folder(ref: str, workspace, where: str) -> Path:
    from workbench.models import resolve_source

    ref = _in_workspace(ref, workspace)
    if ref.startswith("run:"):
        source = resolve_source(ref, workspace)
        if source.adapter is None:
            raise ModelLoadError(f"{where}: '{ref}' is a model, not a LoRA adapter")
        folder = source.adapter
    else:
        folder = resolver.current().path(ref, where)
    _check_peft_adapter(folder, where)
    return folder


def _check_peft_adapter(folder: Path, where: str) -> None:
    try:
        peft_adapter_header(folder)
    except FileNotFoundError as err:
        raise ModelLoadError(f"{where}: {err}; mergekit merges PEFT adapters as `model+adapter`") from None


def _resolve_one(value: Any, workspace, where: str, parents: list[str]) -> tuple[Any, Path, str | None]:
    """A model reference → (mergekit reference with local folders, model folder, the reference as
    a `ModelSpec.path` that loads the same model, or None for an explicit `model+lora`)."""
    from mergekit.common import ModelReference

    from workbench.models import check_model_folder, resolve_source

    try:
        reference = ModelReference.model_validate(value)
    except (RuntimeError, ValueError) as err:
        raise MergekitConfigError(f"{where}: not a model reference ({err})") from None
    for part in (reference.model, reference.lora):
        if part is not None and part.revision:
            raise ModelLoadError(f"{where}: '{part}': revisions (@...) are not supported; "
                                 "download the model and give its folder")
    ref = _in_workspace(reference.model.path, workspace)
    source = resolve_source(ref, workspace)
    if source.folder is None:
        raise ModelLoadError(f"{where}: '{ref}' is a built-in config without weights; mergekit "
                             "merges model folders")
    adapter = None
    if source.adapter is not None:
        if reference.lora is not None:
            raise ModelLoadError(f"{where}: '{reference.model.path}' is an adapter; "
                                 "`model+lora` needs a model before the '+'")
        adapter = source.adapter
        _check_peft_adapter(adapter, where)
    elif reference.lora is not None:
        adapter = _adapter_folder(reference.lora.path, workspace, where)
    if check_model_folder(source.folder, allow_pickle=False) != "safetensors":
        raise ModelLoadError(f"{where}: {source.folder} holds no safetensors weights")
    for ref_or_folder in (source.ref, source.folder, adapter):
        run_id = (str(ref_or_folder).removeprefix("run:") if str(ref_or_folder).startswith("run:")
                  else _run_of(ref_or_folder, workspace) if ref_or_folder is not None else None)
        if run_id and workspace is not None:
            run_id = workspace.get(run_id).id
            if run_id not in parents:
                parents.append(run_id)
    loadable = None if reference.lora is not None else source.ref
    return _reference_value(source.folder, adapter, reference.override_architecture), source.folder, loadable


def _reference_value(folder: Path, adapter: Path | None, override: str | None = None) -> Any:
    """mergekit's short `model+lora` string, or its long form where a path would not parse."""
    text = str(folder) + (f"+{adapter}" if adapter else "")
    plain = not any(c in str(p) for p in (folder, adapter) if p for c in '+@" ')
    if plain and override is None:
        return text
    value: dict = {"model": {"path": str(folder)}}
    if adapter:
        value["lora"] = {"path": str(adapter)}
    if override is not None:
        value["override_architecture"] = override
    return value


def resolve_references(config: dict | str | Path, workspace=None, source: str = "") -> ResolvedConfig:
    """Check a mergekit config, then turn every model reference in it into local folders.

    References: `run:<id>` (a LoRA run becomes `<its base>+<adapter>`), `default`, a folder
    (relative to the workspace root first, then to the current folder), a hub id, `model+lora`.
    `stage:<name>` only inside a pipeline, which binds it to `run:<id>` before this runs.
    """
    data = read_mergekit_config(config) if isinstance(config, (str, Path)) else config
    check_mergekit_config(data, source)
    resolved = copy.deepcopy(data)
    prefix = f"{source}: " if source else ""
    result = ResolvedConfig(config=resolved, base=_as_text(data.get("base_model")))
    folders: dict[str, Path] = {}
    for node, key, where in list(_reference_slots(resolved)):
        written = node[key]
        try:
            node[key], folders[where], loadable = _resolve_one(written, workspace, where, result.parents)
        except MergekitConfigError:
            raise
        except (ModelLoadError, LookupError, OSError, ValueError) as err:
            message = str(err) if str(err).startswith(where) else f"{where}: {err}"
            raise ModelLoadError(prefix + message) from None
        is_input = where.endswith(".model") and not where.startswith("tokenizer.")
        if is_input:
            result.inputs.append(_as_text(written))
        if where == "base_model" or (is_input and data.get("base_model") is None
                                     and len(result.inputs) == 1):
            result.reference = loadable
    result.donor = folders.get("base_model") or next(
        (f for w, f in folders.items() if not w.startswith("tokenizer")), None)
    check_mergekit_config(resolved, source)  # the references still parse as mergekit's
    return result


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


# ----------------------------------------------------------------------------------------------
# Running mergekit


@contextmanager
def _kept_random_state() -> Iterator[None]:
    """mergekit's run_merge reseeds Python's, NumPy's and torch's global generators: undo that."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and (folder / "tokenizer_config.json").is_file() and (
        (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file())


def run_mergekit_config(config: dict | str | Path, out_folder: str | Path, workspace=None, *,
                        seed: int = 0, options: dict | None = None,
                        source: str = "") -> ResolvedConfig:
    """Run a mergekit YAML (mapping or file) into `out_folder`, atomically; return what ran.

    `options` are extra `mergekit.options.MergeOptions` fields (e.g. `out_shard_size`);
    `trust_remote_code` cannot be turned on here. The merge runs on the CPU, reading the inputs
    lazily; LoRA inputs are merged by PEFT in float32 into a temporary folder first. Raises
    FileExistsError for an existing `out_folder`, MergekitConfigError for a bad config (naming the
    key), ModelLoadError for a reference that does not resolve, MergekitRunError when mergekit
    fails; in every case nothing is left at `out_folder`.
    """
    from merge.preflight import check_same_tokenizer

    out_folder = Path(out_folder)
    if out_folder.exists():
        raise FileExistsError(f"{out_folder}: output folder already exists")
    resolved = resolve_references(config, workspace, source)
    mk = _mergekit()
    merge_config = check_mergekit_config(resolved.config, source)
    data = resolved.config
    if data.get("tokenizer") is None and data.get("tokenizer_source") is None and resolved.donor:
        others = {Path(str(r.model.path)) for r in merge_config.referenced_models()}
        check_same_tokenizer(resolved.donor, sorted(others - {resolved.donor}))
    settings = {"device": "cpu", "quiet": True, "write_model_card": False, "random_seed": seed,
                "lora_merge_dtype": "float32", "copy_tokenizer": _has_tokenizer(resolved.donor),
                **(options or {})}
    if settings.get("trust_remote_code"):
        raise ValueError("trust_remote_code cannot be turned on for a mergekit merge")
    with atomic_folder(out_folder) as tmp:
        with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f".{out_folder.name}.lora-") as cache:
            settings["lora_merge_cache"] = cache
            merge_options = mk.merge.MergeOptions(**settings)
            try:
                with _kept_random_state():
                    mk.merge.run_merge(merge_config, str(tmp), merge_options,
                                       config_source=resolved.yaml)
            except Exception as err:  # noqa: BLE001 - any mergekit failure, with its message
                raise MergekitRunError(f"{source + ': ' if source else ''}mergekit failed: "
                                       f"{type(err).__name__}: {err}") from err
            finally:
                from mergekit.io.tasks import LoaderCache

                cache_of_loaders = LoaderCache()
                cache_of_loaders.flush_all()
                cache_of_loaders.loaders.clear()  # process-wide: would serve stale folders later
        _copy_missing_files(resolved.donor, tmp)
    return resolved


def _copy_missing_files(donor: Path | None, folder: Path) -> None:
    """Tokenizer files (when mergekit wrote none) and the generation config, from the donor."""
    if donor is None:
        return
    names = list(TAGALONG_FILES)
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json",
                                                "tokenizer.model")):
        names += TOKENIZER_FILES
    for name in names:
        if (donor / name).is_file() and not (folder / name).exists():
            shutil.copy2(donor / name, folder / name)


# ----------------------------------------------------------------------------------------------
# Writing our merges as mergekit YAML


def mergekit_parameters(method: str, params: dict, weights: list[float]) -> tuple[str, dict, dict, bool]:
    """(mergekit method, shared parameters, per-model parameters, exact) for one of our merges.

    `exact` is False only for DARE with p > 0, whose masks mergekit draws from its own generator.
    Raises MergekitUnsupported naming the option that mergekit cannot express.
    """
    from merge.methods import check_parameters

    if method not in OUR_METHODS:
        raise MergekitUnsupported(f"method {method!r} has no mergekit equivalent")
    values = check_parameters(method, params)
    shared: dict = {"lambda": float(values["scale"])}
    per_model: dict = {}
    unit = all(w == 1 for w in weights)
    if method in ("task_arithmetic", "dare"):
        shared["normalize"] = False
    if method in ("ties", "dare_ties"):
        if values["sign_vote"] == "unweighted" and not unit:
            raise MergekitUnsupported(
                "sign_vote: 'unweighted' has no mergekit equivalent unless every weight is 1 "
                "(mergekit elects signs from the weighted deltas: use sign_vote: weighted)")
        divisor = values["ties_divisor"]
        if divisor == "count" and not unit:
            raise MergekitUnsupported(
                "ties_divisor: 'count' has no mergekit equivalent unless every weight is 1 "
                "(mergekit's normalize divides by the agreeing weights' sum: use ties_divisor: "
                "weight_sum for normalize: true, or none for normalize: false)")
        shared["normalize"] = divisor != "none"
    if method == "ties":
        per_model["density"] = float(values["density"])
        shared["rescale"] = False
    exact = True
    if method in ("dare", "dare_ties"):
        p = float(values["p"])
        per_model["density"] = 1.0 - p
        if values["dare_rescale"] == "inverse_keep" and p > 0:
            raise MergekitUnsupported(
                "dare_rescale: 'inverse_keep' (survivors × 1/(1−p)) has no mergekit equivalent "
                "(mergekit's rescale: true keeps each vector's L1 norm, our dare_rescale: l1_norm; "
                "rescale: false does not rescale)")
        shared["rescale"] = values["dare_rescale"] == "l1_norm"
        exact = p == 0
    return OUR_METHODS[method], shared, per_model, exact


def _check_lora_is_exact(folder: Path) -> None:
    """mergekit's `model+lora` is PEFT's merge_and_unload: W + s·B·A exactly when the adapter is a
    plain LoRA of linear layers (no DoRA, no fan_in_fan_out, no extra trained tensors)."""
    from adapters.lora import check_adapter_format

    try:
        check_adapter_format(Path(folder))
    except (ValueError, FileNotFoundError) as err:
        raise MergekitUnsupported(f"no exact mergekit `model+lora` equivalent: {err}") from None


def _storage_dtype(base_folder: Path) -> str:
    dtypes = sorted({d for _, d, _, _ in model_layout(Path(base_folder)).values()
                     if d in STORAGE_DTYPES})
    if len(dtypes) != 1:
        raise MergekitUnsupported(f"{base_folder}: tensors stored in {', '.join(dtypes) or 'no float'} "
                                  "dtypes; mergekit writes one out_dtype")
    return STORAGE_DTYPES[dtypes[0]]


def to_mergekit_yaml(recipe, sources, base, weights: list[float] | None = None,
                     parameters: dict | None = None) -> str:
    """Our full-model merge (a `MergeRecipe`, its resolved inputs and base) as mergekit YAML.

    `sources` and `base` are `workbench.models.ModelSource`s (a LoRA input has `adapter` set);
    `weights` and `parameters` override the recipe's (the point a merge search chose).
    `instruction_vector` (θ_domain + α(θ_inst − θ_base)) is written as task arithmetic on the base
    with weights 1 and α, equal up to float32 rounding (we add α·τ_inst to θ_domain's stored values).
    Raises MergekitUnsupported when an option, the output kind or an input has no exact mergekit
    equivalent. See the module docstring for the option mapping.
    """
    if getattr(recipe, "output", "model") != "model":
        raise MergekitUnsupported("output: adapter has no mergekit equivalent (mergekit writes models)")
    if base.folder is None:
        raise MergekitUnsupported(f"the base '{base.ref}' is a built-in config without a folder")
    weights = [float(w) for w in (weights if weights is not None else
                                  [item.weight for item in recipe.inputs])]
    params = dict(recipe.parameters if parameters is None else parameters)
    notes = []
    if recipe.method == INSTRUCTION_VECTOR:
        alpha = float(params.get("alpha", 1.0))
        roles = [getattr(item, "role", None) for item in recipe.inputs]
        if sorted(r for r in roles if r) != ["domain", "instruct"] or len(roles) != 2:
            raise MergekitUnsupported("instruction_vector needs one input with role: domain and one "
                                      "with role: instruct")
        weights = [1.0 if role == "domain" else alpha for role in roles]
        method, shared, per_model, exact = mergekit_parameters("task_arithmetic", {}, weights)
        notes.append("# instruction_vector θ_domain + α(θ_inst − θ_base) as task arithmetic with "
                     f"weights 1 and α = {alpha:g}: equal up to float32 rounding.")
    else:
        method, shared, per_model, exact = mergekit_parameters(recipe.method, params, weights)
    if not exact:
        notes.append("# DARE's drop masks come from mergekit's own random generator "
                     "(--random-seed), not from the workbench's per-tensor seeds: the result "
                     "equals the workbench merge in distribution, not tensor for tensor.")
    if any(source.adapter is not None for source in sources):
        notes.append("# LoRA inputs as base+adapter (PEFT merges W + s·B·A): equal up to float32 "
                     "rounding of W + s·B·A.")
    models = []
    for source, weight in zip(sources, weights):
        if source.adapter is not None:
            _check_lora_is_exact(source.adapter)
            ref = _reference_value(Path(base.folder), Path(source.adapter))
        else:
            ref = _reference_value(Path(source.folder), None)
        models.append({"model": ref, "parameters": {"weight": weight, **per_model}})
    config = {"merge_method": method, "base_model": _reference_value(Path(base.folder), None),
              "models": models, "parameters": shared, "dtype": "float32",
              "out_dtype": _storage_dtype(base.folder)}
    has_lora = any(source.adapter is not None for source in sources)
    header = [f"# mergekit equivalent of the workbench merge '{recipe.name}' "
              f"({recipe.method}, seed {recipe.seed}); run it from this folder with mergekit "
              f">= {MIN_MERGEKIT}:",
              "#   " + mergekit_command(has_lora, None if exact else recipe.seed),
              "# or as a workbench `kind: mergekit` stage."]
    return "\n".join(header + notes) + "\n" + yaml.safe_dump(config, sort_keys=False)


def mergekit_command(has_lora: bool, seed: int | None = None, config: str = "mergekit.yaml",
                     out: str = MERGEKIT_OUT) -> str:
    """The `mergekit-yaml` command line that runs a written config as we run it: LoRA inputs
    (`base+lora`) need `--lora-merge-cache` (mergekit refuses them without one) and are merged in
    float32 (`--lora-merge-dtype`); a randomised method (DARE) gets the seed."""
    words = ["mergekit-yaml", config, out]
    if has_lora:
        words += ["--lora-merge-cache", MERGEKIT_LORA_CACHE, "--lora-merge-dtype", "float32"]
    if seed is not None:
        words += ["--random-seed", str(seed)]
    return shlex.join(words)


def write_mergekit_yaml(recipe, sources, base, run, weights: list[float] | None = None,
                        parameters: dict | None = None) -> Path | None:
    """Write `mergekit.yaml` into a merge run's folder when mergekit has an equivalent merge
    (`to_mergekit_yaml`); otherwise log why not and return None."""
    try:
        text = to_mergekit_yaml(recipe, sources, base, weights, parameters)
    except MergekitUnsupported as err:
        run.log(f"no mergekit.yaml: {err}")
        return None
    path = run.path("mergekit.yaml")
    write_atomic(path, text)
    return path
