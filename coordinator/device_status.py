"""What an operator sees of each device: its latest heartbeat facts, and why it sat a round out.

The agent's DeviceState heartbeat says whether the device is eligible and, when it is not,
why (a busy CPU, battery power, the hour); before this module that lived only in the raw
MQTT message. The daemon keeps the latest facts per device in `device_heartbeats`, and when
it opens a round it writes, for every enrolled device it did not choose, the reason in
`round_left_out` (task, round, device). `schoolfl coordinator devices` and `status` read
both; nothing here decides anything about scheduling.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_runtime.wire import DeviceState

if TYPE_CHECKING:
    from coordinator.store import CoordinatorStore

logger = logging.getLogger(__name__)

HEARTBEAT_RECORD_SECONDS = 60.0
"""A heartbeat whose facts did not change is written at most this often per device."""

NO_REASON_RECORDED = "not chosen (no reason recorded)"


@dataclass(frozen=True)
class HeartbeatFacts:
    """The facts of one device's latest recorded heartbeat."""

    device_id: str
    online: bool
    eligible: bool
    ineligible_reasons: tuple[str, ...]
    cpu_load: float
    free_memory_bytes: int
    power_source: str
    battery_percent: float | None
    received_at: float

    @property
    def change_key(self) -> tuple[object, ...]:
        """What makes a heartbeat news. CPU load, free memory and battery move on every
        tick, so they are refreshed only with the periodic write."""
        return (self.online, self.eligible, self.ineligible_reasons, self.power_source)


def facts_from_state(state: DeviceState, received_at: float) -> HeartbeatFacts:
    return HeartbeatFacts(
        device_id=state.device_id,
        online=state.online,
        eligible=state.eligible,
        ineligible_reasons=tuple(state.ineligible_reasons),
        cpu_load=state.cpu_load,
        free_memory_bytes=state.free_memory_bytes,
        power_source=state.power_source.value,
        battery_percent=state.battery_percent,
        received_at=received_at,
    )


Transaction = Callable[[], AbstractContextManager[sqlite3.Connection]]


class DeviceStatusTable:
    """The `device_heartbeats` and `round_left_out` tables of the coordinator's store."""

    def __init__(self, db: sqlite3.Connection, transaction: Transaction) -> None:
        self._db = db
        self._transaction = transaction

    def record_heartbeat(self, facts: HeartbeatFacts) -> None:
        self.record_heartbeats([facts])

    def record_heartbeats(self, batch: list[HeartbeatFacts]) -> None:
        """Write a batch of heartbeats in one transaction (one disk sync, not one each)."""
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO device_heartbeats(device_id, online, eligible,"
                " ineligible_reasons_json, cpu_load, free_memory_bytes, power_source,"
                " battery_percent, received_at) VALUES (?,?,?,?,?,?,?,?,?)",
                [
                    (
                        facts.device_id,
                        int(facts.online),
                        int(facts.eligible),
                        json.dumps(list(facts.ineligible_reasons)),
                        facts.cpu_load,
                        facts.free_memory_bytes,
                        facts.power_source,
                        facts.battery_percent,
                        facts.received_at,
                    )
                    for facts in batch
                ],
            )

    def heartbeats(self) -> dict[str, HeartbeatFacts]:
        rows = self._db.execute(
            "SELECT device_id, online, eligible, ineligible_reasons_json, cpu_load,"
            " free_memory_bytes, power_source, battery_percent, received_at"
            " FROM device_heartbeats ORDER BY device_id"
        ).fetchall()
        return {
            row[0]: HeartbeatFacts(
                row[0], bool(row[1]), bool(row[2]), tuple(json.loads(row[3])), *row[4:]
            )
            for row in rows
        }

    def record_left_out(self, task_id: str, round_number: int, reasons: Mapping[str, str]) -> None:
        """Why each not-chosen device sat round `round_number` out, in one transaction."""
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO round_left_out(task_id, round_number, device_id, reason)"
                " VALUES (?,?,?,?)",
                [(task_id, round_number, device, reason) for device, reason in reasons.items()],
            )

    def left_out(self, task_id: str, round_number: int) -> dict[str, str]:
        rows = self._db.execute(
            "SELECT device_id, reason FROM round_left_out WHERE task_id=? AND round_number=?"
            " ORDER BY device_id",
            (task_id, round_number),
        ).fetchall()
        return dict(rows)


class HeartbeatRecorder:
    """Decides which accepted heartbeats reach the store.

    Agents send one every ~10 s; a district has thousands of devices, and a write per
    heartbeat would make the coordinator's disk work proportional to idle devices. So a
    heartbeat is written only when its facts changed (online, eligible, the reasons, the
    power source: `HeartbeatFacts.change_key`) or when the device's last write is
    `interval_seconds` old. The stored `received_at` (and with it "last heartbeat N s ago")
    is therefore up to `interval_seconds` older than the device's latest heartbeat; readers
    allow for that before they call a device offline (`online_now`).
    """

    def __init__(
        self, table: DeviceStatusTable, interval_seconds: float = HEARTBEAT_RECORD_SECONDS
    ) -> None:
        self.table = table
        self.interval_seconds = interval_seconds
        self._written: dict[str, tuple[tuple[object, ...], float]] = {}
        """Device id -> (the change key, the time) of its last write from this process."""
        self._pending: dict[str, HeartbeatFacts] = {}
        """Device id -> its newest heartbeat waiting for `flush` (one row per device)."""
        self._last_failure_logged = float("-inf")

    def note(self, facts: HeartbeatFacts) -> bool:
        """Queue `facts` for the next `flush` when they are news or due; True when queued."""
        last = self._written.get(facts.device_id)
        if (
            last is not None
            and last[0] == facts.change_key
            and facts.received_at - last[1] < self.interval_seconds
        ):
            return False
        self._pending[facts.device_id] = facts
        return True

    def flush(self) -> int:
        """Write the queued heartbeats in one transaction (the daemon calls this every
        tick: at 5,000 devices one sync per write was a fifth of an idle coordinator's CPU);
        the number written. Never raises: a store that refuses the rows (a full disk) must
        not cost the heartbeats themselves, which the scheduler already holds in memory; it
        is logged (at most once a minute) and the rows stay queued for the next flush."""
        if not self._pending:
            return 0
        batch = list(self._pending.values())
        try:
            self.table.record_heartbeats(batch)
        except sqlite3.Error as error:
            newest = max(facts.received_at for facts in batch)
            if newest - self._last_failure_logged >= HEARTBEAT_RECORD_SECONDS:
                self._last_failure_logged = newest
                logger.warning(
                    "cannot record heartbeats in the store (%s); `coordinator devices` shows "
                    "older facts until it can",
                    error,
                )
            return 0
        for facts in batch:
            self._written[facts.device_id] = (facts.change_key, facts.received_at)
        self._pending.clear()
        return len(batch)


def online_now(facts: HeartbeatFacts | None, now: float, device_timeout_seconds: float) -> bool:
    """Whether the stored heartbeat says the device is online: it said so, and the stored
    heartbeat is not older than the daemon's timeout plus the recorder's write interval."""
    if facts is None or not facts.online:
        return False
    return now - facts.received_at <= device_timeout_seconds + HEARTBEAT_RECORD_SECONDS


# -- why a device was left out of a round --------------------------------------------------


def not_a_candidate_reason(
    revoked: bool,
    state: DeviceState | None,
    heartbeat_age_seconds: float,
    device_timeout_seconds: float,
) -> str | None:
    """Why the daemon's candidate filter drops an enrolled device, or None when it keeps it."""
    if revoked:
        return "revoked"
    if state is None:
        return "offline (no heartbeat since the coordinator started)"
    if not state.online:
        return "offline (its agent went offline)"
    if heartbeat_age_seconds > device_timeout_seconds:
        return (
            f"offline (last heartbeat {heartbeat_age_seconds:.0f} s ago, timeout "
            f"{device_timeout_seconds:.0f} s)"
        )
    if not state.eligible:
        reasons = "; ".join(state.ineligible_reasons) or "no reason given"
        return f"not eligible: {reasons}"
    return None


def scheduler_reason(strategy: str, reason: str) -> str:
    """A scheduler's reason for leaving a candidate out, in the operator's words: either the
    plan could not be made to fit the device, or the scheduler chose others."""
    choice_prefix = "not selected this round"
    if reason.startswith(choice_prefix):
        detail = reason[len(choice_prefix) :].strip().removeprefix("(").removesuffix(")")
        return f"not selected by the scheduler ({strategy}: {detail or 'others chosen'})"
    if reason.startswith("school ") and "link is full" in reason:
        return f"not selected by the scheduler ({strategy}: {reason})"
    return f"plan does not fit: {reason}"


def left_out_reasons(
    enrolled: Iterable[str],
    chosen: Iterable[str],
    not_candidates: Mapping[str, str],
    selection: Mapping[str, str],
    busy: Mapping[str, str],
) -> dict[str, str]:
    """Every enrolled device not chosen -> why, the first decision that dropped it first:
    the candidate filter, then the selection (policy, secure aggregation, scheduler), then
    another task's open round."""
    chosen_ids = set(chosen)
    reasons: dict[str, str] = {}
    for device_id in enrolled:
        if device_id in chosen_ids:
            continue
        reasons[device_id] = (
            not_candidates.get(device_id)
            or selection.get(device_id)
            or busy.get(device_id)
            or NO_REASON_RECORDED
        )
    return reasons


def busy_elsewhere(
    assignments_by_round: Mapping[tuple[str, int], Iterable[str]],
) -> Iterator[tuple[str, str]]:
    """(device, "busy: ...") for each device assigned in one of the given open rounds."""
    for (task_id, round_number), devices in sorted(assignments_by_round.items()):
        for device_id in devices:
            yield device_id, f"busy: training task {task_id} round {round_number}"


def record_left_out(
    store: CoordinatorStore,
    enrolled: Iterable[str],
    opened: Iterable[tuple[str, int]],
    assigned: Mapping[tuple[str, int], Iterable[str]],
    not_candidates: Mapping[str, str],
    selection_left_out: Mapping[str, Mapping[str, str]],
) -> None:
    """For each round just `opened`, store why every enrolled device it did not choose sat
    it out. `assigned` holds the devices of every open round (the round manager's views;
    those of the other open rounds are "busy"). Its own transaction after the round's: a
    crash between the two leaves a round whose left-out devices read NO_REASON_RECORDED."""
    enrolled = list(enrolled)
    for key in sorted(opened):
        others = {other: ids for other, ids in assigned.items() if other != key}
        reasons = left_out_reasons(
            enrolled,
            assigned.get(key, ()),
            not_candidates,
            selection_left_out.get(key[0], {}),
            dict(busy_elsewhere(others)),
        )
        store.device_status.record_left_out(key[0], key[1], reasons)
