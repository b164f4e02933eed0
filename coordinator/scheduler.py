"""Choosing devices and plans for a round: one small interface, one class per strategy.

A scheduler sees the eligible online devices with their profiles (and, through
`RoundContext`, what earlier rounds taught about them and the schools' shared links) and
returns, per chosen device, a plan with the cost model's prediction for it. Devices it
leaves out are listed with the reason, so operators can see why a school sat a round out.

This module holds the interface, its records and the two simple strategies (random, and
fit-first); the utility-based ones are in `coordinator.utility_scheduler`.
"""

from __future__ import annotations

import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from coordinator.config import TaskConfig
from coordinator.fleet_history import FleetHistory
from coordinator.plan_fitting import LadderLimits, PlanFitter, SchoolLink
from device_profiles.cost_model import Prediction, predict
from device_profiles.plan import TrainingPlan
from device_profiles.profile import DeviceProfile
from device_profiles.shapes import ModelShape

logger = logging.getLogger(__name__)

ENCODER_TARGET_ROLES = ("q", "k", "v")
DECODER_TARGET_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
"""LoRA targets by generic role; they match quantization.adapters' defaults per family."""


@dataclass(frozen=True)
class DeviceCandidate:
    """What the coordinator knows about one device when it schedules a round."""

    device_id: str
    school: str
    profile: DeviceProfile
    free_memory_bytes: int | None = None
    """From the latest heartbeat; None when unknown (then the profile's RAM is used)."""
    capabilities: frozenset[str] = frozenset()
    """Optional protocol features its agent announced (DeviceState.capabilities)."""


@dataclass(frozen=True)
class DevicePlan:
    """One chosen device, its plan (what goes on the wire, unchanged) and the prediction
    the scheduler chose it on."""

    device_id: str
    plan: TrainingPlan
    prediction: Prediction


@dataclass(frozen=True)
class RoundSchedule:
    """A round's selection: who trains what, and who was left out and why."""

    plans: tuple[DevicePlan, ...]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def device_ids(self) -> tuple[str, ...]:
        return tuple(p.device_id for p in self.plans)


@dataclass(frozen=True)
class RoundContext:
    """What the scheduler knows beyond the candidates: past rounds and school links."""

    history: FleetHistory = field(default_factory=FleetHistory)
    schools: Mapping[str, SchoolLink] = field(default_factory=dict)
    """School id -> its shared link; a school not listed is limited only by device links."""


def task_plan(task: TaskConfig, shape: ModelShape) -> TrainingPlan:
    """The plan a device gets when nothing needs shrinking."""
    roles = ENCODER_TARGET_ROLES if shape.family == "encoder" else DECODER_TARGET_ROLES
    return TrainingPlan(
        scheme=task.scheme,
        rank=task.rank,
        batch_size=task.batch_size,
        seq_len=task.seq_len,
        local_steps=task.local_steps,
        target_modules=roles,
        learning_rate=task.learning_rate,
    )


class Scheduler(ABC):
    """Picks a round's devices and their plans."""

    @abstractmethod
    def configure_round(
        self,
        task: TaskConfig,
        shape: ModelShape,
        candidates: Sequence[DeviceCandidate],
        round_number: int,
        context: RoundContext | None = None,
    ) -> RoundSchedule:
        """Choose devices and plans for round `round_number` of `task`.

        Parameters
        ----------
        task
            The task's configuration: quota, over-selection, deadline, default plan.
        shape
            The base model's shape, for the cost model.
        candidates
            Online, eligible devices that are not busy with another task.
        round_number
            Seeds any randomness, so a restarted coordinator schedules the same way.
        context
            Past rounds (losses, drop-outs, observed speed, school participation) and the
            schools' shared links; None for a scheduler that needs neither.

        Returns
        -------
        RoundSchedule
            At most quota x (1 + over_selection) plans, each predicted to fit the deadline
            and the device's memory, and the reason for every candidate left out.
        """


class FitFirstScheduler(Scheduler):
    """Random selection among the devices whose predicted plan fits (Flower's default
    selection, plus the cost model's feasibility check and deadline-driven step counts:
    `PlanFitter` with `LadderLimits.steps_only`, so the task's rank and sequence stay)."""

    def configure_round(
        self,
        task: TaskConfig,
        shape: ModelShape,
        candidates: Sequence[DeviceCandidate],
        round_number: int,
        context: RoundContext | None = None,
    ) -> RoundSchedule:
        base_plan = task_plan(task, shape)
        fitter = PlanFitter(
            shape,
            base_plan,
            LadderLimits.steps_only(base_plan),
            task.schedule.round_deadline_seconds,
        )
        feasible: list[DevicePlan] = []
        skipped: dict[str, str] = {}
        for candidate in candidates:
            fitted = fitter.fit(candidate.profile, free_memory_bytes=candidate.free_memory_bytes)
            if isinstance(fitted, str):
                skipped[candidate.device_id] = fitted
                continue
            plan, prediction = fitted
            feasible.append(DevicePlan(candidate.device_id, plan, prediction))
        wanted = task.schedule.devices_to_assign
        rng = random.Random(f"{task.id}/{round_number}")
        feasible.sort(key=lambda p: p.device_id)
        rng.shuffle(feasible)
        chosen = tuple(sorted(feasible[:wanted], key=lambda p: p.device_id))
        for left_out in feasible[wanted:]:
            skipped[left_out.device_id] = "not selected this round (enough devices)"
        return RoundSchedule(plans=chosen, skipped=skipped)


class RandomScheduler(Scheduler):
    """Flower's and FedML's default: a uniformly random sample of the available devices,
    each given the task's full plan. Devices are left out only when the plan cannot run at
    all (scheme or memory); a device too slow for the deadline is still chosen, and misses it.
    The baseline the fleet simulator measures the other schedulers against."""

    def configure_round(
        self,
        task: TaskConfig,
        shape: ModelShape,
        candidates: Sequence[DeviceCandidate],
        round_number: int,
        context: RoundContext | None = None,
    ) -> RoundSchedule:
        plan = task_plan(task, shape)
        runnable: list[DevicePlan] = []
        skipped: dict[str, str] = {}
        for candidate in sorted(candidates, key=lambda c: c.device_id):
            prediction = predict(candidate.profile, shape, plan)
            if not prediction.fits:
                skipped[candidate.device_id] = prediction.reason
                continue
            runnable.append(DevicePlan(candidate.device_id, plan, prediction))
        wanted = task.schedule.devices_to_assign
        chosen = random.Random(f"{task.id}/{round_number}").sample(
            runnable, min(wanted, len(runnable))
        )
        chosen_ids = {p.device_id for p in chosen}
        for left_out in runnable:
            if left_out.device_id not in chosen_ids:
                skipped[left_out.device_id] = "not selected this round (random sample)"
        return RoundSchedule(
            plans=tuple(sorted(chosen, key=lambda p: p.device_id)), skipped=skipped
        )
