"""Training and evaluation data: sources, tokenisation, packing, loss masks and the batch plan.

Sources are `world:<split>` (the embedded world) or files: `.txt` (one document per line) and
`.jsonl` ({"text": ...} for text; {"prompt"|"question": ..., "answer": ...} for instructions;
{"text": ..., "label": ...} for sequence classification, one padded row per example).

Packing: documents are joined with the end-of-text token into one stream and cut into rows of
exactly `seq_len` tokens, so no position is padding. As in standard packed pretraining, documents
that share a row attend to each other (no per-document attention mask); the end-of-text token is
the boundary the model learns. Instruction examples are packed the same way
with a parallel label stream in which prompt tokens are -100 (loss on answers only).

The batch plan is a pure function of (seed, step): row k of the training stream in epoch e is
`randperm(n, seed=(seed, e))[k mod n]`. A resumed run therefore sees exactly the batches the
uninterrupted run would have seen, and any number of processes can slice the same global batch.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from . import resolver
from .io import JsonlError, read_jsonl_numbered
from .world import TOPIC_SPLITS

IGNORE = -100


class DataError(ValueError):
    """Data that cannot be used: the message names the source and the problem."""


@dataclass(frozen=True)
class Example:
    """One exact-match / instruction item: the prompt the model sees and the expected answer."""

    prompt: str
    answer: str


# ----------------------------------------------------------------------------------------------
# Sources


@functools.lru_cache(maxsize=4)
def get_world(seed: int = 0, size: str = "default"):
    from .world import generate_world

    return generate_world(seed=seed, size=size)


def _world_split(source: str, world_seed: int, world_size: str):
    world = get_world(world_seed, world_size)
    split = source.split(":", 1)[1]
    names = [f.name for f in dataclasses.fields(world) if f.name != "seed"]
    if split not in names:
        raise DataError(f"{source}: unknown world split '{split}' (known: {', '.join(names)})")
    return getattr(world, split)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read as UTF-8 text ({err})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path}: data file is empty")
    return lines


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) for each record of a user's .jsonl file; the numbers are the file's
    own lines (blank lines counted), so an error points at the line an editor shows."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        records = read_jsonl_numbered(path)
    except JsonlError as err:
        raise DataError(str(err)) from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    if not records:
        raise DataError(f"{path}: data file is empty")
    return records


def data_path(source: str) -> Path:
    """The file a data source names, through the resolver in force (`workbench.resolver`)."""
    return resolver.current().path(source, "data")


def read_texts(source: str, world_seed: int = 0, world_size: str = "default") -> list[str]:
    """Documents from a source (see the module docstring)."""
    if source.startswith("world:"):
        texts = list(_world_split(source, world_seed, world_size))
        if texts and not isinstance(texts[0], str):
            raise DataError(f"{source}: this split holds questions, not documents")
        return texts
    path = data_path(source)
    if path.suffix == ".jsonl":
        texts = []
        for number, record in _read_jsonl(path):
            if not isinstance(record.get("text"), str):
                raise DataError(f"{path}: line {number} has no string field 'text'")
            texts.append(record["text"])
        return texts
    return _read_lines(path)


TOPIC_ROWS = {"tiny": {"topic_train": 160, "topic_eval": 60},
              "default": {"topic_train": 1000, "topic_eval": 200}}


def sentences(documents: list[str]) -> list[str]:
    return [s.strip() + "." for d in documents for s in d.split(". ") if len(s.split()) >= 4]


def read_labelled(source: str, world_seed: int = 0, world_size: str = "default"
                  ) -> tuple[list[str], list[int], list[str]]:
    """(texts, label ids, label names) for sequence classification.

    `world:topic_train` / `world:topic_eval`: sentences of the embedded world's general and domain
    documents, labelled `general` / `domain`, balanced and shuffled from the world seed. A
    `.jsonl` file holds {"text": ..., "label": ...} records; label names are sorted to give ids.
    """
    if source.startswith("world:"):
        split = source.split(":", 1)[1]
        if split not in TOPIC_SPLITS:
            raise DataError(f"{source}: not a labelled split (labelled world splits: "
                            f"{', '.join('world:' + s for s in TOPIC_SPLITS)})")
        per_class = TOPIC_ROWS[world_size][split] // 2
        pairs = []
        for label, part in enumerate(TOPIC_SPLITS[split]):
            pairs += [(text, label) for text in sentences(read_texts(f"world:{part}", world_seed, world_size))[:per_class]]
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(world_seed))
        pairs = [pairs[i] for i in order.tolist()]
        return [t for t, _ in pairs], [label for _, label in pairs], ["general", "domain"]
    path = data_path(source)
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: labelled data must be a .jsonl file of {{text, label}} records")
    numbered = _read_jsonl(path)
    for number, record in numbered:
        if not isinstance(record.get("text"), str) or "label" not in record:
            raise DataError(f"{path}: line {number} needs a string 'text' and a 'label'")
    records = [record for _, record in numbered]
    names = sorted({str(r["label"]) for r in records})
    if len(names) < 2:
        raise DataError(f"{path}: sequence classification needs at least two labels (found {names})")
    return [r["text"] for r in records], [names.index(str(r["label"])) for r in records], names


def encode_labelled(texts: list[str], labels: list[int], tokenizer, seq_len: int, source: str) -> "Packed":
    """One row per text, truncated / right-padded to seq_len; the class id sits in label column 0."""
    if not texts:
        raise DataError(f"{source}: no labelled examples")
    enc = tokenizer(texts, truncation=True, max_length=seq_len, padding="max_length")
    inputs = torch.tensor(enc["input_ids"], dtype=torch.long)
    targets = torch.full_like(inputs, IGNORE)
    targets[:, 0] = torch.tensor(labels, dtype=torch.long)
    return Packed(inputs, targets)


def read_examples(source: str, world_seed: int = 0, world_size: str = "default") -> list[Example]:
    """Question/answer items; file records use `prompt` as given or wrap `question` in the chat format."""
    from .world import chat_prompt

    if source.startswith("world:"):
        items = list(_world_split(source, world_seed, world_size))
        if items and isinstance(items[0], str):
            raise DataError(f"{source}: this split holds documents, not questions")
        return [Example(q.prompt, q.answer) for q in items]
    path = data_path(source)
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: questions must be a .jsonl file of {{prompt|question, answer}} records")
    examples = []
    for number, record in _read_jsonl(path):
        answer = record.get("answer")
        prompt = record.get("prompt")
        if prompt is None and isinstance(record.get("question"), str):
            prompt = chat_prompt(record["question"])
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise DataError(f"{path}: line {number} needs string fields 'prompt' (or 'question') and 'answer'")
        examples.append(Example(prompt, answer))
    return examples


# ----------------------------------------------------------------------------------------------
# Tokenisation and packing


@dataclass
class Packed:
    """Rows of exactly seq_len tokens; labels are -100 where no loss is taken."""

    inputs: torch.Tensor  # [rows, seq_len] int64
    labels: torch.Tensor  # [rows, seq_len] int64

    def __len__(self) -> int:
        return self.inputs.shape[0]


def encode_documents(texts: list[str], tokenizer) -> tuple[list[int], list[int]]:
    """One token stream: each document followed by the end-of-text token (an encoder's [SEP]);
    every token is a label."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise DataError(f"{type(tokenizer).__name__} has neither an end-of-text nor a separator token")
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    return stream, list(stream)


def encode_examples(examples: list[Example], tokenizer) -> tuple[list[int], list[int]]:
    """Instruction stream: prompt tokens masked (-100), answer + end-of-turn token learned."""
    from .world import END_TOKEN

    eos = tokenizer.eos_token_id
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([e.answer + END_TOKEN for e in examples], add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    labels: list[int] = []
    for p, a in zip(prompts, answers):
        stream += p + a + [eos]
        labels += [IGNORE] * len(p) + a + [IGNORE]
    return stream, labels


def pack(stream: list[int], labels: list[int], seq_len: int, source: str) -> Packed:
    """Cut the stream into full rows of seq_len tokens (the last partial row is dropped)."""
    rows = len(stream) // seq_len
    if rows == 0:
        raise DataError(f"{source}: only {len(stream)} tokens, fewer than one sequence of "
                        f"seq_len={seq_len}; add data or lower data.seq_len")
    n = rows * seq_len
    inputs = torch.tensor(stream[:n], dtype=torch.long).view(rows, seq_len)
    targets = torch.tensor(labels[:n], dtype=torch.long).view(rows, seq_len)
    if (targets[:, 1:] != IGNORE).sum() == 0:
        raise DataError(f"{source}: no token carries a loss after masking")
    return Packed(inputs, targets)


def pack_source(source: str, tokenizer, seq_len: int, fmt: str = "text",
                world_seed: int = 0, world_size: str = "default") -> Packed:
    """Read, tokenise and pack a source in one call."""
    if fmt == "labelled":
        texts, labels, _ = read_labelled(source, world_seed, world_size)
        return encode_labelled(texts, labels, tokenizer, seq_len, source)
    if fmt == "instruct":
        stream, labels = encode_examples(read_examples(source, world_seed, world_size), tokenizer)
    else:
        stream, labels = encode_documents(read_texts(source, world_seed, world_size), tokenizer)
    return pack(stream, labels, seq_len, source)


# ----------------------------------------------------------------------------------------------
# The batch plan


class EpochOrder:
    """Row order of a packed set, epoch after epoch, from a seed alone."""

    def __init__(self, rows: int, seed: int):
        self.rows, self.seed = rows, seed
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.rows, generator=g)}
        return self._cache[epoch]

    def take(self, start: int, count: int) -> torch.Tensor:
        """Row indices for stream positions start .. start+count-1."""
        out = [self._perm(k // self.rows)[k % self.rows] for k in range(start, start + count)]
        return torch.stack(out) if out else torch.empty(0, dtype=torch.long)


@dataclass
class BatchPlan:
    """Global batch for any step: `n_train` rows of training data then `n_replay` of replay data."""

    train: Packed
    replay: Packed | None
    batch_size: int
    replay_ratio: float
    seed: int

    def __post_init__(self):
        self.n_replay = round(self.batch_size * self.replay_ratio) if self.replay is not None else 0
        self.n_train = self.batch_size - self.n_replay
        if self.n_train < 1:
            raise DataError("replay_ratio leaves no room for training rows in the batch")
        self._train_order = EpochOrder(len(self.train), self.seed)
        self._replay_order = EpochOrder(len(self.replay), self.seed + 1) if self.n_replay else None

    def steps_per_epoch(self) -> int:
        return max(1, len(self.train) // self.n_train)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._train_order.take(step * self.n_train, self.n_train)
        inputs, labels = [self.train.inputs[idx]], [self.train.labels[idx]]
        if self.n_replay:
            ridx = self._replay_order.take(step * self.n_replay, self.n_replay)
            inputs.append(self.replay.inputs[ridx])
            labels.append(self.replay.labels[ridx])
        return torch.cat(inputs), torch.cat(labels)
