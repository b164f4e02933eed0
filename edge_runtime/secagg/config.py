"""One round's secure-aggregation settings and result, shared by client and server."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from edge_runtime.secagg.messages import (
    SecAggAbort,
)
from edge_runtime.secagg.ring import (
    QuantizationConfig,
)
from edge_runtime.wire import SchemaError


@dataclass(frozen=True)
class SecAggConfig:
    """One round's secure-aggregation settings; devices and coordinator must agree on them."""

    reconstruction_threshold: int
    """t: shares needed to rebuild a secret, and the fewest devices a step may continue with.
    Fewer than t colluding devices (plus the coordinator) learn nothing; choose t > n/2."""
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.reconstruction_threshold, int) or self.reconstruction_threshold < 2:
            raise SchemaError(
                f"reconstruction_threshold must be an int >= 2, got "
                f"{self.reconstruction_threshold!r}"
            )


class ShareFault(enum.Enum):
    """How a device was caught misbehaving while the coordinator unmasked; the value is the
    category its rejection is recorded under."""

    BAD_SHARE = "secagg-bad-share"
    """It revealed a share that disagrees with the verified secret of its owner."""
    BAD_SECRET = "secagg-bad-secret"
    """Its own shares agree with each other but rebuild a seed other than the one it
    committed to (or a mask key other than the one it advertised)."""


@dataclass(frozen=True)
class ShareRejection:
    """One device caught misbehaving during unmasking, and why (for the log and the store)."""

    device_id: str
    fault: ShareFault
    reason: str


@dataclass(frozen=True)
class SecAggResult:
    """The decoded sum of the survivors' deltas, who it covers, and who was caught lying."""

    total: dict[str, torch.Tensor]
    contributors: tuple[str, ...]
    dropped: tuple[str, ...]
    rejections: tuple[ShareRejection, ...] = ()
    """Devices whose revealed shares were wrong; the sum was rebuilt without them."""

    @property
    def num_inputs(self) -> int:
        return len(self.contributors)


def abort_if_below(threshold: int, count: int, total: int, what: str) -> None:
    if count < threshold:
        raise SecAggAbort(
            f"only {count} of {total} devices {what}; threshold is {threshold}. "
            "The round is aborted and nothing is revealed; retry with more devices."
        )


def share_points(device_ids: Sequence[str]) -> dict[str, int]:
    """Shamir x-coordinate of each device: its 1-based position in the sorted roster."""
    return {device_id: index + 1 for index, device_id in enumerate(sorted(device_ids))}
