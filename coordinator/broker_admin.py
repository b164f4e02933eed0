"""Broker administration through Mosquitto's dynamic-security plugin.

Why: revoking a device at the coordinator alone left it its broker password and ACL, so it
kept receiving every new global model and could keep flooding. With the plugin, clients and
roles change at run time through `$CONTROL/dynamic-security/v1`: deleting a device's client
disconnects it at once (without its last will) and it cannot reconnect; the broker also stops
delivering to its stored session (the read ACL of a user that no longer exists is denied).

The pieces, top-down:
- plain functions that build commands (JSON objects) and parse the plugin's replies;
- `BrokerRevocations`: the daemon's bookkeeping. Every tick it is given the revoked devices;
  it returns the commands to publish for those the broker has not confirmed removed yet
  (re-sent after `retry_seconds` without a reply), and it reads the replies. Idempotent: a
  device the broker does not know counts as removed;
- `BrokerAdminClient`: what the command line uses (`add-device`, `revoke`): a short-lived
  connection as the admin user, a batch of commands, their replies.

Replies go to every subscriber of `$CONTROL/dynamic-security/v1/response`, so each command
carries a correlation id with a per-sender prefix and each side reads only its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

from coordinator.broker_acl import CONTROL_TOPIC, RESPONSE_TOPIC, device_role, device_role_name
from coordinator.outgoing import Outgoing
from coordinator.retained_guard import clear_device_retained
from edge_runtime.wire import BrokerSettings, MqttTransport, check_identifier

logger = logging.getLogger(__name__)

COMMANDS_PER_MESSAGE = 100
"""Commands batched into one control message (a few KiB, far below the size limit)."""

CLIENT_NOT_FOUND = "Client not found"
ROLE_NOT_FOUND = "Role not found"
ROLE_EXISTS = "Role already exists"
CLIENT_EXISTS = "Client already exists"
"""The plugin's own error strings (Mosquitto 2.0), matched to tell "already done" apart."""


class BrokerAdminError(RuntimeError):
    """The broker refused a command, did not answer, or answered something unreadable."""


@dataclass(frozen=True)
class BrokerAdminConfig:
    """`[broker_admin]` in coordinator.toml. Present when the broker runs the
    dynamic-security config that `schoolfl coordinator broker-config` writes: the daemon then
    removes revoked devices from the broker, and `add-device` / `revoke` talk to it."""

    username: str
    """The admin broker user `broker-config` created (`schoolfl-admin` by default). Only the
    command line connects as it; the daemon uses its own connection (the coordinator user
    holds the admin role too), so the two never take over each other's session."""
    password_file: str
    """File holding the admin user's password on its first line (mode 0600)."""
    timeout_seconds: float = 10.0
    """How long a command-line operation waits for the broker's reply."""
    retry_seconds: float = 30.0
    """How long the daemon waits for the broker to confirm a revocation before sending it
    again."""

    def __post_init__(self) -> None:
        try:
            check_identifier("username", self.username)
        except ValueError as error:
            raise ValueError(f"[broker_admin] {error}") from None
        if not isinstance(self.password_file, str) or not self.password_file:
            raise ValueError("[broker_admin] password_file must name the admin password file")
        for name in ("timeout_seconds", "retry_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"[broker_admin] {name} must be a number > 0, got {value!r}")


# -- commands and replies -------------------------------------------------------------------


@dataclass(frozen=True)
class DynsecReply:
    """One entry of the plugin's `responses` list."""

    command: str
    correlation_data: str | None
    error: str | None
    data: dict[str, object] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def create_device_commands(
    fleet: str, device_id: str, password: str, correlation_prefix: str
) -> list[dict[str, object]]:
    """Create the device's role (its exact topics) and its client holding that role."""
    role = device_role(fleet, device_id)
    return [
        {
            "command": "createRole",
            **role.to_json(),
            "correlationData": f"{correlation_prefix}/createRole/{device_id}",
        },
        {
            "command": "createClient",
            "username": device_id,
            "password": password,
            "textname": f"schoolfl device {device_id}",
            "roles": [{"rolename": role.name, "priority": 0}],
            "correlationData": f"{correlation_prefix}/createClient/{device_id}",
        },
    ]


def remove_device_commands(device_id: str, correlation_prefix: str) -> list[dict[str, object]]:
    """Delete the device's client (the broker disconnects it, without its will) and role."""
    return [
        {
            "command": "deleteClient",
            "username": device_id,
            "correlationData": f"{correlation_prefix}/deleteClient/{device_id}",
        },
        {
            "command": "deleteRole",
            "rolename": device_role_name(device_id),
            "correlationData": f"{correlation_prefix}/deleteRole/{device_id}",
        },
    ]


def set_password_commands(
    device_id: str, password: str, correlation_prefix: str
) -> list[dict[str, object]]:
    """Give an existing device client a new password (a device that lost its own)."""
    check_identifier("device_id", device_id)
    return [
        {
            "command": "setClientPassword",
            "username": device_id,
            "password": password,
            "correlationData": f"{correlation_prefix}/setClientPassword/{device_id}",
        }
    ]


def control_payloads(commands: list[dict[str, object]]) -> list[bytes]:
    """`{"commands": [...]}` messages of at most `COMMANDS_PER_MESSAGE` commands each."""
    return [
        json.dumps({"commands": commands[start : start + COMMANDS_PER_MESSAGE]}).encode()
        for start in range(0, len(commands), COMMANDS_PER_MESSAGE)
    ]


def parse_replies(payload: bytes) -> list[DynsecReply]:
    """The replies in one message of `$CONTROL/dynamic-security/v1/response`."""
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BrokerAdminError(f"dynamic-security reply is not JSON: {error}") from None
    responses = document.get("responses") if isinstance(document, dict) else None
    if not isinstance(responses, list):
        raise BrokerAdminError(f"dynamic-security reply has no 'responses' list: {payload[:200]!r}")
    replies = []
    for entry in responses:
        if not isinstance(entry, dict) or not isinstance(entry.get("command"), str):
            raise BrokerAdminError(f"dynamic-security reply entry without a command: {entry!r}")
        correlation = entry.get("correlationData")
        error = entry.get("error")
        data = entry.get("data")
        replies.append(
            DynsecReply(
                command=entry["command"],
                correlation_data=correlation if isinstance(correlation, str) else None,
                error=str(error) if error is not None else None,
                data=data if isinstance(data, dict) else None,
            )
        )
    return replies


def _correlation_prefix(owner: str) -> str:
    return f"schoolfl/{owner}/{secrets.token_hex(6)}"


def _reply_subject(reply: DynsecReply, prefix: str) -> str | None:
    """The device id a reply to one of our commands is about; None for others' replies."""
    correlation = reply.correlation_data or ""
    if not correlation.startswith(prefix + "/"):
        return None
    command, _, device_id = correlation[len(prefix) + 1 :].partition("/")
    return device_id if command == reply.command and device_id else None


# -- the daemon's side ----------------------------------------------------------------------


class BrokerRevocations:
    """Which revoked devices the broker has confirmed removed, and what to send for the rest.

    The daemon calls `due(revoked, now)` every tick with the store's revoked devices and
    publishes what it returns; it hands every message of `RESPONSE_TOPIC` to
    `accept_reply`. After a restart nothing is confirmed, so every revoked device is sent
    once more (one batch); the broker answers "Client not found" and that confirms it."""

    def __init__(self, fleet: str, retry_seconds: float = 30.0) -> None:
        check_identifier("fleet", fleet)
        self.fleet = fleet
        self.retry_seconds = retry_seconds
        self.removed: set[str] = set()
        """Devices the broker confirmed it has no client for (removed now, or never had)."""
        self._sent_at: dict[str, float] = {}
        self._prefix = _correlation_prefix("coordinator")

    def pending(self) -> set[str]:
        """Revocations sent and not yet confirmed."""
        return set(self._sent_at)

    def due(self, revoked: Iterable[str], now: float) -> list[Outgoing]:
        """Commands for the revoked devices not confirmed removed and not sent within
        `retry_seconds`, followed by empty retained messages on their topics (after the
        removal, in the broker's order, so the device cannot publish its state again)."""
        devices = []
        for device_id in sorted(set(revoked) - self.removed):
            sent_at = self._sent_at.get(device_id)
            if sent_at is not None and now - sent_at < self.retry_seconds:
                continue
            if sent_at is not None:
                logger.warning(
                    "no reply from the broker's dynamic-security plugin about revoked device "
                    "%s for %.0f s; sending it again (does the broker run the config of "
                    "`schoolfl coordinator broker-config`?)",
                    device_id,
                    now - sent_at,
                )
            self._sent_at[device_id] = now
            devices.append(device_id)
        if not devices:
            return []
        logger.info("removing %d revoked device(s) from the broker: %s", len(devices), devices)
        commands = [c for d in devices for c in remove_device_commands(d, self._prefix)]
        outgoing = [Outgoing(CONTROL_TOPIC, payload) for payload in control_payloads(commands)]
        for device_id in devices:
            outgoing += clear_device_retained(self.fleet, device_id)
        return outgoing

    def accept_reply(self, payload: bytes) -> list[str]:
        """Read one reply message; returns the devices it confirmed removed. Never raises:
        an unreadable reply is logged and the revocation is sent again later."""
        try:
            replies = parse_replies(payload)
        except BrokerAdminError as error:
            logger.warning("ignoring a dynamic-security reply: %s", error)
            return []
        confirmed = []
        for reply in replies:
            device_id = _reply_subject(reply, self._prefix)
            if device_id is None or reply.command != "deleteClient":
                continue
            if reply.error not in (None, CLIENT_NOT_FOUND):
                logger.warning(
                    "the broker refused to remove revoked device %s: %s; retrying in %.0f s",
                    device_id,
                    reply.error,
                    self.retry_seconds,
                )
                continue
            self.removed.add(device_id)
            self._sent_at.pop(device_id, None)
            confirmed.append(device_id)
            logger.info(
                "revoked device %s is off the broker (%s)",
                device_id,
                "disconnected; it cannot reconnect" if reply.ok else "it had no broker client",
            )
        return confirmed


# -- the command line's side ----------------------------------------------------------------


class BrokerAdminClient:
    """A short-lived admin connection for the command line: connect, send, read, leave."""

    transport_class: type[MqttTransport] = MqttTransport
    """The transport factory; tests can swap in a subclass."""

    def __init__(self, broker: BrokerSettings, admin: BrokerAdminConfig) -> None:
        self.broker = dataclasses.replace(
            broker, username=admin.username, password_file=admin.password_file
        )
        self.admin = admin
        self._prefix = _correlation_prefix("cli")

    def run(self, commands: list[dict[str, object]]) -> list[DynsecReply]:
        """Send `commands` and return the replies to them, in the order sent."""
        if not commands:
            return []
        config = dataclasses.replace(
            self.broker.transport_config(self.admin.username), clean_session=True
        )
        transport = self.transport_class(config)
        transport.subscribe(RESPONSE_TOPIC)  # sent before our commands, on the same link
        expected = [str(command["correlationData"]) for command in commands]
        answers: dict[str, DynsecReply] = {}
        try:
            transport.start(self.admin.timeout_seconds)
            for payload in control_payloads(commands):
                transport.publish(CONTROL_TOPIC, payload)
            deadline = time.monotonic() + self.admin.timeout_seconds
            while len(answers) < len(expected):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = [c for c in expected if c not in answers]
                    raise BrokerAdminError(
                        f"no reply from the broker's dynamic-security plugin within "
                        f"{self.admin.timeout_seconds:.0f} s for {missing}; does the broker run "
                        "the config of `schoolfl coordinator broker-config`?"
                    )
                try:
                    message = transport.received.get(timeout=remaining)
                except queue.Empty:
                    continue
                if message.topic != RESPONSE_TOPIC:
                    continue
                for reply in parse_replies(message.payload):
                    if reply.correlation_data in expected:
                        answers[reply.correlation_data] = reply
        finally:
            transport.stop()
        return [answers[correlation] for correlation in expected]

    def add_device(self, fleet: str, device_id: str, password: str) -> None:
        """Create the device's role and client; `BrokerAdminError` if it already exists."""
        replies = self.run(create_device_commands(fleet, device_id, password, self._prefix))
        role_reply, client_reply = replies
        if role_reply.error not in (None, ROLE_EXISTS):
            raise BrokerAdminError(
                f"the broker refused the role of {device_id}: {role_reply.error}"
            )
        if client_reply.error == CLIENT_EXISTS:
            raise BrokerAdminError(
                f"{device_id} already has a broker client; give it a new password with "
                "`schoolfl coordinator add-device --new-password`"
            )
        if client_reply.error is not None:
            raise BrokerAdminError(f"the broker refused client {device_id}: {client_reply.error}")
        logger.info("created broker client %s", device_id)

    def set_password(self, device_id: str, password: str) -> None:
        """New password for an existing device client."""
        (reply,) = self.run(set_password_commands(device_id, password, self._prefix))
        if reply.error is not None:
            raise BrokerAdminError(
                f"the broker refused a new password for {device_id}: {reply.error}"
            )

    def remove_device(self, device_id: str) -> bool:
        """Delete the device's client and role: True if it had a client (now disconnected
        for good), False if the broker did not know it."""
        client_reply, role_reply = self.run(remove_device_commands(device_id, self._prefix))
        for reply in (client_reply, role_reply):
            if reply.error not in (None, CLIENT_NOT_FOUND, ROLE_NOT_FOUND):
                raise BrokerAdminError(
                    f"the broker refused to remove {device_id} ({reply.command}): {reply.error}"
                )
        return client_reply.ok
