"""The operator and school-IT commands that do not need a running fleet."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from coordinator.store import AdapterVersion, CoordinatorStore, token_digest
from schoolfl.cli import cli

COORDINATOR_TOML = """
[coordinator]
fleet = "f"
state_dir = "{state}"

[[tasks]]
id = "subjects"
kind = "classification"
base_model = "minilm-l6"
labels = ["a", "b"]
"""


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_agent_init_status_and_service(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    code, output = _run(
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
        "--profile",
        "raspberry-pi-4-4gb",
    )
    assert code == 0, output
    assert (tmp_path / "state" / "device_key.pem").stat().st_mode & 0o077 == 0
    code, output = _run(
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
    )
    assert code != 0 and "--force" in output
    code, output = _run(
        "agent",
        "init",
        "--config",
        str(tmp_path / "x.toml"),
        "--fleet",
        "f",
        "--device-id",
        "pi-1",
        "--school",
        "north",
        "--profile",
        "no-such-pi",
    )
    assert code != 0 and "no-such-pi" in output

    code, output = _run("agent", "status", "--config", str(config))
    assert code == 0 and "enrolled: no" in output

    unit = tmp_path / "schoolfl-agent.service"
    code, output = _run("agent", "install-service", "--config", str(config), "--output", str(unit))
    assert code == 0, output
    text = unit.read_text()
    assert "agent run --config" in text and str(config.resolve()) in text
    assert "Restart=on-failure" in text

    code, output = _run("agent", "run", "--config", str(config))
    assert code != 0 and "enroll" in output  # not enrolled yet: a clear error, no traceback

    code, output = _run("agent", "predict", "--config", str(config), "--task", "subjects", "hi")
    assert code != 0 and "has not trained" in output


def test_coordinator_operations(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(COORDINATOR_TOML.format(state=tmp_path / "state"))
    code, output = _run("coordinator", "rounds", "--config", str(config))
    assert code != 0 and "serve" in output  # no state yet

    code, token = _run("coordinator", "enroll-token", "--config", str(config), "--school", "north")
    assert code == 0 and len(token.strip()) >= 24
    store = CoordinatorStore(tmp_path / "state" / "coordinator.db")
    row = store._db.execute(
        "SELECT school FROM enrollment_tokens WHERE token_sha256=?", (token_digest(token.strip()),)
    ).fetchone()
    assert row == ("north",)

    folder = tmp_path / "state" / "adapters" / "subjects" / "v0001"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    store.add_adapter_version(AdapterVersion("subjects", 1, 1, "ab" * 32, str(folder), 1.0))
    store.close()

    code, output = _run("coordinator", "export", "--config", str(config), str(tmp_path / "out"))
    assert code == 0, output
    assert (tmp_path / "out" / "adapter_config.json").exists()
    code, output = _run(
        "coordinator", "export", "--config", str(config), "--version", "7", str(tmp_path / "out2")
    )
    assert code != 0 and "no version 7" in output

    code, output = _run("coordinator", "revoke", "--config", str(config), "ghost")
    assert code != 0 and "no active device" in output
    code, output = _run("coordinator", "status", "--config", str(config))
    assert (
        code == 0 and "task subjects: 0/10 rounds" in output and "refused messages: none" in output
    )
    code, output = _run("coordinator", "devices", "--config", str(config))
    assert code == 0 and "no devices enrolled" in output
