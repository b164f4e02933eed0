"""Broker administration (coordinator/broker_admin.py) and the retained guard
(coordinator/retained_guard.py): the commands and their bookkeeping without a broker, then
the daemon's side against the production broker.

`BrokerManagingDaemon` is the change issue 16 asks of coordinator/daemon.py (the report of
that issue gives it as a patch); until it is merged there, this subclass carries it, so the
test exercises the real daemon loop with it. Once merged, the subclass changes nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from coordinator.broker_acl import CONTROL_TOPIC, RESPONSE_TOPIC
from coordinator.broker_admin import (
    COMMANDS_PER_MESSAGE,
    BrokerAdminError,
    BrokerRevocations,
    control_payloads,
    create_device_commands,
    parse_replies,
    remove_device_commands,
)
from coordinator.cli import coordinator_group
from coordinator.config import CoordinatorConfig, CoordinatorConfigError, CoordinatorSettings
from coordinator.daemon import CoordinatorDaemon
from coordinator.retained_guard import (
    RETAINED_SWEEP_SECONDS,
    forbidden_retained,
    retained_sweep_filters,
)
from coordinator.store import CoordinatorStore
from device_profiles.profile import find_profile, profile_toml_text
from edge_runtime.wire import (
    DeviceChannel,
    ReceivedMessage,
    TransportError,
    device_topic,
    generate_private_key,
    public_key_hex,
)
from tests.production_broker import FLEET, ProductionBroker, production_broker

WAIT_SECONDS = 10.0


def _reply(*responses: dict[str, object]) -> bytes:
    return json.dumps({"responses": list(responses)}).encode()


# -- without a broker -----------------------------------------------------------------------


def test_device_commands_name_the_device_its_role_and_a_correlation() -> None:
    create = create_device_commands(FLEET, "pi-1", "pw", "p")
    assert [c["command"] for c in create] == ["createRole", "createClient"]
    assert create[0]["rolename"] == "schoolfl-device-pi-1"
    assert create[1]["roles"] == [{"rolename": "schoolfl-device-pi-1", "priority": 0}]
    assert create[1]["correlationData"] == "p/createClient/pi-1"
    remove = remove_device_commands("pi-1", "p")
    assert [(c["command"], c["correlationData"]) for c in remove] == [
        ("deleteClient", "p/deleteClient/pi-1"),
        ("deleteRole", "p/deleteRole/pi-1"),
    ]
    with pytest.raises(ValueError, match="device_id"):
        remove_device_commands("a/b", "p")


def test_control_payloads_are_batched() -> None:
    commands = [c for i in range(130) for c in remove_device_commands(f"d{i}", "p")]
    payloads = control_payloads(commands)
    assert len(payloads) == -(-260 // COMMANDS_PER_MESSAGE)
    assert sum(len(json.loads(p)["commands"]) for p in payloads) == 260


@pytest.mark.parametrize(
    ("payload", "problem"),
    [(b"not json", "not JSON"), (b"{}", "no 'responses'"), (b'{"responses": [1]}', "command")],
)
def test_unreadable_replies_are_refused(payload: bytes, problem: str) -> None:
    with pytest.raises(BrokerAdminError, match=problem):
        parse_replies(payload)


def test_revocations_are_sent_until_the_broker_confirms_them() -> None:
    revocations = BrokerRevocations(FLEET, retry_seconds=30.0)
    outgoing = revocations.due({"dev-a", "dev-b"}, now=100.0)
    control = [o for o in outgoing if o.topic == CONTROL_TOPIC]
    assert len(control) == 1
    commands = json.loads(control[0].payload)["commands"]
    assert [c["command"] for c in commands] == ["deleteClient", "deleteRole"] * 2
    clearings = [o for o in outgoing if o.topic != CONTROL_TOPIC]
    assert all(o.retain and o.payload == b"" for o in clearings)
    assert len(clearings) == 2 * len(DeviceChannel)
    assert control[0] is outgoing[0]  # removed first, then its retained messages cleared

    assert revocations.due({"dev-a", "dev-b"}, now=110.0) == []  # waiting for the reply
    by_name = {c["username"]: c["correlationData"] for c in commands if "username" in c}
    confirmed = revocations.accept_reply(
        _reply(
            {"command": "deleteClient", "correlationData": by_name["dev-a"]},
            {"command": "deleteClient", "correlationData": by_name["dev-b"], "error": "Busy"},
            {"command": "deleteClient", "correlationData": "schoolfl/cli/x/deleteClient/dev-b"},
        )
    )
    assert confirmed == ["dev-a"] and revocations.removed == {"dev-a"}
    assert revocations.pending() == {"dev-b"}
    again = revocations.due({"dev-a", "dev-b"}, now=131.0)
    assert [c["username"] for c in json.loads(again[0].payload)["commands"][:1]] == ["dev-b"]
    unknown = {"command": "deleteClient", "error": "Client not found"}
    unknown["correlationData"] = by_name["dev-b"]
    assert revocations.accept_reply(_reply(unknown)) == ["dev-b"]
    assert revocations.due({"dev-a", "dev-b"}, now=500.0) == []
    assert revocations.accept_reply(b"garbage") == []  # logged, never raised


def _received(topic: str, payload: bytes, retain: bool) -> ReceivedMessage:
    return ReceivedMessage(topic, payload, 1, retain)


def test_only_a_devices_state_may_be_retained() -> None:
    update = device_topic(FLEET, "dev-a", DeviceChannel.UPDATE)
    violation = forbidden_retained(FLEET, _received(update, b"x" * 10, retain=True))
    assert violation is not None and violation.device_id == "dev-a"
    assert violation.clearing.topic == update and violation.clearing.retain
    assert violation.clearing.payload == b""
    state = device_topic(FLEET, "dev-a", DeviceChannel.STATE)
    for message in (
        _received(state, b"x", retain=True),
        _received(update, b"x", retain=False),
        _received(update, b"", retain=True),
        _received("schoolfl/other/dev/dev-a/update", b"x", retain=True),
        _received(f"schoolfl/{FLEET}/coord/status", b"x", retain=True),
    ):
        assert forbidden_retained(FLEET, message) is None
    assert len(retained_sweep_filters(FLEET)) == len(DeviceChannel) - 1


def _config_with(broker_admin: dict[str, object]) -> CoordinatorConfig:
    return CoordinatorConfig.from_dict(
        {
            "coordinator": {"fleet": FLEET, "state_dir": "/tmp/x"},
            "broker_admin": broker_admin,
        }
    )


def test_broker_admin_table_is_validated() -> None:
    config = _config_with({"username": "schoolfl-admin", "password_file": "/etc/pw"})
    assert config.broker_admin is not None and config.broker_admin.retry_seconds == 30.0
    assert CoordinatorConfig.from_dict({"coordinator": {"fleet": FLEET, "state_dir": "/x"}})
    for table, named in (
        ({"username": "schoolfl-admin"}, "password_file"),
        ({"username": "a b", "password_file": "/pw"}, "username"),
        ({"username": "admin", "password_file": "/pw", "timeout_seconds": 0}, "timeout_seconds"),
        ({"username": "admin", "password_file": "/pw", "user": "x"}, "user"),
    ):
        with pytest.raises(CoordinatorConfigError, match=named) as error:
            _config_with(table)
        assert "[broker_admin]" in str(error.value)


def _toml(tmp_path: Path, broker_admin: bool, port: int = 1) -> Path:
    """A coordinator.toml whose broker nobody listens on (port 1 on loopback)."""
    password = tmp_path / "admin.password"
    password.write_text("secret\n")
    text = (
        f'[coordinator]\nfleet = "{FLEET}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[broker]\nurl = "mqtt://127.0.0.1:{port}"\n'
    )
    if broker_admin:
        text += (
            f'[broker_admin]\nusername = "schoolfl-admin"\npassword_file = "{password}"\n'
            "timeout_seconds = 1.0\n"
        )
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    return path


def _enrolled_store(tmp_path: Path, device_id: str) -> CoordinatorStore:
    store = CoordinatorStore(tmp_path / "state" / "coordinator.db")
    token = f"token-{device_id}-0123456789abcdef"
    store.add_enrollment_token(token, "north", 3600.0)
    store.redeem_enrollment_token(
        token,
        device_id,
        bytes.fromhex(public_key_hex(generate_private_key())),
        profile_toml_text(find_profile("laptop-mid-16gb")),
    )
    return store


def test_add_device_needs_broker_admin_and_refuses_a_revoked_device(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        coordinator_group, ["add-device", "--config", str(_toml(tmp_path, False)), "pi-1"]
    )
    assert result.exit_code != 0 and "[broker_admin]" in result.output
    store = _enrolled_store(tmp_path, "pi-1")
    assert store.revoke_device("pi-1")
    store.close()
    result = runner.invoke(
        coordinator_group, ["add-device", "--config", str(_toml(tmp_path, True)), "pi-1"]
    )
    assert result.exit_code != 0 and "was revoked" in result.output


def test_revoke_without_a_reachable_broker_still_revokes(tmp_path: Path) -> None:
    _enrolled_store(tmp_path, "pi-1").close()
    config = _toml(tmp_path, True)
    result = CliRunner().invoke(coordinator_group, ["revoke", "--config", str(config), "pi-1"])
    assert result.exit_code == 0, result.output
    assert "did not answer" in result.output and "coordinator removes" in result.output
    store = CoordinatorStore(tmp_path / "state" / "coordinator.db")
    record = store.device("pi-1")
    store.close()
    assert record is not None and record.revoked
    result = CliRunner().invoke(coordinator_group, ["revoke", "--config", str(config), "ghost"])
    assert result.exit_code != 0 and "no active device 'ghost'" in result.output


# -- against the production broker ----------------------------------------------------------


class BrokerManagingDaemon(CoordinatorDaemon):
    """CoordinatorDaemon with the daemon.py change of issue 16: with [broker_admin] it
    removes revoked devices from the broker; it refuses and clears retained messages on the
    device channels that are never retained, sweeping for them every
    RETAINED_SWEEP_SECONDS."""

    def __init__(self, config: CoordinatorConfig, **kwargs: object) -> None:
        super().__init__(config, **kwargs)  # type: ignore[arg-type]
        self.broker_revocations = (
            BrokerRevocations(self.fleet, config.broker_admin.retry_seconds)
            if config.broker_admin is not None
            else None
        )
        self._last_retained_sweep = self.now()

    def start(self) -> None:
        super().start()
        if self.broker_revocations is not None and self.transport is not None:
            self.transport.subscribe(RESPONSE_TOPIC)

    def tick(self) -> None:
        super().tick()
        assert self.transport is not None
        revoked = {record.device_id for record in self.store.devices() if record.revoked}
        if self.broker_revocations is not None:
            self._publish_all(self.broker_revocations.due(revoked, self.now()))
        if self.now() - self._last_retained_sweep >= RETAINED_SWEEP_SECONDS:
            for topic_filter in retained_sweep_filters(self.fleet):
                self.transport.subscribe(topic_filter)
            self._last_retained_sweep = self.now()

    def handle(self, received: ReceivedMessage) -> None:
        if received.topic == RESPONSE_TOPIC:
            if self.broker_revocations is not None:
                self.broker_revocations.accept_reply(received.payload)
            return
        violation = forbidden_retained(self.fleet, received)
        if violation is not None:
            self._publish_all([violation.clearing])
            self.reject(violation.device_id, "retained-refused", violation.reason)
            return
        super().handle(received)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ProductionBroker]:
    with production_broker(tmp_path) as running:
        yield running


def _run_until(daemon: CoordinatorDaemon, condition: Callable[[], bool], what: str) -> None:
    """Drive the daemon's loop by hand (messages, then a tick) until `condition` holds."""
    deadline = time.monotonic() + WAIT_SECONDS
    assert daemon.transport is not None
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        while not daemon.transport.received.empty():
            daemon.handle(daemon.transport.received.get_nowait())
        daemon.tick()
        time.sleep(0.02)


@pytest.mark.integration
def test_the_daemon_takes_a_revoked_device_off_the_broker(
    broker: ProductionBroker, tmp_path: Path
) -> None:
    for device_id in ("dev-a", "dev-b"):
        _enrolled_store(tmp_path, device_id).close()
    config = CoordinatorConfig(
        coordinator=CoordinatorSettings(
            fleet=FLEET, state_dir=str(tmp_path / "state"), startup_grace_seconds=0.0
        ),
        broker=broker.settings(broker.coordinator_user),
        broker_admin=broker.admin_config(),
    )
    clock = Clock()
    daemon = BrokerManagingDaemon(config, now=clock)
    hostile = broker.transport("dev-a")
    honest = broker.transport("dev-b")
    hostile.start(WAIT_SECONDS)
    honest.start(WAIT_SECONDS)
    daemon.start()
    try:
        update = device_topic(FLEET, "dev-a", DeviceChannel.UPDATE)
        hostile.wait_published(hostile.publish(update, b"kept", retain=True), WAIT_SECONDS)
        clock.now += RETAINED_SWEEP_SECONDS  # the next tick sweeps
        _run_until(
            daemon,
            lambda: daemon.rejected["retained-refused"] >= 1,
            "the retained update to be refused",
        )

        assert daemon.store.revoke_device("dev-a")  # `schoolfl coordinator revoke dev-a`
        _run_until(daemon, lambda: "dev-a" in daemon.broker_revocations.removed, "removal")
        deadline = time.monotonic() + WAIT_SECONDS
        while hostile.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not hostile.connected.is_set()
        again = broker.transport("dev-a")
        try:
            with pytest.raises(TransportError, match="refused"):
                again.start(WAIT_SECONDS)
        finally:
            again.stop()

        # After a restart nothing is confirmed: it is sent again, "Client not found" confirms.
        daemon.broker_revocations = BrokerRevocations(FLEET)
        _run_until(daemon, lambda: "dev-a" in daemon.broker_revocations.removed, "again")
        assert honest.connected.is_set() and honest.disconnect_count == 0
    finally:
        daemon.stop()
        hostile.stop()
        honest.stop()
