"""School IT's first hour: `agent init --ca-file`, the systemd unit, and data checked when
it is loaded, not when a batch happens to draw a bad row."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_runtime.agent_config import AgentConfig
from edge_runtime.systemd_unit import (
    MAX_EXPOSURE,
    STATE_ROOT,
    ServicePaths,
    exposure_score,
    render_unit,
    sandbox_warnings,
)
from schoolfl.cli import cli
from tests.production_broker import write_test_certificates
from tests.test_agent_failures import _declines_after

HARDENING = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    "SystemCallFilter=@system-service",
    "CapabilityBoundingSet=\n",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "LockPersonality=yes",
    "RestrictNamespaces=yes",
)


def _init(tmp_path: Path, *extra: str) -> tuple[int, str, Path]:
    config = tmp_path / "agent.toml"
    result = CliRunner().invoke(
        cli,
        [
            "agent",
            "init",
            "--config",
            str(config),
            "--fleet",
            "f",
            "--device-id",
            "pi-1",
            "--school",
            "north",
            "--state-dir",
            str(tmp_path / "state"),
            "--data-dir",
            str(tmp_path / "data"),
            *extra,
        ],
    )
    return result.exit_code, result.output, config


def test_init_writes_a_private_ca_into_the_broker_settings(tmp_path: Path) -> None:
    ca_path, _, _ = write_test_certificates(tmp_path)
    code, output, config_path = _init(
        tmp_path, "--broker", "mqtts://127.0.0.1:8883", "--ca-file", str(ca_path)
    )
    assert code == 0, output
    broker = AgentConfig.load(config_path).broker
    assert broker.ca_file == str(ca_path.resolve()) and broker.tls_insecure is False
    tls = broker.transport_config("pi-1").tls
    assert tls is not None and tls.ca_certs == str(ca_path.resolve())


@pytest.mark.parametrize(
    ("broker", "ca_name", "message"),
    [
        ("mqtts://b:8883", "missing.pem", "does not exist"),
        ("mqtts://b:8883", "server.key", "holds no PEM certificate"),
        ("mqtt://b:1883", "ca.crt", "need an mqtts:// broker URL"),
    ],
)
def test_init_rejects_a_ca_file_it_cannot_use(
    tmp_path: Path, broker: str, ca_name: str, message: str
) -> None:
    write_test_certificates(tmp_path)
    code, output, config_path = _init(
        tmp_path, "--broker", broker, "--ca-file", str(tmp_path / ca_name)
    )
    assert code != 0 and message in output
    assert "Traceback" not in output
    assert not config_path.exists()  # nothing half-written


def _service(tmp_path: Path, *extra: str) -> tuple[int, str, str]:
    config_path = tmp_path / "agent.toml"
    if not config_path.exists():
        code, output, config_path = _init(tmp_path)
        assert code == 0, output
    result = CliRunner().invoke(
        cli, ["agent", "install-service", "--config", str(config_path), *extra]
    )
    return result.exit_code, result.stdout, result.stderr


def test_install_service_prints_the_unit_and_writes_nothing(tmp_path: Path) -> None:
    code, unit, notes = _service(tmp_path, "--no-gpu")
    assert code == 0, notes
    assert unit.startswith("[Unit]")  # stdout is the unit alone: `> file` works
    assert "User=schoolfl" in unit and "StateDirectory=schoolfl" in unit
    assert "PrivateDevices=yes" in unit and "MemoryDenyWriteExecute" not in unit
    for option in HARDENING:
        assert option in unit, option
    assert "not written" in notes and "useradd --system" in notes
    assert "systemctl daemon-reload && systemctl enable --now schoolfl-agent.service" in notes
    # tmp_path lies under /tmp, which PrivateTmp= hides from the service
    assert "warning: the config" in notes and "is under /tmp: PrivateTmp=yes" in notes
    assert f"ReadWritePaths={(tmp_path / 'state').resolve()}" in unit


def test_install_service_asks_before_writing_under_etc(tmp_path: Path) -> None:
    target = Path("/etc") / f"schoolfl-test-{uuid.uuid4().hex[:8]}.service"
    try:
        code, _, notes = _service(tmp_path, "--output", str(target), "--no-gpu")
        assert code != 0 and "write " in notes  # asked, got no answer: aborted
        assert not target.exists()
        if not Path("/etc").is_dir() or not os.access("/etc", os.W_OK):
            return  # cannot check the --yes path without a writable /etc
        code, _, notes = _service(tmp_path, "--output", str(target), "--yes", "--no-gpu")
        assert code == 0, notes
        assert "User=schoolfl" in target.read_text()
    finally:
        target.unlink(missing_ok=True)


def test_install_service_output_outside_etc_does_not_ask(tmp_path: Path) -> None:
    unit_path = tmp_path / "schoolfl-agent.service"
    code, _, notes = _service(tmp_path, "--output", str(unit_path), "--no-gpu")
    assert code == 0, notes
    assert unit_path.read_text().startswith("[Unit]") and f"wrote {unit_path}" in notes


def _paths(root: Path) -> ServicePaths:
    return ServicePaths(
        executable="/opt/schoolfl/bin/schoolfl",
        config=Path("/etc/schoolfl/agent.toml"),
        state_dir=STATE_ROOT / "agent",
        data_dir=STATE_ROOT / "data",
        environment=root,
    )


def test_paths_the_sandbox_hides_are_warned_about() -> None:
    assert sandbox_warnings(_paths(Path("/opt/schoolfl"))) == []
    [warning] = sandbox_warnings(_paths(Path("/home/it/venv")))
    assert "the Python environment /home/it/venv is under /home: ProtectHome=yes" in warning
    [warning] = sandbox_warnings(_paths(Path("/root/venv")))
    assert "under /root" in warning


def test_a_gpu_unit_opens_the_gpu_devices_only() -> None:
    unit = render_unit("pi-1", _paths(Path("/opt/schoolfl")), True, Path("/docs/agent.md"))
    assert "DevicePolicy=closed" in unit and "DeviceAllow=char-nvidia* rw" in unit
    assert "PrivateDevices=yes" not in unit and "SupplementaryGroups=video render" in unit
    assert "ReadWritePaths" not in unit  # state under /var/lib/schoolfl: StateDirectory=


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("gpu", [False, True])
def test_systemd_analyze_security_exposure_is_low(tmp_path: Path, gpu: bool) -> None:
    unit_path = tmp_path / "schoolfl-agent.service"
    unit_path.write_text(
        render_unit("pi-1", _paths(Path("/opt/schoolfl")), gpu, Path("/docs/agent.md"))
    )
    score = exposure_score(unit_path)
    if score is None:
        pytest.skip("this systemd-analyze cannot analyse offline (systemd < 250)")
    assert score <= MAX_EXPOSURE


@pytest.mark.slow
def test_a_label_outside_the_task_is_declined_before_the_model_loads(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    def stray_label(folder: Path, _: dict) -> None:
        rows = [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(6)]
        rows[3]["label"] = "maths"  # the task's labels are a and b
        (folder / "data" / "alpha.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    declines, daemon = _declines_after(tmp_path, tiny_bert_folder, stray_label)
    reason = declines[0].reasons[0]
    assert "alpha.jsonl:4: label 'maths' is not one of the task's labels ['a', 'b']" in reason
    assert daemon.trainers == {}  # rejected when read, before a model was built
