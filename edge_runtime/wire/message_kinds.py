"""The closed sets of the wire protocol: message kinds and the enums messages carry.

Kept apart from `edge_runtime.wire.messages` so that module holds the message dataclasses
only.
"""

from __future__ import annotations

import enum


class MessageKind(enum.Enum):
    """Every message type on the wire. The value is the serialized `kind` tag."""

    ENROLLMENT_REQUEST = "enrollment_request"
    ENROLLMENT_RESPONSE = "enrollment_response"
    DEVICE_STATE = "device_state"
    COORDINATOR_STATUS = "coordinator_status"
    TASK_ASSIGNMENT = "task_assignment"
    ASSIGNMENT_DECLINE = "assignment_decline"
    UPDATE = "update"
    ACKNOWLEDGEMENT = "acknowledgement"
    MODEL_MANIFEST = "model_manifest"
    CHUNK = "chunk"
    TRANSFER_STATUS_REQUEST = "transfer_status_request"
    TRANSFER_STATUS = "transfer_status"
    SECURE_AGGREGATION = "secure_aggregation"

    @property
    def requires_signature(self) -> bool:
        """Chunks are the only unsigned kind: the reassembled frame they carry is signed and
        its sha256 is checked, so signing each chunk would add cost and no protection."""
        return self is not MessageKind.CHUNK


class UpdateEncoding(enum.Enum):
    """How an update body's tensors are stored (see `edge_runtime.wire.update_codec`)."""

    FP32 = "fp32"
    INT8 = "int8"


class PowerSource(enum.Enum):
    MAINS = "mains"
    BATTERY = "battery"
    UNKNOWN = "unknown"


class AckStatus(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    """Already recorded; the sender may delete its outbox copy exactly as for ACCEPTED."""
    REJECTED = "rejected"
    """Refused for good (bad signature, stale round...); `reason` says why. Do not resend."""


class SecAggStep(enum.Enum):
    """The messages of a secure-aggregation round, in protocol order (docs/secagg.md). The
    frame body carries the step's content (`edge_runtime.secagg.bodies`)."""

    ADVERTISE_KEYS = "advertise_keys"
    """Device -> coordinator: this round's two X25519 public keys."""
    ROSTER = "roster"
    """Coordinator -> device: every advertised key pair and the threshold t."""
    SHARE_KEYS = "share_keys"
    """Device -> coordinator: one sealed share box per peer."""
    FORWARDED_SHARES = "forwarded_shares"
    """Coordinator -> device: the boxes the other devices addressed to it."""
    MASKED_INPUT = "masked_input"
    """Device -> coordinator: the masked ring vector (acknowledged like an update)."""
    UNMASK_REQUEST = "unmask_request"
    """Coordinator -> surviving device: whose shares to reveal."""
    UNMASK_RESPONSE = "unmask_response"
    """Device -> coordinator: the requested shares."""
    ABORT = "abort"
    """Coordinator -> device: the round ended without a sum; forget its secrets."""


class PrivacyMode(enum.Enum):
    """Where a differentially private task adds its Gaussian noise (clipping is always on
    the device and again on the coordinator)."""

    CENTRAL = "central"
    """The coordinator noises the aggregate: less noise in the model, but the coordinator
    sees each clipped update."""
    LOCAL = "local"
    """Each device noises its own update before upload: the coordinator never sees an
    un-noised update, at the price of much more noise in the average."""
