"""Rounds that keep going, one tick at a time (no broker): assignments an agent restarted
mid-training can find again, a secure round caught between the coordinator's two stores'
writes, a secure phase whose last answer was stored just before the coordinator was
killed, an agent restarted in a secure round it can no longer take part in, and a revoked
device that no longer holds its round."""

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
from coordinator.outgoing import Outgoing
from coordinator.rounds import RoundManager
from coordinator.scheduler import DeviceCandidate, FitFirstScheduler
from coordinator.secure.store import SecurePhase
from coordinator.store import CoordinatorStore, RoundState
from device_profiles.profile import find_profile
from edge_runtime.agent import AgentDaemon
from edge_runtime.secagg_session import KEYS_LOST_ON_RESTART, SecureSession
from edge_runtime.wire import (
    SECURE_AGGREGATION_CAPABILITY,
    AckStatus,
    AssignmentDecline,
    CodecConfig,
    Ed25519PrivateKey,
    ReceivedMessage,
    SecAggEnvelope,
    SecAggStep,
    TaskAssignment,
    Update,
    UpdateEncoding,
    decode_frame,
    encode_update,
    generate_private_key,
)
from tests.test_lora_ranks import _agent
from tests.test_secure_rounds import _device_message

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


def _manager(
    config: CoordinatorConfig, clock: Clock, key: Ed25519PrivateKey | None = None
) -> RoundManager:
    store = CoordinatorStore(config.state_dir / "coordinator.db", now=clock)
    key = key or generate_private_key()
    return RoundManager(config, store, FitFirstScheduler(), key, now=clock)


def _devices(count: int, names: tuple[str, ...] = ()) -> list[DeviceCandidate]:
    profile = find_profile("laptop-mid-16gb")
    capable = frozenset({SECURE_AGGREGATION_CAPABILITY})
    names = names or tuple(f"dev-{i}" for i in range(count))
    return [DeviceCandidate(name, "north", profile, capabilities=capable) for name in names]


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


class _Killed(Exception):
    """Stands in for a SIGKILL of the coordinator: what it committed stays on disk."""


def _assignments(outgoing: list[Outgoing]) -> list[TaskAssignment]:
    return [
        decode_frame(item.payload).expect(TaskAssignment)
        for item in _task_messages(outgoing)
        if item.payload
    ]


class SecureFleet:
    """The devices of one secure round, with the round manager's messages relayed to them
    and their answers back by hand: scripted devices running the agent's own
    `SecureSession` (each sends its masked input once its share boxes are in) and,
    optionally, one real `AgentDaemon` (it gets no model, so it never trains)."""

    def __init__(
        self,
        manager: RoundManager,
        assignments: list[TaskAssignment],
        agent: AgentDaemon | None = None,
    ) -> None:
        self.manager = manager
        self.agent = agent
        scripted = [a for a in assignments if agent is None or a.device_id != agent.device_id]
        self.sessions = {
            a.device_id: SecureSession(a, a.device_id, generate_private_key()) for a in scripted
        }
        reference = manager.current["alpha"].state()
        self.delta = {name: torch.full_like(t, 1e-4) for name, t in reference.items()}
        self.masked_frames: dict[str, bytes] = {}
        """Device -> the masked input it sent (what its outbox would re-send)."""
        self.agent_messages: list[object] = []
        """What the agent published, decoded, in order."""
        self._agent_seen = 0

    def restart_agent(self) -> AgentDaemon:
        """A new agent process on the same state folder: what it kept in memory is gone."""
        assert self.agent is not None
        old = self.agent
        old.stop()
        self.agent = AgentDaemon(old.config)
        self.agent.transport = type(old.transport)()  # type: ignore[assignment]
        self.agent_messages, self._agent_seen = [], 0
        return self.agent

    def advertise(self) -> None:
        for session in self.sessions.values():
            frame = session.advertise_frame()
            self.deliver(self.manager.accept_secure(*_device_message(frame))[2])

    def deliver(self, outgoing: list[Outgoing]) -> None:
        """Relay until nothing is left: each message to its device, each answer back."""
        pending = list(outgoing)
        while pending:
            item = pending.pop(0)
            parts = item.topic.split("/")
            device_id = parts[3] if parts[2] == "to" else ""
            if self.agent is not None and device_id == self.agent.device_id:
                self.agent.handle(ReceivedMessage(item.topic, item.payload, 1, False))
                pending += self._from_agent()
            elif device_id in self.sessions and item.topic.endswith("/secagg"):
                pending += self._answer(device_id, item.payload)

    def _answer(self, device_id: str, payload: bytes) -> list[Outgoing]:
        envelope, body = _device_message(payload)
        if envelope.step is SecAggStep.ABORT:
            return []
        session = self.sessions[device_id]
        outgoing: list[Outgoing] = []
        reply = session.answer(envelope.step, body)
        if reply is not None:
            outgoing += self.manager.accept_secure(*_device_message(reply))[2]
        if session.ready_to_mask and device_id not in self.masked_frames:
            frame = session.masked_input(self.delta, 5, 2, {"train_loss": 0.7})[1]
            self.masked_frames[device_id] = frame
            outgoing += self.manager.accept_secure(*_device_message(frame))[2]
        return outgoing

    def _from_agent(self) -> list[Outgoing]:
        assert self.agent is not None
        published = self.agent.transport.published[self._agent_seen :]  # type: ignore[union-attr]
        self._agent_seen += len(published)
        outgoing: list[Outgoing] = []
        for _, payload in published:
            frame = decode_frame(payload)
            message = frame.message
            self.agent_messages.append(message)
            if isinstance(message, SecAggEnvelope):
                outgoing += self.manager.accept_secure(message, frame.body)[2]
            elif isinstance(message, AssignmentDecline):
                reasons = "; ".join(message.reasons)
                refused, more = self.manager.accept_decline(
                    message.task, message.server_round, message.device_id, reasons
                )
                assert not refused, refused
                outgoing += more
        return outgoing


def _fail_once_phase_is_done(
    monkeypatch: pytest.MonkeyPatch, manager: RoundManager, phase: SecurePhase
) -> None:
    """Make the coordinator fail right after storing the last answer of `phase`, before
    it moves the round on (once)."""
    secure = manager.secure
    advance = secure._advance

    def failing(task: object, state: object, deadline_passed: bool) -> object:
        if state.phase is phase and not secure._waiting_for(state):  # type: ignore[attr-defined]
            monkeypatch.setattr(secure, "_advance", advance)
            raise _Killed(f"after the last answer of the {phase.value} phase")
        return advance(task, state, deadline_passed)  # type: ignore[arg-type]

    monkeypatch.setattr(secure, "_advance", failing)


NEXT_PHASE = {
    SecurePhase.ADVERTISING: SecurePhase.SHARING,
    SecurePhase.SHARING: SecurePhase.MASKING,
    SecurePhase.MASKING: SecurePhase.UNMASKING,
    SecurePhase.UNMASKING: SecurePhase.COMPLETED,
}


@pytest.mark.parametrize("phase", list(NEXT_PHASE))
def test_a_secure_phase_answered_before_a_kill_moves_on_at_restart(
    tmp_path: Path, tiny_bert_folder: Path, monkeypatch: pytest.MonkeyPatch, phase: SecurePhase
) -> None:
    """The coordinator is killed right after storing the last answer of `phase` (the last
    advert, share set, masked input or unmask response), before moving the round on. Its
    devices have nothing left to send (what they re-send is a duplicate), so the restarted
    coordinator must move the round on itself: the round completes without the clock
    moving, instead of waiting out the phase's deadline (300 s for the masked inputs)."""
    clock = Clock()
    config = _config(tmp_path, tiny_bert_folder, quota=3, min_updates=2, secure=True)
    manager = _manager(config, clock)
    manager.start()
    fleet = SecureFleet(manager, _assignments(manager.open_rounds_if_possible(_devices(3))))
    _fail_once_phase_is_done(monkeypatch, manager, phase)
    with pytest.raises(_Killed):
        fleet.advertise()
    manager.store.close()
    manager.secure.secure_store.close()

    restarted = _manager(config, clock)
    fleet.manager = restarted
    outgoing = restarted.start()
    state = restarted.secure.secure_store.state("alpha", 1)
    assert state is not None and state.phase is NEXT_PHASE[phase]
    fleet.deliver(outgoing)
    record = restarted.store.round("alpha", 1)
    assert record is not None and record.state is RoundState.COMPLETED, record.reason
    assert "summed 3 masked inputs, 0 dropped" in (record.reason or "")


def test_a_resent_masked_input_moves_on_a_phase_left_answered(
    tmp_path: Path, tiny_bert_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coordinator failed after storing the last masked input and before moving on,
    and went on running (an error caught at its loop, not a kill). The device's outbox
    re-sends its unacknowledged input: a duplicate, which makes the coordinator check the
    phase again and ask for the unmasking."""
    clock = Clock()
    config = _config(tmp_path, tiny_bert_folder, quota=3, min_updates=2, secure=True)
    manager = _manager(config, clock)
    manager.start()
    fleet = SecureFleet(manager, _assignments(manager.open_rounds_if_possible(_devices(3))))
    _fail_once_phase_is_done(monkeypatch, manager, SecurePhase.MASKING)
    with pytest.raises(_Killed):
        fleet.advertise()
    last = list(fleet.masked_frames)[-1]

    status, _, outgoing = manager.accept_secure(*_device_message(fleet.masked_frames[last]))
    assert status is AckStatus.DUPLICATE
    state = manager.secure.secure_store.state("alpha", 1)
    assert state is not None and state.phase is SecurePhase.UNMASKING
    fleet.deliver(outgoing)
    record = manager.store.round("alpha", 1)
    assert record is not None and record.state is RoundState.COMPLETED, record.reason


def test_an_agent_restarted_in_a_secure_round_declines_it_at_once(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    """An agent killed mid-training in a secure round has lost its keys (memory only).
    Handed the retained assignment again, it declines with the reason instead of
    advertising new keys the coordinator refuses (the key exchange is over) and waiting
    for ever; the coordinator counts it as dropped out, and the others' round completes at
    once rather than at its deadline. Before the restart, a repeated assignment is
    answered with the same keys, not a decline."""
    clock = Clock()
    key = generate_private_key()
    config = _config(tmp_path, tiny_bert_folder, quota=3, min_updates=2, secure=True)
    manager = _manager(config, clock, key)
    manager.start()
    agent = _agent(tmp_path / "agent", key)  # device "pi-1", trusting this coordinator
    opened = manager.open_rounds_if_possible(_devices(3, ("pi-1", "dev-1", "dev-2")))
    retained = [item for item in _task_messages(opened) if "/pi-1/" in item.topic]
    fleet = SecureFleet(manager, _assignments(opened), agent)
    try:
        fleet.advertise()
        fleet.deliver(retained)  # the agent advertises; the key exchange runs
        fleet.deliver(retained)  # a repeated assignment: the same keys again
        assert [m.step for m in fleet.agent_messages if isinstance(m, SecAggEnvelope)] == [
            SecAggStep.ADVERTISE_KEYS,
            SecAggStep.SHARE_KEYS,
            SecAggStep.ADVERTISE_KEYS,
        ]
        assert not any(isinstance(m, AssignmentDecline) for m in fleet.agent_messages)
        assert set(fleet.masked_frames) == {"dev-1", "dev-2"}
        state = manager.secure.secure_store.state("alpha", 1)
        assert state is not None and state.phase is SecurePhase.MASKING  # waits for pi-1

        restarted = fleet.restart_agent()  # killed mid-training
        fleet.deliver(retained)  # the broker hands it the retained assignment again
        assert len(fleet.agent_messages) == 1, fleet.agent_messages
        decline = fleet.agent_messages[0]
        assert isinstance(decline, AssignmentDecline)
        assert decline.reasons == (KEYS_LOST_ON_RESTART,)
        record = manager.store.round("alpha", 1)
        assert record is not None and record.state is RoundState.COMPLETED, record.reason
        assert "summed 2 masked inputs, 1 dropped" in (record.reason or "")
        assert manager.store.declined_devices("alpha", 1) == {"pi-1": KEYS_LOST_ON_RESTART}
        assert restarted.history.seen("alpha", 1)  # declined: a repeat is ignored
        fleet.deliver(retained)
        assert len(fleet.agent_messages) == 1
    finally:
        fleet.agent.stop()  # type: ignore[union-attr]


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
