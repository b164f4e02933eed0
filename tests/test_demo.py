"""`schoolfl demo` end to end, reduced (3 devices, 2 rounds, --quick), as CI can afford."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from coordinator.mosquitto import MosquittoProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _demo(state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "schoolfl",
            "demo",
            "--devices",
            "3",
            "--rounds",
            "2",
            "--quick",
            "--state",
            str(state),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def _check_outputs(state: Path, completed: subprocess.CompletedProcess[str]) -> None:
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads((state / "summary.json").read_text())
    print("demo summary:", summary)
    assert summary["rounds_completed"] == 2
    assert summary["accuracy_after"] > summary["accuracy_before"]
    assert (state / "adapter" / "adapter_config.json").is_file()
    assert (state / "adapter" / "adapter_model.safetensors").is_file()
    assert (state / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "accuracy" in completed.stdout


def test_demo_against_mosquitto(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    _check_outputs(tmp_path / "demo", _demo(tmp_path / "demo", "--broker", mosquitto.url))


def test_demo_on_the_embedded_broker(tmp_path: Path) -> None:
    _check_outputs(tmp_path / "demo", _demo(tmp_path / "demo"))


def test_ctrl_c_stops_every_child(tmp_path: Path) -> None:
    state = tmp_path / "demo"
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "schoolfl",
            "demo",
            "--devices",
            "3",
            "--rounds",
            "5",
            "--quick",
            "--state",
            str(state),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    children_file = state / "children.json"
    deadline = time.monotonic() + 240
    pids: dict[str, int] = {}
    while time.monotonic() < deadline and len(pids) < 4:  # coordinator + 3 devices
        if children_file.exists():
            pids = json.loads(children_file.read_text() or "{}")
        assert demo.poll() is None, "the demo ended before its devices started"
        time.sleep(0.5)
    assert len(pids) == 4, pids
    demo.send_signal(signal.SIGINT)
    assert demo.wait(timeout=60) == 130
    alive = [
        name
        for name, pid in pids.items()
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert alive == [], f"orphans left: {alive}"
