"""Pre-flight checks of merge inputs against the base, from config files and safetensors headers.

Nothing here reads a model weight: what is checked comes from `config.json`, `adapter_config.json`,
`mixda_config.json`, `tokenizer.json` and the JSON headers of the safetensors files (plus the few
bytes of a prompt's metadata). A mismatch raises ValueError (FileNotFoundError for a missing file)
naming the file and the tensor or key.

- `input_kind(folder)`: "full", "lora", "road", "prompt" or "mixda", from the folder's config file.
- `plan_merge(kinds, variants, method, output)`: which merge the inputs make together, or why
  they cannot be merged (a task prompt vector with a LoRA adapter, ...).
- `check_architectures(base, folders)`: the models the inputs were trained on have the base's
  architecture (model_type, architectures and the sizes in config.json).
- `check_input_tensors(base_layout, base, kind, folder)`: every tensor an input touches exists in
  the base with the shape the input expects.
- `check_same_tokenizer(base, inputs)`: merged models share one tokenizer: the same vocabulary
  (token → id), the same added tokens and the same `vocab_size`.
- `check_merge_inputs(...)`: all of the above, in that order; returns the kinds and the plan.
"""

from __future__ import annotations

import json
from pathlib import Path

from workbench.methods import adapter_config_files, described, get_method, method_of_folder, methods
from workbench.io import read_json_object, read_safetensors_header, tensor_header


def _tokenizer_identity(folder: Path) -> tuple | None:
    """(vocabulary, added tokens) from tokenizer.json, or None when the folder has none."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    added = sorted((t["id"], t["content"]) for t in data.get("added_tokens", []))
    return data.get("model", {}).get("vocab"), added


def _vocab_size(folder: Path) -> int | None:
    path = folder / "config.json"
    return json.loads(path.read_text()).get("vocab_size") if path.is_file() else None


def check_same_tokenizer(base_folder: Path, inputs: list[Path]) -> None:
    """Refuse an input whose tokenizer or vocab size differs from the base's, naming its file."""
    base_folder = Path(base_folder)
    base_tokenizer, base_vocab = _tokenizer_identity(base_folder), _vocab_size(base_folder)
    for folder in map(Path, inputs):
        vocab = _vocab_size(folder)
        if base_vocab is not None and vocab is not None and vocab != base_vocab:
            raise ValueError(f"{folder / 'config.json'}: vocab_size {vocab}, but the base "
                             f"{base_folder} has {base_vocab}; merged models must share a vocabulary")
        tokenizer = _tokenizer_identity(folder)
        if base_tokenizer is not None and tokenizer is not None and tokenizer != base_tokenizer:
            raise ValueError(f"{folder / 'tokenizer.json'}: a different tokenizer from the base's "
                             f"({base_folder / 'tokenizer.json'}); merged models must share one")


# ----------------------------------------------------------------------------------------------
# Kinds and what they make together

ARCHITECTURE_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "vocab_size", "tie_word_embeddings")


def input_kind(folder: Path) -> str:
    """What a merge input folder holds: the name of the registered method that saved it
    (`workbench.methods.method_of_folder`, from its config files only)."""
    folder = Path(folder)
    method = method_of_folder(folder)
    if method is not None:
        return method.name
    config_path = folder / "adapter_config.json"
    if config_path.is_file():
        peft_type = read_json_object(config_path).get("peft_type")
        known = ", ".join(m.label for m in methods().values())
        raise ValueError(f"{config_path}: a {peft_type} adapter cannot be merged (mergeable: {known})")
    raise FileNotFoundError(f"{folder}: neither a model folder (config.json) nor an adapter "
                            f"folder ({', '.join(adapter_config_files())})")


def road_variant(folder: Path) -> tuple[str, int]:
    """(variant, group_size) of a RoAd adapter folder."""
    config = read_json_object(Path(folder) / "adapter_config.json")
    return config.get("variant"), config.get("group_size")


def plan_merge(kinds: list[str], variants: list, method: str, output: str) -> str:
    """The merge the inputs make: "lora" (factored, exact), "road" (composed rotations), "prompt",
    "mixda", or "dense" (every input as a dense delta per tensor). `variants[i]` is (variant,
    group_size) for a RoAd input, else None.

    - Task prompt vectors merge only with task prompt vectors (output: a prompt-tuning adapter),
      MixDA folders only with MixDA folders (output: a MixDA folder).
    - Task arithmetic over LoRA adapters only stays factored; over road_1 adapters of one group
      size only, it composes the rotations. Anything else (other methods, mixed kinds, road_2 and
      road_4) goes through dense deltas: (R − I)·W for RoAd, s·B·A for LoRA, θ − θ_base for models.
    - `output: adapter` with RoAd inputs needs the "road" plan. Which LoRA merges can be written as
      an adapter is the caller's rule (`merge_folders`: task arithmetic only).
    """
    for special in ("prompt", "mixda"):
        if special in kinds:
            first = kinds.index(special)
            for i, kind in enumerate(kinds):
                if kind != special:
                    raise ValueError(
                        f"inputs.{first} is {described(special)} and inputs.{i} is {described(kind)}: "
                        f"they cannot be combined ({described(special)} merges only with others of "
                        "its kind" + (", sharing one P_init" if special == "prompt" else
                                      ", adapting the same layers") + ")")
            if output != "adapter":
                what = "a prompt-tuning adapter" if special == "prompt" else "a MixDA folder"
                raise ValueError(f"{described(special)}s merge into {what}, not into the model's "
                                 "weights; set output: adapter")
            return special
    if method == "task_arithmetic" and set(kinds) == {"lora"}:
        return "lora"
    if method == "task_arithmetic" and set(kinds) == {"road"} and \
            all(v[0] == "road_1" for v in variants) and len({v[1] for v in variants}) == 1:
        return "road"
    if output == "adapter" and "road" in kinds:
        raise ValueError(
            "output: adapter with RoAd inputs needs method: task_arithmetic over road_1 RoAd "
            "adapters of one group size only (their rotations compose into one adapter); got "
            f"method {method} over {', '.join(sorted(set(described(k) for k in kinds)))}"
            + (" (road_2/road_4 or different group sizes)" if set(kinds) == {"road"} else "")
            + "; use output: model to merge them as dense deltas")
    return "dense"


def plan_of(folders: list, method: str, output: str) -> str:
    """`plan_merge` for input folders (their kinds and RoAd variants read from their configs)."""
    folders = [Path(f) for f in folders]
    kinds = [input_kind(f) for f in folders]
    variants = [road_variant(f) if k == "road" else None for k, f in zip(kinds, folders)]
    return plan_merge(kinds, variants, method, output)


# ----------------------------------------------------------------------------------------------
# Architecture and tensors


def check_architectures(base_folder: Path, folders: list) -> None:
    """Refuse a model (or the base an adapter was trained on) whose config.json differs from the
    base's in architecture or size, naming the file and the key."""
    base_folder = Path(base_folder)
    base_path = base_folder / "config.json"
    if not base_path.is_file():
        return
    base = read_json_object(base_path)
    for folder in folders:
        if folder is None or not (Path(folder) / "config.json").is_file() or \
                Path(folder).resolve() == base_folder.resolve():
            continue
        path = Path(folder) / "config.json"
        config = read_json_object(path)
        for key in ARCHITECTURE_KEYS:
            if key in base and key in config and base[key] != config[key]:
                raise ValueError(f"{path}: {key} {config[key]!r}, but the base {base_path} has "
                                 f"{base[key]!r}; inputs must come from a model of the base's "
                                 "architecture (adapters trained on a different base?)")


def check_input_tensors(base_layout: dict, base_folder: Path, kind: str, folder: Path) -> None:
    """Every tensor `folder` touches exists in the base (`model_layout`) with a fitting shape: the
    check of the method that saved the folder (`check_against_base`), from headers alone."""
    check = getattr(get_method(kind), "check_against_base", None)
    if check is not None:
        check(Path(folder), base_layout, Path(base_folder))


def check_same_kind_inputs(kind: str, folders: list[Path]) -> None:
    """Task prompt vectors: one P_init (model fingerprint, init seed, length, from the metadata);
    MixDA folders: the same layers, adapters, sizes, stage and task, and the same tensors."""
    folders = [Path(f) for f in folders]
    if kind == "prompt" and folders:
        from adapters.prompt import INIT_FILE

        metas = [read_safetensors_header(f / INIT_FILE).get("__metadata__", {}) for f in folders]
        shapes = [tensor_header(f / INIT_FILE)["prompt_init"]["shape"] for f in folders]
        for folder, meta, shape in zip(folders[1:], metas[1:], shapes[1:]):
            for key in ("model", "init_seed"):
                if meta.get(key) != metas[0].get(key):
                    raise ValueError(f"{folder / INIT_FILE}: {key} {meta.get(key)!r}, but "
                                     f"{folders[0] / INIT_FILE} has {metas[0].get(key)!r}; task prompt "
                                     "vectors add only when they share one P_init")
            if shape != shapes[0]:
                raise ValueError(f"{folder / INIT_FILE}: prompt_init of shape {tuple(shape)}, but "
                                 f"{folders[0] / INIT_FILE} has {tuple(shapes[0])}")
    if kind == "mixda" and folders:
        configs = [read_json_object(f / "mixda_config.json") for f in folders]
        headers = [tensor_header(f / "mixda.safetensors") for f in folders]
        for folder, config in zip(folders, configs):
            if config.get("task_lora"):
                raise ValueError(f"{folder}: a MixDA folder with a task LoRA (task_lora/); merge "
                                 "its task LoRA separately, MixDA merges hold module weights only")
        for folder, config, header in zip(folders[1:], configs[1:], headers[1:]):
            for key in ("layers", "adapters", "bottleneck", "stage", "task", "model_type",
                        "hidden_size", "intermediate_size"):
                a, b = config.get(key), configs[0].get(key)
                if key == "layers":
                    a, b = sorted(a or []), sorted(b or [])
                if a != b:
                    raise ValueError(f"{folder / 'mixda_config.json'}: {key} {a!r}, but "
                                     f"{folders[0] / 'mixda_config.json'} has {b!r}; MixDA folders "
                                     "merge only with folders of the same layers and adapters")
            for name in sorted(set(header) | set(headers[0])):
                if name not in header or name not in headers[0]:
                    where = folder if name not in header else folders[0]
                    raise ValueError(f"tensor {name}: missing from {where / 'mixda.safetensors'}")
                if header[name]["shape"] != headers[0][name]["shape"]:
                    raise ValueError(f"tensor {name}: shape {tuple(header[name]['shape'])} in "
                                     f"{folder} but {tuple(headers[0][name]['shape'])} in {folders[0]}")


def check_merge_inputs(base_folder: Path, inputs: list[Path], trained_on: list, method: str,
                       output: str) -> tuple[list[str], str]:
    """Every pre-flight check of a merge; returns (kind of each input, plan).

    `inputs` are the input folders (adapter or model), `trained_on` the model folder each was
    trained on where known (for an adapter its base, for a model itself, or None).
    """
    from workbench.io import model_layout

    base_folder = Path(base_folder)
    inputs = [Path(f) for f in inputs]
    kinds = [input_kind(f) for f in inputs]
    variants = [road_variant(f) if k == "road" else None for k, f in zip(kinds, inputs)]
    plan = plan_merge(kinds, variants, method, output)
    check_architectures(base_folder, [f for k, f in zip(kinds, inputs) if k == "full"] + list(trained_on))
    layout = model_layout(base_folder)
    for kind, folder in zip(kinds, inputs):
        check_input_tensors(layout, base_folder, kind, folder)
    if plan in ("prompt", "mixda"):
        check_same_kind_inputs(plan, inputs)
    check_same_tokenizer(base_folder, inputs)
    return kinds, plan
