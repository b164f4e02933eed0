"""A real Mosquitto running the production config of `broker-config`, for attack tests.

Why: the broker is part of the security boundary (client ids, ACLs, revocation, byte
limits), so attack tests must hit the configuration operators deploy, not a lab broker.
`production_broker(folder)` builds, in a test's temporary folder:
- a self-signed CA and a server certificate for 127.0.0.1 (the `cryptography` package);
- the `broker-config` output (mosquitto.conf, dynamic-security.json, credentials.json) for
  a fleet and its devices;
- Mosquitto started from that very mosquitto.conf, changed only where a test must: the
  listener on a free loopback port, the log in a file, persistence in the folder (and
  `user root` when the tests run as root, so the broker can read its 0600 files).

It hands out each user's credentials (`ProductionBroker.credentials`, with a 0600 password
file each), TLS transports for them, and a coordinator.toml for command-line tests. Use it
from a test module through a fixture of its own::

    @pytest.fixture
    def broker(tmp_path: Path) -> Iterator[ProductionBroker]:
        with production_broker(tmp_path) as running:
            yield running
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coordinator.broker_admin import BrokerAdminConfig
from coordinator.broker_config import BrokerConfigFiles, BrokerConfigRequest, write_broker_config
from coordinator.mosquitto import (
    MosquittoConfig,
    MosquittoProcess,
    find_mosquitto,
    free_loopback_port,
)
from edge_runtime.wire import BrokerSettings, MqttTransport, WillConfig

FLEET = "school"
DEVICES = ("dev-a", "dev-b")
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Credential:
    """One broker user, as an operator would hand it out."""

    username: str
    password: str
    password_file: Path
    """The password on its first line, mode 0600 (what `[broker] password_file` names)."""


def _write_secret(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
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
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def write_test_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) for a broker on 127.0.0.1."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    server_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("schoolfl test CA", ca_key, ca_key, "schoolfl test CA", is_ca=True)
    server = _certificate(HOST, server_key, ca_key, "schoolfl test CA", is_ca=False)
    pem = serialization.Encoding.PEM
    key_bytes = server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return (
        _write_secret(folder / "ca.crt", ca.public_bytes(pem)),
        _write_secret(folder / "server.crt", server.public_bytes(pem)),
        _write_secret(folder / "server.key", key_bytes),
    )


def adapt_for_test(config_text: str, port: int, log_path: Path) -> str:
    """The production mosquitto.conf with a loopback listener and a log file."""
    lines = []
    for line in config_text.splitlines():
        if line == f"listener {port}":
            line = f"listener {port} {HOST}"
        elif line == "log_dest syslog":
            line = f"log_dest file {log_path}"
        lines.append(line)
    if os.geteuid() == 0:
        lines.append("user root")
    return "\n".join(lines) + "\n"


@dataclass
class ProductionBroker:
    """A running production broker and the credentials of its users."""

    process: MosquittoProcess
    fleet: str
    folder: Path
    ca_file: Path
    files: BrokerConfigFiles
    request: BrokerConfigRequest
    credentials: dict[str, Credential]

    @property
    def url(self) -> str:
        return f"mqtts://{HOST}:{self.process.port}"

    @property
    def coordinator_user(self) -> str:
        return self.request.coordinator_user

    @property
    def admin_user(self) -> str:
        return self.request.admin_user

    def add_credential(self, username: str, password: str) -> Credential:
        """Record a user created later (e.g. by `add-device`)."""
        path = _write_secret(self.folder / "secrets" / username, password.encode() + b"\n")
        self.credentials[username] = Credential(username, password, path)
        return self.credentials[username]

    def settings(self, username: str) -> BrokerSettings:
        """The `[broker]` table a daemon of this user would have."""
        credential = self.credentials[username]
        return BrokerSettings(
            url=self.url,
            username=username,
            password_file=str(credential.password_file),
            ca_file=str(self.ca_file),
        )

    def transport(
        self,
        username: str,
        client_id: str | None = None,
        clean_session: bool = False,
        will: WillConfig | None = None,
    ) -> MqttTransport:
        """A TLS transport with `username`'s credential; the client id defaults to the
        username (what the broker uses whatever a client sends)."""
        config = self.settings(username).transport_config(client_id or username, will)
        config = dataclasses.replace(config, clean_session=clean_session, keepalive_seconds=10)
        return MqttTransport(config)

    def admin_config(self, timeout_seconds: float = 10.0) -> BrokerAdminConfig:
        """The `[broker_admin]` table of a coordinator of this broker."""
        return BrokerAdminConfig(
            username=self.admin_user,
            password_file=str(self.credentials[self.admin_user].password_file),
            timeout_seconds=timeout_seconds,
        )

    def coordinator_toml(self, state_dir: Path) -> Path:
        """A coordinator.toml (no tasks) for command-line tests against this broker."""
        coordinator = self.credentials[self.coordinator_user]
        admin = self.credentials[self.admin_user]
        path = self.folder / "coordinator.toml"
        path.write_text(
            "[coordinator]\n"
            f'fleet = "{self.fleet}"\n'
            f'state_dir = "{state_dir}"\n'
            "[broker]\n"
            f'url = "{self.url}"\n'
            f'username = "{self.coordinator_user}"\n'
            f'password_file = "{coordinator.password_file}"\n'
            f'ca_file = "{self.ca_file}"\n'
            "[broker_admin]\n"
            f'username = "{self.admin_user}"\n'
            f'password_file = "{admin.password_file}"\n'
            "timeout_seconds = 10.0\n"
        )
        return path


@contextmanager
def production_broker(
    folder: Path,
    fleet: str = FLEET,
    device_ids: tuple[str, ...] = DEVICES,
    **request_options: object,
) -> Iterator[ProductionBroker]:
    """Generate the production config for `device_ids` under `folder` and run it.

    `request_options` go to `BrokerConfigRequest` (e.g. a smaller `max_queued_bytes`)."""
    binary = find_mosquitto()
    if binary is None:
        message = "mosquitto is not installed (apt-get install -y mosquitto)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    ca_file, certfile, keyfile = write_test_certificates(folder / "tls")
    workdir = folder / "broker"
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_loopback_port()
    request = BrokerConfigRequest(
        fleet=fleet,
        device_ids=device_ids,
        output_dir=folder / "config",
        port=port,
        tls_certfile=str(certfile),
        tls_keyfile=str(keyfile),
        persistence_location=f"{workdir}/",
        **request_options,  # type: ignore[arg-type]
    )
    files = write_broker_config(request)
    config_text = adapt_for_test(files.config_path.read_text(), port, workdir / "mosquitto.log")
    process = MosquittoProcess(
        MosquittoConfig(workdir=workdir, port=port, host=HOST, prepared_config=config_text),
        binary=binary,
    )
    broker = ProductionBroker(process, fleet, folder, ca_file, files, request, {})
    for username, password in files.passwords.items():
        broker.add_credential(username, password)
    process.start()
    try:
        yield broker
    finally:
        process.stop()
