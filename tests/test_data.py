"""Data: sources, packing without padding, answer-only loss masks, the batch plan, bad files."""

from __future__ import annotations

import json

import pytest
import torch

from workbench.data import (IGNORE, BatchPlan, DataError, Example, Packed, encode_documents,
                            encode_examples, pack, pack_source, read_examples, read_texts)
from workbench.tokenizer import train_tokenizer
from workbench.world import END_TOKEN, chat_prompt, generate_world


@pytest.fixture(scope="module")
def tokenizer():
    world = generate_world(0, "tiny")
    return train_tokenizer(world.general_train + world.domain_train, 512)


def test_packing_fills_every_position(tokenizer):
    texts = ["the river runs north", "a kettle heats water", "bridges cross rivers"] * 20
    stream, labels = encode_documents(texts, tokenizer)
    packed = pack(stream, labels, 16, "texts")
    assert packed.inputs.shape == (len(stream) // 16, 16)
    # rows are consecutive slices of the stream: nothing padded, nothing reordered
    assert packed.inputs.flatten().tolist() == stream[: packed.inputs.numel()]
    assert (packed.labels == packed.inputs).all()
    assert stream.count(tokenizer.eos_token_id) == len(texts)


def test_instruction_loss_is_on_answers_only(tokenizer):
    examples = [Example(chat_prompt("What is the capital of Veldor?"), "Marn")]
    stream, labels = encode_examples(examples, tokenizer)
    prompt_ids = tokenizer(examples[0].prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer("Marn" + END_TOKEN, add_special_tokens=False)["input_ids"]
    assert stream == prompt_ids + answer_ids + [tokenizer.eos_token_id]
    assert labels == [IGNORE] * len(prompt_ids) + answer_ids + [IGNORE]


def test_batch_plan_is_a_function_of_seed_and_step():
    train = Packed(torch.arange(40).view(10, 4), torch.arange(40).view(10, 4))
    replay = Packed(1000 + torch.arange(24).view(6, 4), 1000 + torch.arange(24).view(6, 4))
    plan = BatchPlan(train, replay, batch_size=4, replay_ratio=0.25, seed=7)
    assert (plan.n_train, plan.n_replay) == (3, 1)
    again = BatchPlan(train, replay, batch_size=4, replay_ratio=0.25, seed=7)
    for step in (0, 3, 11):
        assert torch.equal(plan.batch(step)[0], again.batch(step)[0])
    # one epoch = every training row exactly once (steps 0..2 cover 9 of 10 rows, no repeats)
    rows = torch.cat([plan.batch(s)[0][:3, 0] // 4 for s in range(3)]).tolist()
    assert len(set(rows)) == 9
    first = plan.batch(0)[0]
    assert (first[:3] < 1000).all() and (first[3:] >= 1000).all()
    other = BatchPlan(train, replay, batch_size=4, replay_ratio=0.25, seed=8)
    assert not all(torch.equal(plan.batch(s)[0], other.batch(s)[0]) for s in range(4))


def test_world_sources_and_files(tmp_path):
    assert read_texts("world:domain_eval", 0, "tiny")
    assert read_examples("world:general_qa_eval", 0, "tiny")[0].prompt.startswith("<|user|>")
    with pytest.raises(DataError, match="unknown world split 'nope'"):
        read_texts("world:nope", 0, "tiny")
    with pytest.raises(DataError, match="holds questions"):
        read_texts("world:general_qa_eval", 0, "tiny")
    txt = tmp_path / "docs.txt"
    txt.write_text("first doc\n\nsecond doc\n")
    assert read_texts(str(txt)) == ["first doc", "second doc"]
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text(json.dumps({"question": "Who?", "answer": "Me"}) + "\n")
    assert read_examples(str(jsonl)) == [Example(chat_prompt("Who?"), "Me")]


def test_bad_data_files_are_refused_with_their_name(tmp_path, tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty.txt: data file is empty"):
        read_texts(str(empty))
    with pytest.raises(DataError, match="missing.txt: data file not found"):
        read_texts(str(tmp_path / "missing.txt"))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(DataError, match="binary.txt: cannot read as UTF-8"):
        read_texts(str(binary))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl: line 2 is not valid JSON"):
        read_texts(str(bad))
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="line 1 has no string field 'text'"):
        read_texts(str(no_field))
    short = tmp_path / "short.txt"
    short.write_text("tiny\n")
    with pytest.raises(DataError, match="fewer than one sequence of seq_len=512"):
        pack_source(str(short), tokenizer, 512)
