"""The round lifecycle one tick at a time, with an injected clock and no broker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.config import CoordinatorConfig, CoordinatorSettings, ScheduleConfig, TaskConfig
from coordinator.rounds import RoundManager
from coordinator.scheduler import DeviceCandidate, FitFirstScheduler
from coordinator.store import CoordinatorStore, RoundState, StoredUpdate
from device_profiles.profile import find_profile
from edge_runtime.wire import (
    CodecConfig,
    TaskAssignment,
    UpdateEncoding,
    decode_frame,
    encode_update,
    generate_private_key,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _config(tmp_path: Path, model: Path, gather: float = 0.0, quota: int = 2) -> CoordinatorConfig:
    def task(task_id: str) -> TaskConfig:
        return TaskConfig(
            id=task_id,
            kind="classification",
            base_model=str(model),
            labels=("a", "b"),
            rank=2,
            schedule=ScheduleConfig(
                devices_per_round=quota,
                min_updates=2,
                over_selection=0.0,
                round_deadline_seconds=60.0,
                gather_seconds=gather,
            ),
        )

    return CoordinatorConfig(
        coordinator=CoordinatorSettings(fleet="f", state_dir=str(tmp_path / "state")),
        tasks=(task("alpha"), task("beta")),
    )


def _devices(count: int) -> list[DeviceCandidate]:
    profile = find_profile("laptop-mid-16gb")
    return [DeviceCandidate(f"dev-{i}", "north", profile) for i in range(count)]


def _manager(config: CoordinatorConfig, clock: Clock) -> RoundManager:
    store = CoordinatorStore(config.state_dir / "coordinator.db", now=clock)
    return RoundManager(config, store, FitFirstScheduler(), generate_private_key(), now=clock)


def _assigned(outgoing: list) -> dict[str, set[str]]:  # noqa: ANN001
    by_task: dict[str, set[str]] = {}
    for item in outgoing:
        if "/task" in item.topic and item.payload:  # an empty one clears a closed round
            message = decode_frame(item.payload).message
            assert isinstance(message, TaskAssignment)
            by_task.setdefault(message.task, set()).add(message.device_id)
    return by_task


@pytest.mark.slow
def test_two_tasks_never_share_a_device(tmp_path: Path, tiny_bert_folder: Path) -> None:
    clock = Clock()
    manager = _manager(_config(tmp_path, tiny_bert_folder), clock)
    manager.start()
    assigned = _assigned(manager.open_rounds_if_possible(_devices(3)))
    assert list(assigned) == ["alpha"] and len(assigned["alpha"]) == 2  # beta: 1 free < quorum
    assigned = _assigned(manager.open_rounds_if_possible(_devices(5)))
    assert list(assigned) == ["beta"]
    assert len(assigned["beta"]) == 2
    alpha = set(manager.store.assignments("alpha", 1))
    assert not alpha & assigned["beta"]


@pytest.mark.slow
def test_deadline_without_quorum_fails_and_restart_resumes(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    clock = Clock()
    config = _config(tmp_path, tiny_bert_folder, gather=10.0, quota=3)
    manager = _manager(config, clock)
    manager.start()
    assert _assigned(manager.open_rounds_if_possible(_devices(1))) == {}  # below quorum
    # Quorum (2) but not quota (3): wait gather_seconds for a third device, then go.
    assert _assigned(manager.open_rounds_if_possible(_devices(2))) == {}
    clock.now += 11.0
    opened = _assigned(manager.open_rounds_if_possible(_devices(2)))
    assert set(opened) == {"alpha"} and len(opened["alpha"]) == 2

    # A restarted manager on the same store republishes the open round's assignments.
    restarted = _manager(config, clock)
    republished = _assigned(restarted.start())
    assert republished == {"alpha": opened["alpha"]}

    clock.now += 61.0
    closing = restarted.close_due_rounds()  # only the clearing of its assignments
    assert {item.payload for item in closing} == {b""} and len(closing) == 2
    record = restarted.store.round("alpha", 1)
    assert record is not None and record.state is RoundState.FAILED
    assert "quorum is 2" in (record.reason or "")
    assert [v.version for v in restarted.store.adapter_versions("alpha")] == [0]


@pytest.mark.slow
def test_restart_completes_a_round_whose_quota_was_stored_before_the_crash(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    """A coordinator killed right after it stored a round's last update (before it
    aggregated) finishes that round as soon as it restarts, not at the round's deadline."""
    clock = Clock()
    config = _config(tmp_path, tiny_bert_folder)
    manager = _manager(config, clock)
    manager.start()
    opened = _assigned(manager.open_rounds_if_possible(_devices(2)))["alpha"]
    reference = manager.current["alpha"].state()
    body = encode_update(
        {name: torch.full(t.shape, 0.5) for name, t in reference.items()},
        CodecConfig(UpdateEncoding.FP32),
    ).body
    for device_id in sorted(opened):  # what accept_update stores, minus the aggregation
        manager.store.record_update(
            StoredUpdate(f"f/alpha/1/{device_id}/0", "alpha", 1, device_id, 10, 3, {}, body)
        )
    manager.store.close()

    restarted = _manager(config, clock)
    outgoing = restarted.start()
    record = restarted.store.round("alpha", 1)
    assert record is not None and record.state is RoundState.COMPLETED
    assert "restart" in (record.reason or "")
    assert _assigned(outgoing) == {}  # a completed round's assignments are not re-sent
    assert [v.version for v in restarted.store.adapter_versions("alpha")] == [0, 1]
