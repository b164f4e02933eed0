"""The shipped school-questions data set, and non-IID splits of it for demos and tests.

Real school fleets are not IID: one school's pupils ask mostly about the subjects it
teaches that term. `dirichlet_shards` reproduces that by drawing each subject's share per
shard from a Dirichlet distribution (the usual way FL papers make label skew), with a
fixed seed so every run sees the same fleet.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from quantization.task_data import LabelledText


@dataclass(frozen=True)
class QuestionSplit:
    held_out: list[LabelledText]
    """Stays with the coordinator for evaluation only."""
    shards: list[list[LabelledText]]
    """One per device."""
    labels: tuple[str, ...]


def questions_path() -> Path:
    return Path(str(resources.files("schoolfl") / "data" / "school_questions.jsonl"))


def instructions_path() -> Path:
    return Path(str(resources.files("schoolfl") / "data" / "instructions.jsonl"))


def load_questions() -> list[LabelledText]:
    rows = [json.loads(line) for line in questions_path().read_text().splitlines() if line]
    return [LabelledText(row["text"], row["label"]) for row in rows]


def dirichlet_shards(
    examples: list[LabelledText], num_shards: int, alpha: float, seed: int
) -> list[list[LabelledText]]:
    """Split by label with Dirichlet(alpha) proportions per label; small alpha = more skew.

    Every shard gets at least one example of some label, so no device is left empty."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[LabelledText]] = {}
    for example in examples:
        by_label.setdefault(example.label, []).append(example)
    shards: list[list[LabelledText]] = [[] for _ in range(num_shards)]
    for label in sorted(by_label):
        items = by_label[label]
        proportions = rng.dirichlet([alpha] * num_shards)
        cuts = (np.cumsum(proportions)[:-1] * len(items)).astype(int)
        for shard, part in zip(shards, np.split(np.array(items, dtype=object), cuts), strict=True):
            shard.extend(part.tolist())
    for index, shard in enumerate(shards):
        if not shard:  # steal one example from the largest shard
            largest = max(range(num_shards), key=lambda i: len(shards[i]))
            shard.append(shards[largest].pop())
        random.Random(seed + index).shuffle(shard)
    return shards


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
