"""Comparing schedulers in the fleet simulator: the setup, the runs and the report.

Shared by `schoolfl coordinator simulate` and benchmarks/bench_scheduler.py so both measure
the same thing: the same fleet, data and seed for every scheduler.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from coordinator.config import ScheduleConfig, TaskConfig
from coordinator.simulation.fleet import SimFleet, build_fleet
from coordinator.simulation.simulator import (
    EvalPoint,
    SimulationData,
    SimulationResult,
    gini,
    prepare_data,
)
from coordinator.simulation.simulator import simulate as simulate_one
from coordinator.utility_scheduler import scheduler_named
from device_profiles.shapes import ModelShape, resolve_shape

logger = logging.getLogger(__name__)

COMPARED_SCHEDULERS = ("equity", "oort", "random")
"""Ours, Oort-style without the equity floor, and Flower's / FedML's random default."""


@dataclass(frozen=True)
class SimulationSettings:
    """One comparison: the fleet, the task it trains, and when to stop."""

    devices: int = 200
    schools: int = 20
    rounds: int = 40
    seed: int = 0
    devices_per_round: int = 20
    deadline_seconds: float = 120.0
    local_steps: int = 20
    rank: int = 8
    allowed_ranks: tuple[int, ...] = (4, 2)
    learning_rate: float = 0.003
    equity_rounds: int = 3
    target_accuracy: float = 0.7
    timing_model: str = "minilm-l6"
    """Model whose cost-model shape advances the simulated clock."""
    schedulers: tuple[str, ...] = COMPARED_SCHEDULERS
    time_limit_seconds: float | None = None
    """Stop each scheduler when its simulated clock passes this (None: after `rounds`)."""

    def task(self, labels: tuple[str, ...]) -> TaskConfig:
        return TaskConfig(
            id="simulated",
            kind="classification",
            base_model=self.timing_model,
            labels=labels,
            rank=self.rank,
            learning_rate=self.learning_rate,
            rounds=self.rounds,
            local_steps=self.local_steps,
            batch_size=8,
            seq_len=64,
            schedule=ScheduleConfig(
                allowed_ranks=self.allowed_ranks,
                devices_per_round=self.devices_per_round,
                min_updates=max(1, self.devices_per_round // 2),
                over_selection=0.3,
                round_deadline_seconds=self.deadline_seconds,
                equity_rounds=self.equity_rounds,
            ),
        )


@dataclass(frozen=True)
class SchedulerSummary:
    """One row of the comparison table."""

    scheduler: str
    time_to_target_seconds: float | None
    final_accuracy: float
    slow_tier_accuracy: float
    min_participation: float
    mean_participation: float
    participation_gini: float
    schools_below_half_mean: int
    bytes_moved: int
    wasted_updates: int
    late_updates: int
    dropped_updates: int
    surplus_updates: int
    assigned_updates: int
    wasted_compute_share: float
    rounds_completed: int
    rounds_failed: int
    simulated_seconds: float


def summarise(result: SimulationResult, fleet: SimFleet, target: float) -> SchedulerSummary:
    schools = [school.school_id for school in fleet.schools]
    rates = list(result.participation_rates(schools).values())
    mean = sum(rates) / len(rates)
    return SchedulerSummary(
        scheduler=result.scheduler,
        time_to_target_seconds=result.time_to_accuracy(target),
        final_accuracy=result.final_accuracy,
        slow_tier_accuracy=result.final_slow_tier_accuracy,
        min_participation=min(rates),
        mean_participation=mean,
        participation_gini=gini(rates),
        schools_below_half_mean=sum(1 for rate in rates if rate < 0.5 * mean),
        bytes_moved=result.bytes_moved,
        wasted_updates=result.wasted_updates,
        late_updates=result.late_updates,
        dropped_updates=result.dropped_updates,
        surplus_updates=result.surplus_updates,
        assigned_updates=result.assigned_updates,
        wasted_compute_share=(
            result.wasted_compute_seconds / result.total_compute_seconds
            if result.total_compute_seconds
            else 0.0
        ),
        rounds_completed=result.rounds_completed,
        rounds_failed=result.rounds_failed,
        simulated_seconds=result.curve[-1].clock_seconds if result.curve else 0.0,
    )


def prepare(
    settings: SimulationSettings, embedded: dict[str, torch.Tensor] | None = None
) -> tuple[SimFleet, SimulationData, ModelShape]:
    """Build the fleet and embed its questions with the frozen MiniLM (once per comparison;
    pass `embedded`, from `embed_all_questions`, to reuse embeddings across seeds)."""
    from quantization.school_questions import load_questions

    fleet = build_fleet(
        load_questions(), devices=settings.devices, schools=settings.schools, seed=settings.seed
    )
    embedded = embedded if embedded is not None else embed_all_questions()
    data = prepare_data(fleet, lambda examples: torch.stack([embedded[e.text] for e in examples]))
    shape = dataclasses.replace(resolve_shape(settings.timing_model), num_labels=len(fleet.labels))
    return fleet, data, shape


def embed_all_questions() -> dict[str, torch.Tensor]:
    """MiniLM-L6 embeddings of every shipped question, by text."""
    from coordinator.simulation.proxy_trainer import embed_questions
    from quantization.school_questions import load_questions

    questions = load_questions()
    vectors = embed_questions(questions)
    return {question.text: vector for question, vector in zip(questions, vectors, strict=True)}


def compare(
    settings: SimulationSettings,
    prepared: tuple[SimFleet, SimulationData, ModelShape] | None = None,
    on_round: Callable[[str, EvalPoint], None] | None = None,
) -> tuple[SimFleet, list[SimulationResult]]:
    """Run every scheduler of `settings` on the same fleet, data and seed."""
    fleet, data, shape = prepared or prepare(settings)
    task = settings.task(fleet.labels)
    results = []
    for name in settings.schedulers:
        logger.info("simulating %s", name)
        results.append(
            simulate_one(
                name,
                scheduler_named(name),
                fleet,
                data,
                task,
                shape,
                seed=settings.seed,
                time_limit_seconds=settings.time_limit_seconds,
                on_round=on_round,
            )
        )
    return fleet, results


def plot_accuracy(results: Sequence[SimulationResult], target: float, path: Path) -> Path:
    """Accuracy over simulated time, one line per scheduler (PNG, written atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from durable.atomic_files import atomic_write_bytes

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for result in results:
        hours = [point.clock_seconds / 3600.0 for point in result.curve]
        axis.plot(hours, [point.accuracy for point in result.curve], label=result.scheduler)
    axis.axhline(target, color="grey", linestyle=":", label=f"target {target:.2f}")
    axis.set_xlabel("simulated hours")
    axis.set_ylabel("held-out accuracy")
    axis.set_title("Fleet simulator: accuracy over simulated time")
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path
