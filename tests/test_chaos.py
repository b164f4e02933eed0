"""Chaos, bounded: a real coordinator, three real agents and a real broker, with SIGKILLs at
the worst moments chosen by a seeded generator, and a broker restart.

The kills come from the processes themselves (`SCHOOLFL_CRASH_AT`, durable/crash_points.py),
at the places only the code knows: right after the last update of a round is stored, with a
new version written but the round still open, with the round closed but nothing published,
with a round opened but its assignments not sent; on agents, mid-training and between the
outbox write and the history write. A killed process is restarted at once (with the next
kill of its plan, if any).

Afterwards everything is checked from what the processes left on disk (the coordinator's
store and adapter versions, each agent's outbox and round history), never from logs, except
for the coordinator's start times, which only its log records:
- every round completed or failed with a reason, and the task finished;
- no round waited past the moment its last answer was in (or the coordinator was back, if
  it was down then) by more than a few ticks;
- no update lost: each one an agent trained, or still holds in its outbox, is in the store;
- none counted twice: one update per device and round, and each version equals the one
  before plus the FedAvg of that round's stored updates, recomputed here.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
import torch

from coordinator.aggregation import ClientUpdate, apply_delta
from coordinator.assignments import stored_plan, trusted_sample_count, update_shapes
from coordinator.config import CoordinatorConfig
from coordinator.mosquitto import MosquittoProcess
from coordinator.privacy import make_aggregator
from coordinator.store import CoordinatorStore, RoundState
from durable.crash_points import CRASH_AT_ENVIRONMENT
from edge_runtime.outbox import Outbox, RoundHistory
from edge_runtime.wire import decode_update
from tests.fleet import TASK, Fleet, make_fleet

pytestmark = pytest.mark.integration

SEED = 20261201
ROUNDS = 4
DEVICES = 3
RUN_LIMIT_SECONDS = 480.0
"""The whole run must end by itself well inside this (it takes about two minutes here)."""
LIVENESS_SLACK_SECONDS = 15.0
"""How long after its last answer (or the coordinator's return) a round may take to close:
a few 0.1 s ticks, plus loading the task model after a restart and aggregating, evaluating
and writing the tiny model's version, on a loaded 2-core machine (5.2 s was seen). A round
left waiting for an answer that never comes waits its 120 s deadline instead."""
START_LINE = re.compile(r"^(\S+ \S+) INFO coordinator\.daemon: coordinator for fleet", re.M)


@dataclass
class ChaosPlan:
    """Which crash point each life of each process is armed with (none once used up)."""

    coordinator: list[str]
    agents: dict[int, list[str]]
    broker_restart_after: float
    """Seconds after every agent was started."""
    kills: list[str] = field(default_factory=list)
    """What actually happened, in order, for the failure messages."""

    def next_for(self, name: str) -> dict[str, str]:
        lives = self.coordinator if name == "coordinator" else self.agents[int(name[4:])]
        return {CRASH_AT_ENVIRONMENT: lives.pop(0)} if lives else {}


def chaos_plan(seed: int) -> ChaosPlan:
    rng = random.Random(seed)
    coordinator = [
        f"update-stored:{rng.choice((DEVICES, 2 * DEVICES))}",  # the last update of a round
        "version-written:1",
        "round-closed:1",
        f"round-opened:{rng.choice((1, 2))}",
    ]
    rng.shuffle(coordinator)
    first, second = rng.sample(range(DEVICES), 2)
    agents: dict[int, list[str]] = {index: [] for index in range(DEVICES)}
    agents[first] = [f"training-step:{rng.randint(2, 9)}", f"training-step:{rng.randint(12, 19)}"]
    agents[second] = ["update-queued:1"]
    return ChaosPlan(coordinator, agents, broker_restart_after=rng.uniform(15.0, 40.0))


def _fleet(tmp_path: Path, broker: MosquittoProcess, model: Path) -> Fleet:
    fleet = make_fleet(tmp_path, broker, num_devices=DEVICES)
    fleet.write_coordinator_config(
        {"startup_grace_seconds": 2.0},
        base_model=str(model),
        rounds=ROUNDS,
        local_steps=10,
        batch_size=4,
        seq_len=24,
        update_encoding="fp32",
        schedule={"min_updates": 2, "round_deadline_seconds": 120.0},
    )
    fleet.add_agents(fleet.shards, ["laptop-mid-16gb"] * DEVICES)
    return fleet


def _run_with_kills(fleet: Fleet, broker: MosquittoProcess, plan: ChaosPlan) -> None:
    """Start everything, restart whatever kills itself, restart the broker once; return
    when the coordinator exits by itself (every round done)."""
    fleet.start_coordinator(env=plan.next_for("coordinator"))
    fleet.enroll_agents()
    for index in range(DEVICES):
        fleet.start_agent(index, env=plan.next_for(f"dev-{index}"))
    broker_restart_at = time.monotonic() + plan.broker_restart_after
    deadline = time.monotonic() + RUN_LIMIT_SECONDS
    while time.monotonic() < deadline:
        if broker_restart_at and time.monotonic() >= broker_restart_at:
            broker.restart()
            plan.kills.append("broker restart")
            broker_restart_at = 0.0
        for name, process in list(fleet.processes.items()):
            code = process.poll()
            if code is None:
                continue
            if name == "coordinator" and code == 0:
                return
            assert code == -9, f"{name} exited {code}:\n{fleet.log(name)[-3000:]}"
            plan.kills.append(name)
            if name == "coordinator":
                fleet.start_coordinator(env=plan.next_for(name))
            else:
                fleet.start_agent(int(name[4:]), env=plan.next_for(name))
        time.sleep(0.2)
    raise AssertionError(f"not done in {RUN_LIMIT_SECONDS} s; kills {plan.kills}")


def _coordinator_starts(log: str) -> list[float]:
    """When each life of the coordinator was connected and about to resume its rounds."""
    return [
        datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for stamp in START_LINE.findall(log)
    ]


def _check_liveness(store: CoordinatorStore, starts: list[float], plan: ChaosPlan) -> None:
    for record in store.rounds(TASK):
        assert record.state in (RoundState.COMPLETED, RoundState.FAILED), record
        assert record.reason, f"round {record.round_number} closed without a reason"
        assert "deadline" not in record.reason, (record, plan.kills)  # nobody was waited out
        answered_at = max(u.received_at for u in store.update_summaries(TASK, record.round_number))
        assert record.closed_at is not None
        back_at = max((s for s in starts if s <= record.closed_at), default=0.0)
        waited = record.closed_at - max(answered_at, back_at)
        assert waited <= LIVENESS_SLACK_SECONDS, (
            f"round {record.round_number} closed {waited:.1f} s after its last answer; "
            f"kills {plan.kills}"
        )


def _check_nothing_lost(store: CoordinatorStore, fleet: Fleet) -> int:
    """Every update an agent trained (its history) or still holds (its outbox: only the
    acknowledgement was lost) is in the store, under the same id for the outbox's."""
    checked = 0
    for index in range(DEVICES):
        device_id = f"dev-{index}"
        state = fleet.root / device_id / "state"
        history = RoundHistory(state / "outbox.db")
        outbox = Outbox(state / "outbox.db")
        for entry in history.latest(limit=1000):
            if entry.outcome == "trained":
                stored = {u.device_id for u in store.update_summaries(TASK, entry.round_number)}
                assert device_id in stored, f"{device_id}'s round {entry.round_number} lost"
                checked += 1
        for pending in outbox.pending():
            stored_ids = {u.update_id for u in store.update_summaries(TASK, pending.round_number)}
            assert pending.update_id in stored_ids, f"{device_id}'s {pending.update_id} lost"
            checked += 1
        history.close()
        outbox.close()
    return checked


def _check_aggregates_exact(store: CoordinatorStore, config: CoordinatorConfig) -> None:
    """Each version is the previous one plus the FedAvg of its round's stored updates: an
    update counted twice (or one missing) would not give the same tensors."""
    task = config.task(TASK)
    versions = store.adapter_versions(TASK)
    assert [v.version for v in versions] == list(range(ROUNDS + 1))

    def state_of(version_folder: str) -> dict[str, torch.Tensor]:
        return decode_update(Path(version_folder).with_suffix(".body").read_bytes())

    for before, after in zip(versions, versions[1:], strict=False):
        reference = state_of(before.folder)
        plans = store.assignments(TASK, after.round_number)  # type: ignore[arg-type]
        stored = store.updates(TASK, after.round_number)  # type: ignore[arg-type]
        assert len({u.device_id for u in stored}) == len(stored)
        updates = []
        for u in stored:
            plan = stored_plan(plans[u.device_id])
            delta = decode_update(u.body, update_shapes(reference, plan.rank))
            samples = trusted_sample_count(u.num_samples, u.num_steps, plan)  # as weighed
            updates.append(ClientUpdate(u.device_id, delta, samples, u.num_steps, plan.rank))
        result = make_aggregator(task).aggregate(updates, reference)
        expected = apply_delta(reference, result.delta)
        actual = state_of(after.folder)
        for name, tensor in expected.items():
            assert torch.allclose(actual[name], tensor, atol=1e-6), (after.version, name)


def test_rounds_survive_seeded_kills_at_the_worst_moments(
    tmp_path: Path, mosquitto: MosquittoProcess, tiny_bert_folder: Path
) -> None:
    plan = chaos_plan(SEED)
    fleet = _fleet(tmp_path, mosquitto, tiny_bert_folder)
    try:
        _run_with_kills(fleet, mosquitto, plan)
    finally:
        fleet.stop_all()
    assert plan.kills.count("coordinator") >= 3, plan.kills
    assert sum(name.startswith("dev-") for name in plan.kills) >= 2, plan.kills

    store = CoordinatorStore(fleet.root / "coordinator" / "coordinator.db")
    completed = [r for r in store.rounds(TASK) if r.state is RoundState.COMPLETED]
    assert len(completed) == ROUNDS, (store.rounds(TASK), plan.kills)
    _check_liveness(store, _coordinator_starts(fleet.log("coordinator")), plan)
    assert _check_nothing_lost(store, fleet) >= ROUNDS * DEVICES - DEVICES
    _check_aggregates_exact(store, CoordinatorConfig.load(fleet.coordinator_config))
