"""A failure on a device becomes a reply with the reason, at once (never silence): the
coordinator then need not wait out the round's deadline for an answer that never comes."""

from __future__ import annotations

import time
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


@pytest.mark.slow
def test_a_missing_data_file_is_declined_with_its_reason(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
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
    (tmp_path / "data" / "alpha.jsonl").unlink()  # school IT moved the data folder
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
        assert "could not train" in declines[0].reasons[0]
        assert "alpha.jsonl" in declines[0].reasons[0]
        assert daemon.history.seen("alpha", 1)  # recorded, so a re-sent assignment is not retried
    finally:
        daemon.outbox.close()
        daemon.history.close()
