"""TLS and credentials on a real Mosquitto: the transport verifies the server certificate."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.broker_config import hash_password_file
from coordinator.mosquitto import MosquittoConfig, MosquittoProcess, find_mosquitto
from edge_runtime.wire import MqttTransport, TlsConfig, TransportConfig, TransportError
from tests.production_broker import write_test_certificates

pytestmark = pytest.mark.integration

WAIT_SECONDS = 10.0


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[MosquittoProcess, Path, Path]]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    ca_path, cert_path, key_path = write_test_certificates(tmp_path)
    other_folder = tmp_path / "other"
    other_folder.mkdir()
    other_ca_path, _, _ = write_test_certificates(other_folder)  # a CA the client must not trust
    password_path = tmp_path / "passwd"
    hash_password_file({"pi-1": "correct horse battery"}, password_path)
    lines = [f"certfile {cert_path}", f"keyfile {key_path}", f"password_file {password_path}"]
    broker = MosquittoProcess(
        MosquittoConfig(workdir=tmp_path / "broker", allow_anonymous=False, extra_lines=lines)
    )
    broker.start()
    try:
        yield broker, ca_path, other_ca_path
    finally:
        broker.stop()


def _client(broker: MosquittoProcess, ca_path: Path, password: str) -> MqttTransport:
    return MqttTransport(
        TransportConfig(
            host=broker.host,
            port=broker.port,
            client_id=f"pi-1-{uuid.uuid4().hex[:6]}",
            username="pi-1",
            password=password,
            tls=TlsConfig(ca_certs=str(ca_path)),
        )
    )


def test_tls_with_password_round_trip(tls_broker: tuple[MosquittoProcess, Path, Path]) -> None:
    broker, ca_path, _ = tls_broker
    transport = _client(broker, ca_path, "correct horse battery")
    transport.subscribe("schoolfl/tls/#")
    transport.start(WAIT_SECONDS)
    try:
        transport.publish("schoolfl/tls/hello", b"encrypted")
        assert transport.received.get(timeout=WAIT_SECONDS).payload == b"encrypted"
    finally:
        transport.stop()


def test_tls_refuses_an_untrusted_server(tls_broker: tuple[MosquittoProcess, Path, Path]) -> None:
    broker, _, other_ca_path = tls_broker
    transport = _client(broker, other_ca_path, "correct horse battery")
    try:
        with pytest.raises(TransportError, match="TLS verification failed: unknown CA"):
            transport.start(WAIT_SECONDS)  # fails at once: retrying cannot fix a wrong CA
        assert not transport.connected.is_set()
    finally:
        transport.stop()


def test_tls_with_a_wrong_password_is_refused(
    tls_broker: tuple[MosquittoProcess, Path, Path],
) -> None:
    broker, ca_path, _ = tls_broker
    transport = _client(broker, ca_path, "wrong")
    try:
        with pytest.raises(
            TransportError, match="refused .*not authorised: a wrong username or password"
        ):
            transport.start(WAIT_SECONDS)
    finally:
        transport.stop()


# -- each connection failure names its own cause ---------------------------------------------


def _failure(config: TransportConfig, timeout_seconds: float = WAIT_SECONDS) -> tuple[str, float]:
    """The message `start` raises, and how long it took to say it."""
    transport = MqttTransport(config)
    started = time.monotonic()
    try:
        with pytest.raises(TransportError) as raised:
            transport.start(timeout_seconds)
        return str(raised.value), time.monotonic() - started
    finally:
        transport.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_hostname_mismatch_is_named(tls_broker: tuple[MosquittoProcess, Path, Path]) -> None:
    broker, ca_path, _ = tls_broker
    # The test certificate is issued for the IP 127.0.0.1, not for the name "localhost".
    message, _ = _failure(
        TransportConfig(
            host="localhost",
            port=broker.port,
            client_id="pi-1-name",
            tls=TlsConfig(ca_certs=str(ca_path)),
        )
    )
    assert "TLS verification failed: hostname mismatch" in message
    assert "'localhost'" in message


def test_a_closed_port_is_connection_refused() -> None:
    port = _free_port()
    message, _ = _failure(TransportConfig(host="127.0.0.1", port=port, client_id="c"), 2.0)
    assert f"127.0.0.1:{port}: connection refused, nothing is listening" in message
    assert "retrying in the background" not in message


def test_an_unresolvable_host_is_unknown_host() -> None:
    message, seconds = _failure(TransportConfig(host="no-such-host.invalid", client_id="c"))
    assert "unknown host 'no-such-host.invalid'" in message
    assert seconds < WAIT_SECONDS / 2  # DNS failure is final: no waiting out the deadline


def test_tls_to_a_plaintext_listener_says_the_port_is_not_tls(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    ca_path, _, _ = write_test_certificates(tmp_path)
    message, seconds = _failure(
        TransportConfig(
            host=mosquitto.host,
            port=mosquitto.port,
            client_id="c",
            tls=TlsConfig(ca_certs=str(ca_path)),
        )
    )
    assert "the TLS handshake failed" in message and "needs mqtt://" in message
    assert seconds < WAIT_SECONDS / 2


def test_plaintext_to_a_tls_listener_says_wrong_port(
    tls_broker: tuple[MosquittoProcess, Path, Path],
) -> None:
    broker, _, _ = tls_broker
    message, _ = _failure(
        TransportConfig(
            host=broker.host,
            port=broker.port,
            client_id="pi-1-plain",
            username="pi-1",
            password="correct horse battery",
        )
    )
    assert "closed the connection without answering MQTT CONNECT" in message
    assert "TLS listener (use mqtts://)" in message


def test_an_unknown_user_is_not_authorised_or_bad_credentials(
    tls_broker: tuple[MosquittoProcess, Path, Path],
) -> None:
    broker, ca_path, _ = tls_broker
    config = TransportConfig(
        host=broker.host,
        port=broker.port,
        client_id="anon",
        tls=TlsConfig(ca_certs=str(ca_path)),
    )
    message, _ = _failure(config)
    assert "refused anon" in message and "not authorised" in message


def test_a_missing_ca_file_is_named_before_connecting(tmp_path: Path) -> None:
    missing = tmp_path / "gone.pem"
    config = TransportConfig(host="127.0.0.1", client_id="c", tls=TlsConfig(ca_certs=str(missing)))
    with pytest.raises(TransportError, match=f"cannot use the TLS files \\(ca {missing}"):
        MqttTransport(config)
