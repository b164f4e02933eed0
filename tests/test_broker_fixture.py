"""The Mosquitto fixture is real: paho-mqtt 2.x clients talk through it, across restarts."""

from __future__ import annotations

import queue
import threading
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from coordinator.mosquitto import MosquittoConfig, MosquittoError, MosquittoProcess, find_mosquitto

pytestmark = pytest.mark.integration

WAIT_SECONDS = 10.0


class RecordingClient:
    """A paho client that subscribes in on_connect (so reconnects resubscribe) and queues
    every message and every successful connect for the test to wait on."""

    def __init__(self, broker: MosquittoProcess, subscribe_to: str | None = None) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connects: queue.Queue[int] = queue.Queue()
        self.subscribed = threading.Event()
        self._subscribe_to = subscribe_to
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"test-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.connect(broker.host, broker.port, keepalive=5)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            return
        if self._subscribe_to:
            client.subscribe(self._subscribe_to, qos=1)
        self.connects.put(1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        self.subscribed.set()

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        self.messages.put(message)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_qos1_message_crosses_the_broker(mosquitto: MosquittoProcess) -> None:
    receiver = RecordingClient(mosquitto, subscribe_to="schoolfl/test/#")
    sender = RecordingClient(mosquitto)
    try:
        assert receiver.subscribed.wait(WAIT_SECONDS)
        sender.connects.get(timeout=WAIT_SECONDS)
        info = sender.client.publish("schoolfl/test/hello", b"\x00\x01payload", qos=1)
        info.wait_for_publish(timeout=WAIT_SECONDS)
        assert info.is_published()
        message = receiver.messages.get(timeout=WAIT_SECONDS)
        assert message.topic == "schoolfl/test/hello"
        assert message.payload == b"\x00\x01payload"
        assert message.qos == 1
    finally:
        sender.close()
        receiver.close()


def test_clients_reconnect_after_broker_restart(mosquitto: MosquittoProcess) -> None:
    receiver = RecordingClient(mosquitto, subscribe_to="schoolfl/test/#")
    sender = RecordingClient(mosquitto)
    try:
        receiver.connects.get(timeout=WAIT_SECONDS)
        sender.connects.get(timeout=WAIT_SECONDS)
        assert receiver.subscribed.wait(WAIT_SECONDS)

        mosquitto.restart()

        # Both clients come back on their own (paho's loop reconnects with backoff).
        receiver.connects.get(timeout=WAIT_SECONDS)
        sender.connects.get(timeout=WAIT_SECONDS)
        info = sender.client.publish("schoolfl/test/after-restart", b"still here", qos=1)
        info.wait_for_publish(timeout=WAIT_SECONDS)
        message = receiver.messages.get(timeout=WAIT_SECONDS)
        assert message.topic == "schoolfl/test/after-restart"
        assert message.payload == b"still here"
    finally:
        sender.close()
        receiver.close()


def test_fixture_reports_a_clear_error_when_port_is_taken(tmp_path: Path) -> None:
    """Starting a second broker on an occupied port fails loudly, not silently."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto not installed")
    first = MosquittoProcess(MosquittoConfig(workdir=tmp_path / "a"))
    first.start()
    try:
        second = MosquittoProcess(MosquittoConfig(workdir=tmp_path / "b", port=first.port))
        with pytest.raises(MosquittoError, match="already in use"):
            second.start(timeout_seconds=5)
    finally:
        first.stop()
