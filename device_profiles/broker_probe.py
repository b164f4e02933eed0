"""Round-trip time and throughput to the coordinator's MQTT broker.

The agent reaches the coordinator only through the broker, so the link the scheduler cares
about is device -> broker -> device. The probe subscribes to a private topic, publishes to it
with QoS 1 and times the echo: small messages give the RTT, a train of adapter-sized chunks
gives the throughput (the same chunk size updates travel in).
"""

from __future__ import annotations

import os
import queue
import statistics
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from device_profiles.errors import BenchError

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True)
class BrokerMeasurement:
    """Medians through one broker."""

    rtt_ms: float
    throughput_mbps: float
    rtt_samples: int
    payload_bytes: int


def parse_broker_url(url: str) -> tuple[str, int]:
    """mqtt://host:port (port defaults to 1883)."""
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    if parsed.scheme not in ("mqtt", "tcp") or not parsed.hostname:
        raise BenchError(f"broker URL {url!r} is not mqtt://host[:port]")
    return parsed.hostname, parsed.port or 1883


def _wait(received: queue.Queue[tuple[float, int]], deadline: float, url: str) -> tuple[float, int]:
    try:
        return received.get(timeout=max(deadline - time.monotonic(), 0.01))
    except queue.Empty as error:
        raise BenchError(f"no echo from broker {url} before the deadline") from error


def _probe_client(
    topic: str, received: queue.Queue[tuple[float, int]], connected: queue.Queue[bool]
) -> mqtt.Client:
    """Callbacks are set before connecting and only enqueue, so they never block paho's loop.

    paho is imported only when a broker is probed, keeping it off the import path of the
    rest of the package.
    """
    import paho.mqtt.client as mqtt

    def on_connect(
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason_code: object,
        properties: object = None,
    ) -> None:
        failure = getattr(reason_code, "is_failure", False)
        if not failure:
            client.subscribe(topic, qos=1)
        connected.put(not failure)

    def on_subscribe(*args: object) -> None:
        connected.put(True)

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        received.put((time.perf_counter(), len(message.payload)))

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{os.getpid()}")
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    return client


def _await_subscription(
    connected: queue.Queue[bool], deadline: float, url: str, timeout_seconds: float
) -> None:
    """Publishing before the subscription is acknowledged could lose the first echoes."""
    for _ in range(2):  # connect, then subscribe acknowledged
        try:
            if not connected.get(timeout=max(deadline - time.monotonic(), 0.01)):
                raise BenchError(f"broker {url} refused the connection")
        except queue.Empty as error:
            raise BenchError(
                f"broker {url} did not answer within {timeout_seconds:.0f} s"
            ) from error


def _round_trips_ms(
    client: mqtt.Client,
    topic: str,
    received: queue.Queue[tuple[float, int]],
    deadline: float,
    url: str,
    samples: int,
) -> list[float]:
    """One small message at a time, so each echo times a full device -> broker -> device trip."""
    rtts = []
    for _ in range(samples):
        started = time.perf_counter()
        client.publish(topic, b"x" * 32, qos=1)
        arrived, _ = _wait(received, deadline, url)
        rtts.append((arrived - started) * 1000.0)
    return rtts


def _train_seconds(
    client: mqtt.Client,
    topic: str,
    received: queue.Queue[tuple[float, int]],
    deadline: float,
    url: str,
    chunks: int,
) -> float:
    """All chunks published back to back, timed until the last echo, as an update travels."""
    body = os.urandom(CHUNK_BYTES)
    started = time.perf_counter()
    for _ in range(chunks):
        client.publish(topic, body, qos=1)
    arrived = started
    for _ in range(chunks):
        arrived, _ = _wait(received, deadline, url)
    return max(arrived - started, 1e-6)


def measure_broker(
    url: str,
    *,
    rtt_samples: int = 20,
    payload_bytes: int = 4 * 1024 * 1024,
    timeout_seconds: float = 30.0,
) -> BrokerMeasurement:
    """Median echo RTT of small QoS 1 messages and throughput of a chunked payload."""
    host, port = parse_broker_url(url)
    topic = f"schoolfl/probe/{uuid.uuid4().hex}"
    received: queue.Queue[tuple[float, int]] = queue.Queue()
    connected: queue.Queue[bool] = queue.Queue()
    client = _probe_client(topic, received, connected)
    deadline = time.monotonic() + timeout_seconds
    try:
        client.connect(host, port, keepalive=30)
    except OSError as error:
        raise BenchError(f"cannot connect to broker {url}: {error}") from error
    client.loop_start()
    try:
        _await_subscription(connected, deadline, url, timeout_seconds)
        rtts = _round_trips_ms(client, topic, received, deadline, url, rtt_samples)
        chunks = max(1, payload_bytes // CHUNK_BYTES)
        seconds = _train_seconds(client, topic, received, deadline, url, chunks)
    finally:
        client.loop_stop()
        client.disconnect()
    return BrokerMeasurement(
        rtt_ms=statistics.median(rtts),
        throughput_mbps=chunks * CHUNK_BYTES * 8 / seconds / 1e6,
        rtt_samples=len(rtts),
        payload_bytes=chunks * CHUNK_BYTES,
    )
