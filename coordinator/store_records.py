"""The plain records the coordinator's store reads and writes (rows as typed values), apart
from the store itself so that the store module stays about its transactions."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field


class StoreError(RuntimeError):
    """The store file is unusable (wrong schema version, not a schoolfl store)."""


class RoundState(enum.Enum):
    OPEN = "open"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    school: str
    public_key: bytes
    profile_toml: str
    enrolled_at: float
    revoked_at: float | None
    machine: str = ""
    """`platform.machine()` the device reported at enrollment (empty: an agent that
    predates the field); the profile's architecture may disagree with it."""

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class RoundRecord:
    task_id: str
    round_number: int
    state: RoundState
    base_version: int
    opened_at: float
    deadline: float
    closed_at: float | None
    reason: str | None
    metrics: dict[str, float]


@dataclass(frozen=True)
class AssignmentRow:
    """One device's assignment in a round, as `assignment_rows` reads it."""

    device_id: str
    plan_json: str
    declined_reason: str | None
    school: str
    """The school the device enrolled with ("" when it is no longer enrolled)."""


@dataclass(frozen=True)
class StoredUpdate:
    update_id: str
    task_id: str
    round_number: int
    device_id: str
    num_samples: int
    num_steps: int
    metrics: dict[str, float]
    body: bytes
    received_at: float = 0.0
    """Set by the store when it records the update."""


@dataclass(frozen=True)
class AdapterVersion:
    task_id: str
    version: int
    round_number: int | None
    sha256: str
    folder: str
    created_at: float
    metrics: dict[str, float] = field(default_factory=dict)
    """Held-out evaluation of this version (accuracy, eval loss), when the task has one."""


@dataclass(frozen=True)
class PrivacyRound:
    """One row of a DP task's privacy ledger. Written when the round opens (planned
    participants, projected epsilon) and rewritten when it completes (actual figures);
    only completed rounds count (`privacy_rounds`)."""

    task_id: str
    round_number: int
    eligible_devices: int
    """Devices the round was drawn from (the denominator of the sampling probability)."""
    participants: int
    """Updates aggregated (planned assignments while the round is open)."""
    sampling_probability: float
    clip_norm: float
    noise_multiplier: float
    epsilon: float
    """Cumulative epsilon of the task after this round, at `delta`."""
    delta: float
    secure_aggregation: bool = False


@dataclass(frozen=True)
class PrivacyStop:
    """A DP task whose next round would exceed its epsilon budget."""

    task_id: str
    round_number: int
    epsilon: float
    budget: float
    delta: float
    reason: str
    at: float


class UpdateOutcome(enum.Enum):
    """What `record_update` did, so the caller can acknowledge correctly."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    """Same update id seen before: acknowledge again, count nothing."""
    ALREADY_REPORTED = "already-reported"
    """Another attempt from the same device for the same round was already counted."""


def token_digest(token: str) -> str:
    """Tokens are stored hashed: a leaked database does not leak usable tokens."""
    return hashlib.sha256(token.encode()).hexdigest()
