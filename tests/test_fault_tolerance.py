"""Crash safety with real processes: SIGKILL the coordinator and an agent mid-round,
restart the broker mid-round, freeze devices past the deadline. The model is a tiny random
BERT (the subject here is the round lifecycle, not model quality)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from coordinator.mosquitto import MosquittoProcess
from coordinator.store import CoordinatorStore, RoundState
from durable.crash_points import CRASH_AT_ENVIRONMENT
from edge_runtime.outbox import Outbox
from tests.fleet import TASK, Fleet, make_fleet

pytestmark = pytest.mark.integration

PROFILES = ["laptop-mid-16gb"] * 3


def _fleet(
    tmp_path: Path,
    broker: MosquittoProcess,
    model: Path,
    coordinator: dict[str, object] | None = None,
    **task: object,
) -> Fleet:
    fleet = make_fleet(tmp_path, broker)
    settings = {
        "base_model": str(model),
        "rounds": 2,
        "local_steps": 20,
        "batch_size": 4,
        "seq_len": 24,
        "schedule": {"round_deadline_seconds": 300.0},
    }
    settings.update(task)
    fleet.write_coordinator_config(coordinator, **settings)
    fleet.add_agents(fleet.shards, PROFILES)
    return fleet


def _store(fleet: Fleet) -> CoordinatorStore:
    return CoordinatorStore(fleet.root / "coordinator" / "coordinator.db")


def test_sigkill_coordinator_and_agent_mid_round(
    tmp_path: Path, mosquitto: MosquittoProcess, tiny_bert_folder: Path
) -> None:
    fleet = _fleet(tmp_path, mosquitto, tiny_bert_folder)
    try:
        fleet.start_coordinator()
        fleet.enroll_agents()
        for index in range(3):
            fleet.start_agent(index)
        assert fleet.wait_for_log("coordinator", "round 1 opened", 120), fleet.log("coordinator")
        fleet.kill("coordinator")  # SIGKILL with round 1 open and assignments out

        # dev-0 trains, stores its update in the outbox, publishes; kill it before any ack
        # can reach it (the coordinator is dead, so none can).
        assert fleet.wait_for_log("dev-0", "uploading", 120), fleet.log("dev-0")
        fleet.kill("dev-0")
        outbox = Outbox(fleet.root / "dev-0" / "state" / "outbox.db")
        assert [p.round_number for p in outbox.pending()] == [1]
        outbox.close()

        coordinator = fleet.start_coordinator()  # resumes the open round from its store
        fleet.start_agent(0)  # re-sends from its outbox
        coordinator.wait(timeout=300)
        assert coordinator.returncode == 0, fleet.log("coordinator")[-4000:]
        assert fleet.wait_for_log("dev-0", "acknowledged", 60)
    finally:
        fleet.stop_all()

    store = _store(fleet)
    rounds = store.rounds(TASK)
    assert [r.state for r in rounds] == [RoundState.COMPLETED, RoundState.COMPLETED]
    for record in rounds:
        devices = [u.device_id for u in store.updates(TASK, record.round_number)]
        assert sorted(devices) == ["dev-0", "dev-1", "dev-2"], "each update counted once"
    assert "sending unacknowledged" in fleet.log("dev-0")
    outbox = Outbox(fleet.root / "dev-0" / "state" / "outbox.db")
    assert outbox.pending() == [], "the acknowledged update left the outbox"


def test_broker_restart_mid_round(
    tmp_path: Path, mosquitto: MosquittoProcess, tiny_bert_folder: Path
) -> None:
    fleet = _fleet(tmp_path, mosquitto, tiny_bert_folder, local_steps=40)
    try:
        coordinator = fleet.start_coordinator()
        fleet.enroll_agents()
        for index in range(3):
            fleet.start_agent(index)
        assert fleet.wait_for_log("coordinator", "round 1 opened", 120)
        mosquitto.restart()
        coordinator.wait(timeout=300)
        assert coordinator.returncode == 0, fleet.log("coordinator")[-4000:]
    finally:
        fleet.stop_all()
    rounds = _store(fleet).rounds(TASK)
    assert [r.state for r in rounds] == [RoundState.COMPLETED, RoundState.COMPLETED]


def test_silent_devices_do_not_stall_rounds(
    tmp_path: Path, mosquitto: MosquittoProcess, tiny_bert_folder: Path
) -> None:
    """A frozen device (SIGSTOP: connected but silent) is waited for only until the
    deadline; with a quorum the round completes, without one it fails and the global
    adapter stays as it was."""
    fleet = _fleet(
        tmp_path,
        mosquitto,
        tiny_bert_folder,
        coordinator={"device_timeout_seconds": 600.0},
        schedule={"min_updates": 2, "round_deadline_seconds": 25.0},
    )
    try:
        fleet.start_coordinator()
        fleet.enroll_agents()
        for index in range(3):
            fleet.start_agent(index)
        assert fleet.wait_for_log("coordinator", "round 1 opened: 3 devices", 120)
        fleet.processes["dev-2"].send_signal(signal.SIGSTOP)
        # dev-1 answers round 1, then freezes too: round 2 will hear from dev-0 only.
        assert fleet.wait_for_log("dev-1", "acknowledged (accepted)", 60), fleet.log("dev-1")
        fleet.processes["dev-1"].send_signal(signal.SIGSTOP)
        assert fleet.wait_for_log("coordinator", "round 1 completed (deadline with quorum)", 90)
        assert fleet.wait_for_log("coordinator", "round 2 failed", 120), fleet.log("coordinator")
        store = _store(fleet)
        round2 = store.round(TASK, 2)
        assert round2 is not None and round2.state is RoundState.FAILED
        assert "quorum is 2" in (round2.reason or "") and "unchanged" in (round2.reason or "")
        assert [v.version for v in store.adapter_versions(TASK)] == [0, 1], (
            "a failed round adds no version"
        )
        assert sorted(u.device_id for u in store.updates(TASK, 1)) == ["dev-0", "dev-1"]
        assert [u.device_id for u in store.updates(TASK, 2)] == ["dev-0"]
    finally:
        for name in ("dev-1", "dev-2"):
            if name in fleet.processes:
                fleet.processes[name].send_signal(signal.SIGCONT)
        fleet.stop_all()


def test_an_agent_killed_mid_training_gets_its_assignment_again(
    tmp_path: Path, mosquitto: MosquittoProcess, tiny_bert_folder: Path
) -> None:
    """The agent keeps no memory of an assignment it has not finished; restarted, it finds
    the retained assignment on the broker and trains, so the round completes long before
    its 300 s deadline, with all three updates."""
    fleet = _fleet(tmp_path, mosquitto, tiny_bert_folder, rounds=1)
    try:
        coordinator = fleet.start_coordinator()
        fleet.enroll_agents()
        fleet.start_agent(0, env={CRASH_AT_ENVIRONMENT: "training-step:5"})
        for index in (1, 2):
            fleet.start_agent(index)
        assert fleet.processes["dev-0"].wait(timeout=180) == -signal.SIGKILL, fleet.log("dev-0")
        assert "crash point training-step reached" in fleet.log("dev-0")
        fleet.start_agent(0)
        coordinator.wait(timeout=150)  # well before the round's 300 s deadline
        assert coordinator.returncode == 0, fleet.log("coordinator")[-4000:]
    finally:
        fleet.stop_all()
    store = _store(fleet)
    record = store.round(TASK, 1)
    assert record is not None and record.state is RoundState.COMPLETED, record
    assert "deadline" not in (record.reason or "")
    assert sorted(u.device_id for u in store.updates(TASK, 1)) == ["dev-0", "dev-1", "dev-2"]


def test_a_secure_round_survives_a_kill_between_the_two_stores(
    tmp_path: Path, mosquitto: MosquittoProcess, tiny_bert_folder: Path
) -> None:
    """The coordinator dies right after committing a secure round in coordinator.db, before
    secure_rounds.db has it; restarted, it starts the round's key exchange and finishes."""
    fleet = _fleet(
        tmp_path,
        mosquitto,
        tiny_bert_folder,
        rounds=1,
        scheme="none",
        secure_aggregation={"enabled": True, "step_seconds": 30.0, "clip_bound": 1.0},
    )
    try:
        first = fleet.start_coordinator(env={CRASH_AT_ENVIRONMENT: "round-opened:1"})
        fleet.enroll_agents()
        for index in range(3):
            fleet.start_agent(index)
        assert first.wait(timeout=180) == -signal.SIGKILL, fleet.log("coordinator")[-4000:]
        coordinator = fleet.start_coordinator()
        coordinator.wait(timeout=180)
        assert coordinator.returncode == 0, fleet.log("coordinator")[-4000:]
    finally:
        fleet.stop_all()
    assert "open without secure-aggregation state" in fleet.log("coordinator")
    record = _store(fleet).round(TASK, 1)
    assert record is not None and record.state is RoundState.COMPLETED, record
