"""The demo's live view and plot, from real activity files and a real coordinator store.

No demo runs here: the agents' activity files are written into tmp_path in the schema
the agent writes (edge_runtime/activity.py), rounds go into a real SQLite store on an
injected clock, and the view is rendered by rich to text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from coordinator.store import CoordinatorStore
from coordinator.store_records import RoundState, StoredUpdate
from schoolfl.demo_activity import FleetActivity
from schoolfl.demo_summary import round_timings
from schoolfl.demo_tasks import CLASSIFY
from schoolfl.demo_view import EMULATION_NOTE, render_view, round_figure, round_rows

NOW = 1_000_000.0


def _activity(**fields: object) -> dict[str, object]:
    document: dict[str, object] = {
        "schema": 1,
        "updated_at": NOW - 1,
        "phase": "idle",
        "task": None,
        "round": None,
        "step": None,
        "total_steps": None,
        "upload_fraction": None,
        "eligible": True,
        "ineligible_reasons": [],
        "last_heartbeat_at": NOW - 2,
        "last_round": None,
    }
    document.update(fields)
    return document


def _write(state_dir: Path, document: dict[str, object] | str) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    text = document if isinstance(document, str) else json.dumps(document)
    (state_dir / "activity.json").write_text(text)


def _screen(renderable: object) -> str:
    console = Console(record=True, width=250, color_system=None)
    console.print(renderable)
    return console.export_text()


def _last_round(round_number: int, load: float, compute: float, wait: float) -> dict[str, object]:
    return {
        "task": CLASSIFY.task_id,
        "round": round_number,
        "outcome": "uploaded",
        "load_seconds": load,
        "compute_seconds": compute,
        "emulated_wait_seconds": wait,
        "upload_seconds": 0.4,
    }


@pytest.fixture
def fleet(tmp_path: Path) -> FleetActivity:
    names = ("north-raspberry-0", "south-laptop-1", "east-jetson-2", "north-raspberry-3")
    return FleetActivity({n: tmp_path / n / "state" for n in names}, CLASSIFY.task_id)


def test_each_device_line_says_what_it_is_doing(fleet: FleetActivity) -> None:
    dirs = list(fleet.state_dirs.values())
    _write(
        dirs[0], _activity(phase="training", task=CLASSIFY.task_id, round=2, step=3, total_steps=8)
    )
    _write(dirs[1], _activity(phase="uploading", round=2, upload_fraction=0.45))
    _write(dirs[2], _activity(phase="loading model"))
    # dirs[3] has no file yet: the agent is still starting
    fleet.poll()
    screen = _screen(render_view([], None, CLASSIFY, fleet, now=NOW))
    lines = {
        name: next(line for line in screen.splitlines() if name in line)
        for name in fleet.state_dirs
    }
    assert "training step 3/8 (round 2)" in lines["north-raspberry-0"]
    assert "uploading 45% (round 2)" in lines["south-laptop-1"]
    assert "loading model" in lines["east-jetson-2"]
    assert "starting (the agent has not reported yet)" in lines["north-raspberry-3"]
    assert "emulated" in screen


def test_a_declined_device_says_why_and_a_silent_one_how_long(fleet: FleetActivity) -> None:
    dirs = list(fleet.state_dirs.values())
    _write(
        dirs[0], _activity(phase="declined", eligible=False, ineligible_reasons=["cpu 97% > 80%"])
    )
    _write(dirs[1], _activity(phase="training", step=1, total_steps=4, updated_at=NOW - 42))
    _write(dirs[2], _activity(eligible=False, ineligible_reasons=["on battery"]))
    fleet.poll()
    lines = dict((device, doing) for device, doing, _split in fleet.lines(now=NOW))
    assert lines["north-raspberry-0"] == "declined: cpu 97% > 80%"
    assert lines["east-jetson-2"] == "idle; not eligible: on battery"
    assert lines["south-laptop-1"] == "training step 1/4; 42 s since its last report"


def test_the_agents_own_writer_is_read(fleet: FleetActivity) -> None:
    """The file as edge_runtime.activity writes it (not a hand-made copy of its schema)."""
    activity = pytest.importorskip("edge_runtime.activity")
    first, second = list(fleet.state_dirs.values())[:2]
    for folder in (first, second):
        folder.mkdir(parents=True)
    last = activity.LastRound(CLASSIFY.task_id, 1, "uploaded", 140.0, 3.1, 12.5, 0.4)
    activity.write_activity(
        first,
        activity.Activity(
            updated_at=NOW,
            phase=activity.Phase.TRAINING,
            task=CLASSIFY.task_id,
            round=2,
            step=3,
            total_steps=8,
            eligible=True,
            last_round=last,
        ),
    )
    # A freshly started agent: not eligible yet (no heartbeat), and no reason to show.
    activity.write_activity(
        second, activity.Activity(updated_at=NOW, phase=activity.Phase.LOADING_MODEL)
    )
    fleet.poll()
    lines = fleet.lines(now=NOW)
    assert lines[0][1:] == (
        "training step 3/8 (round 2)",
        "load 140.0 + compute 3.1 + emulated wait 12.5 + upload 0.4 s",
    )
    assert lines[1][1] == "loading model"
    assert fleet.timings.slowest(1) == {
        "load_seconds": 140.0,
        "compute_seconds": 3.1,
        "emulated_wait_seconds": 12.5,
        "upload_seconds": 0.4,
    }


def test_a_corrupt_or_partial_file_keeps_the_last_good_reading(fleet: FleetActivity) -> None:
    state_dir = next(iter(fleet.state_dirs.values()))
    _write(state_dir, _activity(phase="training", step=5, total_steps=8))
    fleet.poll()
    for broken in ('{"schema": 1, "phase": "trai', "not json", json.dumps({"schema": 99})):
        _write(state_dir, broken)
        fleet.poll()
        assert fleet.lines(now=NOW)[0][1] == "training step 5/8"


def _store_with_rounds(tmp_path: Path) -> CoordinatorStore:
    """Round 1 takes 161 s (the devices load the model), round 2 takes 16 s."""
    clock = [NOW]
    store = CoordinatorStore(tmp_path / "coordinator.db", now=lambda: clock[0])
    plan = {"plan": {"rank": 8, "local_steps": 12}, "predicted_round_seconds": 15.5}
    for round_number, took in ((1, 161.0), (2, 16.0)):
        opened = clock[0]
        store.open_round(
            CLASSIFY.task_id,
            round_number,
            round_number - 1,
            opened + 300,
            {"dev-a": json.dumps(plan)},
        )
        clock[0] = opened + took
        store.record_update(
            StoredUpdate(
                f"u{round_number}", CLASSIFY.task_id, round_number, "dev-a", 12, 12, {}, b"x" * 100
            )
        )
        clock[0] += 2.0  # aggregation and evaluation
        store.close_round(
            CLASSIFY.task_id, round_number, RoundState.COMPLETED, "quota", metrics={"accuracy": 0.5}
        )
        clock[0] += 1.0
    return store


def test_the_round_table_splits_load_compute_wait_and_upload(
    tmp_path: Path, fleet: FleetActivity
) -> None:
    store = _store_with_rounds(tmp_path)
    first, second = list(fleet.state_dirs.values())[:2]
    # Round 1: the slowest device loaded the model for 140 s.
    _write(first, _activity(last_round=_last_round(1, load=140.0, compute=3.1, wait=12.5)))
    _write(second, _activity(last_round=_last_round(1, load=90.0, compute=2.0, wait=13.0)))
    fleet.poll()
    _write(first, _activity(last_round=_last_round(2, load=0.0, compute=3.2, wait=12.4)))
    fleet.poll()  # round 1's split is kept although the file now holds round 2
    rows = round_rows(store, CLASSIFY, fleet.timings)
    store.close()
    screen = _screen(render_view(rows, 0.2, CLASSIFY, fleet, now=NOW))
    for heading in ("load s", "compute s", "emulated wait s", "upload s", "round s"):
        assert heading in screen
    row_one = next(line for line in screen.splitlines() if line.strip().startswith("│ 1 "))
    assert ["15.5", "140.0", "3.1", "12.5", "0.4", "161.0"] == [
        cell.strip() for cell in row_one.split("│")[5:11]
    ]
    assert "load 0.0 + compute 3.2 + emulated wait 12.4 + upload 0.4 s" in screen
    assert " ".join(EMULATION_NOTE.split()[:6]) in " ".join(screen.split())
    timings = round_timings(rows)
    assert timings[0]["load_seconds"] == 140.0 and timings[0]["round_seconds"] == 161.0
    assert timings[1]["emulated_wait_seconds"] == 12.4


def test_the_plot_bars_are_the_tables_round_time_and_chance_is_drawn(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    store = _store_with_rounds(tmp_path)
    rows = round_rows(store, CLASSIFY)
    store.close()
    labels = ("maths", "science", "history", "geography", "english", "art", "music", "sport")
    figure = round_figure(rows, 0.2, CLASSIFY, labels)
    try:
        metric_axes, time_axes = figure.axes
        heights = [round(bar.get_height(), 3) for bar in time_axes.patches]
        assert heights == [round(float(r["actual"]), 3) for r in rows] == [161.0, 16.0]
        chance = [line for line in metric_axes.lines if "chance" in str(line.get_label())]
        assert len(chance) == 1 and list(chance[0].get_ydata()) == [1 / 8, 1 / 8]
    finally:
        plt.close(figure)
