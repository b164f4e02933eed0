"""TLS and credentials on a real Mosquitto: the transport verifies the server certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coordinator.broker_config import hash_password_file
from coordinator.mosquitto import MosquittoConfig, MosquittoProcess, find_mosquitto
from edge_runtime.wire import MqttTransport, TlsConfig, TransportConfig, TransportError

pytestmark = pytest.mark.integration

WAIT_SECONDS = 10.0


def _write_pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: str,
    is_ca: bool,
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[MosquittoProcess, Path, Path]]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    server_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("schoolfl test CA", ca_key, ca_key, "schoolfl test CA", is_ca=True)
    server = _certificate("127.0.0.1", server_key, ca_key, "schoolfl test CA", is_ca=False)
    pem = serialization.Encoding.PEM
    ca_path = _write_pem(tmp_path / "ca.crt", ca.public_bytes(pem))
    cert_path = _write_pem(tmp_path / "server.crt", server.public_bytes(pem))
    key_path = _write_pem(
        tmp_path / "server.key",
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    other_ca_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = _certificate("other CA", other_ca_key, other_ca_key, "other CA", is_ca=True)
    other_ca_path = _write_pem(tmp_path / "other-ca.crt", other_ca.public_bytes(pem))
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
