"""Smoke test of the fleet benchmark: 20 emulated devices, one round of 10, against a real
coordinator and a real Mosquitto (benchmarks/bench_fleet.py starts both)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.mosquitto import find_mosquitto

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_fleet.py"


@pytest.mark.integration
@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_a_small_fleet_completes_a_round_and_loses_no_update(tmp_path: Path) -> None:
    raw = tmp_path / "results.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--devices=20",
            "--round-size=10",
            "--rounds=1",
            "--processes=2",
            "--connect-rate=100",
            "--max-delay=0.5",
            "--idle-seconds=1",
            "--startup-grace=2",
            "--timeout=100",
            f"--json={raw}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (result,) = json.loads(raw.read_text())
    (round_one,) = result["rounds"]
    assert round_one["state"] == "completed"
    assert round_one["accepted"] >= 10
    assert round_one["lost"] == 0
    assert round_one["sent"] == round_one["accepted"] + round_one["rejected"]
    assert result["device_counters"]["enrolled"] == 20
    assert result["torch_in_devices"] is False
    assert "| 20 |" in completed.stdout  # the Markdown report's row
