"""Rounds that keep going, one tick at a time (no broker): assignments an agent restarted
mid-training can find again, a secure round caught between the coordinator's two stores'
writes, and a revoked device that no longer holds its round."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from coordinator.config import (
    CoordinatorConfig,
    CoordinatorSettings,
    ScheduleConfig,
    SecureAggregationConfig,
    TaskConfig,
)
from coordinator.rounds import RoundManager
from coordinator.scheduler import DeviceCandidate, FitFirstScheduler
from coordinator.secure.store import SecurePhase
from coordinator.store import CoordinatorStore, RoundState
from device_profiles.profile import find_profile
from edge_runtime.wire import (
    SECURE_AGGREGATION_CAPABILITY,
    AckStatus,
    CodecConfig,
    TaskAssignment,
    Update,
    UpdateEncoding,
    decode_frame,
    encode_update,
    generate_private_key,
)

pytestmark = pytest.mark.slow  # each builds the tiny BERT's task model


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _config(
    tmp_path: Path, model: Path, *, quota: int = 2, min_updates: int = 2, secure: bool = False
) -> CoordinatorConfig:
    task = TaskConfig(
        id="alpha",
        kind="classification",
        base_model=str(model),
        labels=("a", "b"),
        scheme="none",
        rank=2,
        update_encoding="fp32",
        schedule=ScheduleConfig(
            devices_per_round=quota,
            min_updates=min_updates,
            over_selection=0.0,
            round_deadline_seconds=60.0,
            gather_seconds=0.0,
        ),
        secure_aggregation=SecureAggregationConfig(enabled=secure),
    )
    return CoordinatorConfig(
        coordinator=CoordinatorSettings(fleet="f", state_dir=str(tmp_path / "state")),
        tasks=(task,),
    )


def _manager(config: CoordinatorConfig, clock: Clock) -> RoundManager:
    store = CoordinatorStore(config.state_dir / "coordinator.db", now=clock)
    return RoundManager(config, store, FitFirstScheduler(), generate_private_key(), now=clock)


def _devices(count: int) -> list[DeviceCandidate]:
    profile = find_profile("laptop-mid-16gb")
    capable = frozenset({SECURE_AGGREGATION_CAPABILITY})
    return [
        DeviceCandidate(f"dev-{i}", "north", profile, capabilities=capable) for i in range(count)
    ]


def _task_messages(outgoing: list) -> list:  # noqa: ANN001
    return [item for item in outgoing if item.topic.endswith("/task")]


def _assigned(outgoing: list) -> set[str]:  # noqa: ANN001
    return {
        decode_frame(item.payload).expect(TaskAssignment).device_id
        for item in _task_messages(outgoing)
        if item.payload
    }


def _cleared(outgoing: list) -> set[str]:  # noqa: ANN001
    """Devices whose retained assignment the messages clear (empty retained payloads)."""
    return {item.topic.split("/")[-2] for item in _task_messages(outgoing) if not item.payload}


def _send_update(manager: RoundManager, device_id: str, server_round: int = 1) -> AckStatus:
    reference = manager.current["alpha"].state()
    body = encode_update(
        {name: torch.full(t.shape, 0.25) for name, t in reference.items()},
        CodecConfig(UpdateEncoding.FP32),
    ).body
    update = Update(
        fleet="f",
        task="alpha",
        server_round=server_round,
        device_id=device_id,
        attempt=0,
        model_version=manager.current["alpha"].version,
        num_samples=10,
        num_steps=2,
        encoding=UpdateEncoding.FP32,
    )
    status, reason, _ = manager.accept_update(update, body)
    assert status is AckStatus.ACCEPTED, reason
    return status


def test_assignments_are_retained_until_their_round_closes(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    """An agent killed mid-training keeps no memory of its assignment: the retained copy
    is what it gets again on restart. A closed round's copies are cleared (also once more
    by a restarted coordinator), so no agent is later handed a round that is over."""
    clock = Clock()
    config = _config(tmp_path, tiny_bert_folder)
    manager = _manager(config, clock)
    manager.start()
    opened = manager.open_rounds_if_possible(_devices(2))
    assert _assigned(opened) == {"dev-0", "dev-1"}
    assert all(item.retain for item in _task_messages(opened))

    clock.now += 61  # the deadline passes without updates: the round fails
    closing = manager.close_due_rounds()
    record = manager.store.round("alpha", 1)
    assert record is not None and record.state is RoundState.FAILED
    assert _cleared(closing) == {"dev-0", "dev-1"}
    assert all(item.retain for item in _task_messages(closing))
    manager.store.close()

    restarted = _manager(config, clock)
    assert _cleared(restarted.start()) == {"dev-0", "dev-1"}  # in case the clear was lost


def test_a_completed_round_clears_its_assignments(tmp_path: Path, tiny_bert_folder: Path) -> None:
    clock = Clock()
    manager = _manager(_config(tmp_path, tiny_bert_folder), clock)
    manager.start()
    manager.open_rounds_if_possible(_devices(2))
    _send_update(manager, "dev-0")
    reference = manager.current["alpha"].state()
    body = encode_update(
        {name: torch.zeros(t.shape) for name, t in reference.items()},
        CodecConfig(UpdateEncoding.FP32),
    ).body
    update = Update(
        "f", "alpha", 1, "dev-1", 0, manager.current["alpha"].version, 10, 2, UpdateEncoding.FP32
    )
    status, _, outgoing = manager.accept_update(update, body)
    assert status is AckStatus.ACCEPTED
    assert manager.store.round("alpha", 1).state is RoundState.COMPLETED  # type: ignore[union-attr]
    assert _cleared(outgoing) == {"dev-0", "dev-1"}


def test_a_secure_round_opened_only_in_the_main_store_starts_on_restart(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    """A kill between the commit in coordinator.db and the write in secure_rounds.db left a
    secure round with no phase: nothing would ever close it and the task would be blocked.
    A restarted coordinator gives it its advertising phase and sends its assignments."""
    clock = Clock()
    config = _config(tmp_path, tiny_bert_folder, quota=3, min_updates=2, secure=True)
    manager = _manager(config, clock)
    manager.start()
    assert _assigned(manager.open_rounds_if_possible(_devices(3))) == {"dev-0", "dev-1", "dev-2"}
    manager.store.close()
    manager.secure.secure_store.close()
    # What a kill after the main store's commit and before the secure store's write
    # leaves on disk: the round in coordinator.db, nothing for it in secure_rounds.db.
    with sqlite3.connect(config.state_dir / "secure_rounds.db") as secure_db:
        secure_db.execute("DELETE FROM secure_rounds")
        secure_db.execute("DELETE FROM secure_messages")

    restarted = _manager(config, clock)
    outgoing = restarted.start()
    state = restarted.secure.secure_store.state("alpha", 1)
    assert state is not None and state.phase is SecurePhase.ADVERTISING
    assert state.phase_deadline > clock.now  # a fresh phase, not one already run out
    assert _assigned(outgoing) == {"dev-0", "dev-1", "dev-2"}
    clock.now += config.task("alpha").secure_aggregation.step_seconds + 1
    restarted.close_due_rounds()  # nobody advertised: the round ends, it does not hang
    record = restarted.store.round("alpha", 1)
    assert record is not None and record.state is RoundState.FAILED
    assert "secure aggregation aborted" in (record.reason or "")


def test_a_revoked_device_no_longer_holds_its_round(tmp_path: Path, tiny_bert_folder: Path) -> None:
    clock = Clock()
    manager = _manager(_config(tmp_path, tiny_bert_folder, quota=3, min_updates=2), clock)
    manager.start()
    assert _assigned(manager.open_rounds_if_possible(_devices(3))) == {"dev-0", "dev-1", "dev-2"}
    _send_update(manager, "dev-0")
    _send_update(manager, "dev-1")
    assert manager.store.round("alpha", 1).state is RoundState.OPEN  # type: ignore[union-attr]

    assert manager.release_revoked({"dev-0"}) == []  # it answered: nothing changes
    outgoing = manager.release_revoked({"dev-2"})
    record = manager.store.round("alpha", 1)
    assert record is not None and record.state is RoundState.COMPLETED
    assert "every device answered" in (record.reason or "")
    assert manager.store.declined_devices("alpha", 1) == {"dev-2": "device revoked"}
    assert _cleared(outgoing) == {"dev-0", "dev-1", "dev-2"}
    assert manager.release_revoked({"dev-2"}) == []  # a closed round is left alone
