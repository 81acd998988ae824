"""Evaluation metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.data import encode_documents
from workbench.evaluate import format_report, gain_forgetting, is_exact_match, text_metrics
from workbench.models import build_model_from_config
from workbench.tokenizer import train_tokenizer
from workbench.world import generate_world


@pytest.mark.slow
def test_uniform_model_has_perplexity_equal_to_vocab_size():
    world = generate_world(0, "tiny")
    tokenizer = train_tokenizer(world.general_train, 400)
    vocab = len(tokenizer)
    model = build_model_from_config("llama-tiny", vocab_size=vocab).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0 → p = 1/V for every token
    texts = world.general_eval[:20]
    m = text_metrics(model, tokenizer, texts, seq_len=32, max_tokens=10**6, batch_size=4)
    assert m["ppl"] == pytest.approx(vocab, rel=1e-5)
    stream, _ = encode_documents(texts, tokenizer)
    rows = len(stream) // 32
    targets = [t for r in range(rows) for t in stream[r * 32 + 1:(r + 1) * 32]]
    assert m["tokens"] == len(targets)
    # bytes of the predicted tokens, token by token (ASCII text: bytes add up per token)
    nbytes = sum(len(tokenizer.decode([t], skip_special_tokens=True).encode()) for t in targets)
    assert m["bpb"] == pytest.approx(len(targets) * math.log(vocab) / math.log(2) / nbytes, rel=1e-5)


def test_exact_match_rule():
    assert is_exact_match("Marn.", "Marn")
    assert is_exact_match(" marn and more words", "Marn")
    assert is_exact_match("New Tolla is big", "New Tolla")
    assert not is_exact_match("Marnia", "Marn")
    assert not is_exact_match("", "Marn")


def test_gain_and_forgetting_by_hand():
    base = {"domain_ppl": 40.0, "general_ppl": 10.0, "domain_bpb": 2.0, "general_bpb": 1.0,
            "acc_general_qa_eval": 0.50}
    model = {"domain_ppl": 30.0, "general_ppl": 11.0, "domain_bpb": 1.8, "general_bpb": 1.1,
             "acc_general_qa_eval": 0.45}
    report = gain_forgetting(base, model)
    assert report["domain_gain_pct"] == pytest.approx(25.0)
    assert report["general_forgetting_pct"] == pytest.approx(10.0)
    assert report["accuracy_change_pts"]["acc_general_qa_eval"] == pytest.approx(-5.0)
    table = format_report(report)
    assert "domain ppl" in table and "-25.0%" in table and "-5.0 pts" in table
