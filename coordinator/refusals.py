"""Refused messages, counted per device and category, written in batches, logged at a
bounded rate.

A hostile or broken device can send thousands of bad messages a minute. Writing one
fsync'd row per refusal (and one WARNING line each) let a single device grow the store by
11,246 rows in 15 minutes and drown the log. Here every refusal is still counted, with its
reason, but as one row per (device, category): a count, when the first and the last came,
and the last reason. The daemon notes refusals in memory and flushes them in one
transaction about once a second (`FLUSH_SECONDS`): a kill loses at most that second's
counts, never a row that was written. A flush that fails (a full disk) keeps the counts
in memory for the next try.

Logging: the first refusal of each (device, category) is a WARNING with its reason; after
that at most one line per `LOG_EVERY_SECONDS` per (device, category), saying how many
came meanwhile and the last reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0
"""Pending counts are written at most this often (and at stop)."""
LOG_EVERY_SECONDS = 60.0
"""After the first WARNING, one line per (device, category) at most this often."""
UNKNOWN_SENDER = ""
"""The device column of refusals whose sender could not be told (no valid topic)."""


@dataclass
class RefusalCount:
    """Refusals of one category from one device, since the last flush (or in all, as
    the store keeps them)."""

    device_id: str
    """The sender, or `UNKNOWN_SENDER`."""
    category: str
    count: int
    first_at: float
    last_at: float
    last_reason: str


@dataclass
class _LogState:
    last_logged: float
    suppressed: int = 0


class RefusalLedger:
    """In-memory counts waiting for the store, and the rate limit of their log lines."""

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self.now = now
        self.pending: dict[tuple[str, str], RefusalCount] = {}
        self._logging: dict[tuple[str, str], _LogState] = {}
        self._last_flush = time.monotonic()

    def note(self, device_id: str | None, category: str, reason: str, count: int = 1) -> None:
        """Count `count` refusals of one kind and log them, or not, by the rate limit."""
        key = (device_id or UNKNOWN_SENDER, category)
        at = self.now()
        reason = reason[:500]
        counted = self.pending.get(key)
        if counted is None:
            self.pending[key] = RefusalCount(key[0], category, count, at, at, reason)
        else:
            counted.count += count
            counted.last_at = at
            counted.last_reason = reason
        self._log(key, reason)

    def _log(self, key: tuple[str, str], reason: str) -> None:
        device, category = key
        state = self._logging.get(key)
        moment = time.monotonic()
        if state is None:
            self._logging[key] = _LogState(moment)
            logger.warning("refused message from %s (%s): %s", device or "?", category, reason)
            return
        if moment - state.last_logged < LOG_EVERY_SECONDS:
            state.suppressed += 1
            return
        logger.warning(
            "refused %d more message(s) from %s (%s) in the last %.0f s; latest: %s",
            state.suppressed + 1,
            device or "?",
            category,
            moment - state.last_logged,
            reason,
        )
        self._logging[key] = _LogState(moment)

    def due(self) -> bool:
        """Something is pending and the last flush is `FLUSH_SECONDS` old."""
        return bool(self.pending) and time.monotonic() - self._last_flush >= FLUSH_SECONDS

    def take(self) -> list[RefusalCount]:
        """The pending counts, removed; give them back with `restore` if the write fails."""
        taken = list(self.pending.values())
        self.pending = {}
        self._last_flush = time.monotonic()
        return taken

    def restore(self, counts: list[RefusalCount]) -> None:
        """Put counts whose write failed back in front of what arrived since."""
        for old in counts:
            key = (old.device_id, old.category)
            newer = self.pending.get(key)
            if newer is None:
                self.pending[key] = old
                continue
            self.pending[key] = RefusalCount(
                old.device_id,
                old.category,
                old.count + newer.count,
                old.first_at,
                newer.last_at,
                newer.last_reason,
            )

    @property
    def unwritten(self) -> int:
        return sum(counted.count for counted in self.pending.values())
