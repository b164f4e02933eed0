"""Generate a production Mosquitto config: TLS listener, per-client roles, byte limits.

Why each part (docs/coordinator.md, "broker-config", has the operator's view):
- Client ids are bound to usernames (`use_username_as_clientid`): the broker replaces the
  client id a client sends with its username, so one credential can hold exactly one
  session, its own. Without it any device could connect as `schoolfl-coordinator` (or as
  another device), disconnect it and, with a clean session, wipe its queued messages.
- Clients, roles and ACLs live in Mosquitto's dynamic-security plugin
  (`dynamic-security.json`), changed at run time: `revoke` removes one device from the
  broker at once and `add-device` adds one, with no other password regenerated. The roles
  are in coordinator/broker_acl.py: a device may publish to exactly its six protocol topics.
- Byte limits: `message_size_limit` is the protocol's largest message (a 512 KiB chunk with
  its header); a packet twice that size disconnects its sender before the broker reads it
  (`max_packet_size`); each client's queue is capped in messages and bytes; a session
  unused for `persistent_client_expiration` is dropped.

Three users: the coordinator (the fleet tree, plus the admin role so the daemon can remove
revoked devices), an admin user for the command line (`add-device`, `revoke`; dynamic
security commands only) and one per device. Passwords are random; the clear text is written
once to `credentials.json` (mode 0600), the plugin's file holds PBKDF2-SHA512 hashes in the
plugin's own format. Every file is written atomically.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.broker_acl import (
    ADMIN_ROLE,
    COORDINATOR_ROLE,
    DEFAULT_ACL_ACCESS,
    admin_role,
    coordinator_role,
    device_role,
    device_role_name,
)
from durable.atomic_files import atomic_write_bytes
from edge_runtime.wire import DEFAULT_CHUNK_BYTES, Limits, SchemaError, check_identifier

logger = logging.getLogger(__name__)

DEFAULT_COORDINATOR_USER = "coordinator"
DEFAULT_ADMIN_USER = "schoolfl-admin"
DYNAMIC_SECURITY_FILE = "dynamic-security.json"
DYNAMIC_SECURITY_PLUGINS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/arm-linux-gnueabihf/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
"""Where Debian/Ubuntu (amd64, arm64, armhf) and a source install put the plugin."""

PASSWORD_ITERATIONS = 101
"""PBKDF2 rounds, as the plugin's own `createClient` uses. The passwords are 24 random
bytes, so stretching would add nothing but CPU time on every connect."""
PASSWORD_SALT_BYTES = 12
"""The salt length the plugin of Mosquitto 2.0 requires (it refuses other lengths)."""

FRAME_OVERHEAD_BYTES = 8 + 64
"""Frame prefix (magic, version, flags, header length) and Ed25519 signature."""
PROTOCOL_MESSAGE_BYTES = FRAME_OVERHEAD_BYTES + Limits().max_header_bytes + DEFAULT_CHUNK_BYTES
"""The largest payload the protocol publishes: a chunk (512 KiB) with the largest header a
frame may have (an unchunked update is at most one chunk long; model blobs are 256 KiB)."""
DEFAULT_MAX_QUEUED_BYTES = 64 * 1024 * 1024
"""Per client: a coordinator away for a restart still finds a round's uploads queued (and
an upload that overflowed it resumes through a transfer-status request)."""
DEFAULT_MAX_QUEUED_MESSAGES = 10_000
"""Per client: a day of coordinator heartbeats for an offline device."""
DEFAULT_SESSION_EXPIRATION = "14d"
"""A device away longer (holidays) starts a fresh session: it subscribes again on connect
and finds its assignment, the status and the models retained; its outbox re-sends whatever
was not acknowledged."""

_EXPIRATION = re.compile(r"^[1-9][0-9]*[hdwmy]$")


class BrokerConfigError(RuntimeError):
    """The inputs are invalid, or a tool the generator needs is missing or failed."""


def find_dynamic_security_plugin() -> str:
    """This host's plugin if it has one, else the Debian amd64 path (override it with
    `--dynsec-plugin` when the broker host differs)."""
    for candidate in DYNAMIC_SECURITY_PLUGINS:
        if Path(candidate).is_file():
            return candidate
    return DYNAMIC_SECURITY_PLUGINS[0]


@dataclass(frozen=True)
class BrokerConfigRequest:
    """What `schoolfl coordinator broker-config` was asked for."""

    fleet: str
    device_ids: tuple[str, ...]
    """Devices given a broker client now; more are added later with `add-device`."""
    output_dir: Path
    coordinator_user: str = DEFAULT_COORDINATOR_USER
    admin_user: str = DEFAULT_ADMIN_USER
    port: int = 8883
    """8883 with TLS (the default for production), 1883 without."""
    tls_certfile: str | None = "/etc/mosquitto/certs/server.crt"
    tls_keyfile: str | None = "/etc/mosquitto/certs/server.key"
    tls_cafile: str | None = None
    persistence_location: str = "/var/lib/mosquitto/"
    install_dir: Path | None = None
    """Where dynamic-security.json will live on the broker host (mosquitto.conf names it);
    the broker rewrites it on every change, so the mosquitto user must be able to write
    there. None: `output_dir` itself, for a broker run from that folder."""
    dynsec_plugin: str | None = None
    """Path of mosquitto_dynamic_security.so on the broker host; None: found here."""
    password_length: int = 24
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES
    session_expiration: str = DEFAULT_SESSION_EXPIRATION
    """`persistent_client_expiration`: a number and one of h d w m y."""

    def validate(self) -> None:
        try:
            check_identifier("fleet", self.fleet)
            check_identifier("coordinator_user", self.coordinator_user)
            check_identifier("admin_user", self.admin_user)
            for device_id in self.device_ids:
                check_identifier("device_id", device_id)
        except SchemaError as error:
            raise BrokerConfigError(str(error)) from error
        if len(set(self.device_ids)) != len(self.device_ids):
            raise BrokerConfigError("device ids must be unique")
        if self.admin_user == self.coordinator_user:
            raise BrokerConfigError("admin_user and coordinator_user must differ")
        for user in (self.coordinator_user, self.admin_user):
            if user in self.device_ids:
                raise BrokerConfigError(f"a device may not be called {user!r} (a broker user)")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise BrokerConfigError("give both the TLS certificate and key, or neither")
        if self.max_queued_bytes < 4 * PROTOCOL_MESSAGE_BYTES:
            raise BrokerConfigError(
                f"max_queued_bytes must hold at least 4 of the protocol's largest messages "
                f"(>= {4 * PROTOCOL_MESSAGE_BYTES}), got {self.max_queued_bytes}"
            )
        if self.max_queued_messages < 100:
            raise BrokerConfigError(
                f"max_queued_messages must be >= 100, got {self.max_queued_messages}"
            )
        if not _EXPIRATION.match(self.session_expiration):
            raise BrokerConfigError(
                "session_expiration must be a number followed by h, d, w, m or y (e.g. 14d), "
                f"got {self.session_expiration!r}"
            )
        if self.password_length < 16:
            raise BrokerConfigError(f"password_length must be >= 16, got {self.password_length}")


@dataclass(frozen=True)
class BrokerConfigFiles:
    config_path: Path
    dynamic_security_path: Path
    credentials_path: Path
    passwords: dict[str, str] = field(repr=False)
    """username -> clear-text password (also in credentials_path)."""


def hash_password(password: str, salt: bytes | None = None) -> dict[str, object]:
    """`{"password", "salt", "iterations"}` as the plugin stores them: base64 of
    PBKDF2-HMAC-SHA512 (64 bytes) over a 12-byte salt."""
    salt = secrets.token_bytes(PASSWORD_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PASSWORD_ITERATIONS, 64)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": PASSWORD_ITERATIONS,
    }


def _client_entry(username: str, password: str, roles: list[str], text: str) -> dict[str, object]:
    return {
        "username": username,
        "textname": text,
        "roles": [{"rolename": role, "priority": 0} for role in roles],
        **hash_password(password),
    }


def dynamic_security_document(
    request: BrokerConfigRequest, passwords: dict[str, str]
) -> dict[str, object]:
    """The plugin's configuration: default deny, the three kinds of users and their roles."""
    clients = [
        _client_entry(
            request.coordinator_user,
            passwords[request.coordinator_user],
            [COORDINATOR_ROLE, ADMIN_ROLE],
            "schoolfl coordinator",
        ),
        _client_entry(
            request.admin_user,
            passwords[request.admin_user],
            [ADMIN_ROLE],
            "schoolfl command line (add-device, revoke)",
        ),
    ]
    clients += [
        _client_entry(
            device_id,
            passwords[device_id],
            [device_role_name(device_id)],
            f"schoolfl device {device_id}",
        )
        for device_id in request.device_ids
    ]
    roles = [coordinator_role(request.fleet), admin_role()]
    roles += [device_role(request.fleet, device_id) for device_id in request.device_ids]
    return {
        "defaultACLAccess": dict(DEFAULT_ACL_ACCESS),
        "clients": clients,
        "groups": [],
        "roles": [role.to_json() for role in roles],
    }


def render_config(request: BrokerConfigRequest, dynamic_security_path: Path) -> str:
    """mosquitto.conf for production: no anonymous access, dynamic security, client ids
    bound to usernames, byte limits, persistence, TLS when given."""
    plugin = request.dynsec_plugin or find_dynamic_security_plugin()
    lines = [
        f"# Generated by `schoolfl coordinator broker-config` for fleet {request.fleet}.",
        "# See docs/coordinator.md (broker-config) and docs/protocol.md (topics, limits).",
        "per_listener_settings false",
        "allow_anonymous false",
        "",
        "# Clients, roles and ACLs: the dynamic-security plugin. The broker rewrites this file",
        "# on every change (add-device, revoke): never overwrite it once the broker runs.",
        f"plugin {plugin}",
        f"plugin_opt_config_file {dynamic_security_path}",
        "",
        "persistence true",
        f"persistence_location {request.persistence_location}",
        "autosave_interval 60",
        "",
        f"# The protocol's largest message: a {DEFAULT_CHUNK_BYTES // 1024} KiB chunk and its "
        "header.",
        f"message_size_limit {PROTOCOL_MESSAGE_BYTES}",
        "# A larger packet disconnects its sender before the broker reads it into memory.",
        f"max_packet_size {2 * PROTOCOL_MESSAGE_BYTES}",
        "# Per client: what the broker queues while a client is away.",
        f"max_queued_messages {request.max_queued_messages}",
        f"max_queued_bytes {request.max_queued_bytes}",
        f"persistent_client_expiration {request.session_expiration}",
        "# A retained message is delivered only while its publisher may still publish there",
        "# (a removed device's retained messages go quiet).",
        "check_retain_source true",
        "",
        "log_dest syslog",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "",
        f"listener {request.port}",
        "# The client id is the username: one credential, one session (its own).",
        "use_username_as_clientid true",
    ]
    if request.tls_certfile is not None:
        lines += [f"certfile {request.tls_certfile}", f"keyfile {request.tls_keyfile}"]
        if request.tls_cafile is not None:
            lines.append(f"cafile {request.tls_cafile}")
        lines.append("tls_version tlsv1.2")
    return "\n".join(lines) + "\n"


def hash_password_file(plain_lines: dict[str, str], destination: Path) -> None:
    """A Mosquitto `password_file` (for brokers without the plugin, e.g. a test broker):
    write `user:password` lines, hash them in place with `mosquitto_passwd -U`, then move
    the hashed file over `destination` atomically. The clear-text temp file is 0600 and
    never leaves `destination`'s folder."""
    candidates = ("/usr/bin/mosquitto_passwd", "/usr/sbin/mosquitto_passwd")
    binary = shutil.which("mosquitto_passwd") or next(
        (path for path in candidates if Path(path).exists()), None
    )
    if binary is None:
        raise BrokerConfigError(
            "mosquitto_passwd not found (Debian/Ubuntu: apt-get install -y mosquitto)"
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=".passwd.", dir=destination.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.writelines(f"{user}:{password}\n" for user, password in plain_lines.items())
        result = subprocess.run(
            [binary, "-U", temp_name], capture_output=True, text=True, check=False, timeout=60
        )
        if result.returncode != 0:
            raise BrokerConfigError(
                f"mosquitto_passwd -U failed ({result.returncode}): {result.stderr.strip()}"
            )
        with open(temp_name, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp_name, destination)
    finally:
        Path(temp_name).unlink(missing_ok=True)


def new_password(length: int = 24) -> str:
    """A random broker password (URL-safe: no ':' or newline)."""
    return secrets.token_urlsafe(length)


def load_credentials(path: Path) -> dict[str, str]:
    """username -> password from an earlier `credentials.json` (to keep them)."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise BrokerConfigError(f"cannot read credentials from {path}: {error}") from None
    passwords = document.get("passwords") if isinstance(document, dict) else None
    if not isinstance(passwords, dict) or not all(
        isinstance(user, str) and isinstance(password, str) for user, password in passwords.items()
    ):
        raise BrokerConfigError(f"{path} has no 'passwords' table of user -> password")
    return passwords


def write_broker_config(
    request: BrokerConfigRequest, passwords: dict[str, str] | None = None
) -> BrokerConfigFiles:
    """Write mosquitto.conf, dynamic-security.json and credentials.json into
    `request.output_dir`.

    `passwords` (username -> password) overrides generated ones, e.g. to keep the passwords
    devices already have when moving an older broker setup to this one."""
    request.validate()
    output = Path(request.output_dir)
    users = [request.coordinator_user, request.admin_user, *request.device_ids]
    chosen = {user: new_password(request.password_length) for user in users}
    chosen.update({user: pw for user, pw in (passwords or {}).items() if user in chosen})
    for user, password in chosen.items():
        if not password or ":" in password or "\n" in password:
            raise BrokerConfigError(f"password for {user!r} is empty or contains ':' / newline")
    dynamic_security_path = output / DYNAMIC_SECURITY_FILE
    config_path = output / "mosquitto.conf"
    credentials_path = output / "credentials.json"
    document = dynamic_security_document(request, chosen)
    atomic_write_bytes(
        dynamic_security_path, json.dumps(document, indent=2).encode() + b"\n", 0o600
    )
    install_dir = Path(request.install_dir) if request.install_dir else output.resolve()
    config_text = render_config(request, install_dir / DYNAMIC_SECURITY_FILE)
    atomic_write_bytes(config_path, config_text.encode(), 0o644)
    credentials = {
        "fleet": request.fleet,
        "coordinator_user": request.coordinator_user,
        "admin_user": request.admin_user,
        "passwords": chosen,
    }
    atomic_write_bytes(
        credentials_path, json.dumps(credentials, indent=2, sort_keys=True).encode(), 0o600
    )
    logger.info("wrote broker config for %d devices into %s", len(request.device_ids), output)
    return BrokerConfigFiles(config_path, dynamic_security_path, credentials_path, chosen)
