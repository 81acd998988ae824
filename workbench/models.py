"""Model loading: local folders, hub ids, workspace runs and built-in configs, safely.

Safetensors only unless a recipe allows pickled checkpoints (then `weights_only=True`), no remote
code unless a recipe turns it on, every safetensors header checked before any weight is read, and
dtype / device chosen automatically (bf16 on a GPU, fp32 on CPU) or by the recipe.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch

from .bnb import BitsAndBytesUnavailable, bnb_quantization_config

from . import resolver
from .io import INDEX_NAME, PICKLE_SUFFIXES, ModelLoadError, nonfinite_counts, read_safetensors_header
from .methods import adapter_config_files, is_adapter_folder, method_of_folder
from .sections import ModelSpec
from .resolver import HUB_ID

if TYPE_CHECKING:
    from .workspace import Workspace

Task = Literal["causal-lm", "masked-lm", "sequence-classification", "feature-extraction"]

# Small Llama-architecture configs: tests, benchmarks and the embedded base.
BUILTIN_CONFIGS: dict[str, dict] = {
    "llama-tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "llama-small": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "llama-base": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "llama-0.5b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096,
                       vocab_size=32000),
}



@dataclass
class ModelSource:
    """Where a model comes from: a folder with weights, optionally plus an adapter folder."""

    ref: str                  # canonical reference (run:<id>, absolute path, hub id, config:<name>)
    folder: Path | None       # HF model folder (None for config:<name>)
    adapter: Path | None = None
    config_name: str | None = None


# ----------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device is 'cuda' but no CUDA GPU is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


# ----------------------------------------------------------------------------------------------
# Checks before any weight is read


def check_model_folder(folder: Path, allow_pickle: bool) -> Literal["safetensors", "pickle"]:
    """Which weight format a folder holds; refuse pickles unless allowed; check every header."""
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: not a model folder (no config.json)")
    shards = sorted(folder.glob("*.safetensors"))
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ModelLoadError(f"{index}: unreadable shard index ({type(err).__name__}: {err})") from None
        missing = sorted(n for n in names if not (folder / n).is_file())
        if missing:
            raise ModelLoadError(f"{folder}: missing shard(s) listed in {index.name}: {', '.join(missing)}")
    if shards:
        for shard in shards:
            read_safetensors_header(shard)
        return "safetensors"
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and not allow_pickle:
        raise ModelLoadError(
            f"{folder}: only pickled weights ({', '.join(sorted(pickles))}); they can run code when "
            "loaded, so they are refused. Convert them to safetensors, or set "
            "model.allow_pickle: true in the recipe (they are then loaded with weights_only=True)."
        )
    if not pickles:
        raise ModelLoadError(f"{folder}: no weights found (*.safetensors)")
    return "pickle"


# ----------------------------------------------------------------------------------------------
# Resolving references


ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2")


def is_encoder(folder: Path | None) -> bool:
    """Whether a model folder holds a bidirectional encoder (read from its config.json)."""
    if folder is None or not (Path(folder) / "config.json").is_file():
        return False
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    return config.get("model_type") in ENCODER_MODEL_TYPES


def resolve_source(ref: str, workspace: "Workspace | None" = None, *,
                   adapter_base: ModelSource | None = None) -> ModelSource:
    """Turn a model reference into folders to load (see ModelSpec.path for the forms).

    A path (and the base an adapter folder's config names) goes through the resolver in force
    (`workbench.resolver`); what a run recorded is read as recorded. `adapter_base`: for an adapter
    (folder or run), the base to put under it instead of the one its `adapter_config.json` (or
    run) records, which is then not resolved at all: no download of a base the caller did not ask
    for.
    """
    if ref == "default":
        if workspace is None:
            raise ModelLoadError("the embedded default base needs a workspace")
        return resolve_source(f"run:{default_base(workspace).id}", workspace)
    if ref.startswith("config:"):
        name = ref.split(":", 1)[1]
        builtin_config(name)
        return ModelSource(ref=ref, folder=None, config_name=name)
    if ref.startswith("run:"):
        if workspace is None:
            raise ModelLoadError(f"'{ref}' needs a workspace")
        return _source_of_run(ref, workspace, adapter_base)
    if ref.startswith("stage:"):
        raise ModelLoadError(f"'{ref}' refers to a pipeline stage and only works inside a pipeline")
    path = resolver.current().path(ref, "model")
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path}: a model is a folder (config.json + weights), not a file")
        resolver.current().folder_contents(path, "model")
        if is_adapter_folder(path):
            if adapter_base is None:
                base = recorded_base(path)
                if not base:
                    raise ModelLoadError(f"{path}: the adapter's config names no base model "
                                         "(base_model_name_or_path)")
                adapter_base = resolve_source(base, workspace)
            return ModelSource(ref=str(path), folder=adapter_base.folder, adapter=path,
                               config_name=adapter_base.config_name)
        return ModelSource(ref=str(path), folder=path)
    if HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        return ModelSource(ref=ref, folder=_download_from_hub(ref))
    raise ModelLoadError(f"model '{ref}' not found: no such folder, and not a hub id (org/name)")


DEFAULT_BASE_NAME = "default-base"  # the pretrain run that `default` names
_default_base_builder: Callable[["Workspace"], Any] | None = None


def set_default_base_builder(build: Callable[["Workspace"], Any]) -> None:
    """How `default` is built when a workspace has none yet (`workbench.base` registers the
    pretraining stage; loading code here stays free of stages)."""
    global _default_base_builder
    _default_base_builder = build


def default_base(workspace: "Workspace"):
    """The workspace's finished default base run, built first (once) when there is none."""
    found = workspace.latest("pretrain", DEFAULT_BASE_NAME)
    if found is not None:
        return found
    if _default_base_builder is None:
        raise ModelLoadError(f"no embedded default base in {workspace.root} yet; build it with "
                             "`workbench run examples/pretrain-default-base.yaml`")
    return _default_base_builder(workspace)


def _source_of_run(ref: str, workspace: "Workspace", adapter_base: ModelSource | None = None) -> ModelSource:
    run = workspace.get(ref)
    info = run.info
    if info.get("status") != "done":
        raise ModelLoadError(f"run {run.id} is {run.status}, not done; it has no finished model")
    outputs = info.get("outputs", {})
    if "model" in outputs:
        return ModelSource(ref=f"run:{run.id}", folder=run.path(outputs["model"]))
    if "adapter" in outputs:
        if adapter_base is not None:
            base = adapter_base
        else:
            with resolver.workspace_record():
                base = resolve_source(outputs["base"], workspace)
        return ModelSource(ref=f"run:{run.id}", folder=base.folder, adapter=run.path(outputs["adapter"]),
                           config_name=base.config_name)
    raise ModelLoadError(f"run {run.id} ({info.get('kind')}) produced no model or adapter")


def recorded_base(folder: Path) -> str | None:
    """The base an adapter folder records (`base_model_name_or_path` of its config file), or None."""
    config_file = next((Path(folder) / name for name in adapter_config_files()
                        if (Path(folder) / name).is_file()), None)
    if config_file is None:
        return None
    return json.loads(config_file.read_text()).get("base_model_name_or_path") or None


def resolve_local_source(ref: str, workspace: "Workspace | None" = None) -> ModelSource | None:
    """`resolve_source` without the network: a hub id only from the local hub cache. None when
    `ref` cannot be resolved on this machine (not downloaded, a folder that is gone, ...)."""
    try:
        if HUB_ID.match(ref) and not Path(ref).expanduser().exists():
            return ModelSource(ref=ref, folder=_download_from_hub(ref, local_only=True))
        return resolve_source(ref, workspace)
    except (ModelLoadError, LookupError):
        return None


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set now (the hub library reads them only once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _download_from_hub(repo_id: str, local_only: bool = False) -> Path:
    """Fetch a hub model's configs, tokenizer and safetensors; a clear error when offline.
    `local_only`: from the local hub cache only, never from the network."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
            local_files_only=local_only or _hub_offline(),
        )
    except Exception as err:  # noqa: BLE001 - every hub failure becomes one clear message
        raise ModelLoadError(
            f"model '{repo_id}' is not a local folder, and the Hugging Face hub could not provide it "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Without network "
            "access, download the model elsewhere and pass its local folder."
        ) from None
    return Path(folder)


# ----------------------------------------------------------------------------------------------
# Loading


def builtin_config(name: str) -> dict:
    """The parameters of a built-in Llama config; a clear error for an unknown name."""
    if name not in BUILTIN_CONFIGS:
        raise ModelLoadError(f"unknown built-in config '{name}' (known: {', '.join(BUILTIN_CONFIGS)})")
    return BUILTIN_CONFIGS[name]


def build_model_from_config(name: str, vocab_size: int, seed: int = 0, **overrides):
    """A randomly initialised Llama from a built-in config (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    params = {**builtin_config(name), **overrides}
    params.setdefault("vocab_size", vocab_size)
    config = LlamaConfig(tie_word_embeddings=False, **params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _auto_class(task: Task):
    import transformers

    return {
        "causal-lm": transformers.AutoModelForCausalLM,
        "masked-lm": transformers.AutoModelForMaskedLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "feature-extraction": transformers.AutoModel,
    }[task]


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{folder}: could not load the tokenizer ({err})") from None


def load_model(spec: ModelSpec, workspace: "Workspace | None" = None, task: Task = "causal-lm",
               num_labels: int | None = None, with_adapter: bool = True):
    """Load (model, tokenizer, source) for a ModelSpec. An adapter reference loads base + adapter."""
    resolver.current().check_remote_code(spec.trust_remote_code)
    resolver.current().check_pickle(spec.allow_pickle)
    source = resolve_source(spec.path, workspace)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    if source.config_name is not None:
        raise ModelLoadError(f"'{spec.path}' is a random-init config; it has no tokenizer to load")
    fmt = check_model_folder(source.folder, spec.allow_pickle)
    kwargs: dict = dict(dtype=dtype, trust_remote_code=spec.trust_remote_code,
                        use_safetensors=fmt == "safetensors")
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    try:
        quant = bnb_quantization_config(spec.load_in, dtype)
    except BitsAndBytesUnavailable as err:
        raise ModelLoadError(str(err)) from None
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device.index or 0})
    try:
        model = _auto_class(task).from_pretrained(source.folder, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{source.folder}: could not load the model ({type(err).__name__}: {err})") from None
    if quant is None:
        model.to(device)
    tokenizer = load_tokenizer(source.folder, spec.trust_remote_code)
    check_finite(model, source.folder)
    if source.adapter is not None and with_adapter:
        check_adapter_finite(source.adapter)
        model = load_adapter(model, source.adapter)
    model.eval()
    return model, tokenizer, source


def _refuse_nonfinite(found: list[tuple[str, int]], folder: Path, what: str) -> None:
    """Raise a ModelLoadError naming the folder and the tensors with NaN / inf values, if any."""
    if not found:
        return
    shown = "; ".join(f"{name}: {count} NaN / inf values" for name, count in found[:5])
    more = f"; and {len(found) - 5} more tensors" if len(found) > 5 else ""
    raise ModelLoadError(f"{folder}: the {what} holds NaN / inf weights ({shown}{more}). Nothing "
                         "can be trained or evaluated on it: the files are damaged or come from a "
                         "run that diverged; use an earlier checkpoint or re-export the model.")


def check_finite(model, folder: Path) -> None:
    """Refuse a loaded model with NaN / inf in any weight or buffer, naming each such tensor."""
    tensors = dict(model.named_parameters(remove_duplicate=True))
    tensors.update(model.named_buffers(remove_duplicate=True))
    _refuse_nonfinite(nonfinite_counts(tensors.items()), folder, "model")


def check_adapter_finite(folder: Path) -> None:
    """Refuse an adapter folder whose safetensors files hold NaN / inf, naming each such tensor
    (files in sub-folders, e.g. a MixDA task LoRA, included)."""
    from safetensors import safe_open

    found = []
    for path in sorted(Path(folder).rglob("*.safetensors")):
        read_safetensors_header(path)  # a damaged file is named before it is read
        with safe_open(str(path), framework="pt") as f:
            found += nonfinite_counts((name, f.get_tensor(name)) for name in f.keys())
    _refuse_nonfinite(found, folder, "adapter")


def load_adapter(model, folder: Path, trainable: bool = False):
    """Attach a saved adapter folder to its loaded base model, by the method that saved it."""
    method = method_of_folder(folder)
    if method is None or not is_adapter_folder(folder):
        raise ModelLoadError(f"{folder}: not an adapter folder (none of "
                             f"{', '.join(adapter_config_files())}, or of a kind no method knows)")
    return method.load(model, Path(folder), trainable=trainable)


def embedding_fingerprint(model) -> str:
    """SHA-256 (first 16 hex digits) of the input embedding table: identifies a base model."""
    import hashlib

    weight = model.get_input_embeddings().weight.detach().float().cpu().contiguous()
    return hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:16]


def max_sequence_length(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)
