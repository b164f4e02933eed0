"""`broker-config` output starts cleanly with Debian's mosquitto as the package runs it.

Debian's service runs `/usr/sbin/mosquitto -c /etc/mosquitto/mosquitto.conf` as root, and
the broker drops to user `mosquitto` before it reads the dynamic-security file and the TLS
key. So this test runs the real command into a folder laid out like /etc/mosquitto and
/var/lib/mosquitto, applies the install steps the command prints (owners and modes), starts
the broker as root with no `user` override, and checks that it listens, logs no warning or
error, and confines a device. The folder is made under /tmp (pytest's tmp folders sit under
a 0700 path the `mosquitto` user cannot traverse).
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from coordinator.broker_config import BrokerConfigFiles, BrokerConfigRequest, load_credentials
from coordinator.broker_install import DEBIAN_CONFIG_PATH, broker_user_exists, install_steps
from coordinator.cli import coordinator_group
from coordinator.mosquitto import free_loopback_port
from edge_runtime.wire import BrokerSettings, DeviceChannel, MqttTransport, device_topic
from tests.production_broker import write_test_certificates

pytestmark = pytest.mark.integration

MOSQUITTO = Path("/usr/sbin/mosquitto")
FLEET = "school"
WAIT_SECONDS = 10.0


@pytest.fixture
def debian_root() -> Iterator[Path]:
    if os.geteuid() != 0 or not MOSQUITTO.is_file() or not broker_user_exists():
        message = "needs root and Debian's mosquitto package (apt-get install -y mosquitto)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    root = Path(tempfile.mkdtemp(prefix="schoolfl-debian-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _received(transport: MqttTransport, payload: bytes) -> list[bytes]:
    seen: list[bytes] = []
    while True:
        message = transport.received.get(timeout=WAIT_SECONDS)
        seen.append(message.payload)
        if message.payload == payload:
            return seen


def test_broker_config_starts_cleanly_under_debians_mosquitto(debian_root: Path) -> None:
    etc = debian_root / "etc" / "mosquitto"
    lib = debian_root / "var" / "lib" / "mosquitto"
    log_dir = debian_root / "var" / "log" / "mosquitto"
    ca_file, certfile, keyfile = write_test_certificates(etc / "certs")  # root 0600, as made
    (etc / "certs").chmod(0o755)
    port = free_loopback_port()
    output = etc / "generated"
    options = {
        "--port": str(port),
        "--tls-cert": str(certfile),
        "--tls-key": str(keyfile),
        "--install-dir": str(lib),
        "--persistence-location": f"{lib}/",
    }
    arguments = ["broker-config", "--fleet", FLEET, "--device", "dev-a", "--device", "dev-b"]
    arguments += ["--output", str(output), *(item for pair in options.items() for item in pair)]
    result = CliRunner().invoke(coordinator_group, arguments)
    assert result.exit_code == 0, result.output

    request = BrokerConfigRequest(
        fleet=FLEET,
        device_ids=("dev-a", "dev-b"),
        output_dir=output,
        port=port,
        tls_certfile=str(certfile),
        tls_keyfile=str(keyfile),
        persistence_location=f"{lib}/",
        install_dir=lib,
    )
    files = BrokerConfigFiles(
        output / "mosquitto.conf",
        output / "dynamic-security.json",
        output / "credentials.json",
        {},
    )
    steps = install_steps(request, files)
    for step in steps:
        assert f"  {step.command()}\n" in result.output  # what the operator is told to run
        if step.destination == DEBIAN_CONFIG_PATH:
            continue  # the host's own /etc stays untouched; the broker runs from `etc`
        step.apply()
    conf = etc / "mosquitto.conf"
    text = files.config_path.read_text()
    assert "\nuser " not in text  # the drop to `mosquitto` happens, as in Debian's service
    log_dir.mkdir(parents=True)
    shutil.chown(log_dir, "mosquitto")  # what mosquitto.service's ExecStartPre does
    text = text.replace(f"listener {port}\n", f"listener {port} 127.0.0.1\n")
    text = text.replace("log_dest syslog\n", f"log_dest file {log_dir / 'mosquitto.log'}\n")
    conf.write_text(text)

    broker = subprocess.Popen(
        [str(MOSQUITTO), "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    passwords = load_credentials(files.credentials_path)
    transports: list[MqttTransport] = []

    def connect(username: str) -> MqttTransport:
        settings = BrokerSettings(
            url=f"mqtts://127.0.0.1:{port}",
            username=username,
            password_file=str(_secret(debian_root, username, passwords[username])),
            ca_file=str(ca_file),
        )
        transport = MqttTransport(settings.transport_config(username))
        transports.append(transport)
        transport.start(WAIT_SECONDS)
        return transport

    try:
        deadline = time.monotonic() + WAIT_SECONDS
        log = log_dir / "mosquitto.log"
        while "running" not in (log.read_text() if log.exists() else ""):
            assert broker.poll() is None, broker.stdout.read().decode() if broker.stdout else ""
            assert time.monotonic() < deadline, "mosquitto did not report running"
            time.sleep(0.05)
        coordinator = connect("coordinator")
        coordinator.subscribe(f"schoolfl/{FLEET}/#")
        device = connect("dev-a")
        own = device_topic(FLEET, "dev-a", DeviceChannel.STATE)
        probe = b"probe"
        device.publish(own, probe)
        _received(coordinator, probe)
        foreign = device_topic(FLEET, "dev-b", DeviceChannel.STATE)
        assert device.wait_published(device.publish(foreign, b"forbidden"), WAIT_SECONDS)
        device.publish(own, b"control")
        assert b"forbidden" not in _received(coordinator, b"control")
        with pytest.raises(queue.Empty):
            coordinator.received.get(timeout=0.2)
    finally:
        for transport in transports:
            transport.stop()
        broker.terminate()
        try:
            broker.wait(timeout=WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait(timeout=WAIT_SECONDS)
    start_output = broker.stdout.read().decode(errors="replace") if broker.stdout else ""
    broker_log = (log_dir / "mosquitto.log").read_text(errors="replace")
    lines = (start_output + broker_log).splitlines()
    assert [line for line in lines if "Warning" in line or "Error" in line] == [], lines
    assert "Loading plugin" in broker_log and "running" in broker_log


def _secret(root: Path, username: str, password: str) -> Path:
    path = root / "secrets" / username
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path
