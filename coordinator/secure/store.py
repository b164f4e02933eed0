"""Durable state of secure-aggregation rounds, in SQLite next to the coordinator's store.

What a restarted coordinator needs to resume a secure round without asking any device to
repeat a step: the round's phase, its threshold and phase deadline, and every message the
devices sent (public keys, sealed share boxes, revealed shares). The masked inputs live in
the main store's `updates` table like plain updates (idempotent, acknowledged the same way).
The coordinator's own messages (roster, forwarded boxes, unmask request) are not stored:
they are recomputed from these, deterministically. Rows of a finished round are deleted
with its outcome recorded, so share boxes and revealed shares do not outlive the round.

Its own file (`secure_rounds.db`) keeps the main store's schema unchanged; each call is one
transaction, and every message is inserted once (the first copy wins).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from durable.sqlite import open_database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS secure_rounds (
    task_id TEXT NOT NULL,
    round_number INTEGER NOT NULL,
    phase TEXT NOT NULL,
    threshold INTEGER NOT NULL,
    phase_deadline REAL NOT NULL,
    outcome TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (task_id, round_number)
);
CREATE TABLE IF NOT EXISTS secure_messages (
    task_id TEXT NOT NULL,
    round_number INTEGER NOT NULL,
    step TEXT NOT NULL,
    device_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (task_id, round_number, step, device_id)
);
"""


class SecurePhase(enum.Enum):
    """What a secure round waits for; the last two are final."""

    ADVERTISING = "advertising"
    SHARING = "sharing"
    MASKING = "masking"
    UNMASKING = "unmasking"
    COMPLETED = "completed"
    ABORTED = "aborted"

    @property
    def is_final(self) -> bool:
        return self in (SecurePhase.COMPLETED, SecurePhase.ABORTED)


@dataclass(frozen=True)
class SecureRoundState:
    task_id: str
    round_number: int
    phase: SecurePhase
    threshold: int
    """t, fixed with the roster; 0 before it."""
    phase_deadline: float
    outcome: str = ""


class SecureRoundStore:
    """Phases and device messages of secure rounds (one instance per coordinator)."""

    def __init__(self, path: Path, now: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._now = now
        self._db = open_database(self.path, _SCHEMA)

    def close(self) -> None:
        self._db.close()

    def start(self, task_id: str, round_number: int, phase_deadline: float) -> None:
        """Record a new secure round in ADVERTISING (a no-op when it exists: a restart)."""
        self._db.execute(
            "INSERT OR IGNORE INTO secure_rounds(task_id, round_number, phase, threshold,"
            " phase_deadline) VALUES (?,?,?,0,?)",
            (task_id, round_number, SecurePhase.ADVERTISING.value, phase_deadline),
        )

    def state(self, task_id: str, round_number: int) -> SecureRoundState | None:
        row = self._db.execute(
            "SELECT task_id, round_number, phase, threshold, phase_deadline, outcome"
            " FROM secure_rounds WHERE task_id=? AND round_number=?",
            (task_id, round_number),
        ).fetchone()
        return _state(row) if row else None

    def active(self) -> list[SecureRoundState]:
        rows = self._db.execute(
            "SELECT task_id, round_number, phase, threshold, phase_deadline, outcome"
            " FROM secure_rounds WHERE phase NOT IN (?, ?) ORDER BY task_id, round_number",
            (SecurePhase.COMPLETED.value, SecurePhase.ABORTED.value),
        ).fetchall()
        return [_state(row) for row in rows]

    def advance(
        self,
        task_id: str,
        round_number: int,
        phase: SecurePhase,
        phase_deadline: float,
        threshold: int | None = None,
    ) -> None:
        self._db.execute(
            "UPDATE secure_rounds SET phase=?, phase_deadline=?,"
            " threshold=COALESCE(?, threshold) WHERE task_id=? AND round_number=?",
            (phase.value, phase_deadline, threshold, task_id, round_number),
        )

    def finish(self, task_id: str, round_number: int, phase: SecurePhase, outcome: str) -> None:
        """Final phase and outcome; the round's device messages are deleted with it."""
        if not phase.is_final:
            raise ValueError(f"finish needs a final phase, got {phase.value}")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                "UPDATE secure_rounds SET phase=?, outcome=? WHERE task_id=? AND round_number=?",
                (phase.value, outcome, task_id, round_number),
            )
            self._db.execute(
                "DELETE FROM secure_messages WHERE task_id=? AND round_number=?",
                (task_id, round_number),
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def record(
        self, task_id: str, round_number: int, step: str, device_id: str, payload: bytes
    ) -> bool:
        """Keep a device's message of one step; False when one was already kept."""
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO secure_messages(task_id, round_number, step, device_id,"
            " payload, received_at) VALUES (?,?,?,?,?,?)",
            (task_id, round_number, step, device_id, payload, self._now()),
        )
        return cursor.rowcount == 1

    def senders(self, task_id: str, round_number: int, step: str) -> set[str]:
        """The devices whose message of one step is kept (without reading the messages)."""
        rows = self._db.execute(
            "SELECT device_id FROM secure_messages WHERE task_id=? AND round_number=? AND step=?",
            (task_id, round_number, step),
        ).fetchall()
        return {row[0] for row in rows}

    def message(self, task_id: str, round_number: int, step: str, device_id: str) -> bytes | None:
        """One device's kept message of one step, or None."""
        row = self._db.execute(
            "SELECT payload FROM secure_messages"
            " WHERE task_id=? AND round_number=? AND step=? AND device_id=?",
            (task_id, round_number, step, device_id),
        ).fetchone()
        return bytes(row[0]) if row else None

    def messages(self, task_id: str, round_number: int, step: str) -> dict[str, bytes]:
        """Device id -> payload of one step, in device id order."""
        rows = self._db.execute(
            "SELECT device_id, payload FROM secure_messages"
            " WHERE task_id=? AND round_number=? AND step=? ORDER BY device_id",
            (task_id, round_number, step),
        ).fetchall()
        return {device_id: bytes(payload) for device_id, payload in rows}


def _state(row: tuple) -> SecureRoundState:  # type: ignore[type-arg]
    return SecureRoundState(row[0], row[1], SecurePhase(row[2]), row[3], row[4], row[5])
