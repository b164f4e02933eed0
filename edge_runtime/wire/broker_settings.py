"""The `[broker]` table both daemons' TOML files share, turned into a `TransportConfig`.

Operators write a URL (`mqtt://host:1883`, `mqtts://host:8883`) and point at a password
file rather than putting the password in the config (config files get copied around).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from edge_runtime.wire.receive_queue import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_MESSAGES,
    ReceiveQueueConfig,
)
from edge_runtime.wire.transport import TlsConfig, TransportConfig, WillConfig

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class BrokerSettings:
    url: str = "mqtt://127.0.0.1:1883"
    """mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS)."""
    username: str | None = None
    """Broker user; for a device, its device id (the ACL pattern keys on it)."""
    password_file: str | None = None
    """File holding the broker password on its first line (mode 0600)."""
    ca_file: str | None = None
    """CA bundle for mqtts://; empty uses the system trust store."""
    tls_insecure: bool = False
    """Skip TLS hostname checks: only for a lab broker with a self-signed certificate."""
    bandwidth_limit_bytes_per_second: float | None = None
    """Cap on outgoing bytes per second (emulates or respects a slow school uplink)."""
    receive_queue_max_messages: int = DEFAULT_MAX_MESSAGES
    """Received messages waiting for the daemon's loop; more are dropped and counted."""
    receive_queue_max_bytes: int = DEFAULT_MAX_BYTES
    """Received bytes waiting for the daemon's loop (64 MiB); more are dropped and counted.
    On an agent, keep it above the largest global adapter it downloads (its chunks arrive
    at once, and may wait while the loop trains)."""

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ValueError(
                f"broker url {self.url!r} must look like mqtt://HOST:PORT or mqtts://HOST:PORT"
            )
        try:
            _ = parts.port
        except ValueError as error:
            raise ValueError(f"broker url {self.url!r} has a bad port: {error}") from None
        if self.password_file and not self.username:
            raise ValueError("broker password_file is set but username is not")
        if self.bandwidth_limit_bytes_per_second is not None and (
            self.bandwidth_limit_bytes_per_second <= 0
        ):
            raise ValueError("bandwidth_limit_bytes_per_second must be > 0 when set")
        self.receive_queue().validate()

    def receive_queue(self) -> ReceiveQueueConfig:
        return ReceiveQueueConfig(self.receive_queue_max_messages, self.receive_queue_max_bytes)

    @classmethod
    def from_table(cls, table: dict[str, object]) -> BrokerSettings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"unknown keys in [broker]: {unknown}; known: {sorted(known)}")
        values = {key: (None if value == "" else value) for key, value in table.items()}
        return cls(**values)  # type: ignore[arg-type]

    @property
    def host(self) -> str:
        return str(urlsplit(self.url).hostname)

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or DEFAULT_PORTS[parts.scheme]

    def read_password(self) -> str | None:
        if not self.password_file:
            return None
        path = Path(self.password_file).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as error:
            raise ValueError(f"cannot read broker password_file {path}: {error}") from None
        if not lines or not lines[0]:
            raise ValueError(f"broker password_file {path} is empty")
        return lines[0]

    def transport_config(self, client_id: str, will: WillConfig | None = None) -> TransportConfig:
        tls = None
        if urlsplit(self.url).scheme == "mqtts":
            tls = TlsConfig(ca_certs=self.ca_file, insecure=self.tls_insecure)
        config = TransportConfig(
            host=self.host,
            port=self.port,
            client_id=client_id,
            username=self.username,
            password=self.read_password(),
            tls=tls,
            will=will,
            bandwidth_limit_bytes_per_second=self.bandwidth_limit_bytes_per_second,
            receive=self.receive_queue(),
        )
        config.validate()
        return config
