"""What one round moves over the network, and how long it takes on a link.

A device downloads the global adapter (fp32 safetensors) and uploads its update (int8 per-row
quantized, DESIGN.md: compressed before upload); both are one transfer each, plus framing.
The time of a transfer is its bits over the link rate plus one request/acknowledge round
trip. Devices of one school share the school's link, so `RoundTransfer` also prices the
round at a share of a school link (each device gets 1/m of it when m transfer in the same
round, or its own link if that is slower: the same rule as `coordinator.plan_fitting`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from device_profiles.plan import DEFAULT_TARGET_MODULES, TrainingPlan
from device_profiles.profile import Network
from device_profiles.shapes import ModelShape
from device_profiles.step_counts import adapter_parameter_count

DOWNLOAD_BYTES_PER_PARAM = 4.0
"""The global adapter travels as fp32 safetensors."""
UPLOAD_BYTES_PER_PARAM = 1.0
"""Updates travel int8 per-row quantized (DESIGN.md: compressed before upload)."""
SAFETENSORS_OVERHEAD_BYTES = 8192
"""JSON header, message header and chunk framing, per transfer."""


def adapter_bytes(
    model_shape: ModelShape,
    rank: int,
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES,
    bytes_per_param: float = DOWNLOAD_BYTES_PER_PARAM,
) -> int:
    """Size of one adapter transfer: parameters at `bytes_per_param` plus framing.

    Use the default (fp32) for the global adapter a device downloads and
    `UPLOAD_BYTES_PER_PARAM` for the int8-compressed update it uploads.
    """
    parameters = adapter_parameter_count(model_shape, rank, target_modules)
    return int(math.ceil(parameters * bytes_per_param)) + SAFETENSORS_OVERHEAD_BYTES


def transfer_seconds(size_bytes: float, mbps: float, rtt_ms: float) -> float:
    """Link time plus one request/acknowledge round trip."""
    return size_bytes * 8.0 / (mbps * 1e6) + 2.0 * rtt_ms / 1000.0


DEFAULT_SCHOOL_DOWN_MBPS = 100.0
DEFAULT_SCHOOL_UP_MBPS = 30.0
"""A school's whole link when a planner names none: the UK DfE minimum for a primary school
('Broadband internet standards for schools and colleges', 2022), the figure the reference
profiles' own link (20/6 Mbit/s, a fifth of it) is derived from."""
DEFAULT_DEVICES_SHARING = 30
"""Devices of one school transferring in the same round when a planner names no number: a
class set (one device per pupil of a class of 30), the case a school link must carry."""


@dataclass(frozen=True)
class SharedSchoolLink:
    """A school's link as a planner describes it, and how many devices share it in a round."""

    down_mbps: float = DEFAULT_SCHOOL_DOWN_MBPS
    up_mbps: float = DEFAULT_SCHOOL_UP_MBPS
    devices_sharing: int = DEFAULT_DEVICES_SHARING

    def __post_init__(self) -> None:
        for name in ("down_mbps", "up_mbps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"SharedSchoolLink.{name} is {value!r}; expected a number > 0")
        devices = self.devices_sharing
        if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
            raise ValueError(
                f"SharedSchoolLink.devices_sharing is {devices!r}; expected an integer >= 1"
            )

    def device_mbps(self, network: Network) -> tuple[float, float]:
        """(down, up) one device gets: its share of the school link, or its own link if
        that is slower."""
        return (
            min(network.down_mbps, self.down_mbps / self.devices_sharing),
            min(network.up_mbps, self.up_mbps / self.devices_sharing),
        )


@dataclass(frozen=True)
class RoundTransfer:
    """What one device moves in one round, and how long it takes on its own link and on its
    share of the school link."""

    download_bytes: int
    """The global adapter at the plan's rank, fp32."""
    upload_bytes: int
    """The device's update, int8-compressed."""
    download_seconds: float
    """At the profile's own link (`network.down_mbps`, plus the round trip)."""
    upload_seconds: float
    shared_download_seconds: float
    """At the device's share of the school link (`SharedSchoolLink.device_mbps`)."""
    shared_upload_seconds: float


def round_transfer(
    network: Network, model_shape: ModelShape, plan: TrainingPlan, school: SharedSchoolLink
) -> RoundTransfer:
    """Bytes and seconds of one round's download and upload of `plan` (the same sizes and link
    arithmetic `cost_model.predict` prices a round with)."""
    down = adapter_bytes(model_shape, plan.rank, plan.target_modules)
    up = adapter_bytes(model_shape, plan.rank, plan.target_modules, UPLOAD_BYTES_PER_PARAM)
    shared_down, shared_up = school.device_mbps(network)
    return RoundTransfer(
        download_bytes=down,
        upload_bytes=up,
        download_seconds=transfer_seconds(down, network.down_mbps, network.rtt_ms),
        upload_seconds=transfer_seconds(up, network.up_mbps, network.rtt_ms),
        shared_download_seconds=transfer_seconds(down, shared_down, network.rtt_ms),
        shared_upload_seconds=transfer_seconds(up, shared_up, network.rtt_ms),
    )
