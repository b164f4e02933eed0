"""The fleet simulator: compare schedulers on the same fleet, data and seed.

Each round the scheduler under test sees the devices available at the simulated time, with
the history of earlier rounds and the schools' links, exactly as the coordinator daemon
would. The simulator then plays the round out with what the scheduler cannot see: each
device's true speed, its share of the school link among the school's devices in the round,
and its drop-outs. Updates that arrive before the round closes are really trained (LoRA on the
proxy model of `sim_training`, from each device's own non-IID shard) and aggregated with the
coordinator's FedAvg; updates that arrive after it closes are wasted work. The simulated
clock advances by the cost model's times for the task's real model shape (MiniLM-L6 nf4 by
default), like FedScale.

A round closes, as in `coordinator.rounds`, when the quota of updates is in, when every
assigned device has delivered, or at the deadline (failing without a quorum).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from coordinator.aggregation import Aggregator, ClientUpdate, FedAvg, apply_delta
from coordinator.config import TaskConfig
from coordinator.fleet_history import FleetHistory, RoundOutcome
from coordinator.plan_fitting import LadderLimits, PlanFitter, SchoolLink
from coordinator.scheduler import (
    DeviceCandidate,
    RoundContext,
    RoundSchedule,
    Scheduler,
    task_plan,
)
from coordinator.simulation.fleet import SimDevice, SimFleet, is_available
from coordinator.simulation.proxy_trainer import ProxyTrainer
from device_profiles.plan import TrainingPlan
from device_profiles.shapes import ModelShape
from device_profiles.transfer import UPLOAD_BYTES_PER_PARAM, adapter_bytes

logger = logging.getLogger(__name__)

WAIT_WHEN_SHORT_SECONDS = 600.0
"""When too few devices are available for a quorum, the clock jumps this far ahead."""
ROUND_OVERHEAD_SECONDS = 5.0
"""Coordinator time between rounds: aggregation, evaluation, publishing."""
SMOOTHING_POINTS = 3
"""Evaluations averaged when deciding that a target accuracy was reached."""


@dataclass(frozen=True)
class EvalPoint:
    round_number: int
    clock_seconds: float
    accuracy: float
    slow_tier_accuracy: float
    round_seconds: float


@dataclass
class SimulationResult:
    """Everything the comparison table and plot need for one scheduler."""

    scheduler: str
    curve: list[EvalPoint] = field(default_factory=list)
    school_rounds: dict[str, int] = field(default_factory=dict)
    rounds_completed: int = 0
    rounds_failed: int = 0
    bytes_moved: int = 0
    assigned_updates: int = 0
    aggregated_updates: int = 0
    dropped_updates: int = 0
    """The device vanished mid-round (its partial work is wasted)."""
    late_updates: int = 0
    """Arrived after the deadline: the work the issue calls wasted."""
    surplus_updates: int = 0
    """Arrived before the deadline but after the quota closed the round (over-selection's
    price)."""
    wasted_compute_seconds: float = 0.0
    total_compute_seconds: float = 0.0

    @property
    def wasted_updates(self) -> int:
        return self.dropped_updates + self.late_updates + self.surplus_updates

    def time_to_accuracy(self, target: float) -> float | None:
        """Simulated seconds until the mean of the last three evaluations reaches `target`
        (one evaluation on a few hundred questions is too noisy to trust a single crossing)."""
        for index, point in enumerate(self.curve):
            window = self.curve[max(0, index - SMOOTHING_POINTS + 1) : index + 1]
            if sum(p.accuracy for p in window) / len(window) >= target:
                return point.clock_seconds
        return None

    @property
    def final_accuracy(self) -> float:
        return self.curve[-1].accuracy if self.curve else 0.0

    @property
    def final_slow_tier_accuracy(self) -> float:
        return self.curve[-1].slow_tier_accuracy if self.curve else 0.0

    def participation_rates(self, schools: Sequence[str]) -> dict[str, float]:
        rounds = max(1, self.rounds_completed)
        return {school: self.school_rounds.get(school, 0) / rounds for school in schools}


def gini(values: Sequence[float]) -> float:
    """Gini coefficient (0: perfectly even, towards 1: concentrated)."""
    ordered = sorted(values)
    total = sum(ordered)
    if not ordered or total == 0:
        return 0.0
    count = len(ordered)
    weighted = sum((index + 1) * value for index, value in enumerate(ordered))
    return (2.0 * weighted) / (count * total) - (count + 1.0) / count


@dataclass(frozen=True)
class SimulationData:
    """The fleet's questions as tensors: the embeddings are computed once per fleet."""

    device_embeddings: dict[str, torch.Tensor]
    device_labels: dict[str, torch.Tensor]
    held_out_embeddings: torch.Tensor
    held_out_labels: torch.Tensor
    slow_tier_label_weights: torch.Tensor
    """Share of each label among the slow tier's questions: weights of per-label accuracy."""


def prepare_data(
    fleet: SimFleet, embed: Callable[[Sequence[object]], torch.Tensor]
) -> SimulationData:
    """Embed every question once (the frozen base) and index it per device."""
    label_index = {label: index for index, label in enumerate(fleet.labels)}
    unique = {e.text: e for device in fleet.devices for e in device.examples}
    unique.update({e.text: e for e in fleet.held_out})
    texts = sorted(unique)
    vectors = embed([unique[text] for text in texts])
    row = {text: index for index, text in enumerate(texts)}
    device_embeddings, device_labels = {}, {}
    for device in fleet.devices:
        rows = [row[e.text] for e in device.examples]
        device_embeddings[device.device_id] = vectors[rows]
        device_labels[device.device_id] = torch.tensor(
            [label_index[e.label] for e in device.examples]
        )
    slow = set(fleet.tier_schools("slow"))
    counts = torch.zeros(len(fleet.labels))
    for device in fleet.devices:
        if device.school in slow:
            for example in device.examples:
                counts[label_index[example.label]] += 1
    weights = (
        counts / counts.sum() if counts.sum() > 0 else torch.full_like(counts, 1 / len(counts))
    )
    return SimulationData(
        device_embeddings,
        device_labels,
        vectors[[row[e.text] for e in fleet.held_out]],
        torch.tensor([label_index[e.label] for e in fleet.held_out]),
        weights,
    )


@dataclass(frozen=True)
class _Played:
    """One assigned device's round as it really went."""

    device: SimDevice
    rank: int
    steps: int
    batch_size: int
    predicted_seconds: float
    finish_seconds: float | None
    """Seconds after the round opened when its update arrives; None if it dropped out."""
    compute_seconds: float
    bytes_moved: int


def _play(
    device: SimDevice,
    plan: TrainingPlan,
    predicted_seconds: float,
    share: SchoolLink,
    fitter: PlanFitter,
    rng: random.Random,
) -> _Played:
    """The round as it really goes for one device: its true speed, its real link share."""
    actual = fitter.predict(device.profile, plan, share, device.true_slowness)
    upload_bytes = adapter_bytes(
        fitter.shape, plan.rank, plan.target_modules, UPLOAD_BYTES_PER_PARAM
    )
    if rng.random() < device.dropout_probability:
        vanished_after = rng.random()
        return _Played(
            device,
            plan.rank,
            plan.local_steps,
            plan.batch_size,
            predicted_seconds,
            None,
            actual.compute_seconds * vanished_after,
            int(fitter.download_bytes),
        )
    return _Played(
        device,
        plan.rank,
        plan.local_steps,
        plan.batch_size,
        predicted_seconds,
        actual.round_seconds,
        actual.compute_seconds,
        int(fitter.download_bytes + upload_bytes),
    )


def _close_seconds(played: Sequence[_Played], task: TaskConfig) -> float:
    """When the round closes: quota in, everyone delivered, or the deadline."""
    deadline = task.schedule.round_deadline_seconds
    arrivals = sorted(p.finish_seconds for p in played if p.finish_seconds is not None)
    in_time = [t for t in arrivals if t <= deadline]
    if len(in_time) >= task.schedule.devices_per_round:
        return in_time[task.schedule.devices_per_round - 1]
    if len(in_time) == len(played) and len(in_time) >= task.schedule.min_updates:
        return in_time[-1]
    return deadline


def _evaluate(
    trainer: ProxyTrainer, state: dict[str, torch.Tensor], data: SimulationData
) -> tuple[float, float]:
    """Held-out accuracy, and the same weighted by the slow tier's label mix."""
    predicted = trainer.predictions(state, data.held_out_embeddings)
    correct = (predicted == data.held_out_labels).float()
    per_label = torch.zeros(len(data.slow_tier_label_weights))
    for label in range(len(per_label)):
        mask = data.held_out_labels == label
        per_label[label] = correct[mask].mean() if mask.any() else 0.0
    slow = float((per_label * data.slow_tier_label_weights).sum())
    accuracy = float(correct.mean())
    return accuracy, (slow if math.isfinite(slow) else 0.0)


@dataclass
class _Run:
    """What one scheduler's rounds share: the hidden truth the scheduler cannot see (true
    speeds, drop-outs), the trainer, and the history the scheduler does see."""

    task: TaskConfig
    data: SimulationData
    seed: int
    aggregator: Aggregator | None
    rng: random.Random
    trainer: ProxyTrainer
    fitter: PlanFitter
    links: dict[str, SchoolLink]
    by_id: dict[str, SimDevice]
    history: FleetHistory = field(default_factory=FleetHistory)


@dataclass(frozen=True)
class _RoundPlay:
    """One round played out: the updates that beat its close, and the work that was wasted."""

    played: list[_Played]
    close_seconds: float
    on_time: list[_Played]
    wasted: list[_Played]


def _start_run(
    fleet: SimFleet,
    data: SimulationData,
    task: TaskConfig,
    shape: ModelShape,
    seed: int,
    aggregator: Aggregator | None,
) -> _Run:
    """The device plays use the deployed ladder's fitter, so a device's real round time is
    what the coordinator would predict for it given its true speed."""
    rng = random.Random(f"{seed}/simulation")
    trainer = ProxyTrainer(
        data.held_out_embeddings.shape[1], len(fleet.labels), task.rank, task.alpha, seed
    )
    fitter = PlanFitter(
        shape,
        task_plan(task, shape),
        LadderLimits(task.ladder_ranks, task.ladder_min_local_steps, task.ladder_min_seq_len),
        task.schedule.round_deadline_seconds,
    )
    links = {school.school_id: school.link for school in fleet.schools}
    by_id = {device.device_id: device for device in fleet.devices}
    return _Run(task, data, seed, aggregator, rng, trainer, fitter, links, by_id)


def _available_candidates(
    fleet: SimFleet, clock: float, seed: int, round_number: int
) -> list[DeviceCandidate]:
    """The devices the coordinator would see online now; seeded by the round and the clock
    so that every scheduler faces the same school day."""
    availability_rng = random.Random(f"{seed}/available/{round_number}/{int(clock)}")
    return [
        DeviceCandidate(device.device_id, device.school, device.profile)
        for device in fleet.devices
        if is_available(device, clock, availability_rng)
    ]


def _play_schedule(run: _Run, schedule: RoundSchedule) -> _RoundPlay:
    """Devices of one school split its link among those assigned in this round, which the
    scheduler only estimated; play each plan in the schedule's order (the drop-out draws)."""
    per_school: dict[str, int] = {}
    for plan in schedule.plans:
        school = run.by_id[plan.device_id].school
        per_school[school] = per_school.get(school, 0) + 1
    played = [
        _play(
            run.by_id[p.device_id],
            p.plan,
            p.prediction.round_seconds,
            run.links[run.by_id[p.device_id].school].share(
                per_school[run.by_id[p.device_id].school]
            ),
            run.fitter,
            run.rng,
        )
        for p in schedule.plans
    ]
    close = _close_seconds(played, run.task)
    on_time = [p for p in played if p.finish_seconds is not None and p.finish_seconds <= close]
    on_time_ids = {id(p) for p in on_time}
    wasted = [p for p in played if id(p) not in on_time_ids]
    return _RoundPlay(played, close, on_time, wasted)


def _count_work(result: SimulationResult, round_play: _RoundPlay, task: TaskConfig) -> None:
    """Tell wasted work apart by cause: each has a different remedy in the scheduler."""
    played, wasted = round_play.played, round_play.wasted
    result.assigned_updates += len(played)
    result.bytes_moved += sum(p.bytes_moved for p in played)
    result.total_compute_seconds += sum(p.compute_seconds for p in played)
    for p in wasted:
        if p.finish_seconds is None:
            result.dropped_updates += 1
        elif p.finish_seconds > task.schedule.round_deadline_seconds:
            result.late_updates += 1
        else:
            result.surplus_updates += 1
    result.wasted_compute_seconds += sum(p.compute_seconds for p in wasted)


def _train_on_time(
    run: _Run,
    global_state: dict[str, torch.Tensor],
    on_time: Sequence[_Played],
    round_number: int,
) -> tuple[list[ClientUpdate], list[RoundOutcome]]:
    """Only updates that arrived in time are trained for real: the rest never reach FedAvg,
    so training them would only cost wall time."""
    updates: list[ClientUpdate] = []
    outcomes: list[RoundOutcome] = []
    for index, p in enumerate(on_time):
        local = run.trainer.train(
            global_state,
            p.rank,
            run.data.device_embeddings[p.device.device_id],
            run.data.device_labels[p.device.device_id],
            steps=p.steps,
            batch_size=p.batch_size,
            learning_rate=run.task.learning_rate,
            seed=run.seed * 100_003 + round_number * 1_009 + index,
        )
        samples = len(run.data.device_labels[p.device.device_id])
        updates.append(ClientUpdate(p.device.device_id, local.delta, samples, p.steps, rank=p.rank))
        outcomes.append(
            RoundOutcome(
                p.device.device_id,
                p.device.school,
                True,
                loss=local.mean_loss,
                samples=samples,
                actual_seconds=p.finish_seconds,
                predicted_seconds=p.predicted_seconds,
            )
        )
    return updates, outcomes


def _wasted_outcomes(wasted: Sequence[_Played]) -> list[RoundOutcome]:
    """A late update is refused, but its arrival still tells the coordinator how slow the
    device really was; a device that vanished tells it nothing."""
    return [
        RoundOutcome(
            p.device.device_id,
            p.device.school,
            False,
            actual_seconds=p.finish_seconds,
            predicted_seconds=p.predicted_seconds,
            delivered=p.finish_seconds is not None,
        )
        for p in wasted
    ]


def _finish_round(
    run: _Run,
    result: SimulationResult,
    global_state: dict[str, torch.Tensor],
    round_play: _RoundPlay,
    round_number: int,
) -> dict[str, torch.Tensor]:
    """Aggregate the round if it reached its quorum, record it in the history the scheduler
    learns from, and return the (possibly unchanged) global state."""
    _count_work(result, round_play, run.task)
    outcomes: list[RoundOutcome] = []
    if len(round_play.on_time) >= run.task.schedule.min_updates:
        updates, outcomes = _train_on_time(run, global_state, round_play.on_time, round_number)
        aggregated = (run.aggregator or FedAvg()).aggregate(updates, global_state)
        global_state = apply_delta(global_state, aggregated.delta)
        result.rounds_completed += 1
        result.aggregated_updates += len(aggregated.accepted_devices)
        for school in {run.by_id[d].school for d in aggregated.accepted_devices}:
            result.school_rounds[school] = result.school_rounds.get(school, 0) + 1
    else:
        result.rounds_failed += 1
    outcomes.extend(_wasted_outcomes(round_play.wasted))
    run.history.observe(round_number, outcomes)
    return global_state


def simulate(
    scheduler_name: str,
    scheduler: Scheduler,
    fleet: SimFleet,
    data: SimulationData,
    task: TaskConfig,
    shape: ModelShape,
    *,
    seed: int = 0,
    time_limit_seconds: float | None = None,
    aggregator: Aggregator | None = None,
    on_round: Callable[[str, EvalPoint], None] | None = None,
) -> SimulationResult:
    """Run `task.rounds` rounds of `scheduler` on `fleet`, or fewer if the simulated clock
    passes `time_limit_seconds` first (compare schedulers on equal time, not equal rounds),
    and record what happened. `aggregator` replaces FedAvg (e.g. DP-FedAvg)."""
    run = _start_run(fleet, data, task, shape, seed, aggregator)
    trainer = run.trainer
    global_state = trainer.initial_state()
    result = SimulationResult(scheduler_name)
    clock = 0.0
    accuracy, slow_accuracy = _evaluate(trainer, global_state, data)
    result.curve.append(EvalPoint(0, 0.0, accuracy, slow_accuracy, 0.0))
    round_number = 0
    while result.rounds_completed + result.rounds_failed < task.rounds:
        if time_limit_seconds is not None and clock >= time_limit_seconds:
            break
        candidates = _available_candidates(fleet, clock, seed, round_number)
        if len(candidates) < task.schedule.min_updates:
            clock += WAIT_WHEN_SHORT_SECONDS
            continue
        round_number += 1
        schedule = scheduler.configure_round(
            task, shape, candidates, round_number, RoundContext(run.history, run.links)
        )
        if len(schedule.plans) < task.schedule.min_updates:
            clock += WAIT_WHEN_SHORT_SECONDS
            result.rounds_failed += 1
            continue
        round_play = _play_schedule(run, schedule)
        global_state = _finish_round(run, result, global_state, round_play, round_number)
        clock += round_play.close_seconds + ROUND_OVERHEAD_SECONDS
        accuracy, slow_accuracy = _evaluate(trainer, global_state, data)
        point = EvalPoint(round_number, clock, accuracy, slow_accuracy, round_play.close_seconds)
        result.curve.append(point)
        if on_round is not None:
            on_round(scheduler_name, point)
    return result
