"""What `schoolfl agent enroll` leaves on the device: whom to trust from now on.

Its own module so the enrollment command and the agent daemon share it without importing
each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from durable.atomic_files import atomic_write_text

ENROLLMENT_FILE = "enrollment.json"


class AgentError(RuntimeError):
    """The agent cannot run: not enrolled, no key, unreadable state."""


@dataclass(frozen=True)
class Enrollment:
    """What `schoolfl agent enroll` learned: whom to trust from now on."""

    fleet: str
    device_id: str
    coordinator_public_key: str
    enrolled_at: float

    @classmethod
    def load(cls, state_dir: Path) -> Enrollment:
        path = state_dir / ENROLLMENT_FILE
        if not path.is_file():
            raise AgentError(
                f"{path} is missing: enroll this device first with "
                "`schoolfl agent enroll --token TOKEN`"
            )
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as error:
            raise AgentError(f"{path} is damaged ({error}); enroll again") from None

    def save(self, state_dir: Path) -> None:
        atomic_write_text(state_dir / ENROLLMENT_FILE, json.dumps(vars(self), sort_keys=True))
