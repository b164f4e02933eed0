"""`schoolfl demo` end to end, reduced (3 devices, 2 rounds, --quick), as CI can afford.

The classifier runs twice (Mosquitto with the ONNX export, the embedded broker without
it); the SmolLM2 generate task runs once, smallest (2 devices, 1 round): about 4 minutes
on a busy 2-core machine, most of it loading the GGUF base in three processes.
"""

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


def _demo(
    state: Path, *extra: str, devices: int = 3, rounds: int = 2
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "schoolfl",
            "demo",
            "--devices",
            str(devices),
            "--rounds",
            str(rounds),
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


def _check_outputs(
    state: Path, completed: subprocess.CompletedProcess[str], rounds: int = 2
) -> dict[str, object]:
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads((state / "summary.json").read_text())
    print("demo summary:", summary)
    assert summary["rounds_completed"] == rounds
    assert (state / "adapter" / "adapter_config.json").is_file()
    assert (state / "adapter" / "adapter_model.safetensors").is_file()
    assert (state / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return summary


def test_demo_against_mosquitto(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    state = tmp_path / "demo"
    completed = _demo(state, "--broker", mosquitto.url)
    summary = _check_outputs(state, completed)
    assert summary["accuracy_after"] > summary["accuracy_before"]
    assert "accuracy" in completed.stdout
    # The final classifier, exported to ONNX int8 by `schoolfl coordinator export --onnx`.
    onnx = summary["onnx"]
    assert (state / "export-onnx" / "model.int8.onnx").is_file()
    assert (state / "export-onnx" / "predict.py").is_file()
    assert onnx["agreement"] >= 0.95, onnx
    assert onnx["eval_examples"] == summary["held_out"]
    assert onnx["int8_bytes"] < 0.4 * onnx["fp32_bytes"], onnx
    assert "agrees with PyTorch" in completed.stdout and "MB" in completed.stdout


def test_demo_on_the_embedded_broker(tmp_path: Path) -> None:
    state = tmp_path / "demo"
    completed = _demo(state, "--no-onnx")
    summary = _check_outputs(state, completed)
    assert summary["accuracy_after"] > summary["accuracy_before"]
    assert summary["onnx"] == {"skipped": "--no-onnx"}
    assert not (state / "export-onnx").exists()


def test_generate_demo_against_mosquitto(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    """SmolLM2-135M + LoRA on the shipped instructions: held-out loss must fall."""
    state = tmp_path / "demo"
    completed = _demo(state, "--task", "generate", "--broker", mosquitto.url, devices=2, rounds=1)
    summary = _check_outputs(state, completed, rounds=1)
    assert summary["metric"] == "eval_loss" and summary["lower_is_better"] is True
    assert summary["eval_loss_after"] < summary["eval_loss_before"], summary
    assert summary["perplexity_after"] < summary["perplexity_before"], summary
    assert "lower is better" in completed.stdout
    assert "ONNX export skipped: only classification tasks" in completed.stdout
    assert "skipped" in summary["onnx"] and not (state / "export-onnx").exists()


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
