"""MQTT transport: a thin wrapper over paho-mqtt 2.x that both daemons use.

What it adds to paho, and why:
- one `TransportConfig` (TLS, credentials, keepalive, reconnect backoff, last will,
  bandwidth limit) built by the entry point, logged once, passed to the constructor;
- a persistent session (clean session off) and QoS 1 by default, so state-changing
  messages published while the link is down are delivered after it comes back;
- subscriptions remembered and re-sent in `on_connect`, so reconnects resubscribe;
- callbacks that never block: received messages go to `received` (a queue the daemon's
  loop drains, bounded in messages and bytes: when the loop falls behind, arrivals are
  dropped and counted in `dropped` / `take_drops()`; `receive_queue.py` says why this
  rather than paho's `manual_ack`), connection changes set events;
- a failed connect names its cause (`connect_diagnosis.py`): paho retries in its thread
  and drops the exception, so the transport keeps it for `start` to report;
- an optional outgoing token bucket, to emulate (or respect) a slow school uplink;
- paho's own log lines routed into `logging`.

Publishing blocks the *caller* while the bucket refills, never a paho callback, so do not
publish from inside a handler; the daemon loop publishes.
"""

from __future__ import annotations

import enum
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_runtime.wire.connect_diagnosis import (
    ConnectFailure,
    describe_closed_before_connack,
    describe_no_connack,
    describe_refusal,
    describe_socket_error,
)
from edge_runtime.wire.receive_queue import ReceivedMessage, ReceiveQueue, ReceiveQueueConfig

logger = logging.getLogger(__name__)

HANGUPS_BEFORE_GIVING_UP = 3
"""A server that closes the connection before answering CONNECT this many times in a row is
not an MQTT listener (a TLS port, say); once or twice is a broker restarting under us."""


class TransportError(RuntimeError):
    """The broker refused us, or did not answer within the deadline."""


class MqttVersion(enum.Enum):
    V311 = "3.1.1"
    """Enough for everything the protocol does (DESIGN invariant 6)."""
    V5 = "5"


@dataclass(frozen=True)
class TlsConfig:
    """Server verification (and optional client certificate) for `mqtts://` brokers."""

    ca_certs: str | None = None
    """CA bundle path; None uses the system's trust store."""
    certfile: str | None = None
    keyfile: str | None = None
    insecure: bool = False
    """Skip hostname verification. Only for a lab broker with a self-signed cert."""


@dataclass(frozen=True)
class WillConfig:
    """Last will: the broker publishes it when our connection dies without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True
    """Retained, so a late subscriber sees the device as offline, not its last heartbeat."""


@dataclass(frozen=True)
class ReconnectConfig:
    min_delay_seconds: int = 1
    max_delay_seconds: int = 60
    """paho doubles the delay after each failed attempt up to this ceiling."""


@dataclass(frozen=True)
class TransportConfig:
    """Everything needed to talk to the broker. One per daemon."""

    host: str
    client_id: str
    """Stable across restarts: the persistent session is keyed by it."""
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: TlsConfig | None = None
    keepalive_seconds: int = 30
    """The broker fires our last will after 1.5 x this without traffic."""
    clean_session: bool = False
    """False: the broker keeps our subscriptions and queued QoS 1 messages while we are away."""
    protocol: MqttVersion = MqttVersion.V311
    session_expiry_seconds: int = 7 * 24 * 3600
    """MQTT 5 only: how long the broker keeps the session (a week of school holidays)."""
    reconnect: ReconnectConfig = field(default_factory=ReconnectConfig)
    will: WillConfig | None = None
    bandwidth_limit_bytes_per_second: float | None = None
    """Outgoing payload bytes per second; None is unlimited."""
    bandwidth_burst_bytes: int = 64 * 1024
    max_inflight_messages: int = 20
    receive: ReceiveQueueConfig = field(default_factory=ReceiveQueueConfig)
    """Bounds of the queue of received messages; arrivals past them are dropped, counted."""

    def validate(self) -> None:
        if not self.host:
            raise ValueError("TransportConfig.host is empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"TransportConfig.port must be 1..65535, got {self.port}")
        if not self.client_id:
            raise ValueError("TransportConfig.client_id is empty (persistent sessions need one)")
        if (self.username is None) != (self.password is None):
            raise ValueError("set both username and password, or neither")
        if self.bandwidth_limit_bytes_per_second is not None:
            if self.bandwidth_limit_bytes_per_second <= 0:
                raise ValueError("bandwidth_limit_bytes_per_second must be > 0")
        if self.bandwidth_burst_bytes < 1:
            raise ValueError("bandwidth_burst_bytes must be >= 1")
        self.receive.validate()

    def describe(self) -> str:
        """One log line, without the password."""
        return (
            f"mqtt{'s' if self.tls else ''}://{self.host}:{self.port} client_id={self.client_id} "
            f"user={self.username or '-'} mqtt={self.protocol.value} "
            f"clean_session={self.clean_session} keepalive={self.keepalive_seconds}s "
            f"will={'yes' if self.will else 'no'} "
            f"bandwidth_limit={self.bandwidth_limit_bytes_per_second or 'none'} "
            f"receive_queue={self.receive.max_messages} messages/{self.receive.max_bytes} bytes"
        )


class TokenBucket:
    """Blocks callers so that on average at most `rate` bytes per second go out.

    A payload larger than the burst is let through and paid for afterwards (the bucket goes
    into debt), so chunks bigger than the burst still work. `now` and `sleep` are injectable
    so tests run it on a fake clock."""

    def __init__(
        self,
        rate_bytes_per_second: float,
        burst_bytes: int,
        *,
        now: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate_bytes_per_second
        self.burst = burst_bytes
        self._now = now
        self._sleep = sleep
        self._tokens = float(burst_bytes)
        self._updated = now()
        self._lock = threading.Lock()
        self.total_wait_seconds = 0.0

    def consume(self, size: int) -> float:
        """Take `size` tokens, sleeping while the bucket is in debt; returns seconds slept."""
        with self._lock:
            current = self._now()
            self._tokens = min(self.burst, self._tokens + (current - self._updated) * self.rate)
            self._updated = current
            self._tokens -= size
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            if wait > 0:
                self.total_wait_seconds += wait
                self._sleep(wait)
        return wait


class _PahoLogAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Routes paho's log lines into ours, downgrading the errors paho logs when the broker
    goes away: "Client is not connected" (on every loop pass while it is away) and "failed to
    receive on socket" / "timeout on socket" with a connection error (a reset when the broker
    restarts). They go to DEBUG during a clean shutdown (the loop winding down) and to INFO
    otherwise: a routine reconnect, which the transport retries by itself. At ERROR they would
    alarm operators on every stop and every broker restart. Other socket errors (TLS, say)
    keep paho's level."""

    def __init__(self, logger: logging.Logger, transport: MqttTransport) -> None:
        super().__init__(logger, {})
        self._transport = transport

    def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
        if _is_routine_disconnect(str(msg), args):
            level = logging.DEBUG if self._transport.stopping else min(level, logging.INFO)
        super().log(level, msg, *args, **kwargs)  # type: ignore[arg-type]


def _is_routine_disconnect(message: str, args: tuple[object, ...]) -> bool:
    if message.startswith("Client is not connected"):
        return True
    socket_error = message.startswith(("failed to receive on socket", "timeout on socket"))
    return socket_error and bool(args) and isinstance(args[0], (ConnectionError, TimeoutError))


class MqttTransport:
    """Connect, publish, subscribe; received messages land in `received`.

    Typical use (agent or coordinator loop)::

        transport = MqttTransport(config)
        transport.subscribe(topic_filter)          # remembered, re-sent on reconnect
        transport.start(timeout_seconds=10)
        transport.publish(topic, frame_bytes)      # QoS 1, not retained
        message = transport.received.get(timeout=1.0)
        transport.stop()

    `received` holds at most `config.receive` (messages, bytes); what arrives while it is
    full is dropped, counted in `dropped`, and reported by topic by `take_drops()`, which a
    daemon calls on each tick to count the drops as refusals. Nothing needs acknowledging.
    """

    client_class: type[mqtt.Client] = mqtt.Client
    """The paho client class; tests can swap in a subclass."""

    def __init__(self, config: TransportConfig) -> None:
        config.validate()
        self.config = config
        self.received = ReceiveQueue(config.receive)
        self.connected = threading.Event()
        self.connect_count = 0
        self.disconnect_count = 0
        self.last_connect_error: str | None = None
        self.last_failure: ConnectFailure | None = None
        """Why the latest connect attempt failed; None once connected."""
        self._connect_failed = threading.Event()
        self._socket_open = False
        self._connack_received = False
        self._hangups_before_connack = 0
        """Consecutive connections the server closed before answering CONNECT."""
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._connect_condition = threading.Condition(self._lock)
        self.bucket = (
            TokenBucket(config.bandwidth_limit_bytes_per_second, config.bandwidth_burst_bytes)
            if config.bandwidth_limit_bytes_per_second
            else None
        )
        self.stopping = False
        self._client = self._build_client()
        self._started = False

    def _build_client(self) -> mqtt.Client:
        config = self.config
        v5 = config.protocol is MqttVersion.V5
        client = self.client_class(
            CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else config.clean_session,
        )
        client.enable_logger(_PahoLogAdapter(logging.getLogger(f"{__name__}.paho"), self))  # type: ignore[arg-type]
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        if config.tls is not None:
            try:
                client.tls_set(
                    ca_certs=config.tls.ca_certs,
                    certfile=config.tls.certfile,
                    keyfile=config.tls.keyfile,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError) as error:  # ssl.SSLError is an OSError too
                raise TransportError(
                    f"cannot use the TLS files (ca {config.tls.ca_certs}, cert "
                    f"{config.tls.certfile}, key {config.tls.keyfile}): {error}"
                ) from None
            client.tls_insecure_set(config.tls.insecure)
        if config.will is not None:
            client.will_set(
                config.will.topic, config.will.payload, config.will.qos, config.will.retain
            )
        client.reconnect_delay_set(
            config.reconnect.min_delay_seconds, config.reconnect.max_delay_seconds
        )
        client.max_inflight_messages_set(config.max_inflight_messages)
        client.max_queued_messages_set(0)  # unbounded: QoS 1 messages wait for the link
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_pre_connect = self._on_pre_connect
        client.on_socket_open = self._on_socket_open
        paho_reconnect = client.reconnect

        def reconnect_recording_errors() -> MQTTErrorCode:
            # paho's network thread calls reconnect() and drops what it raises; keep it.
            try:
                return paho_reconnect()
            except OSError as error:
                self._record_failure(
                    describe_socket_error(
                        error,
                        config.host,
                        config.port,
                        config.tls is not None,
                        client.connect_timeout,
                    )
                )
                raise

        client.reconnect = reconnect_recording_errors  # type: ignore[method-assign]
        client.on_message = self._on_message
        return client

    # -- paho callbacks: never block, only record and enqueue ------------------------------

    def _record_failure(self, failure: ConnectFailure) -> None:
        if failure != self.last_failure:  # once per change, not once per retry
            logger.warning("%s", failure.message)
        self.last_failure = failure
        if failure.permanent:
            self._connect_failed.set()

    def _on_pre_connect(self, client, userdata) -> None:  # noqa: ANN001
        self._socket_open = False
        self._connack_received = False

    def _on_socket_open(self, client, userdata, sock) -> None:  # noqa: ANN001
        self._socket_open = True

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self._connack_received = True
        self._hangups_before_connack = 0
        if reason_code.is_failure:
            self.last_connect_error = str(reason_code)
            self._record_failure(
                describe_refusal(
                    str(reason_code), self.config.host, self.config.port, self.config.client_id
                )
            )
            return
        self.last_failure = None
        self._connect_failed.clear()  # a failure before this success is no longer news
        with self._lock:
            subscriptions = list(self._subscriptions.items())
        for topic_filter, qos in subscriptions:
            client.subscribe(topic_filter, qos=qos)
        self.last_connect_error = None
        self.connected.set()
        with self._connect_condition:
            self.connect_count += 1
            self._connect_condition.notify_all()
        logger.info(
            "connected to %s:%s (session present: %s)",
            self.config.host,
            self.config.port,
            flags.session_present,
        )

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self.connected.clear()
        if self._socket_open and not self._connack_received and not self.stopping:
            self._hangups_before_connack += 1
            failure = describe_closed_before_connack(
                self.config.host, self.config.port, self.config.tls is not None
            )
            if self._hangups_before_connack < HANGUPS_BEFORE_GIVING_UP:
                failure = replace(failure, permanent=False)  # a broker mid-restart does this once
            self._record_failure(failure)
        with self._lock:
            self.disconnect_count += 1
        logger.info("disconnected (%s); paho reconnects with backoff", reason_code)

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        self.received.offer(
            ReceivedMessage(message.topic, bytes(message.payload), message.qos, message.retain)
        )

    # -- public API ------------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        """Messages dropped since start because `received` was full."""
        return self.received.dropped

    def take_drops(self) -> dict[str, int]:
        """Drops by topic since the last call (see `ReceiveQueue.take_drops`)."""
        return self.received.take_drops()

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected and again after every reconnect."""
        with self._lock:
            self._subscriptions[topic_filter] = qos
        if self.connected.is_set():
            self._client.subscribe(topic_filter, qos=qos)

    def start(self, timeout_seconds: float = 10.0) -> None:
        """Connect and start paho's network thread; return once connected.

        Raises `TransportError` naming the cause: at once when retrying cannot help (TLS
        verification, unknown host, a port that is not a (TLS) MQTT listener, a CONNACK
        refusal), at the deadline otherwise (connection refused, no answer). Callers exit
        on it; call `stop` to end paho's retries when they do not."""
        logger.info("transport config: %s", self.config.describe())
        if not self._started:
            properties = None
            if self.config.protocol is MqttVersion.V5:
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = self.config.session_expiry_seconds
            self._client.connect_async(
                self.config.host,
                self.config.port,
                keepalive=self.config.keepalive_seconds,
                clean_start=(
                    False
                    if self.config.protocol is MqttVersion.V5
                    else mqtt.MQTT_CLEAN_START_FIRST_ONLY
                ),
                properties=properties,
            )
            self._client.loop_start()
            self._started = True
        if not self.wait_connected(timeout_seconds):
            raise TransportError(self._failure_message(timeout_seconds))

    def _failure_message(self, timeout_seconds: float) -> str:
        if self.last_failure is not None:
            return self.last_failure.message
        if self._socket_open and not self._connack_received:
            return describe_no_connack(self.config.host, self.config.port, timeout_seconds).message
        return (
            f"no connection to {self.config.host}:{self.config.port} within {timeout_seconds:.0f} s"
        )

    def wait_connected(self, timeout_seconds: float) -> bool:
        """True once connected; False on timeout or if the broker refused us."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.connected.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
                return True
            if self._connect_failed.is_set():
                self._connect_failed.clear()
                return False
        return self.connected.is_set()

    def wait_connect_count(self, count: int, timeout_seconds: float) -> bool:
        """True once this transport has connected `count` times (e.g. 2 = reconnected once)."""
        with self._connect_condition:
            return self._connect_condition.wait_for(
                lambda: self.connect_count >= count, timeout=timeout_seconds
            )

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        """Queue a message; with QoS 1 it survives a disconnect (paho resends it).

        Blocks for the bandwidth limit if one is set. Use `wait_published` for the PUBACK."""
        if self.bucket is not None:
            self.bucket.consume(len(payload))
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return info

    @staticmethod
    def wait_published(info: mqtt.MQTTMessageInfo, timeout_seconds: float) -> bool:
        """True once the broker acknowledged the message (QoS 1 PUBACK)."""
        try:
            info.wait_for_publish(timeout=timeout_seconds)
        except (RuntimeError, ValueError):
            # paho raises when the message was dropped locally (queue full / no longer
            # connected with QoS 0); report "not published" instead of crashing the loop.
            return False
        return info.is_published()

    def stop(self) -> None:
        """Disconnect cleanly (no last will) and stop paho's thread. Idempotent."""
        if not self._started:
            return
        self.stopping = True
        self._client.disconnect()
        try:
            self._client.loop_stop()
        except AttributeError:
            # paho-mqtt issue #872: loop_stop checks its thread, then joins it; when the
            # thread ends in between (quickly, if we never connected) paho raises on None.
            # The thread being gone is exactly what stop() wants.
            pass
        self._started = False
        self.stopping = False
        self.connected.clear()

    def __enter__(self) -> MqttTransport:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
