"""Replay and staleness checks shared by both daemons.

Why a separate module: idempotency (DESIGN invariant 4) is the same rule on both sides: a
message id seen before is acknowledged and ignored, and a message about a round that is no
longer open is refused. The seen-id cache is bounded (oldest ids fall out) and can be saved
and loaded atomically, so a restarted daemon keeps refusing replays.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path

from durable.atomic_files import atomic_write_bytes
from edge_runtime.wire import ReplayError, StaleRoundError

logger = logging.getLogger(__name__)


class ReplayGuard:
    """Remembers the last `capacity` message ids."""

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.replays = 0

    def __contains__(self, message_id: str) -> bool:
        return message_id in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def first_time(self, message_id: str) -> bool:
        """Record `message_id`; True if it is new, False (and count it) if a replay."""
        if message_id in self._seen:
            self.replays += 1
            self._seen.move_to_end(message_id)
            return False
        self._seen[message_id] = None
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True

    def check(self, message_id: str) -> None:
        """Like `first_time`, but raise `ReplayError` on a replay."""
        if not self.first_time(message_id):
            raise ReplayError(f"message {message_id!r} was already processed; ignored")

    def save(self, path: Path) -> None:
        """Persist the ids, oldest first, atomically."""
        data = json.dumps({"version": 1, "seen": list(self._seen)}).encode()
        atomic_write_bytes(Path(path), data, mode=0o600)

    @classmethod
    def load(cls, path: Path, capacity: int = 100_000) -> ReplayGuard:
        """Load ids saved by `save`; a missing file gives an empty guard."""
        guard = cls(capacity)
        path = Path(path)
        if not path.exists():
            return guard
        document = json.loads(path.read_text())
        if not isinstance(document, dict) or document.get("version") != 1:
            raise ValueError(f"{path}: not a replay cache (version 1) file")
        for message_id in document.get("seen", []):
            guard.first_time(str(message_id))
        return guard


def check_round(task: str, message_round: int, open_round: int | None) -> None:
    """Refuse a message for any round but the task's open one (`StaleRoundError`)."""
    if open_round is None:
        raise StaleRoundError(f"task {task!r} has no open round; message for round {message_round}")
    if message_round != open_round:
        relation = "closed" if message_round < open_round else "not yet opened"
        raise StaleRoundError(
            f"task {task!r} round {message_round} is {relation} (open round: {open_round})"
        )
