"""What each broker user may do: Mosquitto dynamic-security roles for a fleet.

Why roles and not an `acl_file`: an ACL file is read once at start, so removing one device
meant regenerating and reloading the broker's files; the dynamic-security plugin changes
clients and roles at run time through `$CONTROL/dynamic-security/v1`, so a revoked device is
removed at once (coordinator/broker_admin.py) and a new one added without touching the
others.

Why one role per device: the plugin of Mosquitto 2.0 matches ACL topics literally (an
`acl_file` `pattern` line substitutes `%u`; a dynamic-security ACL does not), so each
device's role names its own topics.

Why exact topics: `dev/<device>/#` let a hostile device create any number of retained topics
of any size (persisted to disk). A device may now publish to exactly the six topics of
`DeviceChannel`, so the retained messages one device can leave on the broker are at most
six, each at most the broker's `message_size_limit` (and coordinator/retained_guard.py
clears the five that are never retained by design). Everything not granted is denied
(`DEFAULT_ACL_ACCESS`); the ACLs never mention the retain flag, which Mosquitto's ACLs do
not see.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from edge_runtime.wire import TOPIC_ROOT, DeviceChannel, check_identifier, device_topic

COORDINATOR_ROLE = "schoolfl-coordinator"
"""The coordinator's fleet-wide role."""
ADMIN_ROLE = "schoolfl-broker-admin"
"""May send dynamic-security commands (and read `$SYS`); held by the coordinator's user (so
the daemon can remove a revoked device) and by the admin user of the command line."""
DEVICE_ROLE_PREFIX = "schoolfl-device-"

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
"""Where dynamic-security commands are published."""
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"
"""Where the plugin publishes its replies (QoS 0, to every subscriber of this topic)."""

DEFAULT_ACL_ACCESS: dict[str, bool] = {
    "publishClientSend": False,
    "publishClientReceive": False,
    "subscribe": False,
    "unsubscribe": True,
}
"""What the plugin allows when no role says otherwise: nothing but unsubscribing."""


class AclType(enum.Enum):
    """The dynamic-security ACL kinds this project grants."""

    PUBLISH_SEND = "publishClientSend"
    """The client may publish to the topic."""
    PUBLISH_RECEIVE = "publishClientReceive"
    """The broker may deliver messages on the topic to the client."""
    SUBSCRIBE_LITERAL = "subscribeLiteral"
    """The client may subscribe with exactly this filter."""
    SUBSCRIBE_PATTERN = "subscribePattern"
    """The client may subscribe with this filter or a narrower one."""


@dataclass(frozen=True)
class AclEntry:
    """One ACL line of a role."""

    acl_type: AclType
    topic: str
    allow: bool = True
    priority: int = 0

    def to_json(self) -> dict[str, object]:
        """The shape both the plugin's file and its `createRole` command use."""
        return {
            "acltype": self.acl_type.value,
            "topic": self.topic,
            "priority": self.priority,
            "allow": self.allow,
        }


@dataclass(frozen=True)
class Role:
    """A named set of ACLs, granted to clients by name."""

    name: str
    acls: tuple[AclEntry, ...]
    text_name: str = ""

    def to_json(self) -> dict[str, object]:
        """`{"rolename", "textname", "acls"}`: an entry of the file's `roles` list and the
        body of a `createRole` command alike."""
        return {
            "rolename": self.name,
            "textname": self.text_name,
            "acls": [entry.to_json() for entry in self.acls],
        }


def _fleet_root(fleet: str) -> str:
    check_identifier("fleet", fleet)
    return f"{TOPIC_ROOT}/{fleet}"


def device_role_name(device_id: str) -> str:
    """The role that holds one device's ACLs."""
    check_identifier("device_id", device_id)
    return f"{DEVICE_ROLE_PREFIX}{device_id}"


def device_readable_filters(fleet: str, device_id: str) -> tuple[str, ...]:
    """What a device may subscribe to and receive: its inbox, the coordinator's status, the
    manifests and the content-addressed blobs of global adapters."""
    root = _fleet_root(fleet)
    check_identifier("device_id", device_id)
    return (
        f"{root}/to/{device_id}/#",
        f"{root}/coord/status",
        f"{root}/coord/model/+/manifest",
        f"{root}/coord/blob/+/+",
    )


def device_role(fleet: str, device_id: str) -> Role:
    """Publish to exactly the device's `DeviceChannel` topics; read its inbox and the
    coordinator's topics. Nothing else: no other topic below `dev/<device>/`, no other
    device's topics, no `$CONTROL`."""
    acls = [
        AclEntry(AclType.PUBLISH_SEND, device_topic(fleet, device_id, channel))
        for channel in DeviceChannel
    ]
    for topic_filter in device_readable_filters(fleet, device_id):
        wildcard = "+" in topic_filter or "#" in topic_filter
        subscribe = AclType.SUBSCRIBE_PATTERN if wildcard else AclType.SUBSCRIBE_LITERAL
        acls += [AclEntry(subscribe, topic_filter), AclEntry(AclType.PUBLISH_RECEIVE, topic_filter)]
    return Role(device_role_name(device_id), tuple(acls), f"schoolfl device {device_id}")


def coordinator_role(fleet: str) -> Role:
    """The coordinator reads and writes the whole fleet tree (and nothing outside it)."""
    everything = f"{_fleet_root(fleet)}/#"
    return Role(
        COORDINATOR_ROLE,
        (
            AclEntry(AclType.PUBLISH_SEND, everything),
            AclEntry(AclType.PUBLISH_RECEIVE, everything),
            AclEntry(AclType.SUBSCRIBE_PATTERN, everything),
        ),
        f"schoolfl coordinator of fleet {fleet}",
    )


def admin_role() -> Role:
    """Send dynamic-security commands, read their replies and the broker's `$SYS` figures."""
    return Role(
        ADMIN_ROLE,
        (
            AclEntry(AclType.PUBLISH_SEND, CONTROL_TOPIC),
            AclEntry(AclType.SUBSCRIBE_LITERAL, RESPONSE_TOPIC),
            AclEntry(AclType.PUBLISH_RECEIVE, RESPONSE_TOPIC),
            AclEntry(AclType.SUBSCRIBE_PATTERN, "$SYS/#"),
            AclEntry(AclType.PUBLISH_RECEIVE, "$SYS/#"),
        ),
        "schoolfl broker administration",
    )
