"""MQTT topics of the protocol: one subtree per device, plus coordinator-owned topics.

A device publishes only to its `DeviceChannel` topics under `schoolfl/<fleet>/dev/<device>/`,
so a broker ACL can confine it to exactly those (the production broker's per-device role:
coordinator/broker_acl.py); the coordinator
writes each device's inbox under `schoolfl/<fleet>/to/<device>/` and the fleet-wide status,
manifests and content-addressed model blobs under `schoolfl/<fleet>/coord/`. MQTT 3.1.1 is
enough. See docs/protocol.md.
"""

from __future__ import annotations

import enum

from edge_runtime.wire.errors import SchemaError
from edge_runtime.wire.schema import check_identifier, check_sha256

TOPIC_ROOT = "schoolfl"
COORDINATOR_SENDER = "coordinator"
"""The `sender` of every coordinator frame; devices send their device id."""


class DeviceChannel(enum.Enum):
    """Topics a device publishes to, under `schoolfl/<fleet>/dev/<device>/`."""

    ENROLL = "enroll"
    STATE = "state"
    UPDATE = "update"
    CHUNK = "chunk"
    TRANSFER = "transfer"
    """Transfer status requests (about uploads) and replies (about downloads)."""
    SECAGG = "secagg"
    """Secure-aggregation steps (`SecAggEnvelope`); a large masked input goes as chunks."""


class InboxChannel(enum.Enum):
    """Topics the coordinator publishes to one device, under `schoolfl/<fleet>/to/<device>/`."""

    ENROLLED = "enrolled"
    TASK = "task"
    ACK = "ack"
    TRANSFER = "transfer"
    SECAGG = "secagg"


def device_topic(fleet: str, device_id: str, channel: DeviceChannel) -> str:
    """A device-owned topic; the broker ACL lets only that device publish here."""
    check_identifier("fleet", fleet)
    check_identifier("device_id", device_id)
    return f"{TOPIC_ROOT}/{fleet}/dev/{device_id}/{channel.value}"


def inbox_topic(fleet: str, device_id: str, channel: InboxChannel) -> str:
    """A coordinator-owned topic addressed to one device; that device may only read it."""
    check_identifier("fleet", fleet)
    check_identifier("device_id", device_id)
    return f"{TOPIC_ROOT}/{fleet}/to/{device_id}/{channel.value}"


def coordinator_status_topic(fleet: str) -> str:
    """Retained CoordinatorStatus with a last will; devices read only."""
    check_identifier("fleet", fleet)
    return f"{TOPIC_ROOT}/{fleet}/coord/status"


def model_manifest_topic(fleet: str, task: str) -> str:
    """Retained ModelManifest of the task's current global adapter."""
    check_identifier("fleet", fleet)
    check_identifier("task", task)
    return f"{TOPIC_ROOT}/{fleet}/coord/model/{task}/manifest"


def model_blob_topic(fleet: str, version: str, index: int) -> str:
    """Retained chunk `index` of an adapter body, content-addressed by its sha256, so the
    body is published once per version however many devices fetch it."""
    check_identifier("fleet", fleet)
    check_sha256("version", version)
    return f"{TOPIC_ROOT}/{fleet}/coord/blob/{version}/{index}"


def coordinator_subscriptions(fleet: str) -> list[str]:
    """Filters the coordinator subscribes to: every device's subtree."""
    check_identifier("fleet", fleet)
    return [f"{TOPIC_ROOT}/{fleet}/dev/+/{channel.value}" for channel in DeviceChannel]


def device_subscriptions(fleet: str, device_id: str) -> list[str]:
    """Filters a device subscribes to: its inbox, the coordinator's status and the tasks'
    model manifests (which describe each task's model, so an agent can build it before its
    first assignment). Blobs are subscribed per version when needed."""
    check_identifier("fleet", fleet)
    return [
        f"{TOPIC_ROOT}/{fleet}/to/{device_id}/#",
        coordinator_status_topic(fleet),
        f"{TOPIC_ROOT}/{fleet}/coord/model/+/manifest",
    ]


def parse_device_topic(topic: str) -> tuple[str, str, DeviceChannel]:
    """(fleet, device_id, channel) of a device-owned topic.

    The coordinator checks that a frame's `sender` equals the device id in its topic, so
    a device that the ACL confines to its subtree cannot speak for another one."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != TOPIC_ROOT or parts[2] != "dev":
        raise SchemaError(
            f"expected {TOPIC_ROOT}/<fleet>/dev/<device>/<channel>, got {topic!r:.200}"
        )
    check_identifier("fleet", parts[1])
    check_identifier("device_id", parts[3])
    try:
        channel = DeviceChannel(parts[4])
    except ValueError as error:
        raise SchemaError(f"unknown device channel {parts[4]!r:.40} in {topic!r:.200}") from error
    return parts[1], parts[3], channel
