"""`schoolfl coordinator simulate`: compare schedulers on a simulated fleet of schools."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import click

from durable.atomic_files import atomic_write_text

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from coordinator.simulation.compare import SchedulerSummary, SimulationSettings
    from coordinator.simulation.fleet import SimFleet
    from coordinator.simulation.simulator import EvalPoint, SimulationResult


def _scheduler_names(schedulers: str) -> tuple[str, ...]:
    """Reject a misspelt scheduler before the minutes spent embedding the fleet's questions."""
    from coordinator.config import SCHEDULERS

    names = tuple(name.strip() for name in schedulers.split(",") if name.strip())
    unknown = [name for name in names if name not in SCHEDULERS]
    if unknown or not names:
        raise click.BadParameter(
            f"unknown {unknown}; choose from {', '.join(SCHEDULERS)}", param_hint="--schedulers"
        )
    return names


def _check_fleet_and_target(devices: int, schools: int, target: float) -> None:
    """Checked before the fleet is built: a bad value would otherwise surface only after
    minutes of embedding and training."""
    if devices < schools or schools < 1:
        raise click.BadParameter("need at least one device per school", param_hint="--devices")
    if not 0 < target <= 1:
        raise click.BadParameter("an accuracy in (0, 1]", param_hint="--target")


def _progress_logger(console: Console) -> Callable[[str, EvalPoint], None]:
    """A comparison takes minutes: show each evaluation as it happens, on stderr, so the
    table on stdout stays clean."""

    def progress(name: str, point: EvalPoint) -> None:
        console.log(
            f"{name}: round {point.round_number:3d}  "
            f"t={point.clock_seconds / 3600:5.2f} h  "
            f"accuracy {point.accuracy:.3f}"
        )

    return progress


def _summary_row(row: SchedulerSummary) -> tuple[str, ...]:
    """Hours and megabytes, the units a planner compares schedulers in."""
    return (
        row.scheduler,
        "not reached"
        if row.time_to_target_seconds is None
        else f"{row.time_to_target_seconds / 3600:.2f} h",
        f"{row.final_accuracy:.3f}",
        f"{row.slow_tier_accuracy:.3f}",
        f"{row.min_participation:.2f} / {row.mean_participation:.2f}",
        f"{row.participation_gini:.3f}",
        str(row.schools_below_half_mean),
        f"{row.bytes_moved / 1e6:.1f}",
        f"{row.wasted_updates}/{row.assigned_updates}",
        str(row.rounds_failed),
    )


def _summary_table(
    rows: Sequence[SchedulerSummary], settings: SimulationSettings, target: float
) -> Table:
    """One row per scheduler, titled with what makes the run reproducible."""
    from rich.table import Table

    table = Table(
        title=f"{settings.devices} devices, {settings.schools} schools, "
        f"{settings.rounds} rounds, seed {settings.seed}"
    )
    for header in (
        "scheduler",
        f"time to {target:.2f}",
        "final acc",
        "slow-tier acc",
        "min / mean part.",
        "Gini",
        "schools < half mean",
        "MB moved",
        "wasted updates",
        "failed rounds",
    ):
        table.add_column(header)
    for row in rows:
        table.add_row(*_summary_row(row))
    return table


def _write_json(
    json_path: Path,
    settings: SimulationSettings,
    rows: Sequence[SchedulerSummary],
    results: Sequence[SimulationResult],
    fleet: SimFleet,
) -> None:
    """Everything needed to redraw the table or the plot later without re-running."""
    document = {
        "settings": asdict(settings),
        "summary": [asdict(row) for row in rows],
        "curves": {r.scheduler: [asdict(p) for p in r.curve] for r in results},
        "participation": {
            r.scheduler: r.participation_rates([s.school_id for s in fleet.schools])
            for r in results
        },
    }
    atomic_write_text(json_path, json.dumps(document, indent=2))


@click.command("simulate")
@click.option("--devices", default=200, show_default=True, help="Devices in the fleet.")
@click.option("--schools", default=20, show_default=True, help="Schools they belong to.")
@click.option("--rounds", default=40, show_default=True, help="Rounds per scheduler.")
@click.option("--seed", default=0, show_default=True, help="Fleet, data and drop-out seed.")
@click.option(
    "--hours",
    type=float,
    default=None,
    help="Also stop each scheduler after this much simulated time (equal time, not rounds).",
)
@click.option("--per-round", default=20, show_default=True, help="Updates wanted per round.")
@click.option(
    "--deadline", default=120.0, show_default=True, help="Round deadline, simulated seconds."
)
@click.option(
    "--target", default=0.7, show_default=True, help="Accuracy for the time-to-target column."
)
@click.option(
    "--schedulers",
    default="equity,oort,random",
    show_default=True,
    help="Comma-separated: equity, oort, random, fit-first.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Write accuracy over simulated time per scheduler to this PNG.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the summary rows and curves to this JSON file.",
)
def simulate_command(
    devices: int,
    schools: int,
    rounds: int,
    seed: int,
    hours: float | None,
    per_round: int,
    deadline: float,
    target: float,
    schedulers: str,
    plot_path: Path | None,
    json_path: Path | None,
) -> None:
    """Run each scheduler on the same simulated fleet, data and seed, and compare them.

    Devices really train (LoRA on a small network over frozen MiniLM embeddings of the
    shipped school questions); the clock is advanced by the cost model for MiniLM-L6 nf4.
    """
    from rich.console import Console

    from coordinator.simulation.compare import (
        SimulationSettings,
        compare,
        plot_accuracy,
        prepare,
        summarise,
    )

    names = _scheduler_names(schedulers)
    _check_fleet_and_target(devices, schools, target)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = SimulationSettings(
        devices=devices,
        schools=schools,
        rounds=rounds,
        seed=seed,
        devices_per_round=per_round,
        deadline_seconds=deadline,
        target_accuracy=target,
        schedulers=names,
        time_limit_seconds=hours * 3600.0 if hours else None,
    )
    console = Console(stderr=True)
    started = time.perf_counter()
    with console.status("building the fleet and embedding the questions with MiniLM..."):
        prepared = prepare(settings)
    fleet, results = compare(settings, prepared, on_round=_progress_logger(console))
    rows = [summarise(result, fleet, target) for result in results]
    Console().print(_summary_table(rows, settings, target))
    if plot_path is not None:
        plot_accuracy(results, target, plot_path)
        click.echo(f"plot: {plot_path}")
    if json_path is not None:
        _write_json(json_path, settings, rows, results, fleet)
        click.echo(f"summary: {json_path}")
    click.echo(f"simulated in {time.perf_counter() - started:.0f} s of wall time")
