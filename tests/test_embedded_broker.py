"""The embedded amqtt broker under a fleet that connects and subscribes all at once.

amqtt 0.12.1 breaks here (coordinator/embedded_broker.py says how): with the workaround
switched off (`patch_amqtt = False`) this test fails with connections closed after their
CONNACK, reconnects and retained messages the client never subscribed to.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from coordinator.embedded_broker import EmbeddedBroker

pytestmark = pytest.mark.integration

CLIENTS = 30
RETAINED = 5
TIMEOUT_SECONDS = 20.0


@dataclass
class HammerClient:
    """One paho client that subscribes in on_connect and records what happens to it."""

    client_id: str
    client: mqtt.Client
    connects: int = 0
    disconnects: int = 0
    subscribed: threading.Event = field(default_factory=threading.Event)
    direct_message: threading.Event = field(default_factory=threading.Event)
    retained_topics: set[str] = field(default_factory=set)
    foreign_topics: set[str] = field(default_factory=set)


def _hammer_client(client_id: str, host: str, port: int) -> HammerClient:
    # clean_session=False, as the project's transport: a session the broker keeps.
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    record = HammerClient(client_id, client)
    own = f"fleet/dev/{client_id}/"

    def on_connect(c: mqtt.Client, userdata: object, flags: object, rc: object, p: object) -> None:
        record.connects += 1
        c.subscribe([(own + "#", 1), ("fleet/status/#", 1)])

    def on_subscribe(c: mqtt.Client, userdata: object, mid: int, codes: list, p: object) -> None:  # type: ignore[type-arg]
        if all(not code.is_failure for code in codes):
            record.subscribed.set()

    def on_message(c: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if message.topic == own + "ping":
            record.direct_message.set()
        elif message.topic.startswith("fleet/status/"):
            record.retained_topics.add(message.topic)
        else:
            record.foreign_topics.add(message.topic)

    def on_disconnect(c: mqtt.Client, userdata: object, f: object, rc: object, p: object) -> None:
        record.disconnects += 1

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.on_disconnect = on_disconnect
    client.connect_async(host, port, keepalive=10)
    return record


def _connected_client(client_id: str, broker: EmbeddedBroker) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    embedded = EmbeddedBroker()
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.stop()


def test_a_fleet_subscribing_at_once_keeps_every_connection(
    broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    publisher = _connected_client("publisher", broker)
    watcher = _connected_client("watcher", broker)
    clients: list[HammerClient] = []
    try:
        # Retained messages, and a subscriber whose filters match them and another
        # device's subtree: what the coordinator's subscriptions look like to the broker.
        for index in range(RETAINED):
            info = publisher.publish(f"fleet/status/{index}", b"x" * 1000, qos=1, retain=True)
            info.wait_for_publish(TIMEOUT_SECONDS)
        info = publisher.publish("fleet/dev/elsewhere/state", b"private", qos=1, retain=True)
        info.wait_for_publish(TIMEOUT_SECONDS)
        watcher_subscribed = threading.Event()
        watcher.on_subscribe = lambda *args: watcher_subscribed.set()
        watcher.subscribe([("fleet/status/#", 1), ("fleet/dev/+/state", 1)])
        assert watcher_subscribed.wait(TIMEOUT_SECONDS)

        clients = [
            _hammer_client(f"dev-{index}", broker.host, broker.port) for index in range(CLIENTS)
        ]
        for record in clients:  # all connect and subscribe at once
            record.client.loop_start()
        for record in clients:
            assert record.subscribed.wait(TIMEOUT_SECONDS), f"{record.client_id}: no SUBACK"
        for record in clients:
            publisher.publish(f"fleet/dev/{record.client_id}/ping", b"hi", qos=1)
        for record in clients:
            assert record.direct_message.wait(TIMEOUT_SECONDS), f"{record.client_id}: no message"
        expected_retained = {f"fleet/status/{index}" for index in range(RETAINED)}
        broken = {
            r.client_id: (r.connects, r.disconnects, sorted(r.foreign_topics))
            for r in clients
            if (r.connects, r.disconnects) != (1, 0) or r.foreign_topics
        }
        assert broken == {}, "connects, disconnects, unsubscribed topics received"
        missing_retained = {
            r.client_id: sorted(expected_retained - r.retained_topics)
            for r in clients
            if not expected_retained <= r.retained_topics
        }
        assert missing_retained == {}
    finally:
        for record in clients:
            record.client.disconnect()
            record.client.loop_stop()
        for client in (publisher, watcher):
            client.disconnect()
            client.loop_stop()
    assert broker.connection_errors == 0
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == []
