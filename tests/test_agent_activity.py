"""What the agent tells school IT at the device: its activity file, its eligibility log
line (once per change), and `schoolfl agent status`."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_runtime.activity import (
    Activity,
    ActivityTracker,
    LastRound,
    Phase,
    read_activity,
    write_activity,
)
from edge_runtime.eligibility import DeviceReadings
from edge_runtime.wire import generate_private_key
from tests.test_lora_ranks import _agent


def _sample() -> Activity:
    return Activity(
        updated_at=100.5,
        phase=Phase.TRAINING,
        task="alpha",
        round=3,
        step=4,
        total_steps=12,
        eligible=False,
        ineligible_reasons=("CPU busy at 93% (limit 80%)", "on battery"),
        last_heartbeat_at=99.0,
        last_round=LastRound("alpha", 2, "uploaded", 12.5, 3.25, 150.0, 0.5),
    )


def test_activity_round_trips_with_the_documented_keys(tmp_path: Path) -> None:
    write_activity(tmp_path, _sample())
    assert read_activity(tmp_path) == _sample()
    data = json.loads((tmp_path / "activity.json").read_text())
    assert list(data) == [
        "schema", "updated_at", "phase", "task", "round", "step", "total_steps",
        "upload_fraction", "eligible", "ineligible_reasons", "last_heartbeat_at", "last_round",
    ]  # fmt: skip
    assert data["schema"] == 1 and data["phase"] == "training"
    assert data["last_round"]["emulated_wait_seconds"] == 150.0
    assert [p.name for p in tmp_path.iterdir()] == ["activity.json"]  # no temp file left


@pytest.mark.parametrize(
    "text",
    ["", "{not json", "[]", '{"schema": 1}', "\xff\xfe", None],
)
def test_a_missing_or_corrupt_file_reads_as_none(tmp_path: Path, text: str | None) -> None:
    if text is not None:
        (tmp_path / "activity.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    assert read_activity(tmp_path) is None


def test_a_bad_phase_or_type_reads_as_none(tmp_path: Path) -> None:
    data = json.loads(_sample().to_json())
    write_activity(tmp_path, _sample())
    for key, value in [("phase", "dancing"), ("round", "3"), ("eligible", 1), ("step", True)]:
        (tmp_path / "activity.json").write_text(json.dumps({**data, key: value}))
        assert read_activity(tmp_path) is None, key


def test_writes_are_throttled_except_on_phase_changes(tmp_path: Path) -> None:
    clock = [0.0]
    tracker = ActivityTracker(tmp_path, clock=lambda: clock[0])
    tracker.begin_round("alpha", 1)
    with tracker.part(Phase.TRAINING, "compute_seconds", 10):
        tracker.training_step(1, 10)
        clock[0] = 0.1
        tracker.training_step(2, 10)  # within 0.5 s of the phase change: not written yet
        assert read_activity(tmp_path).step == 0  # type: ignore[union-attr]
        clock[0] = 0.7
        tracker.flush_if_due()
        assert read_activity(tmp_path).step == 2  # type: ignore[union-attr]
        clock[0] = 2.0
    with tracker.part(Phase.UPLOADING, "upload_seconds"):
        assert read_activity(tmp_path).phase is Phase.UPLOADING  # type: ignore[union-attr]
        tracker.upload_progress(0.5)
        clock[0] = 2.5
    tracker.end_round("uploaded")
    written = read_activity(tmp_path)
    assert written is not None and written.phase is Phase.IDLE
    assert written.last_round == LastRound("alpha", 1, "uploaded", 0.0, 2.0, 0.0, 0.5)


def _readings(cpu: float, on_mains: bool = True) -> DeviceReadings:
    return DeviceReadings(
        on_mains=on_mains,
        battery_percent=None if on_mains else 50.0,
        cpu_percent=cpu,
        available_memory_bytes=8 * 2**30,
        temperature_celsius=None,
        local_time=dt.datetime(2026, 12, 2, 10, 0),  # a Wednesday
    )


def test_the_eligibility_log_line_comes_once_per_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = _agent(tmp_path, generate_private_key())
    daemon.config = dataclasses.replace(
        daemon.config,
        eligibility=dataclasses.replace(
            daemon.config.eligibility, max_cpu_percent=80.0, require_mains=True
        ),
    )
    sequence = [
        _readings(10), _readings(12), _readings(93), _readings(95), _readings(94, False),
        _readings(96, False), _readings(20), _readings(21),
    ]  # fmt: skip
    try:
        with caplog.at_level(logging.INFO):
            for readings in sequence:
                daemon.device_reader = lambda readings=readings, **_: readings  # type: ignore[method-assign]
                daemon.heartbeat()
    finally:
        daemon.outbox.close()
        daemon.history.close()
    lines = [r.getMessage() for r in caplog.records if "eligible to train" in r.getMessage()]
    assert lines == [
        "device is eligible to train",
        "device is not eligible to train: CPU busy at 93% (limit 80%)",
        "device is not eligible to train: on battery and the policy requires mains power; "
        "CPU busy at 94% (limit 80%)",
        "device is eligible to train again",
    ]
    written = read_activity(daemon.config.state_dir)
    assert written is not None and written.eligible and written.last_heartbeat_at is not None
    published = [topic for topic, _ in daemon.transport.published if topic.endswith("/state")]
    assert len(published) == 4  # one per change of verdict: 8 checks, 4 heartbeats sent


def test_agent_status_shows_eligibility_activity_and_the_last_round(tmp_path: Path) -> None:
    from schoolfl.cli import cli as main

    config_path = tmp_path / "agent.toml"
    state_dir = tmp_path / "state"
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["agent", "init", "--config", str(config_path), "--fleet", "f", "--device-id", "pi-1",
         "--school", "north", "--state-dir", str(state_dir), "--data-dir", str(tmp_path / "d")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    missing = runner.invoke(main, ["agent", "status", "--config", str(config_path)])
    assert "agent: not running" in missing.output
    now = time.time()
    activity = dataclasses.replace(_sample(), updated_at=now - 1, last_heartbeat_at=now - 4)
    write_activity(state_dir, activity)
    shown = runner.invoke(main, ["agent", "status", "--config", str(config_path)]).output
    assert "agent: running, last heartbeat 4 s ago" in shown
    assert "eligible to train (now): no: CPU busy at 93% (limit 80%); on battery" in shown
    assert "doing: training task alpha round 3, step 4/12" in shown
    assert "compute 3.2 s, emulated wait 150.0 s" in shown and "model load 12.5 s" in shown
    old = dataclasses.replace(activity, phase=Phase.IDLE, updated_at=now - 300,
                              last_heartbeat_at=now - 300)  # fmt: skip
    write_activity(state_dir, old)
    stale = runner.invoke(main, ["agent", "status", "--config", str(config_path)]).output
    assert "agent: not running (last heartbeat 5 min ago)" in stale


def test_the_trainer_reports_each_optimizer_step(tiny_bert_folder: Path) -> None:
    from device_profiles.plan import TrainingPlan
    from edge_runtime.trainer import LocalTrainer
    from quantization.adapters import AdapterConfig
    from quantization.task_data import LabelledText
    from quantization.task_model import TaskModelSpec

    spec = TaskModelSpec(
        "alpha", "classification", str(tiny_bert_folder), "none", AdapterConfig(4), ("a", "b")
    )
    examples = [LabelledText(f"question {i}", "ab"[i % 2]) for i in range(8)]
    trainer = LocalTrainer(spec, examples)
    seen: list[tuple[int, int]] = []
    plan = TrainingPlan(scheme="none", rank=4, batch_size=4, seq_len=16, local_steps=3)
    result = trainer.train_round(trainer.adapter_state(), plan, on_step=lambda *s: seen.append(s))
    assert seen == [(1, 3), (2, 3), (3, 3)] and result.num_steps == 3


def test_a_heartbeat_is_published_on_a_change_a_reconnect_or_once_a_minute() -> None:
    """Checked every 10 s, published only when it tells the coordinator something: a
    district's idle devices must not cost the coordinator a message each every 10 s."""
    from edge_runtime.activity import HEARTBEAT_REFRESH_SECONDS
    from edge_runtime.device_state import PublishedHeartbeat, heartbeat_due
    from edge_runtime.eligibility import Eligibility

    busy = Eligibility(eligible=False, reasons=("CPU busy at 93% (limit 60%)",))
    last = PublishedHeartbeat(1000.0, busy, connect_count=1)
    assert heartbeat_due(None, busy, 1000.0, 1)  # the first one
    assert not heartbeat_due(last, busy, 1010.0, 1)
    busier = Eligibility(eligible=False, reasons=("CPU busy at 97% (limit 60%)",))
    assert not heartbeat_due(last, busier, 1020.0, 1)  # the same reason, another number
    assert heartbeat_due(last, Eligibility(eligible=True, reasons=()), 1010.0, 1)
    assert heartbeat_due(last, busy, 1010.0, 2)  # reconnected: the broker holds the will
    assert heartbeat_due(last, busy, 1000.0 + HEARTBEAT_REFRESH_SECONDS, 1)
