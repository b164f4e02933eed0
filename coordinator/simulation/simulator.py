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
from coordinator.scheduler import DeviceCandidate, RoundContext, Scheduler, task_plan
from coordinator.simulation.fleet import SimDevice, SimFleet, is_available
from coordinator.simulation.proxy_trainer import ProxyTrainer
from device_profiles.cost_model import UPLOAD_BYTES_PER_PARAM, adapter_bytes
from device_profiles.plan import TrainingPlan
from device_profiles.shapes import ModelShape

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
    rng = random.Random(f"{seed}/simulation")
    trainer = ProxyTrainer(
        data.held_out_embeddings.shape[1], len(fleet.labels), task.rank, task.alpha, seed
    )
    global_state = trainer.initial_state()
    full_plan = task_plan(task, shape)
    fitter = PlanFitter(
        shape,
        full_plan,
        LadderLimits(task.ladder_ranks, task.ladder_min_local_steps, task.ladder_min_seq_len),
        task.schedule.round_deadline_seconds,
    )
    links = {school.school_id: school.link for school in fleet.schools}
    by_id = {device.device_id: device for device in fleet.devices}
    history = FleetHistory()
    result = SimulationResult(scheduler_name)
    clock = 0.0
    accuracy, slow_accuracy = _evaluate(trainer, global_state, data)
    result.curve.append(EvalPoint(0, 0.0, accuracy, slow_accuracy, 0.0))
    round_number = 0
    while result.rounds_completed + result.rounds_failed < task.rounds:
        if time_limit_seconds is not None and clock >= time_limit_seconds:
            break
        availability_rng = random.Random(f"{seed}/available/{round_number}/{int(clock)}")
        candidates = [
            DeviceCandidate(device.device_id, device.school, device.profile)
            for device in fleet.devices
            if is_available(device, clock, availability_rng)
        ]
        if len(candidates) < task.schedule.min_updates:
            clock += WAIT_WHEN_SHORT_SECONDS
            continue
        round_number += 1
        schedule = scheduler.configure_round(
            task, shape, candidates, round_number, RoundContext(history, links)
        )
        if len(schedule.plans) < task.schedule.min_updates:
            clock += WAIT_WHEN_SHORT_SECONDS
            result.rounds_failed += 1
            continue
        per_school: dict[str, int] = {}
        for plan in schedule.plans:
            school = by_id[plan.device_id].school
            per_school[school] = per_school.get(school, 0) + 1
        played = [
            _play(
                by_id[p.device_id],
                p.plan,
                p.prediction.round_seconds,
                links[by_id[p.device_id].school].share(per_school[by_id[p.device_id].school]),
                fitter,
                rng,
            )
            for p in schedule.plans
        ]
        close = _close_seconds(played, task)
        on_time = [p for p in played if p.finish_seconds is not None and p.finish_seconds <= close]
        result.assigned_updates += len(played)
        result.bytes_moved += sum(p.bytes_moved for p in played)
        result.total_compute_seconds += sum(p.compute_seconds for p in played)
        on_time_ids = {id(p) for p in on_time}
        wasted = [p for p in played if id(p) not in on_time_ids]
        for p in wasted:
            if p.finish_seconds is None:
                result.dropped_updates += 1
            elif p.finish_seconds > task.schedule.round_deadline_seconds:
                result.late_updates += 1
            else:
                result.surplus_updates += 1
        result.wasted_compute_seconds += sum(p.compute_seconds for p in wasted)
        outcomes: list[RoundOutcome] = []
        updates: list[ClientUpdate] = []
        if len(on_time) >= task.schedule.min_updates:
            for index, p in enumerate(on_time):
                local = trainer.train(
                    global_state,
                    p.rank,
                    data.device_embeddings[p.device.device_id],
                    data.device_labels[p.device.device_id],
                    steps=p.steps,
                    batch_size=p.batch_size,
                    learning_rate=task.learning_rate,
                    seed=seed * 100_003 + round_number * 1_009 + index,
                )
                samples = len(data.device_labels[p.device.device_id])
                updates.append(
                    ClientUpdate(p.device.device_id, local.delta, samples, p.steps, rank=p.rank)
                )
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
            aggregated = (aggregator or FedAvg()).aggregate(updates, global_state)
            global_state = apply_delta(global_state, aggregated.delta)
            result.rounds_completed += 1
            result.aggregated_updates += len(aggregated.accepted_devices)
            for school in {by_id[d].school for d in aggregated.accepted_devices}:
                result.school_rounds[school] = result.school_rounds.get(school, 0) + 1
        else:
            result.rounds_failed += 1
        for p in wasted:
            # A late update is refused, but its arrival still tells the coordinator how slow
            # the device really was; a device that vanished tells it nothing.
            outcomes.append(
                RoundOutcome(
                    p.device.device_id,
                    p.device.school,
                    False,
                    actual_seconds=p.finish_seconds,
                    predicted_seconds=p.predicted_seconds,
                    delivered=p.finish_seconds is not None,
                )
            )
        history.observe(round_number, outcomes)
        clock += close + ROUND_OVERHEAD_SECONDS
        accuracy, slow_accuracy = _evaluate(trainer, global_state, data)
        point = EvalPoint(round_number, clock, accuracy, slow_accuracy, close)
        result.curve.append(point)
        if on_round is not None:
            on_round(scheduler_name, point)
    return result


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
