"""The round manager's in-memory view of each open round: its assignments, who reported,
who declined, and (plain FedAvg rounds) the running sum of its updates.

Loaded from the store once, when the round opens or when the coordinator starts, and kept
up to date as the manager writes rows, so that a message costs the same in a round of 500
devices as in a round of 2 (before, every update and decline re-read every assignment,
report and decline of its round: O(N) per message, O(N^2) per round). The store stays the
truth: a restarted coordinator builds the views again from it, running sums included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.aggregation import update_problem
from coordinator.assignments import stored_plan, trusted_sample_count, update_shapes
from coordinator.running_aggregate import RunningAggregate
from coordinator.store import CoordinatorStore, RoundRecord, StoredUpdate
from device_profiles.plan import TrainingPlan
from edge_runtime.wire import CodecError, decode_update
from quantization.adapter_deltas import TensorMap

logger = logging.getLogger(__name__)


@dataclass
class OpenRound:
    """One open round as the manager sees it between two store writes."""

    record: RoundRecord
    plans_json: dict[str, str]
    """Device id -> its stored assignment (`assignment_json`)."""
    schools: dict[str, str]
    """Device id -> the school it enrolled with."""
    reported: dict[str, str] = field(default_factory=dict)
    """Device id -> the id of its stored update."""
    declined: dict[str, str] = field(default_factory=dict)
    """Device id -> the reason it declined (or was released as revoked)."""
    running: RunningAggregate | None = None
    """The running FedAvg sum; None where the task aggregates otherwise (DP-FedAvg, secure
    aggregation) or the round holds no update yet."""
    _plans: dict[str, TrainingPlan] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return self.record.task_id, self.record.round_number

    def plan(self, device_id: str) -> TrainingPlan:
        """The device's plan, parsed once."""
        plan = self._plans.get(device_id)
        if plan is None:
            plan = self._plans[device_id] = stored_plan(self.plans_json[device_id])
        return plan

    def answered(self) -> int:
        """Assigned devices that reported or declined (each counted once)."""
        return len(self.reported) + sum(1 for d in self.declined if d not in self.reported)

    def note_decline(self, device_id: str, reason: str) -> None:
        self.declined[device_id] = reason[:500]

    @classmethod
    def load(cls, store: CoordinatorStore, record: RoundRecord) -> OpenRound:
        """The view of an open round as the store has it (its running sum not yet folded:
        `fold_stored`)."""
        rows = store.assignment_rows(record.task_id, record.round_number)
        return cls(
            record,
            {row.device_id: row.plan_json for row in rows},
            {row.device_id: row.school for row in rows},
            reported=store.reported_devices(record.task_id, record.round_number),
            declined={r.device_id: r.declined_reason for r in rows if r.declined_reason},
        )


def decode_checked(body: bytes, reference: TensorMap, rank: int) -> tuple[TensorMap | None, str]:
    """Decode an update against the global adapter for a plan of rank `rank`, and check it
    as aggregation would (`update_problem`: names, rank, shapes, dtype, finite): the delta,
    or None with the reason it is refused."""
    try:
        delta = decode_update(body, update_shapes(dict(reference), rank))
    except CodecError as error:
        return None, f"undecodable update: {error}"
    except ValueError as error:  # the stored plan does not fit the global adapter
        return None, f"plan rank {rank} does not fit: {error}"
    problem = update_problem(delta, reference, rank)
    if problem is not None:
        return None, f"refused: {problem}"
    return delta, ""


def fold(view: OpenRound, reference: TensorMap, stored: StoredUpdate, delta: TensorMap) -> None:
    """Add one stored, validated update to the view's running sum."""
    if view.running is None:
        view.running = RunningAggregate(reference)
    plan = view.plan(stored.device_id)
    weight = trusted_sample_count(stored.num_samples, stored.num_steps, plan)
    view.running.add(stored.device_id, delta, weight, plan.rank)


def fold_stored(
    view: OpenRound,
    store: CoordinatorStore,
    reference: TensorMap,
    devices: set[str] | None = None,
) -> int:
    """Fold the round's stored updates that the running sum lacks (all of them after a
    restart; any written behind the manager's back), one body at a time: the store is the
    truth. An update that no longer passes the checks (stored by an older coordinator) is
    kept out and reported at close. Returns how many were read."""
    task_id, round_number = view.key
    wanted = set(store.reported_devices(task_id, round_number)) if devices is None else devices
    if view.running is None:
        view.running = RunningAggregate(reference)
    missing = sorted(wanted - view.running.devices)
    for device_id in missing:
        stored = store.update_of(task_id, round_number, device_id)
        if stored is None or device_id not in view.plans_json:
            continue
        view.reported[device_id] = stored.update_id
        delta, reason = decode_checked(stored.body, reference, view.plan(device_id).rank)
        if delta is None:
            view.running.refused[device_id] = reason
            continue
        fold(view, reference, stored, delta)
    if missing:
        logger.info(
            "task %s round %d: %d stored update(s) folded into the running sum",
            task_id,
            round_number,
            len(missing),
        )
    return len(missing)


def stored_delta(
    store: CoordinatorStore, view: OpenRound, reference: TensorMap
) -> Callable[[str], TensorMap]:
    """`RunningAggregate.finish`'s `body_of`: decode one device's stored update again."""

    def body_of(device_id: str) -> TensorMap:
        stored = store.update_of(view.record.task_id, view.record.round_number, device_id)
        if stored is None:
            raise ValueError(f"{device_id!r} has no stored update in round {view.key}")
        shapes = update_shapes(dict(reference), view.plan(device_id).rank)
        return decode_update(stored.body, shapes)

    return body_of
