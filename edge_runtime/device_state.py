"""The agent's heartbeat: what it tells the coordinator about itself, signed.

A retained `DeviceState` on the device's state topic is how the coordinator knows a device
is online and fit to train; its last will is the same message with `online=False`, built
before the agent connects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edge_runtime.activity import HEARTBEAT_REFRESH_SECONDS, verdict_changed
from edge_runtime.eligibility import (
    DeviceReadings,
    Eligibility,
    EligibilityPolicy,
    check_eligibility,
    read_device,
)
from edge_runtime.wire import (
    SECURE_AGGREGATION_CAPABILITY,
    DeviceState,
    Ed25519PrivateKey,
    PowerSource,
    encode_frame,
)
from quantization.compute_device import CPU, ComputeDevice


@dataclass(frozen=True)
class Heartbeat:
    """A signed state frame and the verdict it carries (the agent logs a change of it)."""

    frame: bytes
    verdict: Eligibility
    """`eligible=False, reasons=("offline",)` for the offline frame (the last will)."""


@dataclass(frozen=True)
class PublishedHeartbeat:
    """The agent's last published heartbeat: when, its verdict, and the transport's
    connect count then (after a reconnect the broker holds the last will instead)."""

    at: float
    verdict: Eligibility
    connect_count: int


def heartbeat_due(
    last: PublishedHeartbeat | None, verdict: Eligibility, now: float, connect_count: int
) -> bool:
    """Publish a checked heartbeat? Yes when the verdict changed (numbers in reasons
    aside), the agent reconnected, or the last one is HEARTBEAT_REFRESH_SECONDS old."""
    return (
        last is None
        or verdict_changed(last.verdict, verdict)
        or connect_count != last.connect_count
        or now - last.at >= HEARTBEAT_REFRESH_SECONDS
    )


def signed_heartbeat(
    fleet: str,
    device_id: str,
    key: Ed25519PrivateKey,
    *,
    online: bool,
    sequence: int,
    profile_digest: str,
    eligibility: EligibilityPolicy,
    compute: ComputeDevice = CPU,
    reader: Callable[..., DeviceReadings] = read_device,
) -> Heartbeat:
    """The signed state frame; an online one reads the device's sensors with `reader`
    (without waiting for a CPU sample: a heartbeat must not stall the loop).
    Training on a discrete GPU, the free memory reported is the GPU's, which the
    coordinator's plan fitter compares with a plan's GPU peak (device_profiles/gpu_path.py);
    otherwise it is the system's."""
    readings = reader(cpu_sample_seconds=0.0, compute=compute) if online else None
    verdict = Eligibility(eligible=False, reasons=("offline",))
    if readings is not None:
        verdict = check_eligibility(eligibility, readings)
    if readings is None or readings.power_unknown_reason:
        power = PowerSource.UNKNOWN
    else:
        power = PowerSource.MAINS if readings.on_mains else PowerSource.BATTERY
    state = DeviceState(
        fleet=fleet,
        device_id=device_id,
        sequence=sequence,
        online=online,
        eligible=verdict.eligible,
        cpu_load=readings.cpu_percent if readings else 0.0,
        free_memory_bytes=_free_memory(readings),
        power_source=power,
        profile_digest=profile_digest,
        ineligible_reasons=tuple(verdict.reasons),
        battery_percent=readings.battery_percent if readings else None,
        capabilities=(SECURE_AGGREGATION_CAPABILITY,),
    )
    return Heartbeat(encode_frame(state, sender=device_id, signing_key=key), verdict)


def device_state_frame(
    fleet: str,
    device_id: str,
    key: Ed25519PrivateKey,
    *,
    online: bool,
    sequence: int,
    profile_digest: str,
    eligibility: EligibilityPolicy,
    compute: ComputeDevice = CPU,
) -> bytes:
    """`signed_heartbeat(...)`'s frame alone, for callers that need no verdict."""
    return signed_heartbeat(
        fleet,
        device_id,
        key,
        online=online,
        sequence=sequence,
        profile_digest=profile_digest,
        eligibility=eligibility,
        compute=compute,
    ).frame


def _free_memory(readings: DeviceReadings | None) -> int:
    if readings is None:
        return 0
    if readings.gpu_free_memory_bytes is not None:
        return readings.gpu_free_memory_bytes
    return readings.available_memory_bytes
