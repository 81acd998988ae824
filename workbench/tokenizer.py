"""A small byte-level BPE tokenizer trained locally, and a unigram perplexity baseline."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .world import ASSISTANT_TOKEN, END_TOKEN, EOS_TOKEN, USER_TOKEN

SPECIAL_TOKENS = [EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN]

# Renders [{"role": "user"|"assistant", "content": ...}] in the chat format of workbench.world.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '" + USER_TOKEN + "\\n' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '" + ASSISTANT_TOKEN + "\\n' + message['content'] + '" + END_TOKEN + "' }}"
    "{%- else -%}"
    "{{ raise_exception('only user and assistant messages are supported') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '" + ASSISTANT_TOKEN + "\\n' }}"
    "{%- endif -%}"
)


def _bpe_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer (no prefix space, byte-level decoder)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``; the special tokens get ids 0-3 and are never split."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256}, got {vocab_size}")
    tokenizer = _bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        bos_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
    )


def unigram_perplexity(train_ids: list[list[int]], eval_ids: list[list[int]], vocab_size: int) -> float:
    """Perplexity on ``eval_ids`` of an add-one-smoothed unigram model fitted on ``train_ids``.

    p(t) = (count(t) + 1) / (N + vocab_size), perplexity = exp(mean of -log p(t) over eval tokens).
    """
    counts = Counter(token for seq in train_ids for token in seq)
    total = sum(counts.values())
    _check_ids(counts, vocab_size, "train_ids")
    eval_tokens = [token for seq in eval_ids for token in seq]
    if not eval_tokens:
        raise ValueError("eval_ids holds no tokens")
    _check_ids(Counter(eval_tokens), vocab_size, "eval_ids")
    denominator = total + vocab_size
    nll = sum(math.log(denominator / (counts[token] + 1)) for token in eval_tokens)
    return math.exp(nll / len(eval_tokens))


def _check_ids(counts: Counter, vocab_size: int, name: str) -> None:
    """Raise ValueError if any id is outside ``range(vocab_size)``."""
    bad = [token for token in counts if not 0 <= token < vocab_size]
    if bad:
        raise ValueError(f"{name} has ids outside range(0, {vocab_size}): {sorted(bad)[:5]}")
