"""A failure on a device becomes a reply with the reason, at once (never silence): the
coordinator then need not wait out the round's deadline for an answer that never comes."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from device_profiles.plan import TrainingPlan
from edge_runtime.wire import (
    COORDINATOR_SENDER,
    AssignmentDecline,
    ReceivedMessage,
    TaskAssignment,
    TaskSpec,
    UpdateEncoding,
    decode_frame,
    encode_frame,
    generate_private_key,
)
from quantization.adapters import AdapterConfig, get_adapter_state
from quantization.task_model import TaskModelSpec, build_task_model
from tests.test_lora_ranks import _agent


def _declines_after(
    tmp_path: Path, tiny_bert_folder: Path, spoil: Callable[[Path, dict], None]
) -> tuple[list[AssignmentDecline], object]:
    """Hand a real agent one assignment after `spoil(tmp_path, global_state)` broke something
    on the device; returns the declines it published and the agent."""
    spec = TaskSpec("classification", str(tiny_bert_folder), ("a", "b"), adapter_alpha=16.0)
    model, _ = build_task_model(
        TaskModelSpec(
            "alpha", "classification", spec.base_model, "none", AdapterConfig(4, 16.0), spec.labels
        )
    )
    key = generate_private_key()
    daemon = _agent(tmp_path, key)
    version = "cd" * 32
    daemon.global_states[version] = get_adapter_state(model)
    spoil(tmp_path, daemon.global_states[version])
    plan = TrainingPlan(scheme="none", rank=4, batch_size=4, seq_len=16, local_steps=2)
    assignment = TaskAssignment(
        "f", "alpha", 1, "pi-1", 0, plan, time.time() + 600, version, spec, UpdateEncoding.FP32
    )
    frame = encode_frame(assignment, sender=COORDINATOR_SENDER, signing_key=key)
    try:
        daemon.handle(ReceivedMessage("schoolfl/f/to/pi-1/task", frame, 1, False))
        sent = [decode_frame(payload).message for _, payload in daemon.transport.published]
        declines = [m for m in sent if isinstance(m, AssignmentDecline)]
        assert len(declines) == 1, [type(m).__name__ for m in sent]
        assert daemon.history.seen("alpha", 1)  # recorded, so a re-sent assignment is not retried
        assert daemon.outbox.pending() == []  # nothing half-made left to send
        return declines, daemon
    finally:
        daemon.outbox.close()
        daemon.history.close()


@pytest.mark.slow
def test_a_missing_data_file_is_declined_with_its_reason(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    def move_the_data(folder: Path, _: dict) -> None:
        (folder / "data" / "alpha.jsonl").unlink()  # school IT moved the data folder

    declines, _ = _declines_after(tmp_path, tiny_bert_folder, move_the_data)
    assert "could not train" in declines[0].reasons[0]
    assert "alpha.jsonl" in declines[0].reasons[0]


@pytest.mark.slow
def test_a_diverged_loss_is_declined_with_its_reason(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    """The trainer's own check raises FloatingPointError on a non-finite loss: that too is an
    answer, not a traceback and a round that waits for its deadline."""

    def poison_the_start(_: Path, state: dict) -> None:
        for tensor in state.values():  # finite, so the start passes its check, but overflows
            tensor.fill_(1e30)

    declines, _ = _declines_after(tmp_path, tiny_bert_folder, poison_the_start)
    assert "could not train: training loss became" in declines[0].reasons[0]
