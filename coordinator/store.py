"""The coordinator's durable state in SQLite (WAL mode).

Every state change is one transaction, so a coordinator killed at any instant restarts
with the last committed state: open rounds, their assignments and every update already
acknowledged. Updates are keyed by their unique id (fleet, task, round, device, attempt)
and by (task, round, device), so a re-sent or replayed update is recognised and counted
once (DESIGN.md invariants 3 and 4). Update bodies are safetensors bytes; nothing here is
pickled.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from coordinator.device_status import DeviceStatusTable
from coordinator.refusals import UNKNOWN_SENDER, RefusalCount
from coordinator.store_records import (
    AdapterVersion,
    AssignmentRow,
    DeviceRecord,
    PrivacyRound,
    PrivacyStop,
    RoundRecord,
    RoundState,
    StoredUpdate,
    StoreError,
    UpdateOutcome,
    token_digest,
)
from coordinator.store_schema import ADDED_COLUMNS, SCHEMA, SCHEMA_VERSION
from durable.sqlite import open_database

logger = logging.getLogger(__name__)

__all__ = [
    "CoordinatorStore",
    "StoreError",
    "RoundState",
    "DeviceRecord",
    "RoundRecord",
    "StoredUpdate",
    "AdapterVersion",
    "AssignmentRow",
    "PrivacyRound",
    "PrivacyStop",
    "UpdateOutcome",
    "token_digest",
]


class CoordinatorStore:
    """All of the coordinator's durable state; one instance per process."""

    def __init__(self, path: Path, now: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._now = now
        self._db = open_database(self.path, SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        elif int(row[0]) != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {row[0]}, this coordinator expects "
                f"{SCHEMA_VERSION}; upgrade schoolfl or point --state at a new folder"
            )
        self._add_missing_columns()
        self._fold_old_rejections()
        self.device_status = DeviceStatusTable(self._db, self._transaction)
        """Heartbeat facts and per-round left-out reasons (coordinator.device_status)."""
        self.device_writes: list[str] = []
        """The device ids this connection enrolled or revoked, in order (`change_marker`)."""

    def _add_missing_columns(self) -> None:
        """Bring a store written by an older coordinator up to the additive columns."""
        for table, column, declaration in ADDED_COLUMNS:
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                logger.info("adding column %s.%s to %s", table, column, self.path)
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        self._db.close()

    def change_marker(self) -> tuple[int, int]:
        """Changes when the devices may have changed, for one cheap query: SQLite's
        `data_version` moves when *another* connection commits (the `coordinator revoke` CLI,
        a token issued), the second figure when this one enrolls or revokes a device (which
        ones: `device_writes`). The daemon re-reads device records only when it moved."""
        (data_version,) = self._db.execute("PRAGMA data_version").fetchone()
        return int(data_version), len(self.device_writes)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            if self._db.in_transaction:  # SQLite rolls back by itself on SQLITE_FULL
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- devices and enrollment ------------------------------------------------------

    def add_enrollment_token(self, token: str, school: str, valid_seconds: float) -> None:
        if not valid_seconds > 0:
            raise ValueError(f"a token must be valid for a positive time, got {valid_seconds} s")
        with self._transaction() as db:
            db.execute(
                "INSERT INTO enrollment_tokens(token_sha256, school, expires_at) VALUES (?,?,?)",
                (token_digest(token), school, self._now() + valid_seconds),
            )

    def redeem_enrollment_token(
        self,
        token: str,
        device_id: str,
        public_key: bytes,
        profile_toml: str,
        agent_school: str = "",
        machine: str = "",
    ) -> DeviceRecord:
        """Exchange a one-time token for a device registration, atomically.

        Raises ValueError with the reason when the token is unknown, expired or used, was
        issued for another school than the agent is configured for (`agent_school`; empty
        from agents that do not say), or the device id is taken by another key. A refused
        token stays unused.
        """
        with self._transaction() as db:
            row = db.execute(
                "SELECT school, expires_at, used_by FROM enrollment_tokens WHERE token_sha256=?",
                (token_digest(token),),
            ).fetchone()
            if row is None:
                raise ValueError("unknown enrollment token")
            school, expires_at, used_by = row
            if agent_school and agent_school != school:
                raise ValueError(
                    f"this token was issued for school {school!r}, but the agent is "
                    f"configured for school {agent_school!r}; fix [agent] school or ask "
                    "for a token for that school"
                )
            if used_by is not None:
                raise ValueError(f"enrollment token already used by device {used_by!r}")
            if expires_at < self._now():
                raise ValueError("enrollment token expired; ask the operator for a new one")
            existing = db.execute(
                "SELECT public_key FROM devices WHERE device_id=?", (device_id,)
            ).fetchone()
            if existing is not None and bytes(existing[0]) != public_key:
                raise ValueError(f"device id {device_id!r} is already enrolled with another key")
            db.execute(
                "UPDATE enrollment_tokens SET used_by=? WHERE token_sha256=?",
                (device_id, token_digest(token)),
            )
            db.execute(
                "INSERT OR REPLACE INTO devices(device_id, school, public_key, profile_toml,"
                " enrolled_at, revoked_at, machine) VALUES (?,?,?,?,?,NULL,?)",
                (device_id, school, public_key, profile_toml, self._now(), machine),
            )
        self.device_writes.append(device_id)
        device = self.device(device_id)
        assert device is not None  # just written in the transaction above
        return device

    def device(self, device_id: str) -> DeviceRecord | None:
        row = self._db.execute(
            "SELECT device_id, school, public_key, profile_toml, enrolled_at, revoked_at, machine "
            "FROM devices WHERE device_id=?",
            (device_id,),
        ).fetchone()
        return None if row is None else DeviceRecord(row[0], row[1], bytes(row[2]), *row[3:])

    def school_of(self, device_id: str) -> str:
        """The school a device enrolled with ("" for an unknown device)."""
        row = self._db.execute(
            "SELECT school FROM devices WHERE device_id=?", (device_id,)
        ).fetchone()
        return row[0] if row else ""

    def devices(self) -> list[DeviceRecord]:
        rows = self._db.execute(
            "SELECT device_id, school, public_key, profile_toml, enrolled_at, revoked_at, machine "
            "FROM devices ORDER BY device_id"
        ).fetchall()
        return [DeviceRecord(r[0], r[1], bytes(r[2]), *r[3:]) for r in rows]

    def revoke_device(self, device_id: str) -> bool:
        """Mark a device revoked; its messages are refused from then on. False if unknown."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE devices SET revoked_at=? WHERE device_id=? AND revoked_at IS NULL",
                (self._now(), device_id),
            )
        self.device_writes.append(device_id)
        return cursor.rowcount == 1

    # -- rounds ----------------------------------------------------------------------

    def open_round(
        self,
        task_id: str,
        round_number: int,
        base_version: int,
        deadline: float,
        plans_json: dict[str, str],
        privacy: PrivacyRound | None = None,
    ) -> RoundRecord:
        """Persist a new round, its assignments and (DP tasks) its planned ledger row in
        one transaction."""
        with self._transaction() as db:
            if privacy is not None:
                _write_privacy_round(db, privacy)
            db.execute(
                "INSERT INTO rounds(task_id, round_number, state, base_version, opened_at,"
                " deadline) VALUES (?,?,?,?,?,?)",
                (task_id, round_number, RoundState.OPEN.value, base_version, self._now(), deadline),
            )
            db.executemany(
                "INSERT INTO assignments(task_id, round_number, device_id, plan_json)"
                " VALUES (?,?,?,?)",
                [(task_id, round_number, device, plan) for device, plan in plans_json.items()],
            )
        record = self.round(task_id, round_number)
        assert record is not None  # just written
        return record

    def round(self, task_id: str, round_number: int) -> RoundRecord | None:
        row = self._db.execute(
            "SELECT task_id, round_number, state, base_version, opened_at, deadline, closed_at,"
            " reason, metrics_json FROM rounds WHERE task_id=? AND round_number=?",
            (task_id, round_number),
        ).fetchone()
        return None if row is None else _round_record(row)

    def rounds(self, task_id: str | None = None) -> list[RoundRecord]:
        query = (
            "SELECT task_id, round_number, state, base_version, opened_at, deadline, closed_at,"
            " reason, metrics_json FROM rounds"
        )
        params: tuple[str, ...] = ()
        if task_id is not None:
            query += " WHERE task_id=?"
            params = (task_id,)
        rows = self._db.execute(query + " ORDER BY task_id, round_number", params).fetchall()
        return [_round_record(row) for row in rows]

    def open_rounds(self) -> list[RoundRecord]:
        return [r for r in self.rounds() if r.state is RoundState.OPEN]

    def assignments(self, task_id: str, round_number: int) -> dict[str, str]:
        rows = self._db.execute(
            "SELECT device_id, plan_json FROM assignments WHERE task_id=? AND round_number=?",
            (task_id, round_number),
        ).fetchall()
        return {device: plan for device, plan in rows}

    def assignment_rows(self, task_id: str, round_number: int) -> list[AssignmentRow]:
        """Every assignment of a round with its decline and the device's school, in one
        query: what the round manager's in-memory view of an open round starts from."""
        rows = self._db.execute(
            "SELECT a.device_id, a.plan_json, a.declined_reason, COALESCE(d.school, '')"
            " FROM assignments a LEFT JOIN devices d ON a.device_id = d.device_id"
            " WHERE a.task_id=? AND a.round_number=? ORDER BY a.device_id",
            (task_id, round_number),
        ).fetchall()
        return [AssignmentRow(*row) for row in rows]

    def record_decline(self, task_id: str, round_number: int, device_id: str, reason: str) -> bool:
        """Note that an assigned device declined; False when it had no such assignment."""
        cursor = self._db.execute(
            "UPDATE assignments SET declined_reason=? WHERE task_id=? AND round_number=?"
            " AND device_id=?",
            (reason[:500], task_id, round_number, device_id),
        )
        return cursor.rowcount == 1

    def declined_devices(self, task_id: str, round_number: int) -> dict[str, str]:
        rows = self._db.execute(
            "SELECT device_id, declined_reason FROM assignments WHERE task_id=? AND"
            " round_number=? AND declined_reason IS NOT NULL",
            (task_id, round_number),
        ).fetchall()
        return {device: reason for device, reason in rows}

    def busy_devices(self) -> set[str]:
        """Devices assigned in any open round: a device trains one task at a time."""
        rows = self._db.execute(
            "SELECT a.device_id FROM assignments a JOIN rounds r ON a.task_id=r.task_id"
            " AND a.round_number=r.round_number WHERE r.state=?",
            (RoundState.OPEN.value,),
        ).fetchall()
        return {row[0] for row in rows}

    def record_update(self, update: StoredUpdate) -> UpdateOutcome:
        """Store an update once. Idempotent on its id and on (task, round, device)."""
        with self._transaction() as db:
            if db.execute(
                "SELECT 1 FROM updates WHERE update_id=?", (update.update_id,)
            ).fetchone():
                return UpdateOutcome.DUPLICATE
            if db.execute(
                "SELECT 1 FROM updates WHERE task_id=? AND round_number=? AND device_id=?",
                (update.task_id, update.round_number, update.device_id),
            ).fetchone():
                return UpdateOutcome.ALREADY_REPORTED
            db.execute(
                "INSERT INTO updates(update_id, task_id, round_number, device_id, num_samples,"
                " num_steps, metrics_json, body, received_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    update.update_id,
                    update.task_id,
                    update.round_number,
                    update.device_id,
                    update.num_samples,
                    update.num_steps,
                    json.dumps(update.metrics, sort_keys=True),
                    update.body,
                    self._now(),
                ),
            )
        return UpdateOutcome.STORED

    def reported_devices(self, task_id: str, round_number: int) -> dict[str, str]:
        """Device id -> update id of the round's stored updates. Reads no body (nor any
        column after it: a body's overflow pages are not touched), so it is cheap to ask
        on every message."""
        rows = self._db.execute(
            "SELECT device_id, update_id FROM updates WHERE task_id=? AND round_number=?",
            (task_id, round_number),
        ).fetchall()
        return dict(rows)

    def update_summaries(self, task_id: str, round_number: int) -> list[StoredUpdate]:
        """The round's updates without their bodies (for the scheduler's history)."""
        rows = self._db.execute(
            "SELECT update_id, task_id, round_number, device_id, num_samples, num_steps,"
            " metrics_json, received_at FROM updates WHERE task_id=? AND round_number=?"
            " ORDER BY device_id",
            (task_id, round_number),
        ).fetchall()
        return [
            StoredUpdate(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), b"", r[7])
            for r in rows
        ]

    def update_of(self, task_id: str, round_number: int, device_id: str) -> StoredUpdate | None:
        """One device's stored update of a round, with its body (aggregation re-reads the
        few it must correct, one at a time)."""
        found = self._updates_with_bodies(" AND device_id=?", (task_id, round_number, device_id))
        return next(iter(found), None)

    def updates(self, task_id: str, round_number: int) -> list[StoredUpdate]:
        return self._updates_with_bodies(" ORDER BY device_id", (task_id, round_number))

    def _updates_with_bodies(self, tail: str, params: tuple[object, ...]) -> list[StoredUpdate]:
        rows = self._db.execute(
            "SELECT update_id, task_id, round_number, device_id, num_samples, num_steps,"
            " metrics_json, body, received_at FROM updates WHERE task_id=? AND round_number=?"
            + tail,
            params,
        ).fetchall()
        return [
            StoredUpdate(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), bytes(r[7]), r[8])
            for r in rows
        ]

    def close_round(
        self,
        task_id: str,
        round_number: int,
        state: RoundState,
        reason: str,
        new_version: AdapterVersion | None = None,
        metrics: dict[str, float] | None = None,
        privacy: PrivacyRound | None = None,
    ) -> None:
        """Close a round and, on success, record the new adapter version and (DP tasks)
        the round's final privacy ledger row, atomically."""
        if state is RoundState.OPEN:
            raise ValueError("close_round needs COMPLETED or FAILED")
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE rounds SET state=?, closed_at=?, reason=?, metrics_json=? WHERE task_id=?"
                " AND round_number=? AND state=?",
                (
                    state.value,
                    self._now(),
                    reason,
                    json.dumps(metrics or {}, sort_keys=True),
                    task_id,
                    round_number,
                    RoundState.OPEN.value,
                ),
            )
            if cursor.rowcount != 1:
                raise ValueError(f"round {round_number} of task {task_id!r} is not open")
            if new_version is not None:
                _insert_version(db, new_version)
            if privacy is not None:
                _write_privacy_round(db, privacy)

    # -- rejections ------------------------------------------------------------------

    def record_refusals(self, counts: Sequence[RefusalCount]) -> None:
        """Add refusal counts (`coordinator.refusals`), one transaction for the batch."""
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO refusals(device_id, category, count, first_at, last_at,"
                " last_reason) VALUES (?,?,?,?,?,?) ON CONFLICT(device_id, category) DO UPDATE"
                " SET count = count + excluded.count, last_at = excluded.last_at,"
                " last_reason = excluded.last_reason",
                [
                    (c.device_id, c.category, c.count, c.first_at, c.last_at, c.last_reason)
                    for c in counts
                ],
            )

    def record_rejection(self, device_id: str | None, category: str, reason: str) -> None:
        """One refusal, written now (operator tools and tests; the daemon batches)."""
        at = self._now()
        device = device_id or UNKNOWN_SENDER
        self.record_refusals([RefusalCount(device, category, 1, at, at, reason[:500])])

    def rejection_counts(self) -> dict[str, int]:
        """Refusals in all, by category."""
        rows = self._db.execute(
            "SELECT category, SUM(count) FROM refusals GROUP BY category ORDER BY category"
        ).fetchall()
        return {category: int(count) for category, count in rows}

    def refusals(self, limit: int = 20) -> list[RefusalCount]:
        """Per device and category, the most recently refused first."""
        rows = self._db.execute(
            "SELECT device_id, category, count, first_at, last_at, last_reason FROM refusals"
            " ORDER BY last_at DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [RefusalCount(*row) for row in rows]

    def _fold_old_rejections(self) -> None:
        """A store from before per-device counts kept one row per refusal in `rejections`:
        fold them into `refusals` once, then drop the old table."""
        exists = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='rejections'"
        ).fetchone()
        if exists is None:
            return
        with self._transaction() as db:
            folded = db.execute(
                "INSERT INTO refusals(device_id, category, count, first_at, last_at, last_reason)"
                " SELECT COALESCE(device_id, ''), category, COUNT(*), MIN(at), MAX(at),"
                " (SELECT r2.reason FROM rejections r2 WHERE COALESCE(r2.device_id, '') ="
                " COALESCE(r.device_id, '') AND r2.category = r.category ORDER BY r2.at DESC"
                " LIMIT 1) FROM rejections r WHERE 1 GROUP BY COALESCE(device_id, ''), category"
                " ON CONFLICT(device_id, category) DO UPDATE SET count = count + excluded.count"
            ).rowcount
            db.execute("DROP TABLE rejections")
        logger.info("folded the old rejections table into %d refusal count(s)", folded)

    # -- adapter versions ------------------------------------------------------------

    def add_adapter_version(self, version: AdapterVersion) -> None:
        with self._transaction() as db:
            _insert_version(db, version)

    def adapter_versions(self, task_id: str) -> list[AdapterVersion]:
        rows = self._db.execute(
            "SELECT task_id, version, round_number, sha256, folder, created_at, metrics_json"
            " FROM adapter_versions WHERE task_id=? ORDER BY version",
            (task_id,),
        ).fetchall()
        return [AdapterVersion(*row[:6], metrics=json.loads(row[6])) for row in rows]

    def latest_adapter_version(self, task_id: str) -> AdapterVersion | None:
        versions = self.adapter_versions(task_id)
        return versions[-1] if versions else None

    # -- privacy ledger --------------------------------------------------------------

    def privacy_round(self, task_id: str, round_number: int) -> PrivacyRound | None:
        """The ledger row of one round, whatever its state."""
        row = self._db.execute(
            f"SELECT {_PRIVACY_COLUMNS} FROM privacy_rounds WHERE task_id=? AND round_number=?",
            (task_id, round_number),
        ).fetchone()
        return None if row is None else _privacy_round(row)

    def privacy_rounds(self, task_id: str) -> list[PrivacyRound]:
        """The ledger of a task's *completed* rounds, in order: what the accountant counts
        (an open or failed round published nothing)."""
        columns = ", ".join(f"p.{c.strip()}" for c in _PRIVACY_COLUMNS.split(","))
        rows = self._db.execute(
            f"SELECT {columns} FROM privacy_rounds p JOIN rounds r ON p.task_id=r.task_id"
            " AND p.round_number=r.round_number WHERE p.task_id=? AND r.state=?"
            " ORDER BY p.round_number",
            (task_id, RoundState.COMPLETED.value),
        ).fetchall()
        return [_privacy_round(row) for row in rows]

    def set_privacy_stop(self, stop: PrivacyStop) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO privacy_stops(task_id, round_number, epsilon, budget,"
            " delta, reason, at) VALUES (?,?,?,?,?,?,?)",
            (
                stop.task_id,
                stop.round_number,
                stop.epsilon,
                stop.budget,
                stop.delta,
                stop.reason,
                stop.at,
            ),
        )

    def clear_privacy_stop(self, task_id: str) -> None:
        self._db.execute("DELETE FROM privacy_stops WHERE task_id=?", (task_id,))

    def privacy_stop(self, task_id: str) -> PrivacyStop | None:
        row = self._db.execute(
            "SELECT task_id, round_number, epsilon, budget, delta, reason, at"
            " FROM privacy_stops WHERE task_id=?",
            (task_id,),
        ).fetchone()
        return None if row is None else PrivacyStop(*row)


_PRIVACY_COLUMNS = (
    "task_id, round_number, eligible_devices, participants, sampling_probability, clip_norm,"
    " noise_multiplier, epsilon, delta, secure_aggregation"
)


def _privacy_round(row: tuple) -> PrivacyRound:  # type: ignore[type-arg]
    return PrivacyRound(*row[:9], secure_aggregation=bool(row[9]))


def _write_privacy_round(db: sqlite3.Connection, entry: PrivacyRound) -> None:
    db.execute(
        f"INSERT OR REPLACE INTO privacy_rounds({_PRIVACY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (
            entry.task_id,
            entry.round_number,
            entry.eligible_devices,
            entry.participants,
            entry.sampling_probability,
            entry.clip_norm,
            entry.noise_multiplier,
            entry.epsilon,
            entry.delta,
            int(entry.secure_aggregation),
        ),
    )


def _round_record(row: tuple) -> RoundRecord:  # type: ignore[type-arg]
    return RoundRecord(
        task_id=row[0],
        round_number=row[1],
        state=RoundState(row[2]),
        base_version=row[3],
        opened_at=row[4],
        deadline=row[5],
        closed_at=row[6],
        reason=row[7],
        metrics=json.loads(row[8]),
    )


def _insert_version(db: sqlite3.Connection, version: AdapterVersion) -> None:
    db.execute(
        "INSERT INTO adapter_versions(task_id, version, round_number, sha256, folder, created_at,"
        " metrics_json) VALUES (?,?,?,?,?,?,?)",
        (
            version.task_id,
            version.version,
            version.round_number,
            version.sha256,
            version.folder,
            version.created_at,
            json.dumps(version.metrics, sort_keys=True),
        ),
    )
