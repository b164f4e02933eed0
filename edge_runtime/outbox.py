"""The agent's durable outbox of updates waiting for the coordinator's acknowledgement.

An update is stored here before its first publish and removed only when the coordinator
acknowledges it, so an agent that is killed, loses power or loses the network re-sends it
after restart (DESIGN.md: "the agent writes each update to a durable outbox before
publishing"). The coordinator de-duplicates by update id, so re-sending is always safe.
Stored in SQLite so a write is one transaction: a crash leaves the entry whole or absent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from durable.sqlite import open_database

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    update_id TEXT PRIMARY KEY,
    task_id TEXT NOT NULL,
    round_number INTEGER NOT NULL,
    frame BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_sent_at REAL
);
"""


@dataclass(frozen=True)
class PendingUpdate:
    update_id: str
    task_id: str
    round_number: int
    frame: bytes
    """The encoded, signed update exactly as it goes on the wire."""
    created_at: float
    attempts: int


class Outbox:
    """Updates not yet acknowledged, oldest first."""

    def __init__(self, path: Path, now: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._now = now
        self._db = open_database(self.path, _SCHEMA)

    def close(self) -> None:
        self._db.close()

    def put(self, update_id: str, task_id: str, round_number: int, frame: bytes) -> bool:
        """Store an update before it is published; False when that id is already there."""
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO outbox(update_id, task_id, round_number, frame, created_at)"
            " VALUES (?,?,?,?,?)",
            (update_id, task_id, round_number, frame, self._now()),
        )
        return cursor.rowcount == 1

    def mark_sent(self, update_id: str) -> None:
        self._db.execute(
            "UPDATE outbox SET attempts = attempts + 1, last_sent_at=? WHERE update_id=?",
            (self._now(), update_id),
        )

    def acknowledge(self, update_id: str) -> bool:
        """Drop an acknowledged update; False when it was not (or no longer) pending."""
        cursor = self._db.execute("DELETE FROM outbox WHERE update_id=?", (update_id,))
        if cursor.rowcount:
            logger.debug("update %s acknowledged and removed from the outbox", update_id)
        return cursor.rowcount == 1

    def pending(self) -> list[PendingUpdate]:
        rows = self._db.execute(
            "SELECT update_id, task_id, round_number, frame, created_at, attempts"
            " FROM outbox ORDER BY created_at, update_id"
        ).fetchall()
        return [PendingUpdate(r[0], r[1], r[2], bytes(r[3]), r[4], r[5]) for r in rows]

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def holds(self, task_id: str, round_number: int) -> bool:
        """An update for that round is waiting here: the round is answered, even if the
        history's row for it was never written (a kill between the two writes)."""
        row = self._db.execute(
            "SELECT 1 FROM outbox WHERE task_id=? AND round_number=? LIMIT 1",
            (task_id, round_number),
        ).fetchone()
        return row is not None


_HISTORY_SCHEMA = """
CREATE TABLE IF NOT EXISTS round_history (
    task_id TEXT NOT NULL,
    round_number INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (task_id, round_number)
);
"""


JOINED_SECURE_ROUND = "joined"
"""The outcome of a secure round whose keys this agent advertised and that has no final
outcome yet. The keys themselves stay in memory; this row is how a restarted agent knows
it had joined the round and lost them (`edge_runtime.agent`)."""


@dataclass(frozen=True)
class RoundEntry:
    task_id: str
    round_number: int
    outcome: str
    """trained, declined, failed; joined while a secure round is under way."""
    detail: str
    at: float


class RoundHistory:
    """What this device did in each round it was asked to join (for `agent status`), and
    the record that stops a restarted agent from training the same round twice."""

    def __init__(self, path: Path, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self._db = open_database(Path(path), _HISTORY_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def record(self, task_id: str, round_number: int, outcome: str, detail: str) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO round_history(task_id, round_number, outcome, detail, at)"
            " VALUES (?,?,?,?,?)",
            (task_id, round_number, outcome, detail, self._now()),
        )

    def outcome(self, task_id: str, round_number: int) -> str | None:
        """The outcome recorded for the round, None when it has none."""
        row = self._db.execute(
            "SELECT outcome FROM round_history WHERE task_id=? AND round_number=?",
            (task_id, round_number),
        ).fetchone()
        return None if row is None else str(row[0])

    def seen(self, task_id: str, round_number: int) -> bool:
        """The round was handled (trained, declined or failed): a repeated assignment for
        it is ignored. A secure round only joined is not handled yet."""
        return self.outcome(task_id, round_number) not in (None, JOINED_SECURE_ROUND)

    def latest(self, limit: int = 10) -> list[RoundEntry]:
        rows = self._db.execute(
            "SELECT task_id, round_number, outcome, detail, at FROM round_history"
            " ORDER BY at DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [RoundEntry(*row) for row in rows]
