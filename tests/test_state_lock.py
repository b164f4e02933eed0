"""One coordinator per state folder: a second one is refused at start, clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig, CoordinatorSettings, TaskConfig
from coordinator.daemon import CoordinatorDaemon
from durable.state_lock import StateLockedError, lock_state_folder


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
