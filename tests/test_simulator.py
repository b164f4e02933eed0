"""The fleet simulator: reproducible fleets, a school day, real training, fair comparison.

Devices really train (LoRA on the proxy network over real MiniLM-L6 embeddings of the shipped
questions); the clock is the cost model's. Nothing is mocked.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from coordinator.simulation.compare import SimulationSettings, compare, summarise
from coordinator.simulation.fleet import build_fleet, is_available
from coordinator.simulation.simulator import gini
from quantization.school_questions import load_questions
from schoolfl.cli import cli

SMALL = SimulationSettings(
    devices=24, schools=4, rounds=6, devices_per_round=6, deadline_seconds=60.0, seed=3
)


@pytest.fixture(scope="module")
def prepared():  # noqa: ANN201 - (fleet, data, shape)
    from coordinator.simulation.compare import prepare

    torch.set_num_threads(1)
    return prepare(SMALL)


def test_the_fleet_is_reproducible_by_seed_and_mixes_tiers() -> None:
    questions = load_questions()
    first = build_fleet(questions, devices=40, schools=10, seed=1)
    again = build_fleet(questions, devices=40, schools=10, seed=1)
    other = build_fleet(questions, devices=40, schools=10, seed=2)
    assert first == again
    assert [d.true_slowness for d in first.devices] != [d.true_slowness for d in other.devices]
    assert {s.tier for s in first.schools} == {"well-equipped", "typical", "slow"}
    assert len(first.devices) == 40 and all(d.examples for d in first.devices)
    held_out = {e.text for e in first.held_out}
    assert not held_out & {e.text for d in first.devices for e in d.examples}


def test_laptops_follow_the_school_day_and_pis_stay_on() -> None:
    fleet = build_fleet(load_questions(), devices=40, schools=10, seed=1)
    laptop = next(d for d in fleet.devices if d.is_laptop)
    pi = next(d for d in fleet.devices if not d.is_laptop)
    hour = 3600.0  # the clock starts on Monday at 08:00

    def share(device: object, at: float) -> float:
        rng = random.Random(0)
        return sum(is_available(device, at, rng) for _ in range(200)) / 200  # type: ignore[arg-type]

    assert share(laptop, 0.0) > 0.9  # 08:00, before lessons
    assert share(laptop, 2 * hour) == 0.0  # 10:00, a lesson
    assert share(laptop, 16 * hour) == 0.0  # midnight
    assert share(laptop, 5 * 24 * hour) == 0.0  # Saturday 08:00
    assert share(pi, 2 * hour) > 0.9 and share(pi, 5 * 24 * hour) > 0.9


def test_gini() -> None:
    assert gini([1.0, 1.0, 1.0, 1.0]) == pytest.approx(0.0)
    assert gini([0.0, 0.0, 0.0, 1.0]) == pytest.approx(0.75)


@pytest.mark.slow
def test_schedulers_compared_on_the_same_fleet(prepared) -> None:  # noqa: ANN001
    fleet, results = compare(SMALL, prepared)
    again = compare(SMALL, prepared)[1]
    assert [p.accuracy for p in results[0].curve] == [p.accuracy for p in again[0].curve]
    by_name = {result.scheduler: result for result in results}
    assert set(by_name) == {"equity", "oort", "random"}
    for result in results:
        assert result.rounds_completed >= 4
        assert result.final_accuracy > result.curve[0].accuracy + 0.1  # it really learns
        assert result.bytes_moved > 0 and result.assigned_updates >= result.aggregated_updates
    equity = summarise(by_name["equity"], fleet, 0.5)
    random_row = summarise(by_name["random"], fleet, 0.5)
    assert equity.min_participation > 0  # every school took part
    assert equity.late_updates <= random_row.late_updates
    # Rounds close sooner with plans fitted to one finish time than with random full plans.
    assert equity.simulated_seconds < random_row.simulated_seconds


@pytest.mark.slow
def test_simulate_command_writes_table_plot_and_json(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "coordinator",
            "simulate",
            "--devices",
            "12",
            "--schools",
            "3",
            "--rounds",
            "2",
            "--per-round",
            "4",
            "--schedulers",
            "equity,random",
            "--plot",
            str(tmp_path / "sim.png"),
            "--json",
            str(tmp_path / "sim.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "equity" in result.output and "random" in result.output
    assert (tmp_path / "sim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "sim.json").read_text())
    assert [row["scheduler"] for row in summary["summary"]] == ["equity", "random"]
    assert len(summary["curves"]["equity"]) == 3  # the start and two rounds


def test_simulate_command_refuses_bad_options() -> None:
    result = CliRunner().invoke(cli, ["coordinator", "simulate", "--schedulers", "fastest"])
    assert result.exit_code == 2 and "unknown ['fastest']" in result.output
    result = CliRunner().invoke(cli, ["coordinator", "simulate", "--devices", "2"])
    assert result.exit_code == 2 and "at least one device per school" in result.output
