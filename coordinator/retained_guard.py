"""Retained messages a device may leave on the broker: only its state.

Why this exists: Mosquitto's ACLs (the `acl_file` and the dynamic-security plugin alike) do
not look at the retain flag, so the broker stores a retained message on any topic a device
may publish to. The role of coordinator/broker_acl.py bounds that to the six `DeviceChannel`
topics of the device, each at most `message_size_limit` bytes; this module lets the
coordinator clear the five that the protocol never retains (only `state` is retained, so a
late coordinator sees every device's last state).

MQTT 3.1.1 sets the retain flag only on messages sent because of a new subscription, so the
coordinator sees a retained message when it subscribes (at start) and when it subscribes
again to `retained_sweep_filters` (the daemon does so every `RETAINED_SWEEP_SECONDS`; the
broker then re-sends what is retained there, which by design is nothing). Each one is
refused (`forbidden_retained`) and cleared with an empty retained message.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.outgoing import Outgoing
from edge_runtime.wire import (
    TOPIC_ROOT,
    DeviceChannel,
    ReceivedMessage,
    SchemaError,
    check_identifier,
    device_topic,
    parse_device_topic,
)

RETAINED_CHANNELS = frozenset({DeviceChannel.STATE})
"""Device channels whose messages are retained by design."""

RETAINED_SWEEP_SECONDS = 300.0
"""How often the daemon re-subscribes to `retained_sweep_filters`. Between two sweeps a
hostile device holds at most five retained messages, each within the broker's size limit."""


@dataclass(frozen=True)
class RetainedViolation:
    """A retained message on a device channel that is never retained, and its removal."""

    device_id: str
    channel: DeviceChannel
    clearing: Outgoing
    """An empty retained message on the same topic: the broker deletes what it retained."""
    reason: str


def retained_sweep_filters(fleet: str) -> list[str]:
    """The coordinator's own filters for the never-retained device channels. Subscribing to
    them again makes the broker re-send what is retained there."""
    check_identifier("fleet", fleet)
    return [
        f"{TOPIC_ROOT}/{fleet}/dev/+/{channel.value}"
        for channel in DeviceChannel
        if channel not in RETAINED_CHANNELS
    ]


def forbidden_retained(fleet: str, received: ReceivedMessage) -> RetainedViolation | None:
    """The violation if `received` is a retained message on one of this fleet's device
    channels that the protocol never retains; None otherwise (including an empty payload,
    which is a clearing, and topics that are not device topics)."""
    if not received.retain or not received.payload:
        return None
    try:
        message_fleet, device_id, channel = parse_device_topic(received.topic)
    except SchemaError:
        return None
    if message_fleet != fleet or channel in RETAINED_CHANNELS:
        return None
    return RetainedViolation(
        device_id=device_id,
        channel=channel,
        clearing=Outgoing(received.topic, b"", retain=True),
        reason=(
            f"retained message of {len(received.payload)} bytes on {channel.value!r}; only "
            "state is retained: cleared from the broker"
        ),
    )


def clear_device_retained(fleet: str, device_id: str) -> list[Outgoing]:
    """Empty retained messages on every topic of one device (for a revoked device: its last
    state would otherwise stay on the broker for good)."""
    return [
        Outgoing(device_topic(fleet, device_id, channel), b"", retain=True)
        for channel in DeviceChannel
    ]
