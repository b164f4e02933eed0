"""TLS and credentials on a real Mosquitto: the transport verifies the server certificate."""

from __future__ import annotations

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
        with pytest.raises(TransportError):
            transport.start(3.0)
        assert not transport.connected.is_set()
    finally:
        transport.stop()


def test_tls_with_a_wrong_password_is_refused(
    tls_broker: tuple[MosquittoProcess, Path, Path],
) -> None:
    broker, ca_path, _ = tls_broker
    transport = _client(broker, ca_path, "wrong")
    try:
        with pytest.raises(TransportError, match="refused"):
            transport.start(WAIT_SECONDS)
    finally:
        transport.stop()
