"""Evaluation: perplexity and bits per byte on held-out text, exact match on held-out questions,
and the gain-vs-forgetting report of a model against its base.

- Perplexity = exp(Σ NLL / target tokens) over packed rows of `seq_len` tokens.
- Bits per byte = Σ NLL / ln 2 / UTF-8 bytes of the predicted text (tokenizer-independent).
- Exact match: greedy decoding; the first k words of the output (k = words in the answer), with
  surrounding punctuation stripped, must equal the answer, case-insensitively.
- Domain gain = 1 − ppl_model/ppl_base on domain text; general forgetting = ppl_model/ppl_base − 1
  on general text (both in percent; positive gain is good, positive forgetting is bad).
"""

from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Callable

import torch

from .data import (IGNORE, sentences, encode_documents, encode_labelled, pack, read_examples,
                   read_labelled, read_texts)
from .engine import masked_nll_sum, next_token_nll_sum
from .progress import phase as progress_phase
from .sections import EvalSpec

EVALUATING = "evaluating"  # the progress phase: one event per batch (`workbench.progress`)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _batches(rows: int, batch_size: int) -> int:
    return -(-rows // batch_size)


def _packed_texts(texts: list[str], tokenizer, seq_len: int, max_tokens: int, source: str):
    """The first max_tokens tokens of `texts` packed into rows of `seq_len`."""
    stream, labels = encode_documents(texts, tokenizer)
    limit = max(seq_len, max_tokens)
    return pack(stream[:limit], labels[:limit], seq_len, source)


def _no_batch_report() -> None:
    pass


@torch.no_grad()
def text_metrics(model, tokenizer, texts: list[str], seq_len: int, max_tokens: int,
                 batch_size: int, source: str = "text") -> dict:
    """Perplexity, bits per byte, mean NLL and token count on `texts` (first max_tokens tokens)."""
    packed = _packed_texts(texts, tokenizer, seq_len, max_tokens, source)
    return _text_metrics_of(model, tokenizer, packed, batch_size)


@torch.no_grad()
def _text_metrics_of(model, tokenizer, packed, batch_size: int,
                     on_batch: Callable[[], None] = _no_batch_report) -> dict:
    device = _device(model)
    nll, tokens, nbytes = 0.0, 0, 0
    for start in range(0, len(packed), batch_size):
        x = packed.inputs[start:start + batch_size].to(device)
        y = packed.labels[start:start + batch_size].to(device)
        nll += float(next_token_nll_sum(model(input_ids=x, use_cache=False).logits, y))
        tokens += int((y[:, 1:] != IGNORE).sum())
        for row in x[:, 1:].tolist():
            nbytes += len(tokenizer.decode(row, skip_special_tokens=True).encode("utf-8"))
        on_batch()
    mean = nll / tokens
    return {"ppl": math.exp(mean), "bpb": nll / math.log(2) / max(1, nbytes),
            "nll": mean, "tokens": tokens}


def _normalise(text: str) -> str:
    return text.strip().strip(string.punctuation + " ").casefold()


def is_exact_match(prediction: str, answer: str) -> bool:
    """First k words of the prediction (k = words in the answer) equal the answer."""
    words = prediction.split()
    k = max(1, len(answer.split()))
    return _normalise(" ".join(words[:k])) == _normalise(answer)


@torch.no_grad()
def qa_accuracy(model, tokenizer, examples, max_new_tokens: int, batch_size: int,
                on_batch: Callable[[], None] = _no_batch_report) -> dict:
    """Greedy exact-match accuracy over (prompt, answer) examples; `on_batch()` after each batch."""
    device = _device(model)
    stop_ids = [tokenizer.eos_token_id]
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    if isinstance(end_id, int) and end_id != tokenizer.unk_token_id:
        stop_ids.append(end_id)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    correct = 0
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            enc = tokenizer([e.prompt for e in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids)
            for example, ids in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
                text = tokenizer.decode(ids, skip_special_tokens=True).split("\n")[0]
                correct += is_exact_match(text, example.answer)
            on_batch()
    finally:
        tokenizer.padding_side = side
    return {"accuracy": correct / max(1, len(examples)), "n": len(examples)}


def question_set_name(source: str) -> str:
    return source.split(":", 1)[1] if source.startswith("world:") else Path(source).stem


def evaluate_model(model, tokenizer, spec: EvalSpec, seq_len: int, world_seed: int = 0,
                   world_size: str = "default", text_only: bool = False) -> dict:
    """All held-out metrics of one model as a flat dict (progress: one event per batch, over
    all the sets)."""
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    texts = [(label, _packed_texts(read_texts(source, world_seed, world_size), tokenizer, seq_len,
                                   spec.max_tokens, source))
             for label, source in (("domain", spec.domain_text), ("general", spec.general_text))]
    questions = [] if text_only else [
        (source, read_examples(source, world_seed, world_size)[:spec.max_questions])
        for source in spec.questions]
    batches = sum(_batches(len(packed), spec.batch_size) for _, packed in texts) + \
        sum(_batches(len(examples), spec.batch_size) for _, examples in questions)
    with progress_phase(EVALUATING, batches, "batch") as events:
        for label, packed in texts:
            for key, value in _text_metrics_of(model, tokenizer, packed, spec.batch_size,
                                               events.advance).items():
                metrics[f"{label}_{key}"] = value
        for source, examples in questions:
            result = qa_accuracy(model, tokenizer, examples, spec.max_new_tokens, spec.batch_size,
                                 events.advance)
            metrics[f"acc_{question_set_name(source)}"] = result["accuracy"]
    if was_training:
        model.train()
    return metrics


def gain_forgetting(base: dict, model: dict) -> dict:
    """The report: both metric sets, domain gain, general forgetting and accuracy changes."""
    report = {
        "base": base, "model": model,
        "domain_gain_pct": 100.0 * (1.0 - model["domain_ppl"] / base["domain_ppl"]),
        "general_forgetting_pct": 100.0 * (model["general_ppl"] / base["general_ppl"] - 1.0),
        "accuracy_change_pts": {k: 100.0 * (model[k] - base[k]) for k in base
                                if k.startswith("acc_") and k in model},
    }
    return report


def format_report(report: dict, labels: tuple[str, str] = ("base", "adapted")) -> str:
    """The report as a terminal table plus a one-line verdict."""
    base, model = report["base"], report["model"]
    rows = [("metric", labels[0], labels[1], "change")]
    for key in ("domain_ppl", "domain_bpb", "general_ppl", "general_bpb"):
        if key not in base or key not in model:
            continue
        rel = 100.0 * (model[key] / base[key] - 1.0)
        rows.append((key.replace("_", " "), f"{base[key]:.3f}", f"{model[key]:.3f}", f"{rel:+.1f}%"))
    for key in sorted(k for k in base if k.startswith("acc_") and k in model):
        rows.append((key.replace("acc_", "accuracy "), f"{100 * base[key]:.1f}%",
                     f"{100 * model[key]:.1f}%", f"{100 * (model[key] - base[key]):+.1f} pts"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                       for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    lines.append(f"Domain gain: {report['domain_gain_pct']:+.1f}% (lower domain perplexity is a gain). "
                 f"General forgetting: {report['general_forgetting_pct']:+.1f}% "
                 "(higher general perplexity is forgetting).")
    return "\n".join(lines)


def comparison_report(columns: dict[str, dict], reference: str = "base") -> dict:
    """Several models side by side: each column's metrics, and its domain gain, general forgetting
    and accuracy changes against the `reference` column (the definitions of `gain_forgetting`)."""
    if reference not in columns:
        raise ValueError(f"reference column {reference!r} is not among {', '.join(columns)}")
    against = {label: gain_forgetting(columns[reference], metrics) for label, metrics in columns.items()}
    return {"reference": reference, "columns": columns,
            "domain_gain_pct": {k: r["domain_gain_pct"] for k, r in against.items()},
            "general_forgetting_pct": {k: r["general_forgetting_pct"] for k, r in against.items()},
            "accuracy_change_pts": {k: r["accuracy_change_pts"] for k, r in against.items()}}


def format_comparison(report: dict) -> str:
    """A `comparison_report` as a terminal table, one column per model."""
    columns, labels = report["columns"], list(report["columns"])
    rows = [("metric", *labels)]
    for key in ("domain_ppl", "domain_bpb", "general_ppl", "general_bpb"):
        if all(key in columns[label] for label in labels):
            rows.append((key.replace("_", " "), *(f"{columns[label][key]:.3f}" for label in labels)))
    accuracies = sorted(k for k in columns[report["reference"]] if k.startswith("acc_")
                        and all(k in columns[label] for label in labels))
    for key in accuracies:
        rows.append((key.replace("acc_", "accuracy "), *(f"{100 * columns[label][key]:.1f}%" for label in labels)))
    rows.append((f"domain gain vs {report['reference']}",
                 *(f"{report['domain_gain_pct'][label]:+.1f}%" for label in labels)))
    rows.append((f"general forgetting vs {report['reference']}",
                 *(f"{report['general_forgetting_pct'][label]:+.1f}%" for label in labels)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                       for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 2, "-" * len(lines[0]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Sequence classification (encoders and classification heads)

EMBEDDING_SENTENCES = 64


def _pooled(model, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the last hidden state over real tokens (virtual prompt tokens left out)."""
    hidden = model(input_ids=inputs, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    hidden = hidden[:, -inputs.shape[1]:].float()
    weights = mask.unsqueeze(-1).float()
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


@torch.no_grad()
def classifier_metrics(model, tokenizer, spec: EvalSpec, seq_len: int, world_seed: int = 0,
                       world_size: str = "default") -> tuple[dict, torch.Tensor]:
    """Accuracy and mean loss on `spec.labelled`, plus pooled embeddings of general sentences
    (to measure how far the encoder's representation of general text moved)."""
    was_training = model.training
    model.eval()
    device = _device(model)
    texts, labels, _ = read_labelled(spec.labelled, world_seed, world_size)
    packed = encode_labelled(texts, labels, tokenizer, seq_len, spec.labelled)
    correct, loss = 0, 0.0
    with progress_phase(EVALUATING, _batches(len(packed), spec.batch_size) + 1, "batch") as events:
        for start in range(0, len(packed), spec.batch_size):
            x = packed.inputs[start:start + spec.batch_size].to(device)
            y = packed.labels[start:start + spec.batch_size, 0].to(device)
            logits = model(input_ids=x, attention_mask=(x != tokenizer.pad_token_id).long()).logits.float()
            loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            events.advance()
        embeddings = general_embeddings(model, tokenizer, spec, seq_len, world_seed, world_size)
        events.advance()
    model.train(was_training)
    return {"accuracy": correct / len(packed), "loss": loss / len(packed), "n": len(packed)}, embeddings


@torch.no_grad()
def general_embeddings(model, tokenizer, spec: EvalSpec, seq_len: int, world_seed: int = 0,
                       world_size: str = "default") -> torch.Tensor:
    """Mean-pooled last hidden states of the first general sentences (how an encoder represents
    general text; compared base vs adapted by cosine)."""
    general = sentences(read_texts(spec.general_text, world_seed, world_size))[:EMBEDDING_SENTENCES]
    enc = tokenizer(general, truncation=True, max_length=seq_len, padding=True,
                    return_tensors="pt").to(_device(model))
    return _pooled(model, enc["input_ids"], enc["attention_mask"]).cpu()


@torch.no_grad()
def masked_text_metrics(model, tokenizer, texts: list[str], seq_len: int, max_tokens: int,
                        batch_size: int, masker, source: str = "text") -> dict:
    """Masked-LM perplexity: exp(mean NLL of the masked tokens) on `texts` (first max_tokens
    tokens), with the masker's deterministic masks."""
    packed = _packed_texts(texts, tokenizer, seq_len, max_tokens, source)
    return _masked_text_metrics_of(model, packed, batch_size, masker)


@torch.no_grad()
def _masked_text_metrics_of(model, packed, batch_size: int, masker,
                            on_batch: Callable[[], None] = _no_batch_report) -> dict:
    device = _device(model)
    nll, tokens = 0.0, 0
    for start in range(0, len(packed), batch_size):
        corrupted, targets = masker(packed.inputs[start:start + batch_size])
        logits = model(input_ids=corrupted.to(device)).logits
        nll += float(masked_nll_sum(logits, targets.to(device)))
        tokens += int((targets != IGNORE).sum())
        on_batch()
    mean = nll / max(1, tokens)
    return {"ppl": math.exp(mean), "nll": mean, "tokens": tokens}


def masked_lm_metrics(model, tokenizer, spec: EvalSpec, seq_len: int, masker, world_seed: int = 0,
                      world_size: str = "default", embeddings: bool = True) -> tuple[dict, torch.Tensor | None]:
    """Masked-LM perplexity on held-out domain and general text, plus general-text embeddings."""
    was_training = model.training
    model.eval()
    metrics = {}
    texts = [(kind, _packed_texts(read_texts(source, world_seed, world_size), tokenizer, seq_len,
                                  spec.max_tokens, source))
             for kind, source in (("domain", spec.domain_text), ("general", spec.general_text))]
    batches = sum(_batches(len(packed), spec.batch_size) for _, packed in texts) + int(embeddings)
    with progress_phase(EVALUATING, batches, "batch") as events:
        for kind, packed in texts:
            m = _masked_text_metrics_of(model, packed, spec.batch_size, masker, events.advance)
            metrics.update({f"{kind}_ppl": m["ppl"], f"{kind}_nll": m["nll"]})
        vectors = general_embeddings(model, tokenizer, spec, seq_len, world_seed, world_size) \
            if embeddings else None
        if embeddings:
            events.advance()
    model.train(was_training)
    return metrics, vectors


def embedding_cosine(base_embeddings: torch.Tensor, embeddings: torch.Tensor) -> float:
    """Mean cosine between two sets of sentence embeddings (row by row)."""
    return float(torch.nn.functional.cosine_similarity(base_embeddings, embeddings, dim=-1).mean())


def classifier_report(base: dict, model: dict, base_embeddings: torch.Tensor,
                      embeddings: torch.Tensor) -> dict:
    """Task gain (accuracy points over the base with its untrained head) and general forgetting
    (1 − mean cosine between base and adapted embeddings of general sentences, in percent)."""
    cosine = embedding_cosine(base_embeddings, embeddings)
    return {"base": base, "model": model, "task_gain_pts": 100.0 * (model["accuracy"] - base["accuracy"]),
            "general_embedding_cosine": cosine, "general_forgetting_pct": 100.0 * (1.0 - cosine)}


def format_classifier_report(report: dict) -> str:
    base, model = report["base"], report["model"]
    return "\n".join([
        f"{'metric':22s} {'base':>8s} {'adapted':>8s}",
        f"{'task accuracy':22s} {100 * base['accuracy']:7.1f}% {100 * model['accuracy']:7.1f}%",
        f"{'task loss':22s} {base['loss']:8.3f} {model['loss']:8.3f}",
        "",
        f"Task gain: {report['task_gain_pts']:+.1f} pts accuracy. General forgetting: "
        f"{report['general_forgetting_pct']:.2f}% (1 − cosine of general-text embeddings, base vs adapted).",
    ])
