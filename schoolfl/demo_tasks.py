"""The two tasks `schoolfl demo` can run: what model, what data, which metric.

`classify` sorts pupils' questions by school subject with MiniLM-L6 (accuracy, higher is
better); `generate` teaches SmolLM2-135M to explain school ideas simply (held-out mean
token loss, lower is better). Everything else about the demo is the same for both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from quantization.school_questions import (
    split_instructions,
    split_questions,
    write_instructions_jsonl,
    write_jsonl,
)

SUBJECTS = 8
"""Subjects in both shipped data sets (quantization/data/README.md)."""


@dataclass(frozen=True)
class DemoTask:
    """What differs between `--task classify` and `--task generate`."""

    name: str
    """The --task value."""
    task_id: str
    """The coordinator's task id (topic level, data file name on devices)."""
    kind: str
    base_model: str
    title: str
    metric: str
    """The held-out metric the coordinator records for each version."""
    metric_label: str
    lower_is_better: bool
    learning_rate: float
    batch_size: int
    seq_len: int
    local_steps: int
    quick_local_steps: int
    held_out: int
    """Held-out examples the coordinator evaluates on (quick runs use half)."""
    held_out_noun: str
    """What the held-out examples are, for the summary line."""
    quick_per_device: int
    """Examples per device with --quick."""
    deadline_seconds: float


CLASSIFY = DemoTask(
    name="classify",
    task_id="subjects",
    kind="classification",
    base_model="minilm-l6",
    title="MiniLM-L6 nf4 + LoRA r=8",
    metric="accuracy",
    metric_label="accuracy",
    lower_is_better=False,
    learning_rate=0.003,
    batch_size=8,
    seq_len=48,
    local_steps=12,
    quick_local_steps=6,
    held_out=160,
    held_out_noun="held-out questions",
    quick_per_device=60,
    deadline_seconds=240.0,
)
GENERATE = DemoTask(
    name="generate",
    task_id="explain",
    kind="causal-lm",
    base_model="smollm2-135m",
    title="SmolLM2-135M nf4 + LoRA r=8",
    metric="eval_loss",
    metric_label="loss",
    lower_is_better=True,
    learning_rate=0.002,
    # A training step of the 135M decoder costs ~10x MiniLM's: small batches, few steps, and
    # 64 tokens (the median instruction + response length) keep a round near a minute here.
    batch_size=4,
    seq_len=64,
    local_steps=4,
    quick_local_steps=2,
    held_out=16,
    held_out_noun="held-out instructions",
    quick_per_device=24,
    deadline_seconds=600.0,
)
DEMO_TASKS = {task.name: task for task in (CLASSIFY, GENERATE)}


def write_task_data(
    task: DemoTask,
    devices: int,
    held_out: int,
    per_device: int | None,
    held_out_file: Path,
) -> tuple[list[Callable[[Path], Path]], tuple[str, ...]]:
    """Write the held-out file; return one writer per device shard, and the labels.

    Both splits are non-IID the same way: each subject's share per device is drawn from
    Dirichlet(0.5), so each school asks mostly about a few subjects. The instructions'
    held-out set takes the same number from every subject, so the loss covers every topic.
    """
    if task.kind == "classification":
        split = split_questions(devices, held_out=held_out, alpha=0.5, seed=0, per_shard=per_device)
        write_jsonl(split.held_out, held_out_file)
        writers = [partial(write_jsonl, shard) for shard in split.shards]
        return writers, split.labels
    instructions = split_instructions(
        devices,
        held_out_per_subject=max(1, held_out // SUBJECTS),
        alpha=0.5,
        seed=0,
        per_shard=per_device,
    )
    write_instructions_jsonl(instructions.held_out, held_out_file)
    return [partial(write_instructions_jsonl, shard) for shard in instructions.shards], ()
