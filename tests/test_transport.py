"""The transport and chunked transfers against a real Mosquitto.

The receiver side below is a minimal coordinator loop built only from the protocol's
pieces (decode, verify, replay guard, reassembler), as the real coordinator will be.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from coordinator.mosquitto import MosquittoProcess
from edge_runtime.wire import (
    COORDINATOR_SENDER,
    Acknowledgement,
    AckStatus,
    ChunkHeader,
    ChunkReassembler,
    ChunkSender,
    DeviceChannel,
    DeviceState,
    Ed25519PrivateKey,
    Frame,
    InboxChannel,
    Limits,
    MqttTransport,
    PowerSource,
    ProtocolError,
    ReceivedMessage,
    ReconnectConfig,
    ReplayError,
    SignatureError,
    StaleRoundError,
    TokenBucket,
    TransferStatus,
    TransferStatusRequest,
    TransportConfig,
    Update,
    UpdateEncoding,
    WillConfig,
    decode_frame,
    device_topic,
    encode_frame,
    generate_private_key,
    inbox_topic,
    parse_device_topic,
    verify_frame,
)
from tests.replay_guard import ReplayGuard, check_round

pytestmark = pytest.mark.integration

FLEET = "school"
DEVICE = "dev-a"
WAIT_SECONDS = 15.0
MODEL_VERSION = "ab" * 32


def _transport(broker: MosquittoProcess, client_id: str, **options: object) -> MqttTransport:
    return MqttTransport(
        TransportConfig(
            host=broker.host,
            port=broker.port,
            client_id=client_id,
            keepalive_seconds=5,
            reconnect=ReconnectConfig(min_delay_seconds=1, max_delay_seconds=2),
            **options,  # type: ignore[arg-type]
        )
    )


class CoordinatorLoop:
    """Drains a transport's queue on its own thread, like the coordinator daemon will."""

    def __init__(
        self,
        transport: MqttTransport,
        device_keys: dict[str, Ed25519PrivateKey],
        coordinator_key: Ed25519PrivateKey,
        limits: Limits,
        open_round: int = 3,
    ) -> None:
        self.transport = transport
        self.public_keys = {name: key.public_key() for name, key in device_keys.items()}
        self.key = coordinator_key
        self.reassembler = ChunkReassembler(limits)
        self.limits = limits
        self.replays = ReplayGuard()
        self.open_round = open_round
        self.accepted: list[Frame] = []
        self.rejections: list[ProtocolError] = []
        self.chunks_received = 0
        self.chunk_event = threading.Event()
        self.chunk_target = 0
        self.handled: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=WAIT_SECONDS)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.transport.received.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                outcome = self._handle(message)
            except ProtocolError as error:
                self.rejections.append(error)
                outcome = f"rejected:{type(error).__name__}"
            self.handled.put(outcome)

    def _verified(self, frame: Frame, topic_device: str) -> None:
        if frame.sender != topic_device or frame.sender not in self.public_keys:
            raise SignatureError(f"sender {frame.sender!r} may not publish on {topic_device}")
        verify_frame(frame, self.public_keys[frame.sender])

    def _handle(self, message: ReceivedMessage) -> str:
        _, device_id, channel = parse_device_topic(message.topic)
        frame = decode_frame(message.payload, self.limits)
        if channel is DeviceChannel.CHUNK:
            header = frame.expect(ChunkHeader)
            self.chunks_received += 1
            if self.chunks_received >= self.chunk_target:
                self.chunk_event.set()
            completed = self.reassembler.accept(header, frame.body)
            if completed is None:
                return "chunk"
            frame = completed.decode(self.limits)
        self._verified(frame, device_id)
        if isinstance(frame.message, TransferStatusRequest):
            status = self.reassembler.status(frame.message)
            self._reply(device_id, InboxChannel.TRANSFER, status)
            return "status"
        update = frame.expect(Update)
        if not self.replays.first_time(frame.message_id):
            self._ack(device_id, frame.message_id, AckStatus.DUPLICATE)
            return "duplicate"
        check_round(update.task, update.server_round, self.open_round)
        self.accepted.append(frame)
        self._ack(device_id, frame.message_id, AckStatus.ACCEPTED)
        return "accepted"

    def _ack(self, device_id: str, message_id: str, status: AckStatus) -> None:
        ack = Acknowledgement(FLEET, device_id, message_id, status)
        self._reply(device_id, InboxChannel.ACK, ack)

    def _reply(self, device_id: str, channel: InboxChannel, message: object) -> None:
        frame = encode_frame(message, sender=COORDINATOR_SENDER, signing_key=self.key)  # type: ignore[arg-type]
        self.transport.publish(inbox_topic(FLEET, device_id, channel), frame)


@pytest.fixture
def keys() -> tuple[Ed25519PrivateKey, Ed25519PrivateKey]:
    return generate_private_key(), generate_private_key()


@pytest.fixture
def coordinator(
    mosquitto: MosquittoProcess, keys: tuple[Ed25519PrivateKey, Ed25519PrivateKey]
) -> Iterator[CoordinatorLoop]:
    device_key, coordinator_key = keys
    transport = _transport(mosquitto, "coordinator")
    transport.subscribe(f"schoolfl/{FLEET}/dev/+/#")
    transport.start(WAIT_SECONDS)
    limits = Limits(max_chunk_bytes=2 * 1024 * 1024, max_transfer_bytes=128 * 1024 * 1024)
    loop = CoordinatorLoop(transport, {DEVICE: device_key}, coordinator_key, limits)
    loop.start()
    try:
        yield loop
    finally:
        loop.stop()
        transport.stop()


def _update(server_round: int = 3, attempt: int = 0) -> Update:
    return Update(
        fleet=FLEET,
        task="reading",
        server_round=server_round,
        device_id=DEVICE,
        attempt=attempt,
        model_version=MODEL_VERSION,
        num_samples=10,
        num_steps=5,
        encoding=UpdateEncoding.INT8,
        metrics={"loss": 0.25},
    )


def _device(mosquitto: MosquittoProcess, client_id: str = DEVICE) -> MqttTransport:
    transport = _transport(mosquitto, client_id)
    transport.subscribe(f"schoolfl/{FLEET}/to/{DEVICE}/#")
    transport.start(WAIT_SECONDS)
    return transport


def _next_inbox(transport: MqttTransport, coordinator_key: Ed25519PrivateKey) -> Frame:
    message = transport.received.get(timeout=WAIT_SECONDS)
    frame = decode_frame(message.payload)
    verify_frame(frame, coordinator_key.public_key())
    return frame


def _ask_transfer_status(
    device: MqttTransport,
    device_key: Ed25519PrivateKey,
    coordinator_key: Ed25519PrivateKey,
    transfer_id: str,
) -> TransferStatus:
    """Ask which chunks the coordinator holds; ask again if no answer comes (a request sent
    before the coordinator resubscribed is lost when the broker has no persistence)."""
    for attempt in range(3):
        request = TransferStatusRequest(transfer_id, f"query-{attempt}")
        device.publish(
            device_topic(FLEET, DEVICE, DeviceChannel.TRANSFER),
            encode_frame(request, sender=DEVICE, signing_key=device_key),
        )
        try:
            message = device.received.get(timeout=WAIT_SECONDS / 3)
        except queue.Empty:
            continue
        frame = decode_frame(message.payload)
        verify_frame(frame, coordinator_key.public_key())
        return frame.expect(TransferStatus)
    raise AssertionError("the coordinator never answered the transfer status request")


def test_50_mb_body_survives_broker_restart_resending_only_missing_chunks(
    mosquitto: MosquittoProcess,
    coordinator: CoordinatorLoop,
    keys: tuple[Ed25519PrivateKey, Ed25519PrivateKey],
) -> None:
    device_key, coordinator_key = keys
    body = os.urandom(50 * 1024 * 1024)
    frame_bytes = encode_frame(_update(), sender=DEVICE, body=body, signing_key=device_key)
    sender = ChunkSender(frame_bytes, transfer_id="upload-1", sender=DEVICE, chunk_bytes=1 << 20)
    chunk_topic = device_topic(FLEET, DEVICE, DeviceChannel.CHUNK)
    delivered_before_outage = 20
    coordinator.chunk_target = delivered_before_outage

    device = _device(mosquitto, "dev-a-uploader")
    infos = [device.publish(chunk_topic, data) for _, data in sender.frames(range(20))]
    assert all(device.wait_published(info, WAIT_SECONDS) for info in infos)
    assert coordinator.chunk_event.wait(WAIT_SECONDS)

    mosquitto.stop()
    # The device keeps "sending" into a dead link, then its process restarts: whatever sat
    # in paho's in-memory queue is gone; only the outbox copy of the frame remains.
    for _, data in sender.frames(range(20, 25)):
        device.publish(chunk_topic, data)
    device.stop()
    mosquitto.start()

    device = _device(mosquitto, "dev-a-uploader")
    try:
        assert coordinator.transport.wait_connect_count(2, WAIT_SECONDS)
        status = _ask_transfer_status(device, device_key, coordinator_key, "upload-1")
        missing = sender.missing_from(status)
        assert missing == list(range(delivered_before_outage, sender.count))

        resent_before = sender.sent_count
        for _, data in sender.frames(missing):
            device.publish(chunk_topic, data)
        assert sender.sent_count - resent_before == len(missing) < sender.count

        ack = _next_inbox(device, coordinator_key).expect(Acknowledgement)
        assert ack.status is AckStatus.ACCEPTED
        assert ack.acked_message_id == _update().message_id
        assert len(coordinator.accepted) == 1
        received = coordinator.accepted[0]
        assert received.body == body  # byte-identical
        assert hashlib.sha256(received.body).digest() == hashlib.sha256(body).digest()
        # Every chunk reached the coordinator; only redeliveries of the broker's own
        # unacknowledged messages (if any) show up as de-duplicated chunks.
        assert coordinator.reassembler.completed == 1
        assert coordinator.chunks_received - coordinator.reassembler.duplicates == sender.count
    finally:
        device.stop()


def test_duplicates_replays_forgeries_and_stale_rounds_change_nothing(
    mosquitto: MosquittoProcess,
    coordinator: CoordinatorLoop,
    keys: tuple[Ed25519PrivateKey, Ed25519PrivateKey],
) -> None:
    device_key, coordinator_key = keys
    topic = device_topic(FLEET, DEVICE, DeviceChannel.UPDATE)
    device = _device(mosquitto)
    try:
        update = encode_frame(_update(), sender=DEVICE, body=b"delta", signing_key=device_key)
        device.publish(topic, update)
        device.publish(topic, update)  # duplicate (e.g. a QoS 1 redelivery)
        outcomes = [coordinator.handled.get(timeout=WAIT_SECONDS) for _ in range(2)]
        assert outcomes == ["accepted", "duplicate"]
        acks = [_next_inbox(device, coordinator_key).expect(Acknowledgement) for _ in range(2)]
        assert [ack.status for ack in acks] == [AckStatus.ACCEPTED, AckStatus.DUPLICATE]

        device.publish(topic, update)  # replay later, same id
        forged = encode_frame(
            _update(attempt=1), sender=DEVICE, body=b"evil", signing_key=generate_private_key()
        )
        device.publish(topic, forged)
        tampered = bytearray(
            encode_frame(_update(attempt=2), sender=DEVICE, body=b"x", signing_key=device_key)
        )
        tampered[8] ^= 0x01  # flip a signature bit
        device.publish(topic, bytes(tampered))
        stale = encode_frame(_update(server_round=2), sender=DEVICE, signing_key=device_key)
        device.publish(topic, stale)
        outcomes = [coordinator.handled.get(timeout=WAIT_SECONDS) for _ in range(4)]
        assert outcomes == [
            "duplicate",
            "rejected:SignatureError",
            "rejected:SignatureError",
            "rejected:StaleRoundError",
        ]
        assert len(coordinator.accepted) == 1
        assert coordinator.accepted[0].body == b"delta"
        assert coordinator.replays.replays == 2
        assert isinstance(coordinator.rejections[-1], StaleRoundError)
        assert all(str(error) for error in coordinator.rejections)
    finally:
        device.stop()


def test_persistent_session_delivers_qos1_messages_sent_while_offline(
    mosquitto: MosquittoProcess,
) -> None:
    topic = f"schoolfl/{FLEET}/to/{DEVICE}/task"
    receiver = _transport(mosquitto, "offline-receiver")
    receiver.subscribe(topic)
    receiver.start(WAIT_SECONDS)
    sender = _transport(mosquitto, "sender")
    sender.start(WAIT_SECONDS)
    try:
        # Prove the subscription is registered, then go away.
        sender.publish(topic, b"first")
        assert receiver.received.get(timeout=WAIT_SECONDS).payload == b"first"
        receiver.stop()
        info = sender.publish(topic, b"while-offline", qos=1)
        assert sender.wait_published(info, WAIT_SECONDS)

        again = _transport(mosquitto, "offline-receiver")  # same client id, no subscribe
        again.start(WAIT_SECONDS)
        message = again.received.get(timeout=WAIT_SECONDS)
        assert (message.payload, message.qos) == (b"while-offline", 1)
        again.stop()
    finally:
        sender.stop()


def test_last_will_announces_an_offline_device(
    mosquitto: MosquittoProcess, keys: tuple[Ed25519PrivateKey, Ed25519PrivateKey]
) -> None:
    device_key, _ = keys
    state_topic = device_topic(FLEET, DEVICE, DeviceChannel.STATE)
    offline = DeviceState(
        fleet=FLEET,
        device_id=DEVICE,
        sequence=1,
        online=False,
        eligible=False,
        cpu_load=0.0,
        free_memory_bytes=0,
        power_source=PowerSource.UNKNOWN,
        profile_digest="cd" * 32,
    )
    will = WillConfig(state_topic, encode_frame(offline, sender=DEVICE, signing_key=device_key))
    watcher = _transport(mosquitto, "watcher")
    watcher.subscribe(state_topic)
    watcher.start(WAIT_SECONDS)
    device = _transport(mosquitto, DEVICE, will=will)
    device.start(WAIT_SECONDS)
    try:
        # Cut the TCP connection without an MQTT DISCONNECT, as a dead Wi-Fi link would.
        raw_socket = device._client.socket()
        assert isinstance(raw_socket, socket.socket)
        raw_socket.shutdown(socket.SHUT_RDWR)
        message = watcher.received.get(timeout=WAIT_SECONDS)
        frame = decode_frame(message.payload)
        verify_frame(frame, device_key.public_key())
        state = frame.expect(DeviceState)
        assert state.online is False
        assert message.retain is False  # live delivery; the broker also retains it
        # The transport reconnects on its own afterwards.
        assert device.wait_connected(WAIT_SECONDS)
    finally:
        device.stop()
        watcher.stop()


def test_bandwidth_limit_throttles_publishing(mosquitto: MosquittoProcess) -> None:
    rate = 1024 * 1024.0
    device = _transport(
        mosquitto,
        "slow-link",
        bandwidth_limit_bytes_per_second=rate,
        bandwidth_burst_bytes=64 * 1024,
    )
    device.start(WAIT_SECONDS)
    try:
        payload = b"\0" * (64 * 1024)
        infos = [device.publish("schoolfl/test/slow", payload) for _ in range(9)]
        assert all(device.wait_published(info, WAIT_SECONDS) for info in infos)
        assert device.bucket is not None
        # 9 x 64 KiB at 1 MiB/s after a 64 KiB burst: at least 0.5 s of waiting.
        assert device.bucket.total_wait_seconds >= 0.45
    finally:
        device.stop()


def test_token_bucket_on_a_fake_clock() -> None:
    clock = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    bucket = TokenBucket(1000.0, 500, now=lambda: clock[0], sleep=sleep)
    assert bucket.consume(500) == 0.0  # the burst is free
    assert bucket.consume(1000) == pytest.approx(1.0)
    clock[0] += 2.0  # idle: refills, but only up to the burst
    assert bucket.consume(500) == 0.0
    assert bucket.consume(250) == pytest.approx(0.25)
    assert sum(slept) == pytest.approx(1.25)


def test_replay_guard_persists_across_restart(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "seen.json"
    guard = ReplayGuard(capacity=3)
    for message_id in ("a", "b", "c", "d"):
        assert guard.first_time(message_id)
    guard.save(path)
    loaded = ReplayGuard.load(path, capacity=3)
    assert "a" not in loaded  # evicted: capacity bounds memory
    with pytest.raises(ReplayError, match="already processed"):
        loaded.check("d")
    assert (path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(StaleRoundError, match="closed"):
        check_round("reading", 1, 2)
    with pytest.raises(StaleRoundError, match="no open round"):
        check_round("reading", 1, None)
    check_round("reading", 2, 2)


def test_transport_config_validation() -> None:
    with pytest.raises(ValueError, match="both username and password"):
        TransportConfig(host="h", client_id="c", username="u").validate()
    with pytest.raises(ValueError, match="port"):
        TransportConfig(host="h", client_id="c", port=0).validate()
    described = TransportConfig(host="h", client_id="c", username="u", password="secret")
    assert "secret" not in described.describe()


def test_mqtt5_session_round_trip(mosquitto: MosquittoProcess) -> None:
    from edge_runtime.wire import MqttVersion

    receiver = _transport(mosquitto, "v5-receiver", protocol=MqttVersion.V5)
    receiver.subscribe("schoolfl/test/v5")
    receiver.start(WAIT_SECONDS)
    sender = _transport(mosquitto, "v5-sender", protocol=MqttVersion.V5)
    sender.start(WAIT_SECONDS)
    try:
        sender.publish("schoolfl/test/v5", b"over mqtt 5")
        assert receiver.received.get(timeout=WAIT_SECONDS).payload == b"over mqtt 5"
        receiver.stop()  # session expiry > 0: the broker keeps the subscription
        assert sender.wait_published(sender.publish("schoolfl/test/v5", b"queued"), WAIT_SECONDS)
        again = _transport(mosquitto, "v5-receiver", protocol=MqttVersion.V5)
        again.start(WAIT_SECONDS)
        assert again.received.get(timeout=WAIT_SECONDS).payload == b"queued"
        again.stop()
    finally:
        sender.stop()


class _LineSeen(logging.Handler):
    """Sets `seen` when a log line containing `text` arrives (from any thread)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = threading.Event()
        self.levels: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.levels.append(record.levelno)
            self.seen.set()


def test_a_broker_restart_is_not_logged_as_an_error(mosquitto: MosquittoProcess) -> None:
    """While the broker is away paho logs "Client is not connected" at ERROR on every loop
    pass; a routine reconnect must not fill the agent's log with errors."""
    paho_logger = logging.getLogger("edge_runtime.wire.transport.paho")
    watcher = _LineSeen("not connected")
    paho_logger.addHandler(watcher)
    old_level = paho_logger.level
    paho_logger.setLevel(logging.DEBUG)
    transport = _transport(mosquitto, "dev-restart")
    transport.start()
    try:
        mosquitto.stop()
        assert watcher.seen.wait(WAIT_SECONDS), "paho logged no 'not connected' line"
        mosquitto.start()
        assert transport.wait_connected(WAIT_SECONDS)
        assert max(watcher.levels) <= logging.INFO
    finally:
        transport.stop()
        paho_logger.removeHandler(watcher)
        paho_logger.setLevel(old_level)


def _broker_that_resets_once() -> tuple[socket.socket, threading.Thread]:
    """A TCP listener that answers one MQTT CONNECT with a CONNACK and then resets the
    connection (SO_LINGER 0 makes close() send RST), as a broker killed under load does."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = listener.accept()
        connection.recv(1024)  # CONNECT
        connection.sendall(b"\x20\x02\x00\x00")  # CONNACK, accepted
        time.sleep(0.5)
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_a_connection_reset_by_the_broker_is_not_logged_as_an_error() -> None:
    """paho logs "failed to receive on socket: [Errno 104] Connection reset by peer" at ERROR
    when a broker dies with the connection open (seen in the chaos run's logs)."""
    paho_logger = logging.getLogger("edge_runtime.wire.transport.paho")
    watcher = _LineSeen("failed to receive on socket")
    paho_logger.addHandler(watcher)
    old_level = paho_logger.level
    paho_logger.setLevel(logging.DEBUG)
    listener, server = _broker_that_resets_once()
    transport = MqttTransport(
        TransportConfig(
            host="127.0.0.1",
            port=listener.getsockname()[1],
            client_id="dev-reset",
            reconnect=ReconnectConfig(min_delay_seconds=5, max_delay_seconds=5),
        )
    )
    transport.start()
    try:
        assert watcher.seen.wait(WAIT_SECONDS), "paho logged no 'failed to receive' line"
        assert max(watcher.levels) == logging.INFO
    finally:
        transport.stop()
        listener.close()
        server.join(timeout=5)
        paho_logger.removeHandler(watcher)
        paho_logger.setLevel(old_level)
