"""What the round logic asks the daemon to publish: it returns these instead of publishing,
so rounds can be driven one tick at a time in tests without a broker."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Outgoing:
    """A message for the daemon to publish (QoS 1)."""

    topic: str
    payload: bytes
    retain: bool = False
