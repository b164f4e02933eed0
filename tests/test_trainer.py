"""Local training on the real MiniLM-L6 (nf4 + LoRA + classification head)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch

from device_profiles.plan import TrainingPlan
from edge_runtime.trainer import LocalTrainer
from quantization.adapters import AdapterConfig
from quantization.task_data import LabelledText
from quantization.task_model import TaskModelSpec, resolve_base_model

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[1] / "quantization" / "data" / "school_questions.jsonl"


def _plan(local_steps: int, batch_size: int, seq_len: int, learning_rate: float) -> TrainingPlan:
    """A plan as the trainer runs it (scheme and rank are the fixture model's)."""
    return TrainingPlan(
        scheme="nf4",
        local_steps=local_steps,
        batch_size=batch_size,
        seq_len=seq_len,
        learning_rate=learning_rate,
    )


def _questions() -> list[LabelledText]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    examples = [LabelledText(r["text"], r["label"]) for r in rows]
    random.Random(0).shuffle(examples)
    return examples


LABELS = tuple(sorted({e.label for e in _questions()}))


class SteppingClock:
    """Each reading advances 10 s: drives the deadline logic without sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 10.0
        return self.now


@pytest.fixture(scope="module")
def trainer() -> LocalTrainer:
    torch.set_num_threads(2)
    spec = TaskModelSpec(
        "subjects", "classification", "minilm-l6", "nf4", AdapterConfig(rank=4), LABELS
    )
    return LocalTrainer(spec, _questions()[:200], seed=0)


def test_round_lowers_loss_and_returns_a_delta(trainer: LocalTrainer) -> None:
    start = trainer.adapter_state()
    result = trainer.train_round(start, _plan(12, 8, 32, 3e-3))
    assert result.num_steps == 12 and not result.stopped_early
    assert result.last_loss < result.first_loss
    assert result.num_examples == 200
    assert set(result.delta) == set(start)
    assert any(float(t.abs().max()) > 0 for t in result.delta.values())
    # Only adapter and head tensors travel: no base weights in the delta.
    assert all("lora_" in name or "classifier" in name for name in result.delta)


def test_round_starts_from_the_given_global_state(trainer: LocalTrainer) -> None:
    start = {name: torch.zeros_like(t) for name, t in trainer.adapter_state().items()}
    result = trainer.train_round(start, _plan(1, 4, 16, 1e-3))
    trained = trainer.adapter_state()
    for name in start:
        assert torch.allclose(trained[name], start[name] + result.delta[name], atol=1e-6)


def test_deadline_stops_training_early(trainer: LocalTrainer) -> None:
    clock = SteppingClock()
    trainer.clock = clock  # inject the clock for this test only
    try:
        deadline = clock.now + 45.0
        result = trainer.train_round(
            trainer.adapter_state(), _plan(20, 4, 16, 1e-3), deadline=deadline
        )
    finally:
        trainer.clock = time.monotonic
    assert result.stopped_early
    assert 0 < result.num_steps < 20


def test_unknown_base_model_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="neither a known name"):
        resolve_base_model("gpt-17")


def test_task_spec_validation() -> None:
    with pytest.raises(ValueError, match="at least 2 labels"):
        TaskModelSpec("t", "classification", "minilm-l6", "nf4", AdapterConfig(), ("one",))
    with pytest.raises(ValueError, match="task kind"):
        TaskModelSpec("t", "regression", "minilm-l6", "nf4", AdapterConfig())
    with pytest.raises(ValueError, match="local_steps"):
        _plan(0, 1, 1, 1e-3)
