"""Message schemas: one frozen dataclass per message kind, validated in `__post_init__`.

The dataclass *is* the schema: `edge_runtime.wire.schema` converts to and from JSON driven by
the annotations.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from device_profiles.plan import TrainingPlan
from edge_runtime.wire.errors import SchemaError
from edge_runtime.wire.message_kinds import (
    AckStatus,
    MessageKind,
    PowerSource,
    PrivacyMode,
    SecAggStep,
    UpdateEncoding,
)
from edge_runtime.wire.schema import (
    MAX_SAFE_INTEGER,
    check_identifier,
    check_range,
    check_sha256,
)

MAX_METRICS = 256
SECURE_AGGREGATION_CAPABILITY = "secagg-v1"
"""The `DeviceState.capabilities` entry of an agent that can take part in secure rounds."""
TASK_KINDS = ("classification", "causal-lm")


# ----------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class DevicePrivacy:
    """A differentially private task's instructions to the device (see
    `edge_runtime.local_privacy`): clip every update to `clip_norm`; under LOCAL also add
    N(0, (noise_multiplier * clip_norm)^2) to each coordinate before encoding."""

    mode: PrivacyMode
    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise SchemaError(f"clip_norm must be a positive number, got {self.clip_norm!r}")
        check_range("noise_multiplier", self.noise_multiplier, 0.0, 1e6)


@dataclass(frozen=True)
class SecureAggregationSpec:
    """How a secure-aggregation task's devices encode their delta into the ring
    (`edge_runtime.secagg.ring.QuantizationConfig`); both sides must agree on it."""

    clip_bound: float
    """Every coordinate is clipped to [-clip_bound, clip_bound] before masking."""
    ring_bits: int = 32

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_bound) and self.clip_bound > 0):
            raise SchemaError(f"clip_bound must be a positive number, got {self.clip_bound!r}")
        check_range("ring_bits", self.ring_bits, 8, 32)


@dataclass(frozen=True)
class TaskSpec:
    """What a device needs to build the task's model; sent inside every assignment."""

    kind: str
    """'classification' or 'causal-lm'."""
    base_model: str
    """A known model name (minilm-l6, smollm2-135m) or a path on the device."""
    labels: tuple[str, ...] = ()
    """Class names in head order (classification only)."""
    adapter_alpha: float = 16.0
    quantize_embeddings: bool = field(default=True, metadata={"omit_if_default": True})
    """int8 frozen embeddings (quantization/embeddings.py); sent only when false."""
    privacy: DevicePrivacy | None = field(default=None, metadata={"omit_if_none": True})
    """Client-level DP instructions; None (and then absent from the JSON, so agents that
    predate it still parse assignments of non-private tasks) when the task has DP off. An
    agent too old to know the field refuses a private task's assignment rather than
    sending an unclipped update."""
    secure_aggregation: SecureAggregationSpec | None = field(
        default=None, metadata={"omit_if_none": True}
    )
    """Set when the task's rounds run secure aggregation: the device sends a masked input
    instead of an update. None (absent) for plain tasks, as for `privacy`."""

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise SchemaError(f"kind must be one of {list(TASK_KINDS)}, got {self.kind!r:.80}")
        if not 1 <= len(self.base_model) <= 1024:
            raise SchemaError(f"base_model must be 1..1024 chars, got {len(self.base_model)}")
        if len(self.labels) > 4096 or any(not 1 <= len(label) <= 256 for label in self.labels):
            raise SchemaError("labels: at most 4096 labels of 1..256 chars each")
        if not (math.isfinite(self.adapter_alpha) and self.adapter_alpha > 0):
            raise SchemaError(
                f"adapter_alpha must be a positive number, got {self.adapter_alpha!r}"
            )


@dataclass(frozen=True)
class EnrollmentRequest:
    """Device -> coordinator: redeem a one-time token to register `public_key`.

    Signed by the new key itself (proof of possession)."""

    KIND: ClassVar[MessageKind] = MessageKind.ENROLLMENT_REQUEST
    fleet: str
    device_id: str
    request_id: str
    token: str
    public_key: str
    profile_digest: str
    school: str = ""
    """The school the agent is configured for: a token issued for another is refused
    (empty from agents that predate the field)."""
    machine: str = ""
    """`platform.machine()` of the device (`aarch64`, `x86_64`, ...): what the hardware
    really is, whatever the configured profile claims, so an operator sees a Pi enrolled
    with a laptop profile (empty from agents that predate the field)."""

    def __post_init__(self) -> None:
        check_identifier("fleet", self.fleet)
        check_identifier("device_id", self.device_id)
        check_identifier("request_id", self.request_id)
        if self.school:
            check_identifier("school", self.school)
        if not re.fullmatch(r"[A-Za-z0-9_.-]{0,32}", self.machine):
            raise SchemaError(
                f"machine must be up to 32 chars of [A-Za-z0-9_.-] (platform.machine()), "
                f"got {self.machine!r:.80}"
            )
        if not 16 <= len(self.token) <= 256:
            raise SchemaError(f"token must be 16..256 chars, got {len(self.token)}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.public_key):
            raise SchemaError(f"public_key must be 64 hex chars, got {self.public_key!r:.80}")
        check_sha256("profile_digest", self.profile_digest)

    @property
    def message_id(self) -> str:
        return f"enroll/{self.fleet}/{self.device_id}/{self.request_id}"


@dataclass(frozen=True)
class EnrollmentResponse:
    """Coordinator -> device: the registration result and the key to trust from now on."""

    KIND: ClassVar[MessageKind] = MessageKind.ENROLLMENT_RESPONSE
    fleet: str
    device_id: str
    request_id: str
    accepted: bool
    reason: str
    coordinator_public_key: str

    def __post_init__(self) -> None:
        check_identifier("fleet", self.fleet)
        check_identifier("device_id", self.device_id)
        check_identifier("request_id", self.request_id)
        if not re.fullmatch(r"[0-9a-f]{64}", self.coordinator_public_key):
            raise SchemaError("coordinator_public_key must be 64 hex chars")

    @property
    def message_id(self) -> str:
        return f"enrolled/{self.fleet}/{self.device_id}/{self.request_id}"


@dataclass(frozen=True)
class DeviceState:
    """Device heartbeat, retained; the same message with online=False is the last will."""

    KIND: ClassVar[MessageKind] = MessageKind.DEVICE_STATE
    fleet: str
    device_id: str
    sequence: int
    """Strictly increasing per device (e.g. milliseconds since the epoch)."""
    online: bool
    eligible: bool
    cpu_load: float
    free_memory_bytes: int
    power_source: PowerSource
    profile_digest: str
    ineligible_reasons: tuple[str, ...] = ()
    battery_percent: float | None = None
    capabilities: tuple[str, ...] | None = field(default=None, metadata={"omit_if_none": True})
    """Optional protocol features the agent speaks, e.g. SECURE_AGGREGATION_CAPABILITY.
    None (absent) from agents that predate it: they can do none."""

    def __post_init__(self) -> None:
        check_identifier("fleet", self.fleet)
        check_identifier("device_id", self.device_id)
        check_range("sequence", self.sequence, 0, MAX_SAFE_INTEGER)
        check_range("cpu_load", self.cpu_load, 0.0, 1e6)
        check_range("free_memory_bytes", self.free_memory_bytes, 0, MAX_SAFE_INTEGER)
        check_sha256("profile_digest", self.profile_digest)
        if self.battery_percent is not None:
            check_range("battery_percent", self.battery_percent, 0.0, 100.0)
        if self.capabilities is not None:
            if len(self.capabilities) > 64:
                raise SchemaError(f"at most 64 capabilities, got {len(self.capabilities)}")
            for capability in self.capabilities:
                check_identifier("capabilities", capability)

    @property
    def message_id(self) -> str:
        return f"state/{self.fleet}/{self.device_id}/{self.sequence}"


@dataclass(frozen=True)
class CoordinatorStatus:
    """Coordinator liveness, retained; online=False is its last will."""

    KIND: ClassVar[MessageKind] = MessageKind.COORDINATOR_STATUS
    fleet: str
    sequence: int
    online: bool
    public_key: str

    def __post_init__(self) -> None:
        check_identifier("fleet", self.fleet)
        check_range("sequence", self.sequence, 0, MAX_SAFE_INTEGER)
        if not re.fullmatch(r"[0-9a-f]{64}", self.public_key):
            raise SchemaError("public_key must be 64 hex chars")

    @property
    def message_id(self) -> str:
        return f"status/{self.fleet}/{self.sequence}"


@dataclass(frozen=True)
class TaskAssignment:
    """Coordinator -> device: train `plan` on top of `model_version` before `deadline`."""

    KIND: ClassVar[MessageKind] = MessageKind.TASK_ASSIGNMENT
    fleet: str
    task: str
    server_round: int
    device_id: str
    attempt: int
    plan: TrainingPlan
    """The scheduler's plan for this device, as it built it (see `device_profiles.plan`)."""
    deadline: float
    """Unix time (seconds) by which the update must have arrived."""
    model_version: str
    """sha256 of the global adapter body to start from (see ModelManifest)."""
    spec: TaskSpec
    update_encoding: UpdateEncoding = UpdateEncoding.INT8
    """How to encode the update; INT8 by default: a quarter of fp32's bytes, which slow
    school uplinks need."""
    top_k_fraction: float | None = None
    """Keep only this fraction of each tensor's largest entries; None sends all."""
    predicted_round_seconds: float | None = None
    """The scheduler's prediction for this device (lets an agent emulate a slower profile)."""

    def __post_init__(self) -> None:
        check_identifier("fleet", self.fleet)
        check_identifier("task", self.task)
        check_identifier("device_id", self.device_id)
        check_range("server_round", self.server_round, 0, MAX_SAFE_INTEGER)
        check_range("attempt", self.attempt, 0, 1000)
        check_range("deadline", self.deadline, 0.0, 1e11)
        check_sha256("model_version", self.model_version)
        if self.top_k_fraction is not None:
            check_range("top_k_fraction", self.top_k_fraction, 1e-6, 1.0)
        if self.predicted_round_seconds is not None:
            check_range("predicted_round_seconds", self.predicted_round_seconds, 0.0, 1e7)

    @property
    def message_id(self) -> str:
        return f"task/{self.fleet}/{self.task}/{self.server_round}/{self.device_id}/{self.attempt}"


@dataclass(frozen=True)
class AssignmentDecline:
    """Device -> coordinator (on its update topic): it will not do this assignment, and why
    (not eligible, task not allowed here...), so the round need not wait for it."""

    KIND: ClassVar[MessageKind] = MessageKind.ASSIGNMENT_DECLINE
    fleet: str
    task: str
    server_round: int
    device_id: str
    attempt: int
    reasons: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_identifier("fleet", self.fleet)
        check_identifier("task", self.task)
        check_identifier("device_id", self.device_id)
        check_range("server_round", self.server_round, 0, MAX_SAFE_INTEGER)
        check_range("attempt", self.attempt, 0, 1000)
        if len(self.reasons) > 64:
            raise SchemaError(f"at most 64 reasons, got {len(self.reasons)}")

    @property
    def message_id(self) -> str:
        return (
            f"decline/{self.fleet}/{self.task}/{self.server_round}/{self.device_id}/{self.attempt}"
        )


def update_id(fleet: str, task: str, server_round: int, device_id: str, attempt: int) -> str:
    """The idempotency key of an update (DESIGN invariant 4)."""
    return f"update/{fleet}/{task}/{server_round}/{device_id}/{attempt}"


@dataclass(frozen=True)
class Update:
    """Device -> coordinator: an adapter delta (the frame body) plus what produced it."""

    KIND: ClassVar[MessageKind] = MessageKind.UPDATE
    fleet: str
    task: str
    server_round: int
    device_id: str
    attempt: int
    model_version: str
    num_samples: int
    num_steps: int
    encoding: UpdateEncoding
    metrics: dict[str, float] = field(default_factory=dict)
    top_k_fraction: float | None = None

    def __post_init__(self) -> None:
        check_identifier("fleet", self.fleet)
        check_identifier("task", self.task)
        check_identifier("device_id", self.device_id)
        check_range("server_round", self.server_round, 0, MAX_SAFE_INTEGER)
        check_range("attempt", self.attempt, 0, 1000)
        check_sha256("model_version", self.model_version)
        check_range("num_samples", self.num_samples, 0, MAX_SAFE_INTEGER)
        check_range("num_steps", self.num_steps, 0, MAX_SAFE_INTEGER)
        if len(self.metrics) > MAX_METRICS:
            raise SchemaError(f"at most {MAX_METRICS} metrics, got {len(self.metrics)}")
        for name in self.metrics:
            check_identifier("metric name", name)
        if self.top_k_fraction is not None:
            check_range("top_k_fraction", self.top_k_fraction, 1e-6, 1.0)

    @property
    def message_id(self) -> str:
        return update_id(self.fleet, self.task, self.server_round, self.device_id, self.attempt)


@dataclass(frozen=True)
class Acknowledgement:
    """Coordinator -> device: the fate of one message (the agent clears its outbox on it)."""

    KIND: ClassVar[MessageKind] = MessageKind.ACKNOWLEDGEMENT
    fleet: str
    device_id: str
    acked_message_id: str
    status: AckStatus
    reason: str = ""

    def __post_init__(self) -> None:
        check_identifier("fleet", self.fleet)
        check_identifier("device_id", self.device_id)
        if not 1 <= len(self.acked_message_id) <= 512:
            raise SchemaError("acked_message_id must be 1..512 chars")

    @property
    def message_id(self) -> str:
        return f"ack/{self.acked_message_id}"


@dataclass(frozen=True)
class ModelManifest:
    """A global adapter version, retained, published once per version.

    The body is content-addressed: `version` is the sha256 of the encoded adapter, sent in
    retained chunks on `model_blob_topic(fleet, version, index)`."""

    KIND: ClassVar[MessageKind] = MessageKind.MODEL_MANIFEST
    fleet: str
    task: str
    version: str
    server_round: int
    body_bytes: int
    chunk_bytes: int
    chunk_count: int
    encoding: UpdateEncoding = UpdateEncoding.FP32
    parent_version: str | None = None
    spec: TaskSpec | None = None
    """The task's model, as an assignment carries it: an agent with data for the task
    builds its model from this before its first assignment (edge_runtime.task_preload)."""
    plan: TrainingPlan | None = None
    """The plan of a device that needs nothing shrunk: what the agent prices against its
    memory before it preloads (a real assignment may still bring a smaller plan)."""

    def __post_init__(self) -> None:
        check_identifier("fleet", self.fleet)
        check_identifier("task", self.task)
        check_sha256("version", self.version)
        if self.parent_version is not None:
            check_sha256("parent_version", self.parent_version)
        check_range("server_round", self.server_round, 0, MAX_SAFE_INTEGER)
        check_range("body_bytes", self.body_bytes, 1, MAX_SAFE_INTEGER)
        check_range("chunk_bytes", self.chunk_bytes, 1, MAX_SAFE_INTEGER)
        expected = -(-self.body_bytes // self.chunk_bytes)
        if self.chunk_count != expected:
            raise SchemaError(
                f"chunk_count must be ceil(body_bytes / chunk_bytes) = {expected}, "
                f"got {self.chunk_count}"
            )

    @property
    def message_id(self) -> str:
        return f"model/{self.fleet}/{self.task}/{self.version}"


@dataclass(frozen=True)
class ChunkHeader:
    """One piece of a large frame; the frame body is the piece's bytes."""

    KIND: ClassVar[MessageKind] = MessageKind.CHUNK
    transfer_id: str
    index: int
    count: int
    chunk_bytes: int
    """Size of every chunk but the last."""
    total_bytes: int
    sha256: str
    """Digest of the whole reassembled payload."""

    def __post_init__(self) -> None:
        check_identifier("transfer_id", self.transfer_id)
        check_range("total_bytes", self.total_bytes, 1, MAX_SAFE_INTEGER)
        check_range("chunk_bytes", self.chunk_bytes, 1, MAX_SAFE_INTEGER)
        expected = -(-self.total_bytes // self.chunk_bytes)
        if self.count != expected:
            raise SchemaError(
                f"count must be ceil(total_bytes / chunk_bytes) = {expected}, got {self.count}"
            )
        check_range("index", self.index, 0, self.count - 1)
        check_sha256("sha256", self.sha256)

    @property
    def expected_body_bytes(self) -> int:
        return min(self.chunk_bytes, self.total_bytes - self.index * self.chunk_bytes)

    @property
    def message_id(self) -> str:
        return f"chunk/{self.transfer_id}/{self.index}"


@dataclass(frozen=True)
class TransferStatusRequest:
    """Sender -> receiver after a reconnect: which chunks of `transfer_id` do you hold?"""

    KIND: ClassVar[MessageKind] = MessageKind.TRANSFER_STATUS_REQUEST
    transfer_id: str
    request_id: str

    def __post_init__(self) -> None:
        check_identifier("transfer_id", self.transfer_id)
        check_identifier("request_id", self.request_id)

    @property
    def message_id(self) -> str:
        return f"transfer-query/{self.transfer_id}/{self.request_id}"


@dataclass(frozen=True)
class TransferStatus:
    """Receiver -> sender: the chunks still missing, as half-open [start, stop) ranges
    flattened into `missing_ranges` (start0, stop0, start1, stop1, ...), so a reply stays
    small however many chunks a transfer has."""

    KIND: ClassVar[MessageKind] = MessageKind.TRANSFER_STATUS
    transfer_id: str
    request_id: str
    known: bool
    """False when the receiver never saw this transfer: resend everything."""
    complete: bool
    missing_ranges: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_identifier("transfer_id", self.transfer_id)
        check_identifier("request_id", self.request_id)
        ranges = self.missing_ranges
        if len(ranges) % 2:
            raise SchemaError("missing_ranges must hold (start, stop) pairs")
        previous_stop = -1
        for start, stop in zip(ranges[::2], ranges[1::2], strict=True):
            if not previous_stop < start < stop or start < 0:
                raise SchemaError(
                    f"missing_ranges must be increasing, non-empty, disjoint; got {ranges!r:.200}"
                )
            previous_stop = stop

    @property
    def message_id(self) -> str:
        return f"transfer-status/{self.transfer_id}/{self.request_id}"

    def missing_indices(self, count: int) -> list[int]:
        """The missing chunk indices, refusing ranges beyond `count` (a lying receiver)."""
        if self.missing_ranges and self.missing_ranges[-1] > count:
            raise SchemaError(
                f"missing_ranges reach {self.missing_ranges[-1]} but the transfer has "
                f"{count} chunks"
            )
        return [
            index
            for start, stop in zip(self.missing_ranges[::2], self.missing_ranges[1::2], strict=True)
            for index in range(start, stop)
        ]


@dataclass(frozen=True)
class SecAggEnvelope:
    """One secure-aggregation step of one device in one round (either direction).

    The header names the round and the step; the body holds the step's content, parsed by
    `edge_runtime.secagg.bodies` into the typed messages of `edge_runtime.secagg.messages`.
    A masked input also carries, in the clear as a plain update does, the samples and steps
    trained and the training metrics (the scheduler's utility needs them)."""

    KIND: ClassVar[MessageKind] = MessageKind.SECURE_AGGREGATION
    fleet: str
    task: str
    server_round: int
    device_id: str
    """The sending device, or for coordinator steps the addressed one."""
    step: SecAggStep
    num_samples: int = 0
    num_steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    """ABORT only: why the round ended without a sum."""

    def __post_init__(self) -> None:
        check_identifier("fleet", self.fleet)
        check_identifier("task", self.task)
        check_identifier("device_id", self.device_id)
        check_range("server_round", self.server_round, 1, MAX_SAFE_INTEGER)
        check_range("num_samples", self.num_samples, 0, MAX_SAFE_INTEGER)
        check_range("num_steps", self.num_steps, 0, MAX_SAFE_INTEGER)
        if len(self.metrics) > MAX_METRICS:
            raise SchemaError(f"at most {MAX_METRICS} metrics, got {len(self.metrics)}")
        for name in self.metrics:
            check_identifier("metric name", name)
        if len(self.reason) > 1024:
            raise SchemaError(f"reason must be at most 1024 chars, got {len(self.reason)}")

    @property
    def message_id(self) -> str:
        return (
            f"secagg/{self.fleet}/{self.task}/{self.server_round}/{self.device_id}/"
            f"{self.step.value}"
        )


Message = (
    EnrollmentRequest
    | EnrollmentResponse
    | DeviceState
    | CoordinatorStatus
    | TaskAssignment
    | AssignmentDecline
    | Update
    | Acknowledgement
    | ModelManifest
    | ChunkHeader
    | TransferStatusRequest
    | TransferStatus
    | SecAggEnvelope
)

MESSAGE_CLASSES: dict[MessageKind, type[Any]] = {cls.KIND: cls for cls in typing.get_args(Message)}
"""The one registry the style guide allows: serialized kind tag -> class."""
