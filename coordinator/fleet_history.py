"""What past rounds taught the scheduler about each device and school.

Utility-based selection (Oort) needs each device's last training loss and sample count; the
equity floor needs the last round each school took part in; over-selection needs observed
drop-out rates; and the cost model's predictions are corrected by how much slower (or faster)
each device really was. The daemon replays this from the store once, at start
(`history_from_store`), then feeds it each round that closes, as the simulator feeds it
outcomes (`observe`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

SPEED_SMOOTHING = 0.5
"""Weight of the newest observation in the exponential average of actual / predicted time."""
SPEED_FACTOR_RANGE = (0.25, 8.0)
"""A single odd measurement cannot re-rate a device beyond these bounds."""


class StoredUpdateLike(Protocol):
    """What `round_outcomes` reads of a stored update (coordinator.store.StoredUpdate)."""

    @property
    def device_id(self) -> str: ...
    @property
    def num_samples(self) -> int: ...
    @property
    def metrics(self) -> dict[str, float]: ...
    @property
    def received_at(self) -> float: ...


@dataclass
class DeviceStats:
    """One device's record over the rounds the scheduler has seen."""

    assigned: int = 0
    completed: int = 0
    """Updates that were aggregated."""
    delivered: int = 0
    """Updates that arrived at all, aggregated or not (late, or after the quota closed the
    round): a device that delivers is not a drop-out, even when its update came too late."""
    last_round: int = 0
    """Last round the device was assigned (0: never)."""
    last_loss: float | None = None
    """Mean training loss of its last completed round (Oort's statistical utility)."""
    last_samples: int = 0
    speed_factor: float = 1.0
    """Exponential average of actual / predicted round seconds: >1 means slower than its
    profile says; predictions for this device are multiplied by it."""

    @property
    def explored(self) -> bool:
        return self.last_loss is not None

    @property
    def dropouts(self) -> int:
        return self.assigned - self.delivered

    def observe_duration(self, actual_seconds: float, predicted_seconds: float) -> None:
        if actual_seconds <= 0 or predicted_seconds <= 0:
            return
        ratio = actual_seconds / predicted_seconds
        low, high = SPEED_FACTOR_RANGE
        blended = (1 - SPEED_SMOOTHING) * self.speed_factor + SPEED_SMOOTHING * ratio
        self.speed_factor = min(high, max(low, blended))


@dataclass(frozen=True)
class RoundOutcome:
    """What happened to one assigned device in one round."""

    device_id: str
    school: str
    completed: bool
    """Its update arrived before the round closed."""
    loss: float | None = None
    samples: int = 0
    actual_seconds: float | None = None
    """Assignment to arrival of its update (or None when it never arrived)."""
    predicted_seconds: float | None = None
    delivered: bool | None = None
    """Its update arrived, even if too late to count; None: the same as `completed`."""


@dataclass
class FleetHistory:
    """Per-device statistics and per-school participation of one task."""

    devices: dict[str, DeviceStats] = field(default_factory=dict)
    school_last_round: dict[str, int] = field(default_factory=dict)
    """Last round in which at least one of the school's updates was aggregated."""
    school_rounds: dict[str, int] = field(default_factory=dict)
    """How many rounds each school took part in."""

    def device(self, device_id: str) -> DeviceStats:
        stats = self.devices.get(device_id)
        if stats is None:
            stats = self.devices[device_id] = DeviceStats()
        return stats

    def observe(self, round_number: int, outcomes: Iterable[RoundOutcome]) -> None:
        took_part: set[str] = set()
        for outcome in outcomes:
            stats = self.device(outcome.device_id)
            stats.assigned += 1
            stats.last_round = max(stats.last_round, round_number)
            if outcome.actual_seconds is not None and outcome.predicted_seconds:
                stats.observe_duration(outcome.actual_seconds, outcome.predicted_seconds)
            delivered = outcome.completed if outcome.delivered is None else outcome.delivered
            stats.delivered += int(delivered or outcome.completed)
            if outcome.completed:
                stats.completed += 1
                stats.last_loss = outcome.loss if outcome.loss is not None else stats.last_loss
                stats.last_samples = outcome.samples
                took_part.add(outcome.school)
        for school in took_part:
            self.school_last_round[school] = max(
                self.school_last_round.get(school, 0), round_number
            )
            self.school_rounds[school] = self.school_rounds.get(school, 0) + 1

    def dropout_rate(self, prior_rate: float, prior_weight: float = 4.0) -> float:
        """Fleet-wide share of assignments that never delivered, shrunk towards the
        configured over-selection prior until there are enough observations."""
        assigned = sum(s.assigned for s in self.devices.values())
        dropped = sum(s.dropouts for s in self.devices.values())
        return (dropped + prior_rate * prior_weight) / (assigned + prior_weight)

    def device_dropout_rate(self, device_id: str, fleet_rate: float) -> float:
        """One device's drop-out probability: its own record, shrunk towards the fleet's."""
        stats = self.devices.get(device_id)
        if stats is None:
            return fleet_rate
        prior_weight = 2.0
        return (stats.dropouts + fleet_rate * prior_weight) / (stats.assigned + prior_weight)


def round_outcomes(
    opened_at: float,
    plans_json: Mapping[str, str],
    schools: Mapping[str, str],
    updates: Iterable[StoredUpdateLike],
) -> list[RoundOutcome]:
    """What happened to each assigned device of one closed round, from its stored
    assignments (`plans_json`: device -> assignment JSON) and update summaries.

    Actual round seconds are measured at the coordinator, from the round's opening to the
    arrival of the update. The store keeps only accepted updates, so here a device whose
    update came after the round closed counts as a drop-out and is not re-rated from that
    late arrival (the simulator, which sees late arrivals, does both)."""
    by_device = {u.device_id: u for u in updates}
    outcomes = []
    for device_id, plan_json in plans_json.items():
        predicted = json.loads(plan_json).get("predicted_round_seconds") or None
        update = by_device.get(device_id)
        actual = None
        if update is not None and update.received_at:
            actual = max(0.0, update.received_at - opened_at)
        loss = update.metrics.get("train_loss") if update is not None else None
        outcomes.append(
            RoundOutcome(
                device_id=device_id,
                school=schools.get(device_id, ""),
                completed=update is not None,
                loss=None if loss is None or not math.isfinite(loss) else float(loss),
                samples=update.num_samples if update is not None else 0,
                actual_seconds=actual,
                predicted_seconds=predicted,
            )
        )
    return outcomes


def history_from_store(store: object, task_id: str) -> FleetHistory:
    """Replay a task's closed rounds from the coordinator store into a `FleetHistory`
    (`round_outcomes` for each). The daemon does this once, at start; after that it feeds
    each round that closes to the history it keeps (`FleetHistory.observe`)."""
    from coordinator.store import CoordinatorStore, RoundState

    assert isinstance(store, CoordinatorStore)
    history = FleetHistory()
    for record in store.rounds(task_id):
        if record.state is RoundState.OPEN:
            continue
        rows = store.assignment_rows(task_id, record.round_number)
        outcomes = round_outcomes(
            record.opened_at,
            {row.device_id: row.plan_json for row in rows},
            {row.device_id: row.school for row in rows},
            store.update_summaries(task_id, record.round_number),
        )
        history.observe(record.round_number, outcomes)
    return history
