"""The shipped data sets (school questions, instructions) and non-IID splits of them.

Real school fleets are not IID: one school's pupils ask mostly about the subjects it
teaches that term. `dirichlet_split` reproduces that by drawing each subject's share per
shard from a Dirichlet distribution (the usual way FL papers make label skew), with a
fixed seed so every run sees the same fleet; the questions split by their label, the
instructions (for the causal-LM demo) by their subject.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TypeVar

import numpy as np

from quantization.task_data import LabelledText

T = TypeVar("T")


@dataclass(frozen=True)
class QuestionSplit:
    held_out: list[LabelledText]
    """Stays with the coordinator for evaluation only."""
    shards: list[list[LabelledText]]
    """One per device."""
    labels: tuple[str, ...]


def questions_path() -> Path:
    return Path(str(resources.files("quantization") / "data" / "school_questions.jsonl"))


def instructions_path() -> Path:
    return Path(str(resources.files("quantization") / "data" / "instructions.jsonl"))


def load_questions() -> list[LabelledText]:
    rows = [json.loads(line) for line in questions_path().read_text().splitlines() if line]
    return [LabelledText(row["text"], row["label"]) for row in rows]


def dirichlet_split(
    items: Sequence[T], labels: Sequence[str], num_shards: int, alpha: float, seed: int
) -> list[list[T]]:
    """Split `items` by their `labels` with Dirichlet(alpha) proportions per label; small
    alpha = more skew. Works for any item type (questions, instructions).

    Every shard gets at least one item of some label, so no device is left empty."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[T]] = {}
    for item, label in zip(items, labels, strict=True):
        by_label.setdefault(label, []).append(item)
    shards: list[list[T]] = [[] for _ in range(num_shards)]
    for label in sorted(by_label):
        members = by_label[label]
        proportions = rng.dirichlet([alpha] * num_shards)
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
        parts = np.split(np.array(members, dtype=object), cuts)
        for shard, part in zip(shards, parts, strict=True):
            shard.extend(part.tolist())
    for index, shard in enumerate(shards):
        if not shard:  # steal one item from the largest shard
            largest = max(range(num_shards), key=lambda i: len(shards[i]))
            shard.append(shards[largest].pop())
        random.Random(seed + index).shuffle(shard)
    return shards


def dirichlet_shards(
    examples: list[LabelledText], num_shards: int, alpha: float, seed: int
) -> list[list[LabelledText]]:
    """Labelled questions split by their label (see `dirichlet_split`)."""
    return dirichlet_split(examples, [e.label for e in examples], num_shards, alpha, seed)


def split_questions(
    num_shards: int,
    *,
    held_out: int = 160,
    alpha: float = 0.5,
    seed: int = 0,
    per_shard: int | None = None,
) -> QuestionSplit:
    """Held-out evaluation set plus `num_shards` non-IID device shards."""
    examples = load_questions()
    random.Random(seed).shuffle(examples)
    evaluation, rest = examples[:held_out], examples[held_out:]
    shards = dirichlet_shards(rest, num_shards, alpha, seed)
    if per_shard is not None:
        shards = [shard[:per_shard] for shard in shards]
    labels = tuple(sorted({e.label for e in examples}))
    return QuestionSplit(held_out=evaluation, shards=shards, labels=labels)


def write_jsonl(examples: list[LabelledText], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in examples)
    )
    return path


# -- instructions (the causal-LM demo) ---------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    instruction: str
    response: str
    subject: str


@dataclass(frozen=True)
class InstructionSplit:
    held_out: list[Instruction]
    """Stays with the coordinator for evaluation only."""
    shards: list[list[Instruction]]
    """One per device."""


def load_instructions() -> list[Instruction]:
    rows = [json.loads(line) for line in instructions_path().read_text().splitlines() if line]
    return [Instruction(row["instruction"], row["response"], row["subject"]) for row in rows]


def split_instructions(
    num_shards: int,
    *,
    held_out_per_subject: int = 2,
    alpha: float = 0.5,
    seed: int = 0,
    per_shard: int | None = None,
) -> InstructionSplit:
    """Held-out set with the same few instructions of every subject, so the evaluation
    covers every topic; the rest split across devices non-IID by subject (Dirichlet)."""
    instructions = load_instructions()
    random.Random(seed).shuffle(instructions)
    taken: dict[str, int] = {}
    evaluation, rest = [], []
    for item in instructions:
        if taken.get(item.subject, 0) < held_out_per_subject:
            taken[item.subject] = taken.get(item.subject, 0) + 1
            evaluation.append(item)
        else:
            rest.append(item)
    shards = dirichlet_split(rest, [i.subject for i in rest], num_shards, alpha, seed)
    if per_shard is not None:
        shards = [shard[:per_shard] for shard in shards]
    return InstructionSplit(held_out=evaluation, shards=shards)


def write_instructions_jsonl(items: list[Instruction], path: Path) -> Path:
    """JSONL with instruction + response (what `read_lm_texts` reads) and the subject."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(
            json.dumps({"instruction": i.instruction, "response": i.response, "subject": i.subject})
            + "\n"
            for i in items
        )
    )
    return path
