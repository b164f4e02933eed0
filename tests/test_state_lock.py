"""One coordinator per state folder: a second one is refused at start, clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from coordinator.config import CoordinatorConfig, CoordinatorSettings, TaskConfig
from coordinator.daemon import CoordinatorDaemon
from durable.atomic_files import sweep_leftovers
from durable.state_lock import StateLockedError, lock_state_folder
from schoolfl.cli import cli


def _config(tmp_path: Path, model: Path) -> CoordinatorConfig:
    task = TaskConfig(id="t", kind="classification", base_model=str(model), labels=("a", "b"))
    return CoordinatorConfig(
        coordinator=CoordinatorSettings(fleet="f", state_dir=str(tmp_path / "state")),
        tasks=(task,),
    )


@pytest.mark.slow
def test_a_second_coordinator_on_one_state_folder_is_refused(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    config = _config(tmp_path, tiny_bert_folder)
    first = CoordinatorDaemon(config)
    with pytest.raises(StateLockedError, match="in use by another coordinator"):
        CoordinatorDaemon(config)
    first.stop()
    second = CoordinatorDaemon(config)  # released at stop: the next one may start
    second.stop()


def test_the_lock_holds_across_processes_and_dies_with_its_holder(tmp_path: Path) -> None:
    probe = (
        "import sys; from pathlib import Path; from durable.state_lock import "
        "lock_state_folder, StateLockedError\n"
        "try:\n    lock_state_folder(Path(sys.argv[1]), 'coordinator')\n"
        "except StateLockedError as error:\n    print(error); sys.exit(3)\n"
    )
    held = lock_state_folder(tmp_path, "coordinator")
    refused = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 3 and "in use by another coordinator" in refused.stdout
    held.close()
    granted = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], timeout=60)
    assert granted.returncode == 0


def _leftovers(root: Path) -> None:
    """What kills at the worst moments leave: mid atomic write, mid adapter write, and
    between save_adapter's two renames (old moved aside, new not yet in place)."""
    adapters = root / "adapters" / "t"
    (adapters / "v0000").mkdir(parents=True)
    (adapters / "v0000" / "adapter_model.safetensors").write_bytes(b"kept")
    (root / ".coordinator_key.pem.k3j4h5.tmp").write_bytes(b"half a key")
    (adapters / ".v0001.tmp-abc123").mkdir()
    (adapters / ".v0001.tmp-abc123" / "adapter_config.json").write_text("{")
    (adapters / ".v0000.old-41").mkdir()  # superseded copy beside its replacement
    (adapters / ".v0002.old-42").mkdir()  # the only copy left of v0002
    (adapters / ".v0002.old-42" / "adapter_model.safetensors").write_bytes(b"v2")


def test_interrupted_writes_are_swept_and_a_moved_aside_adapter_restored(tmp_path: Path) -> None:
    _leftovers(tmp_path)
    swept = sweep_leftovers(tmp_path)
    adapters = tmp_path / "adapters" / "t"
    assert len(swept) == 4
    assert sorted(p.name for p in adapters.iterdir()) == ["v0000", "v0002"]
    assert (adapters / "v0002" / "adapter_model.safetensors").read_bytes() == b"v2"
    assert (adapters / "v0000" / "adapter_model.safetensors").read_bytes() == b"kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]
    assert sweep_leftovers(tmp_path) == []  # idempotent


@pytest.mark.slow
def test_a_starting_coordinator_sweeps_its_state_folder(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    config = _config(tmp_path, tiny_bert_folder)
    _leftovers(config.state_dir)
    daemon = CoordinatorDaemon(config)
    try:
        leftovers = [p.name for p in config.state_dir.rglob(".*") if p.name != ".lock"]
        assert leftovers == []
    finally:
        daemon.stop()


def test_one_agent_per_state_folder_and_a_kill_mid_save_is_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent killed while saving its personal copy leaves a half-written adapter folder
    (or the old copy moved aside); the next agent on that folder cleans it at start, and a
    second agent on the same folder is refused (both would answer the same assignments)."""
    from edge_runtime.agent import AgentDaemon
    from edge_runtime.wire import generate_private_key
    from tests.test_lora_ranks import _agent

    first = _agent(tmp_path, generate_private_key())
    config = first.config
    first.stop()
    adapters = config.state_dir / "adapters"
    (adapters / ".alpha.tmp-9f8e7d").mkdir(parents=True)  # killed mid-write
    (adapters / ".alpha.old-77").mkdir()  # killed between the two renames
    (adapters / ".alpha.old-77" / "adapter_model.safetensors").write_bytes(b"kept copy")

    agent = AgentDaemon(config)
    try:
        assert sorted(p.name for p in adapters.iterdir()) == ["alpha"]
        assert (adapters / "alpha" / "adapter_model.safetensors").read_bytes() == b"kept copy"
        with pytest.raises(StateLockedError, match="in use by another agent"):
            AgentDaemon(config)
        # `schoolfl agent run` says so in one line, not with a traceback (config loading is
        # not under test here: the command gets the running agent's config)
        monkeypatch.setattr("edge_runtime.cli._load", lambda path: config)
        result = CliRunner().invoke(cli, ["agent", "run", "--config", str(tmp_path / "a.toml")])
        assert result.exit_code == 1, result.output
        assert "in use by another agent" in result.output
        assert not isinstance(result.exception, StateLockedError)
    finally:
        agent.stop()
