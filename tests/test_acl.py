"""The broker config of `broker-config` confines each device to its protocol topics.

A real Mosquitto runs the generated production config (TLS, dynamic security; see
tests/production_broker.py). Denied publishes are dropped silently by Mosquitto (MQTT 3.1.1
has no negative PUBACK), so each test brackets the forbidden publishes between two allowed
"control" messages from the same client: Mosquitto routes one client's messages in order, so
once the second control has arrived, any forbidden message that had got through would have
arrived too.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from coordinator.broker_acl import (
    CONTROL_TOPIC,
    AclType,
    coordinator_role,
    device_role,
)
from coordinator.broker_config import (
    PROTOCOL_MESSAGE_BYTES,
    BrokerConfigRequest,
    hash_password,
    render_config,
)
from coordinator.cli import coordinator_group
from edge_runtime.wire import (
    DEFAULT_CHUNK_BYTES,
    DeviceChannel,
    InboxChannel,
    MqttTransport,
    ReceivedMessage,
    TransportError,
    coordinator_status_topic,
    device_topic,
    inbox_topic,
    model_manifest_topic,
)
from tests.production_broker import ProductionBroker, production_broker

pytestmark = pytest.mark.integration

FLEET = "school"
WAIT_SECONDS = 10.0
DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"


@pytest.fixture
def secured_broker(tmp_path: Path) -> Iterator[ProductionBroker]:
    with production_broker(tmp_path, fleet=FLEET, device_ids=("dev-a", "dev-b")) as broker:
        yield broker


def _drain_until(received: queue.Queue[ReceivedMessage], payload: bytes) -> list[bytes]:
    """Everything received up to and including `payload` (fails if it never comes)."""
    seen: list[bytes] = []
    while True:
        message = received.get(timeout=WAIT_SECONDS)
        seen.append(message.payload)
        if message.payload == payload:
            return seen


def _subscribe_and_wait(transport: MqttTransport, topic_filter: str, probe_topic: str) -> None:
    """Subscribe, then prove the subscription is active with a probe message."""
    transport.subscribe(topic_filter)
    probe = b"probe-" + uuid.uuid4().hex.encode()
    transport.publish(probe_topic, probe)
    _drain_until(transport.received, probe)


def test_device_cannot_publish_outside_its_topics(secured_broker: ProductionBroker) -> None:
    coordinator = secured_broker.transport("coordinator")
    device_a = secured_broker.transport("dev-a")
    coordinator.start(WAIT_SECONDS)
    device_a.start(WAIT_SECONDS)
    try:
        _subscribe_and_wait(coordinator, f"schoolfl/{FLEET}/#", coordinator_status_topic(FLEET))
        own = device_topic(FLEET, "dev-a", DeviceChannel.STATE)
        forbidden = [
            device_topic(FLEET, "dev-b", DeviceChannel.UPDATE),
            device_topic(FLEET, "dev-b", DeviceChannel.STATE),
            coordinator_status_topic(FLEET),
            model_manifest_topic(FLEET, "task-1"),
            inbox_topic(FLEET, "dev-b", InboxChannel.TASK),
            inbox_topic(FLEET, "dev-a", InboxChannel.ACK),  # own inbox is read-only
            "schoolfl/other-fleet/dev/dev-a/state",
            f"schoolfl/{FLEET}/dev/dev-a/anything",  # only the protocol's channels
            f"schoolfl/{FLEET}/dev/dev-a/state/deeper",
            CONTROL_TOPIC,
        ]
        device_a.publish(own, b"control-1")
        for topic in forbidden:
            info = device_a.publish(topic, b"forbidden:" + topic.encode())
            assert device_a.wait_published(info, WAIT_SECONDS)  # broker PUBACKs, then drops
        device_a.publish(own, b"control-2")

        seen = _drain_until(coordinator.received, b"control-2")
        assert b"control-1" in seen
        assert [payload for payload in seen if payload.startswith(b"forbidden")] == []
        assert coordinator.received.empty()
    finally:
        device_a.stop()
        coordinator.stop()


def test_device_cannot_read_another_devices_topics(secured_broker: ProductionBroker) -> None:
    coordinator = secured_broker.transport("coordinator")
    device_a = secured_broker.transport("dev-a")
    device_b = secured_broker.transport("dev-b")
    for transport in (coordinator, device_a, device_b):
        transport.start(WAIT_SECONDS)
    try:
        _subscribe_and_wait(coordinator, f"schoolfl/{FLEET}/#", coordinator_status_topic(FLEET))
        # dev-a listens on dev-b's subtree and inbox, on every device's topics and on the
        # whole tree (all denied), and on its own inbox (allowed).
        for topic_filter in (
            f"schoolfl/{FLEET}/dev/dev-b/#",
            f"schoolfl/{FLEET}/to/dev-b/#",
            f"schoolfl/{FLEET}/dev/+/update",
            f"schoolfl/{FLEET}/#",
            "#",
        ):
            device_a.subscribe(topic_filter)
        own_inbox = inbox_topic(FLEET, "dev-a", InboxChannel.ACK)
        device_a.subscribe(f"schoolfl/{FLEET}/to/dev-a/#")
        coordinator.publish(own_inbox, b"subscribed", retain=True)
        _drain_until(device_a.received, b"subscribed")
        coordinator.publish(own_inbox, b"", retain=True)

        device_b.publish(device_topic(FLEET, "dev-b", DeviceChannel.UPDATE), b"secret-b")
        coordinator.publish(inbox_topic(FLEET, "dev-b", InboxChannel.TASK), b"secret-task-b")
        _drain_until(coordinator.received, b"secret-task-b")  # both routed by now
        coordinator.publish(own_inbox, b"control")
        seen = _drain_until(device_a.received, b"control")
        assert b"secret-b" not in seen
        assert b"secret-task-b" not in seen
    finally:
        for transport in (device_b, device_a, coordinator):
            transport.stop()


def test_wrong_password_and_anonymous_are_refused(secured_broker: ProductionBroker) -> None:
    good = secured_broker.transport("dev-a").config
    for username, password in (
        ("dev-a", secured_broker.credentials["dev-b"].password),
        (None, None),
    ):
        transport = MqttTransport(dataclasses.replace(good, username=username, password=password))
        try:
            with pytest.raises(TransportError, match="refused"):
                transport.start(5.0)
        finally:
            transport.stop()


def test_a_client_id_is_bound_to_its_username(secured_broker: ProductionBroker) -> None:
    """dev-b connecting with dev-a's (or the coordinator's) client id does not throw them
    off: the broker uses the username as client id."""
    config = secured_broker.files.config_path.read_text().splitlines()
    listener = next(i for i, line in enumerate(config) if line.startswith("listener "))
    assert "use_username_as_clientid true" in config[listener:]  # a listener setting
    coordinator = secured_broker.transport("coordinator")
    device_a = secured_broker.transport("dev-a")
    for transport in (coordinator, device_a):
        transport.start(WAIT_SECONDS)
    try:
        for stolen_id in ("dev-a", "coordinator"):
            intruder = secured_broker.transport("dev-b", client_id=stolen_id, clean_session=True)
            intruder.start(WAIT_SECONDS)
            intruder.stop()
        _subscribe_and_wait(coordinator, f"schoolfl/{FLEET}/#", coordinator_status_topic(FLEET))
        assert device_a.disconnect_count == 0 and coordinator.disconnect_count == 0
    finally:
        device_a.stop()
        coordinator.stop()


def test_roles_grant_exactly_the_protocol_topics() -> None:
    role = device_role(FLEET, "dev-a")
    published = {acl.topic for acl in role.acls if acl.acl_type is AclType.PUBLISH_SEND}
    assert published == {device_topic(FLEET, "dev-a", channel) for channel in DeviceChannel}
    readable = {acl.topic for acl in role.acls if acl.acl_type is AclType.PUBLISH_RECEIVE}
    assert readable == {
        f"schoolfl/{FLEET}/to/dev-a/#",
        f"schoolfl/{FLEET}/coord/status",
        f"schoolfl/{FLEET}/coord/model/+/manifest",
        f"schoolfl/{FLEET}/coord/blob/+/+",
    }
    assert all(acl.allow for acl in role.acls)
    assert {acl.topic for acl in coordinator_role(FLEET).acls} == {f"schoolfl/{FLEET}/#"}


def test_limits_fit_the_protocol() -> None:
    """The largest message the protocol sends passes; the queue holds several of them."""
    assert PROTOCOL_MESSAGE_BYTES >= DEFAULT_CHUNK_BYTES + 64 * 1024
    request = BrokerConfigRequest(fleet=FLEET, device_ids=(), output_dir=Path("."))
    text = render_config(request, Path("/var/lib/mosquitto/dynamic-security.json"))
    assert f"message_size_limit {PROTOCOL_MESSAGE_BYTES}\n" in text
    assert f"max_packet_size {2 * PROTOCOL_MESSAGE_BYTES}\n" in text
    assert f"max_queued_bytes {request.max_queued_bytes}\n" in text
    hashed = hash_password("secret", salt=b"\0" * 12)
    assert hashed["iterations"] == 101 and len(str(hashed["password"])) == 88


def test_broker_config_cli_writes_files(tmp_path: Path) -> None:
    devices_file = tmp_path / "devices.txt"
    devices_file.write_text("pi-1\n# a comment\npi-2  # trailing\n")
    result = CliRunner().invoke(
        coordinator_group,
        [
            "broker-config",
            "--fleet",
            "demo",
            "--devices-file",
            str(devices_file),
            "--device",
            "laptop-3",
            "--output",
            str(tmp_path / "out"),
            "--install-dir",
            "/var/lib/mosquitto/schoolfl",
            "--max-queued-bytes",
            "8388608",
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    config = (out / "mosquitto.conf").read_text()
    assert "plugin_opt_config_file /var/lib/mosquitto/schoolfl/dynamic-security.json" in config
    assert "allow_anonymous false" in config
    assert "password_file" not in config and "acl_file" not in config
    assert "certfile" in config
    assert "max_queued_bytes 8388608" in config
    document = json.loads((out / "dynamic-security.json").read_text())
    users = {client["username"]: client for client in document["clients"]}
    assert set(users) == {"coordinator", "schoolfl-admin", "laptop-3", "pi-1", "pi-2"}
    assert [role["rolename"] for role in users["pi-1"]["roles"]] == ["schoolfl-device-pi-1"]
    assert {role["rolename"] for role in users["coordinator"]["roles"]} == {
        "schoolfl-coordinator",
        "schoolfl-broker-admin",
    }
    assert all(len(client["salt"]) == 16 for client in users.values())  # 12 bytes, base64
    assert not any(document["defaultACLAccess"][key] for key in ("publishClientSend", "subscribe"))
    credentials = json.loads((out / "credentials.json").read_text())
    assert set(credentials["passwords"]) == set(users)
    assert credentials["admin_user"] == "schoolfl-admin"
    assert (out / "credentials.json").stat().st_mode & 0o777 == 0o600
    assert (out / "dynamic-security.json").stat().st_mode & 0o077 == 0

    kept = CliRunner().invoke(
        coordinator_group,
        [
            "broker-config",
            "--fleet",
            "demo",
            "--device",
            "pi-1",
            "--output",
            str(tmp_path / "again"),
            "--keep-passwords",
            str(out / "credentials.json"),
        ],
    )
    assert kept.exit_code == 0, kept.output
    again = json.loads((tmp_path / "again" / "credentials.json").read_text())["passwords"]
    assert again["pi-1"] == credentials["passwords"]["pi-1"]


def test_broker_config_cli_refuses_bad_input(tmp_path: Path) -> None:
    for arguments, named in (
        (["--device", "a/b"], "device_id"),
        (["--device", "schoolfl-admin"], "broker user"),
        (["--max-queued-bytes", "1000"], "max_queued_bytes"),
        (["--session-expiration", "soon"], "session_expiration"),
    ):
        result = CliRunner().invoke(
            coordinator_group,
            ["broker-config", "--fleet", "demo", "--output", str(tmp_path), *arguments],
        )
        assert result.exit_code != 0
        assert named in result.output


def test_deploy_template_matches_generator() -> None:
    """The checked-in template sets what the generator writes, in the same order."""

    def directives(text: str) -> list[str]:
        return [line.split()[0] for line in text.splitlines() if line and line[0] != "#"]

    generated = render_config(
        BrokerConfigRequest(fleet="example", device_ids=(), output_dir=Path(".")),
        Path("/var/lib/mosquitto/schoolfl/dynamic-security.json"),
    )
    template = (DEPLOY_DIR / "mosquitto.conf").read_text()
    assert directives(template) == directives(generated)
    for line in generated.splitlines():
        if line.startswith(("message_size_limit", "max_", "use_username", "persistent_client")):
            assert line in template.splitlines()
