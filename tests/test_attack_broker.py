"""Attacks by one enrolled device turned hostile (its real broker password) on the
production broker config (`schoolfl coordinator broker-config`: TLS, dynamic security).

Issue 16, findings 6-8; each test failed on the broker config before it (b842c6d):
6. client-id takeover: any credential could connect with the coordinator's (or a device's)
   client id, disconnect it and, with a clean session, wipe its queued messages;
7. revocation stopped at the coordinator: a revoked device kept its broker password and
   ACL, and so every new global model;
8. broker storage: `dev/<device>/#` let a device create retained topics of any number and
   size, persisted to disk (+208 MiB from 32 messages).

A denied publish is dropped silently (MQTT 3.1.1 has no negative PUBACK), so a test brackets
forbidden publishes between two allowed "control" messages of the same client: Mosquitto
routes one client's messages in order.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from coordinator.broker_acl import CONTROL_TOPIC
from coordinator.broker_config import PROTOCOL_MESSAGE_BYTES
from coordinator.cli import coordinator_group
from coordinator.daemon import COORDINATOR_CLIENT_ID
from coordinator.retained_guard import forbidden_retained, retained_sweep_filters
from coordinator.store import CoordinatorStore
from device_profiles.profile import find_profile, profile_toml_text
from edge_runtime.wire import (
    DeviceChannel,
    InboxChannel,
    MqttTransport,
    ReceivedMessage,
    TransportError,
    coordinator_subscriptions,
    device_subscriptions,
    device_topic,
    generate_private_key,
    inbox_topic,
    model_blob_topic,
    model_manifest_topic,
    public_key_hex,
)
from tests.production_broker import FLEET, ProductionBroker, production_broker

pytestmark = pytest.mark.integration

logger = logging.getLogger(__name__)

WAIT_SECONDS = 10.0
TEST_QUEUE_BYTES = 4 * 1024 * 1024
"""A small per-client queue for the test broker, so the flood that overflows it is quick."""
IN_FLIGHT_MESSAGES = 20
"""Mosquitto's default `max_inflight_messages`: queued on top of `max_queued_bytes`."""


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ProductionBroker]:
    with production_broker(tmp_path, max_queued_bytes=TEST_QUEUE_BYTES) as running:
        yield running


def _started(transport: MqttTransport, filters: list[str] | tuple[str, ...] = ()) -> MqttTransport:
    for topic_filter in filters:
        transport.subscribe(topic_filter)
    transport.start(WAIT_SECONDS)
    return transport


def _drain_until(
    received: queue.Queue[ReceivedMessage], done: Callable[[ReceivedMessage], bool]
) -> list[ReceivedMessage]:
    """Everything received up to and including the first message `done` accepts."""
    seen: list[ReceivedMessage] = []
    while True:
        message = received.get(timeout=WAIT_SECONDS)
        seen.append(message)
        if done(message):
            return seen


def _arrives(received: queue.Queue[ReceivedMessage], payload: bytes) -> bool:
    """True once `payload` arrives, False if it does not within WAIT_SECONDS."""
    try:
        _drain_until(received, _payload_is(payload))
    except queue.Empty:
        return False
    return True


def _payload_is(payload: bytes) -> Callable[[ReceivedMessage], bool]:
    return lambda message: message.payload == payload


def _published(transport: MqttTransport, topic: str, payload: bytes, retain: bool = False) -> None:
    info = transport.publish(topic, payload, retain=retain)
    assert transport.wait_published(info, WAIT_SECONDS), f"no PUBACK for {topic}"


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _retained_under(coordinator: MqttTransport, topic_filter: str, probe_topic: str) -> dict:
    """What the broker retains under `topic_filter`: subscribe anew (the broker sends what
    it retains there, retain flag set), then a probe marks the end."""
    coordinator.subscribe(topic_filter)
    probe = f"probe-{time.monotonic_ns()}".encode()
    _published(coordinator, probe_topic, probe)
    seen = _drain_until(coordinator.received, _payload_is(probe))
    return {m.topic: len(m.payload) for m in seen if m.retain and m.payload}


# -- finding 6 ------------------------------------------------------------------------------


def test_a_device_cannot_take_over_the_coordinators_or_another_devices_session(
    broker: ProductionBroker,
) -> None:
    coordinator = _started(
        broker.transport(broker.coordinator_user, client_id=COORDINATOR_CLIENT_ID),
        coordinator_subscriptions(FLEET),
    )
    # A retained probe reaches the victim however its subscription and the probe race.
    probe = inbox_topic(FLEET, "dev-b", InboxChannel.ACK)
    _published(coordinator, probe, b"subscribed", retain=True)
    victim = _started(broker.transport("dev-b"), device_subscriptions(FLEET, "dev-b"))
    try:
        _drain_until(victim.received, _payload_is(b"subscribed"))
        _published(coordinator, probe, b"", retain=True)
        victim.stop()  # offline: its session keeps what the coordinator sends it
        _published(coordinator, inbox_topic(FLEET, "dev-b", InboxChannel.TASK), b"assignment")

        # dev-a's real credential with the client ids of the coordinator and of dev-b, and a
        # clean session: before, each connect threw the victim off and wiped its session.
        for stolen_id in (COORDINATOR_CLIENT_ID, broker.coordinator_user, "dev-b"):
            hostile = broker.transport("dev-a", client_id=stolen_id, clean_session=True)
            hostile.start(WAIT_SECONDS)
            _published(hostile, device_topic(FLEET, "dev-a", DeviceChannel.STATE), b"hostile")
            hostile.stop()

        arrived = _arrives(coordinator.received, b"hostile")
        assert coordinator.disconnect_count == 0, "dev-a's credential threw the coordinator off"
        assert arrived and coordinator.connect_count == 1
        back = _started(broker.transport("dev-b"))  # its session: no need to subscribe again
        try:
            delivered = _drain_until(back.received, lambda m: m.payload != b"")
            assert delivered[-1].payload == b"assignment"
        finally:
            back.stop()
        assert coordinator.disconnect_count == 0
    finally:
        victim.stop()
        coordinator.stop()


# -- finding 7 ------------------------------------------------------------------------------


def _enroll(store: CoordinatorStore, device_id: str) -> None:
    token = f"token-{device_id}-0123456789abcdef"
    store.add_enrollment_token(token, "north", 3600.0)
    public_key = bytes.fromhex(public_key_hex(generate_private_key()))
    store.redeem_enrollment_token(
        token, device_id, public_key, profile_toml_text(find_profile("laptop-mid-16gb"))
    )


def _publish_model(coordinator: MqttTransport, version: str) -> bytes:
    """A new global adapter version: its retained manifest and first blob chunk."""
    manifest = f"manifest-{version}".encode()
    _published(coordinator, model_blob_topic(FLEET, version, 0), f"blob-{version}".encode(), True)
    _published(coordinator, model_manifest_topic(FLEET, "task-1"), manifest, retain=True)
    return manifest


def test_a_revoked_device_is_off_the_broker_at_once(
    broker: ProductionBroker, tmp_path: Path
) -> None:
    state_dir = tmp_path / "coordinator-state"
    store = CoordinatorStore(state_dir / "coordinator.db")
    for device_id in ("dev-a", "dev-b"):
        _enroll(store, device_id)
    store.close()
    config_path = broker.coordinator_toml(state_dir)
    model_filters = [
        model_manifest_topic(FLEET, "task-1"),
        f"schoolfl/{FLEET}/coord/blob/+/+",  # every version, as a hostile device would
    ]
    coordinator = _started(
        broker.transport(broker.coordinator_user), coordinator_subscriptions(FLEET)
    )
    hostile = _started(broker.transport("dev-a"), model_filters)
    honest = _started(broker.transport("dev-b"), model_filters)
    newcomer: MqttTransport | None = None
    try:
        first = _publish_model(coordinator, "a" * 64)
        for device in (hostile, honest):
            _drain_until(device.received, _payload_is(first))
        _published(hostile, device_topic(FLEET, "dev-a", DeviceChannel.STATE), b"a-state", True)

        runner = CliRunner()
        result = runner.invoke(coordinator_group, ["revoke", "--config", str(config_path), "dev-a"])
        assert result.exit_code == 0, result.output
        assert "removed from the broker" in result.output

        _wait_for(lambda: not hostile.connected.is_set(), "the broker to disconnect dev-a")
        again = broker.transport("dev-a")
        try:
            with pytest.raises(TransportError, match="refused"):
                again.start(WAIT_SECONDS)
        finally:
            again.stop()

        second = _publish_model(coordinator, "b" * 64)
        _drain_until(honest.received, _payload_is(second))
        assert second not in [m.payload for m in list(hostile.received.queue)]
        # Its retained state is no longer handed out (its publisher lost the right).
        state_filter = device_topic(FLEET, "dev-a", DeviceChannel.STATE)
        probe_topic = device_topic(FLEET, "dev-b", DeviceChannel.STATE)
        assert _retained_under(coordinator, state_filter, probe_topic) == {}

        # A device added after the revocation gets on at once and finds the current model.
        password_file = tmp_path / "dev-c.password"
        result = runner.invoke(
            coordinator_group,
            [
                "add-device",
                "--config",
                str(config_path),
                "dev-c",
                "--password-file",
                str(password_file),
            ],
        )
        assert result.exit_code == 0, result.output
        broker.add_credential("dev-c", password_file.read_text().strip())
        newcomer = _started(broker.transport("dev-c"), [model_manifest_topic(FLEET, "task-1")])
        assert newcomer.received.get(timeout=WAIT_SECONDS).payload == second
        assert honest.disconnect_count == 0 and coordinator.disconnect_count == 0
    finally:
        for transport in (newcomer, honest, hostile, coordinator):
            if transport is not None:
                transport.stop()


# -- finding 8 ------------------------------------------------------------------------------


def _sweep_retained(coordinator: MqttTransport, probe_topic: str) -> list[str]:
    """What the daemon does every `RETAINED_SWEEP_SECONDS` (coordinator/retained_guard.py):
    subscribe again, clear every retained message the protocol never retains."""
    for topic_filter in retained_sweep_filters(FLEET):
        coordinator.subscribe(topic_filter)
    probe = b"sweep-done"
    _published(coordinator, probe_topic, probe)
    cleared = []
    for message in _drain_until(coordinator.received, _payload_is(probe)):
        violation = forbidden_retained(FLEET, message)
        if violation is not None:
            _published(coordinator, violation.clearing.topic, b"", retain=True)
            cleared.append(violation.channel.value)
    return sorted(cleared)


def test_a_device_cannot_fill_the_broker(broker: ProductionBroker) -> None:
    coordinator = _started(
        broker.transport(broker.coordinator_user), coordinator_subscriptions(FLEET)
    )
    hostile = _started(broker.transport("dev-a"))
    state = device_topic(FLEET, "dev-a", DeviceChannel.STATE)
    probe_topic = device_topic(FLEET, "dev-b", DeviceChannel.STATE)
    before_bytes = broker.process.save_database()
    before_memory = broker.process.resident_bytes()
    try:
        # Outside the protocol's topics: other levels below its own subtree, and beyond it
        # (retained, so a subscription made afterwards shows whether the broker took them).
        in_fleet = [
            f"schoolfl/{FLEET}/dev/dev-a/junk",
            f"schoolfl/{FLEET}/dev/dev-a/state/more",
            f"schoolfl/{FLEET}/dev/dev-a",
            f"schoolfl/{FLEET}/junk/dev-a",
        ]
        for topic in [*in_fleet, "schoolfl/other-fleet/dev/dev-a/state", CONTROL_TOPIC]:
            _published(hostile, topic, b"forbidden:" + topic.encode(), retain=True)
        # Above the protocol's largest message: dropped by the broker (PUBACK all the same).
        _published(hostile, state, b"control-1")
        _published(hostile, device_topic(FLEET, "dev-a", DeviceChannel.UPDATE), b"x" * 700_000)
        _published(hostile, state, b"control-2")
        seen = _drain_until(coordinator.received, _payload_is(b"control-2"))
        assert max(len(m.payload) for m in seen) <= PROTOCOL_MESSAGE_BYTES
        for topic in in_fleet:
            assert _retained_under(coordinator, topic, probe_topic) == {}, topic

        # Retained messages on its own protocol topics, each at the size limit: the broker
        # keeps at most these five (plus its state) until the coordinator's sweep clears them.
        largest = b"r" * (PROTOCOL_MESSAGE_BYTES - 1024)
        for channel in DeviceChannel:
            if channel is not DeviceChannel.STATE:
                _published(hostile, device_topic(FLEET, "dev-a", channel), largest, retain=True)
        _published(hostile, state, b"state", retain=True)

        # The reported attack: 32 retained messages of 6.5 MiB. A packet that large
        # disconnects its sender before the broker reads it. (One credential holds one
        # session: a second dev-a connection would throw the first off, so one at a time.)
        hostile.stop()
        flooder = _started(broker.transport("dev-a"))
        huge = b"h" * (13 * 512 * 1024)
        for index in range(32):
            flooder.publish(f"schoolfl/{FLEET}/dev/dev-a/junk/{index}", huge, qos=0, retain=True)
        after_flood = flooder.publish(state, b"after-the-flood")

        def taken_or_refused() -> bool:
            try:
                return flooder.disconnect_count > 0 or after_flood.is_published()
            except RuntimeError:  # paho: "not currently connected", i.e. thrown off
                return True

        _wait_for(taken_or_refused, "the flood to be taken or refused")
        flooder.stop()

        # While the coordinator is away, its queue is capped in bytes.
        coordinator.stop()
        hostile = _started(broker.transport("dev-a"))
        chunk_topic = device_topic(FLEET, "dev-a", DeviceChannel.CHUNK)
        for _ in range(80):
            _published(hostile, chunk_topic, largest)
        flooded_bytes = broker.process.save_database()
        flooded_memory = broker.process.resident_bytes()

        coordinator = _started(
            broker.transport(broker.coordinator_user), coordinator_subscriptions(FLEET)
        )
        _published(hostile, state, b"control-3", retain=True)
        queued = _drain_until(coordinator.received, _payload_is(b"control-3"))
        delivered = sum(1 for m in queued if m.topic == chunk_topic and not m.retain)
        retained = _retained_under(coordinator, f"schoolfl/{FLEET}/dev/dev-a/#", probe_topic)
        assert set(retained) == {device_topic(FLEET, "dev-a", c) for c in DeviceChannel}
        assert _sweep_retained(coordinator, probe_topic) == sorted(
            c.value for c in DeviceChannel if c is not DeviceChannel.STATE
        )
        retained = _retained_under(coordinator, f"schoolfl/{FLEET}/dev/dev-a/#", probe_topic)
        assert retained == {state: len(b"control-3")}
        after_bytes = broker.process.save_database()
        after_memory = broker.process.resident_bytes()
    finally:
        hostile.stop()
        coordinator.stop()

    logger.info(
        "broker persistence %d -> %d bytes under the flood (coordinator away), %d after the "
        "sweep; resident memory %d -> %d -> %d; %d of 80 queued chunks delivered",
        before_bytes,
        flooded_bytes,
        after_bytes,
        before_memory,
        flooded_memory,
        after_memory,
        delivered,
    )
    queue_bound = TEST_QUEUE_BYTES + (IN_FLIGHT_MESSAGES + 1) * PROTOCOL_MESSAGE_BYTES
    retained_bound = len(DeviceChannel) * PROTOCOL_MESSAGE_BYTES
    slack = 1024 * 1024
    assert flooded_bytes - before_bytes <= queue_bound + retained_bound + slack
    assert delivered * len(largest) <= queue_bound
    assert after_bytes - before_bytes <= slack
    assert flooded_memory - before_memory <= queue_bound + retained_bound + 16 * slack
