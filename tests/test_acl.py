"""The broker config from `deploy/` / `broker-config` confines each device to its subtree.

A real Mosquitto runs with the generated password file and ACL. Denied publishes are
dropped silently by Mosquitto (MQTT 3.1.1 has no negative PUBACK), so each test brackets the
forbidden publishes between two allowed "control" messages from the same client: Mosquitto
routes one client's messages in order, so once the second control has arrived, any forbidden
message that had got through would have arrived too.
"""

from __future__ import annotations

import json
import queue
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from coordinator.broker_config import BrokerConfigRequest, render_acl, write_broker_config
from coordinator.cli import coordinator_group
from coordinator.mosquitto import MosquittoConfig, MosquittoProcess, find_mosquitto
from edge_runtime.wire import (
    DeviceChannel,
    InboxChannel,
    MqttTransport,
    ReceivedMessage,
    TransportConfig,
    TransportError,
    coordinator_status_topic,
    device_topic,
    inbox_topic,
    model_manifest_topic,
)

pytestmark = pytest.mark.integration

FLEET = "school"
WAIT_SECONDS = 10.0
DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"


@pytest.fixture
def secured_broker(tmp_path: Path) -> Iterator[tuple[MosquittoProcess, dict[str, str]]]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    files = write_broker_config(
        BrokerConfigRequest(
            fleet=FLEET,
            device_ids=("dev-a", "dev-b"),
            output_dir=tmp_path / "config",
            tls_certfile=None,
            tls_keyfile=None,
        )
    )
    # Take the auth lines from the generated production config, so the test exercises it.
    generated = files.config_path.read_text().splitlines()
    auth_lines = [line for line in generated if line.startswith(("password_file", "acl_file"))]
    assert len(auth_lines) == 2
    # (As root, MosquittoConfig keeps the broker root so it can read the 0600 files.)
    broker = MosquittoProcess(
        MosquittoConfig(workdir=tmp_path / "broker", allow_anonymous=False, extra_lines=auth_lines)
    )
    broker.start()
    try:
        yield broker, files.passwords
    finally:
        broker.stop()


def _client(broker: MosquittoProcess, user: str | None, password: str | None) -> MqttTransport:
    return MqttTransport(
        TransportConfig(
            host=broker.host,
            port=broker.port,
            client_id=f"{user}-{uuid.uuid4().hex[:6]}",
            username=user,
            password=password,
            keepalive_seconds=10,
        )
    )


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


def test_device_cannot_publish_outside_its_subtree(
    secured_broker: tuple[MosquittoProcess, dict[str, str]],
) -> None:
    broker, passwords = secured_broker
    coordinator = _client(broker, "coordinator", passwords["coordinator"])
    device_a = _client(broker, "dev-a", passwords["dev-a"])
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


def test_device_cannot_read_another_devices_subtree(
    secured_broker: tuple[MosquittoProcess, dict[str, str]],
) -> None:
    broker, passwords = secured_broker
    coordinator = _client(broker, "coordinator", passwords["coordinator"])
    device_a = _client(broker, "dev-a", passwords["dev-a"])
    device_b = _client(broker, "dev-b", passwords["dev-b"])
    for transport in (coordinator, device_a, device_b):
        transport.start(WAIT_SECONDS)
    try:
        _subscribe_and_wait(coordinator, f"schoolfl/{FLEET}/#", coordinator_status_topic(FLEET))
        # dev-a listens on dev-b's subtree and inbox (denied) and on its own inbox (allowed).
        device_a.subscribe(f"schoolfl/{FLEET}/dev/dev-b/#")
        device_a.subscribe(f"schoolfl/{FLEET}/to/dev-b/#")
        _subscribe_and_wait(
            device_a,
            f"schoolfl/{FLEET}/dev/dev-a/#",
            device_topic(FLEET, "dev-a", DeviceChannel.STATE),
        )
        device_b.publish(device_topic(FLEET, "dev-b", DeviceChannel.UPDATE), b"secret-b")
        coordinator.publish(inbox_topic(FLEET, "dev-b", InboxChannel.TASK), b"secret-task-b")
        _drain_until(coordinator.received, b"secret-task-b")  # both routed by now
        coordinator.publish(device_topic(FLEET, "dev-a", DeviceChannel.STATE), b"control")
        seen = _drain_until(device_a.received, b"control")
        assert b"secret-b" not in seen
        assert b"secret-task-b" not in seen
    finally:
        for transport in (device_b, device_a, coordinator):
            transport.stop()


def test_wrong_password_and_anonymous_are_refused(
    secured_broker: tuple[MosquittoProcess, dict[str, str]],
) -> None:
    broker, passwords = secured_broker
    for user, password in (("dev-a", passwords["dev-b"]), (None, None)):
        transport = _client(broker, user, password)
        try:
            with pytest.raises(TransportError, match="refused"):
                transport.start(5.0)
        finally:
            transport.stop()


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
            "/etc/mosquitto/schoolfl",
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    config = (out / "mosquitto.conf").read_text()
    assert "password_file /etc/mosquitto/schoolfl/passwd" in config
    assert "allow_anonymous false" in config
    assert "certfile" in config
    users = [line.split(":", 1)[0] for line in (out / "passwd").read_text().splitlines()]
    assert users == ["coordinator", "laptop-3", "pi-1", "pi-2"] or sorted(users) == sorted(
        ["coordinator", "laptop-3", "pi-1", "pi-2"]
    )
    assert all(
        line.split(":", 1)[1].startswith("$7$")
        for line in (out / "passwd").read_text().splitlines()
    )
    credentials = json.loads((out / "credentials.json").read_text())
    assert set(credentials["passwords"]) == {"coordinator", "laptop-3", "pi-1", "pi-2"}
    assert (out / "credentials.json").stat().st_mode & 0o777 == 0o600
    assert (out / "passwd").stat().st_mode & 0o077 == 0


def test_broker_config_cli_refuses_bad_device_id(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        coordinator_group,
        ["broker-config", "--fleet", "demo", "--device", "a/b", "--output", str(tmp_path)],
    )
    assert result.exit_code != 0
    assert "device_id" in result.output


def test_deploy_acl_template_matches_generator() -> None:
    """The checked-in template is what the generator writes for fleet "example"."""
    template_rules = [
        line for line in (DEPLOY_DIR / "acl").read_text().splitlines() if line and line[0] != "#"
    ]
    generated_rules = [
        line for line in render_acl("example").splitlines() if line and line[0] != "#"
    ]
    assert template_rules == generated_rules
