"""Tests of the embedded default world and the local tokenizer."""

from __future__ import annotations

import json
import math
import re

import pytest
from transformers import AutoTokenizer

from workbench import world as W
from workbench.tokenizer import SPECIAL_TOKENS, train_tokenizer, unigram_perplexity
from workbench.world import (
    ASSISTANT_TOKEN,
    END_TOKEN,
    EOS_TOKEN,
    QA,
    USER_TOKEN,
    WORLD_SIZES,
    chat_prompt,
    generate_world,
    read_world,
    split_text,
    write_world,
)

SEED = 7


@pytest.fixture(scope="module")
def world():
    return generate_world(SEED, "tiny")


@pytest.fixture(scope="module")
def tokenizer(world):
    return train_tokenizer(world.general_train + world.domain_train + world.split_text("instruct_train"))


def _sentences(docs: list[str]) -> list[str]:
    return [s for doc in docs for s in re.split(r"(?<=[.?])\s+", doc)]


def _mentions(sentence: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", sentence) is not None


def _times_stated(fact: W.Fact, sentences: list[str]) -> int:
    return sum(_mentions(s, fact.subject) and _mentions(s, fact.answer) for s in sentences)


def _cloze_index(facts: list[W.Fact], relations) -> dict[str, W.Fact]:
    clozes = {rel.name: rel.cloze for rel in relations}
    return {W._capitalize(clozes[f.relation].format(e=f.subject)): f for f in facts}


def _question_index(facts: list[W.Fact]) -> dict[str, W.Fact]:
    questions = {rel.name: rel.questions for rel in W.GENERAL_RELATIONS}
    return {chat_prompt(q.format(e=f.subject)): f for f in facts for q in questions[f.relation]}


# --- the world -----------------------------------------------------------------------------


def test_chat_format():
    assert chat_prompt("Hi?") == "<|user|>\nHi?\n<|assistant|>\n"
    tokens = (USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN, EOS_TOKEN)
    assert tokens == ("<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")
    assert W.qa_text(QA(chat_prompt("Hi?"), "Yes")) == chat_prompt("Hi?") + "Yes" + END_TOKEN
    assert W.qa_text(QA("The capital of Veldor is", "Marn")) == "The capital of Veldor is Marn"


def test_same_seed_gives_identical_world(world, tmp_path):
    again = generate_world(SEED, "tiny")
    assert again == world
    write_world(world, tmp_path / "a")
    write_world(again, tmp_path / "b")
    for path in sorted((tmp_path / "a").iterdir()):
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes()


def test_different_seed_gives_different_world(world):
    other = generate_world(SEED + 1, "tiny")
    assert other.seed != world.seed
    assert set(other.general_train).isdisjoint(world.general_train)
    assert set(other.domain_train).isdisjoint(world.domain_train)
    assert W.general_facts(SEED) != W.general_facts(SEED + 1)
    assert W.domain_facts(SEED) != W.domain_facts(SEED + 1)


def test_tiny_sizes(world):
    for name, count in WORLD_SIZES["tiny"].items():
        assert len(world.split(name)) == count, name


def test_default_sizes():
    big = generate_world(0)
    for name, count in WORLD_SIZES["default"].items():
        assert len(big.split(name)) == count, name
    assert len(set(big.general_train)) == len(big.general_train)
    assert len({(qa.prompt, qa.answer) for qa in big.general_qa_eval}) == len(big.general_qa_eval)


def test_unknown_size_and_split(world):
    with pytest.raises(ValueError, match="tiny, default"):
        generate_world(0, "huge")
    with pytest.raises(ValueError, match="general_train.*domain_cloze_eval"):
        world.split("nonsense")
    with pytest.raises(ValueError, match="valid splits"):
        split_text(world, "nonsense")


def test_documents_are_clean(world):
    for name in W.DOC_SPLITS:
        for doc in world.split(name):
            assert doc.isascii() and doc == doc.strip()
            assert "\n" not in doc and "\r" not in doc
            assert not any(token in doc for token in SPECIAL_TOKENS)
            assert 30 <= len(doc.split()) <= 130


def test_eval_documents_differ_from_training(world):
    assert set(world.general_eval).isdisjoint(world.general_train)
    assert set(world.domain_eval).isdisjoint(world.domain_train)
    assert len(set(world.general_eval)) == len(world.general_eval)


def test_split_text_renders_qa_items(world):
    texts = split_text(world, "instruct_train")
    assert texts[0] == world.instruct_train[0].prompt + world.instruct_train[0].answer + END_TOKEN
    assert split_text(world, "general_train") == world.general_train
    cloze = world.general_cloze_eval[0]
    assert world.split_text("general_cloze_eval")[0] == f"{cloze.prompt} {cloze.answer}"


def test_qa_items_are_well_formed(world):
    for name in W.QA_SPLITS:
        for qa in world.split(name):
            assert qa.answer and qa.answer == qa.answer.strip() and " " not in qa.answer
            assert END_TOKEN not in qa.answer
    for qa in world.instruct_train + world.general_qa_eval:
        assert qa.prompt.startswith(USER_TOKEN + "\n") and qa.prompt.endswith("\n" + ASSISTANT_TOKEN + "\n")
    for qa in world.general_cloze_eval + world.domain_cloze_eval:
        assert qa.prompt == qa.prompt.strip() and USER_TOKEN not in qa.prompt


def test_cloze_facts_are_stated_in_training(world):
    cases = [
        (world.general_cloze_eval, W.general_facts(SEED), W.GENERAL_RELATIONS, world.general_train),
        (world.domain_cloze_eval, W.domain_facts(SEED), W.DOMAIN_RELATIONS, world.domain_train),
    ]
    for items, facts, relations, corpus in cases:
        index = _cloze_index(facts, relations)
        sentences = _sentences(corpus)
        for qa in items:
            fact = index[qa.prompt]
            assert qa.answer == fact.answer
            assert _times_stated(fact, sentences) >= 2, fact


@pytest.mark.slow
def test_cloze_form_is_seen_in_default_training():
    big = generate_world(0)
    cases = ((big.general_cloze_eval, big.general_train), (big.domain_cloze_eval, big.domain_train))
    for items, corpus in cases:
        text = " ".join(corpus)
        for qa in items:
            assert text.count(f"{qa.prompt} {qa.answer}.") + text.count(f"{qa.prompt} {qa.answer} ") >= 1, qa
    sentences = _sentences(big.general_train)
    facts = _cloze_index(W.general_facts(0), W.GENERAL_RELATIONS)
    for qa in big.general_cloze_eval[:40]:
        assert _times_stated(facts[qa.prompt], sentences) >= 10


def test_qa_eval_pairs_are_held_out_but_stated(world):
    index = _question_index(W.general_facts(SEED))
    train_pairs = set()
    for qa in world.instruct_train:
        fact = index[qa.prompt]
        assert qa.answer == fact.answer
        train_pairs.add((fact.subject, fact.relation))
    sentences = _sentences(world.general_train)
    for qa in world.general_qa_eval:
        fact = index[qa.prompt]
        assert qa.answer == fact.answer
        assert (fact.subject, fact.relation) not in train_pairs
        assert _times_stated(fact, sentences) >= 2, fact


def test_domain_vocabulary_is_absent_from_general_corpus(world):
    general_words = set(re.findall(r"[A-Za-z]+", " ".join(world.general_train + world.general_eval)))
    general_words |= set(re.findall(r"[A-Za-z]+", " ".join(world.split_text("instruct_train"))))
    facts = W.domain_facts(SEED)
    domain_words = {f.subject for f in facts} | {f.answer for f in facts if f.answer.isalpha()}
    domain_words -= set(W.NUMBER_WORDS)
    domain_words |= set(W.DOMAIN_VOCABULARY)
    assert general_words.isdisjoint(domain_words)
    assert all(word in " ".join(world.domain_train) for word in ("Quorrax", "Kzarin", "qeths"))


def test_template_counts():
    for rel in W.GENERAL_RELATIONS + W.DOMAIN_RELATIONS:
        assert len(set(rel.statements())) >= 8, rel.name
    for rel in W.GENERAL_RELATIONS:
        assert len(rel.questions) >= 5, rel.name


def test_write_world_round_trip(world, tmp_path):
    write_world(world, tmp_path)
    lines = (tmp_path / "general_train.txt").read_text(encoding="utf-8").splitlines()
    assert lines == world.general_train
    record = json.loads((tmp_path / "general_qa_eval.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert record == {"prompt": world.general_qa_eval[0].prompt, "answer": world.general_qa_eval[0].answer}
    assert read_world(tmp_path) == world
    assert not list(tmp_path.glob(".*.tmp"))


# --- the tokenizer -------------------------------------------------------------------------


def test_tokenizer_round_trip(tokenizer, world):
    for doc in world.general_eval[:5] + world.domain_eval[:5]:
        ids = tokenizer(doc)["input_ids"]
        assert tokenizer.decode(ids) == doc
        assert len(ids) < len(doc) / 2


def test_special_tokens_are_single_ids(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert ids == [0, 1, 2, 3]
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tokenizer(token)["input_ids"] == [token_id]
    text = chat_prompt("What is the capital of Veldor?") + "Marn" + END_TOKEN + EOS_TOKEN
    encoded = tokenizer(text)["input_ids"]
    assert [i for i in encoded if i in ids] == [1, 2, 3, 0]
    assert tokenizer.eos_token == tokenizer.pad_token == EOS_TOKEN
    assert tokenizer.bos_token is None


def test_chat_template_matches_chat_prompt(tokenizer):
    question = "What does the glimmet eat?"
    user = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert prompt == chat_prompt(question)
    full = user + [{"role": "assistant", "content": "berries"}]
    rendered = tokenizer.apply_chat_template(full, tokenize=False)
    assert rendered == chat_prompt(question) + "berries" + END_TOKEN


def test_save_and_load_give_same_ids(tokenizer, world, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = world.general_eval[:10] + world.split_text("general_qa_eval")[:10]
    assert loaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    question = "Where does the glimmet live?"
    messages = [{"role": "user", "content": question}]
    prompt = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == chat_prompt(question)
    assert loaded.eos_token == loaded.pad_token == EOS_TOKEN


def test_tokenizer_training_is_deterministic(world):
    first = train_tokenizer(world.general_train, vocab_size=512)
    second = train_tokenizer(world.general_train, vocab_size=512)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert len(first) == 512


def test_unigram_perplexity_by_hand():
    # counts over train: 0 -> 1, 1 -> 2, 2 -> 1, 3 -> 0; N = 4, V = 4, so p(t) = (count + 1) / 8:
    # p(1) = 3/8, p(3) = 1/8. Eval [1, 3]: perplexity = (3/8 * 1/8) ** -0.5 = 8 / sqrt(3).
    value = unigram_perplexity([[0, 1, 1], [2]], [[1], [3]], vocab_size=4)
    assert value == pytest.approx(8 / math.sqrt(3))
    # With no training data every token has p = 1/V, so the perplexity is V.
    assert unigram_perplexity([], [[0, 1, 2]], vocab_size=5) == pytest.approx(5.0)


def test_unigram_perplexity_rejects_bad_input():
    with pytest.raises(ValueError):
        unigram_perplexity([[0, 4]], [[1]], vocab_size=4)
    with pytest.raises(ValueError):
        unigram_perplexity([[0]], [[]], vocab_size=4)
