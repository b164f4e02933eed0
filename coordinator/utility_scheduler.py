"""Utility-based selection: an Oort-style selector, and ours with an equity floor.

Both rank devices by Oort's statistical utility (Lai et al., OSDI 2021): a device whose data
the model still gets wrong (high training loss) on many samples is worth more, and a device
not picked for a while earns a staleness bonus. A share of the slots goes to devices never
tried, fastest first (exploration).

`OortScheduler` is the published idea as other frameworks would run it here: every device
gets the task's full plan, a device predicted to be late is penalised by (T / t)^alpha, and
the over-selection is the fixed configured fraction.

`EquityScheduler` is schoolfl's default. It differs where schools differ from phones:
- a slow or poorly connected device gets a smaller plan (fewer steps, a smaller rank, a
  shorter sequence: `plan_fitting`) that fits the deadline, instead of a lateness penalty that
  in practice excludes whole schools;
- devices of one school share the school's link, so adding a device refits the plans of its
  school-mates with their new share, and a school whose link is full takes no more;
- every school with an eligible device takes part at least once every `equity_rounds`;
- over-selection is sized from observed drop-out rates: devices are added until the expected
  number of arriving updates reaches the quota;
- predictions are multiplied by each device's observed actual/predicted ratio.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coordinator.config import TaskConfig
from coordinator.fleet_history import FleetHistory
from coordinator.plan_fitting import LadderLimits, PlanFitter, SchoolLink, work_fraction
from coordinator.scheduler import (
    DeviceCandidate,
    DevicePlan,
    RoundContext,
    RoundSchedule,
    Scheduler,
    task_plan,
)
from device_profiles.cost_model import Prediction
from device_profiles.plan import TrainingPlan
from device_profiles.shapes import ModelShape

STALENESS_WEIGHT = 0.1
"""Oort's staleness bonus: sqrt(0.1 x ln(round) / rounds since last picked)."""
LATENESS_ALPHA = 2.0
"""Oort's system-utility exponent for devices slower than the preferred round time."""
PREFERRED_SLACK = 2.0
"""The preferred round time is this much longer than the quota's fastest full plans: long
enough that most chosen devices do most of the full plan (1.25 made rounds shorter but each
round taught the model less; benchmarks/RESULTS.md)."""
QUOTA_CONFIDENCE_Z = 1.5
"""Over-selection aims for the quota at about 93% confidence (one-sided normal z)."""
MAX_SELECTION_FACTOR = 3.0
"""Never assign more than this many devices per wanted update, whatever the drop-out rate."""


def statistical_utilities(
    candidates: Sequence[DeviceCandidate], history: FleetHistory, round_number: int
) -> dict[str, float]:
    """Oort's utility for every explored device: samples x loss, scaled to 0..1 across the
    candidates, plus the staleness bonus. Unexplored devices are absent."""
    raw: dict[str, float] = {}
    for candidate in candidates:
        stats = history.devices.get(candidate.device_id)
        if stats is None or stats.last_loss is None:
            continue
        raw[candidate.device_id] = max(0.0, stats.last_samples * stats.last_loss)
    top = max(raw.values(), default=0.0) or 1.0
    utilities = {}
    for device_id, value in raw.items():
        last = history.devices[device_id].last_round
        since = max(1, round_number - last)
        bonus = math.sqrt(STALENESS_WEIGHT * math.log(max(round_number, 2)) / since)
        utilities[device_id] = value / top + bonus
    return utilities


@dataclass
class _Pick:
    candidate: DeviceCandidate
    plan: TrainingPlan
    prediction: Prediction
    utility: float
    budget: float | None = None
    """Seconds its plan was fitted to: the preferred round time, or None for the deadline's
    share (a slow device that only the equity floor brings in)."""


def _speed(history: FleetHistory, device_id: str) -> float:
    stats = history.devices.get(device_id)
    return stats.speed_factor if stats else 1.0


def _explore_slots(wanted: int, exploration: float, explored: int, unexplored: int) -> int:
    """Oort's exploration share; all slots explore while nothing is explored yet."""
    if explored == 0:
        return min(wanted, unexplored)
    return min(unexplored, max(1, round(wanted * exploration)) if unexplored else 0)


def _sample_by_utility(picks: list[_Pick], rng: random.Random) -> list[_Pick]:
    """An order drawn without replacement with probability proportional to utility
    (Efraimidis-Spirakis keys), as Oort samples among high-utility devices instead of
    always taking the same top few."""
    keyed = []
    for pick in sorted(picks, key=lambda p: p.candidate.device_id):
        weight = max(pick.utility, 1e-9)
        keyed.append((rng.random() ** (1.0 / weight), pick))
    keyed.sort(key=lambda item: -item[0])
    return [pick for _, pick in keyed]


def _is_due(school: str, history: FleetHistory, round_number: int, task: TaskConfig) -> bool:
    """The equity floor: the school waited `equity_rounds`, or has taken part in fewer
    than 60% of the mean school's rounds (so no school falls below half the mean)."""
    if round_number - history.school_last_round.get(school, 0) >= task.schedule.equity_rounds:
        return True
    counts = history.school_rounds
    if not counts:
        return False
    mean = sum(counts.values()) / len(counts)
    return counts.get(school, 0) < 0.6 * mean


def _fit_to_deadline(
    fitter: PlanFitter,
    candidates: Sequence[DeviceCandidate],
    utilities: Mapping[str, float],
    context: RoundContext,
) -> tuple[list[_Pick], dict[str, str], list[float]]:
    """(the picks whose plan fits the deadline, why the others do not, each pick's seconds
    for the full plan). The full-plan times are kept even for shrunk plans: they decide the
    preferred round time, which must not depend on how much each device was shrunk."""
    skipped: dict[str, str] = {}
    fitted_picks: list[_Pick] = []
    full_seconds: list[float] = []
    for candidate in sorted(candidates, key=lambda c: c.device_id):
        link = context.schools.get(candidate.school)
        speed = _speed(context.history, candidate.device_id)
        fitted = fitter.fit(candidate.profile, link, speed, candidate.free_memory_bytes)
        if isinstance(fitted, str):
            skipped[candidate.device_id] = fitted
            continue
        plan, prediction = fitted
        fitted_picks.append(
            _Pick(candidate, plan, prediction, utilities.get(candidate.device_id, -1.0))
        )
        if plan is fitter.full_plan:
            full_seconds.append(prediction.round_seconds)
        else:
            full_seconds.append(fitter.full_round_seconds(candidate.profile, link, speed))
    return fitted_picks, skipped, full_seconds


def _preferred_seconds(fitter: PlanFitter, full_seconds: Sequence[float], quota: int) -> float:
    """The quota's fastest full plans x PREFERRED_SLACK: a round paced by its slowest
    device would leave the fast ones idle, one paced by the fastest would cut most plans
    down to nothing. Never beyond the deadline's safe share."""
    ordered = sorted(full_seconds)
    if not ordered:
        return fitter.budget_seconds
    quick_time = ordered[min(quota, len(ordered)) - 1] * PREFERRED_SLACK
    return min(fitter.budget_seconds, quick_time)


def _fit_to_preferred(
    fitter: PlanFitter, pick: _Pick, context: RoundContext, preferred: float
) -> _Pick:
    """Refit a pick that is slower than the preferred time to it; a device that would be
    left with fewer than `min_local_steps` keeps its deadline plan (`budget` None: only the
    equity floor brings it in). Utility is scaled by the share of the full plan it does."""
    plan, prediction = pick.plan, pick.prediction
    if prediction.round_seconds > preferred:
        quick = fitter.fit(
            pick.candidate.profile,
            context.schools.get(pick.candidate.school),
            _speed(context.history, pick.candidate.device_id),
            pick.candidate.free_memory_bytes,
            budget_seconds=preferred,
        )
        if isinstance(quick, str) or quick[0].local_steps < fitter.limits.min_local_steps:
            return pick
        plan, prediction = quick
    utility = pick.utility
    if utility >= 0:
        utility *= math.sqrt(work_fraction(plan, fitter.full_plan))
    return _Pick(pick.candidate, plan, prediction, utility, preferred)


def _fit_candidates(
    fitter: PlanFitter,
    candidates: Sequence[DeviceCandidate],
    utilities: Mapping[str, float],
    context: RoundContext,
    quota: int,
) -> tuple[list[_Pick], dict[str, str], float]:
    """(the feasible picks, why the others were left out, the preferred round seconds).

    Every candidate is first fitted to the deadline. The preferred round time is what the
    quota's fastest devices need for the full plan, x PREFERRED_SLACK. Devices that can do
    at least `min_local_steps` within it get that plan and compete on utility
    (`budget` = preferred); the others keep their deadline plan and take part only through
    the equity floor (`budget` = None).
    """
    fitted_picks, skipped, full_seconds = _fit_to_deadline(fitter, candidates, utilities, context)
    preferred = _preferred_seconds(fitter, full_seconds, quota)
    feasible = [_fit_to_preferred(fitter, pick, context, preferred) for pick in fitted_picks]
    return feasible, skipped, preferred


class _Selection:
    """The growing set of chosen devices, refitting a school's plans as it adds to it."""

    def __init__(
        self,
        fitter: PlanFitter,
        schools: Mapping[str, SchoolLink],
        history: FleetHistory,
        task: TaskConfig,
    ) -> None:
        self.fitter = fitter
        self.schools = schools
        self.history = history
        over_selection = task.schedule.over_selection
        self.fleet_dropout = history.dropout_rate(over_selection / (1 + over_selection))
        self.picks: dict[str, _Pick] = {}
        self.per_school: dict[str, list[str]] = {}
        self.refused: dict[str, str] = {}
        self._expected = 0.0
        self._variance = 0.0

    def expected_updates(self) -> float:
        return self._expected

    def enough(self, quota: int) -> bool:
        """Enough devices that the quota arrives with high probability, not just on average:
        a round short of its quota waits for the deadline, which costs more than a few
        surplus updates."""
        margin = QUOTA_CONFIDENCE_Z * math.sqrt(self._variance)
        return self._expected - margin >= quota or self.full(quota)

    def full(self, quota: int) -> bool:
        return len(self.picks) >= math.ceil(quota * MAX_SELECTION_FACTOR)

    def try_add(self, pick: _Pick) -> bool:
        device_id = pick.candidate.device_id
        if device_id in self.picks:
            return False
        school = pick.candidate.school
        link = self.schools.get(school)
        mates = self.per_school.get(school, [])
        if link is None:
            refitted = {device_id: (pick.plan, pick.prediction)}
        else:
            share = link.share(len(mates) + 1)
            refitted = {}
            for member in [*(self.picks[m] for m in mates), pick]:
                member_id = member.candidate.device_id
                fitted = self.fitter.fit(
                    member.candidate.profile,
                    share,
                    _speed(self.history, member_id),
                    member.candidate.free_memory_bytes,
                    budget_seconds=member.budget,
                )
                if isinstance(fitted, str):
                    self.refused[device_id] = f"school {school}'s link is full: {fitted}"
                    return False
                refitted[member_id] = fitted
        for member_id, (plan, prediction) in refitted.items():
            existing = self.picks.get(member_id, pick)
            self.picks[member_id] = _Pick(
                existing.candidate, plan, prediction, existing.utility, existing.budget
            )
        self.per_school.setdefault(school, []).append(device_id)
        dropout = self.history.device_dropout_rate(device_id, self.fleet_dropout)
        self._expected += 1.0 - dropout
        self._variance += dropout * (1.0 - dropout)
        return True

    def chosen(self) -> list[_Pick]:
        return list(self.picks.values())


def _align_finish_times(selection: _Selection, preferred_seconds: float) -> list[_Pick]:
    """Refit every chosen plan to one target round time, so fast devices do not wait for
    slow ones and slow ones are not cut off by the quota: the round closes when the quota
    arrives, and an update that comes after that is wasted.

    The target is the preferred round time, stretched to the longest of the chosen
    devices' smallest acceptable plans (so a slow device the equity floor brought in can
    still do `min_local_steps`); never beyond the deadline's safe share.
    """
    chosen = selection.chosen()
    if not chosen:
        return chosen
    fitter = selection.fitter
    minimum_steps = fitter.limits.min_local_steps
    smallest = []
    for pick in chosen:
        prediction = pick.prediction
        transfer = prediction.download_seconds + prediction.upload_seconds
        steps = min(pick.plan.local_steps, minimum_steps)
        smallest.append(transfer + steps * prediction.step_seconds)
    target = min(fitter.budget_seconds, max(max(smallest), preferred_seconds) * (1 + 1e-9))
    aligned = []
    for pick in chosen:
        school = pick.candidate.school
        link = selection.schools.get(school)
        share = link.share(len(selection.per_school[school])) if link else None
        fitted = fitter.fit(
            pick.candidate.profile,
            share,
            _speed(selection.history, pick.candidate.device_id),
            pick.candidate.free_memory_bytes,
            budget_seconds=target,
        )
        if isinstance(fitted, str):
            aligned.append(pick)
        else:
            aligned.append(_Pick(pick.candidate, fitted[0], fitted[1], pick.utility, target))
    return aligned


def _add_equity_floor(
    selection: _Selection,
    feasible: Sequence[_Pick],
    round_number: int,
    task: TaskConfig,
    mean_utility: float,
) -> None:
    """Each school that has waited `equity_rounds` gets its best device first, before
    utility can crowd it out. More due schools than the quota cannot all train at once:
    the longest-waiting go first."""
    history = selection.history
    quota = task.schedule.devices_per_round
    by_school: dict[str, list[_Pick]] = {}
    for pick in feasible:
        by_school.setdefault(pick.candidate.school, []).append(pick)
    due = [school for school in by_school if _is_due(school, history, round_number, task)]
    due.sort(key=lambda s: (history.school_last_round.get(s, 0), s))
    for school in due[:quota]:
        ranked = sorted(
            by_school[school],
            key=lambda p: (
                p.budget is None,
                -(p.utility if p.utility >= 0 else mean_utility),
                p.candidate.device_id,
            ),
        )
        for pick in ranked:
            if selection.try_add(pick):
                break


def _add_by_utility(
    selection: _Selection,
    feasible: Sequence[_Pick],
    full_plan: TrainingPlan,
    round_number: int,
    task: TaskConfig,
) -> None:
    """After the floor, exploration then exploitation, until enough updates are expected
    to arrive: over-selecting by the observed drop-out rate instead of a fixed fraction."""
    quota = task.schedule.devices_per_round
    rng = random.Random(f"{task.id}/{round_number}")
    competing = [p for p in feasible if p.budget is not None]
    explored = _sample_by_utility([p for p in competing if p.utility >= 0], rng)
    unexplored = [p for p in competing if p.utility < 0]
    rng.shuffle(unexplored)
    unexplored.sort(key=lambda p: -work_fraction(p.plan, full_plan))
    explore_slots = _explore_slots(quota, task.schedule.exploration, len(explored), len(unexplored))
    explore_target = min(quota, selection.expected_updates() + explore_slots)
    for pick in unexplored:
        if selection.expected_updates() >= explore_target:
            break
        selection.try_add(pick)
    for pick in [*explored, *unexplored]:
        if selection.enough(quota):
            break
        selection.try_add(pick)


def _schedule(
    chosen: Sequence[_Pick],
    considered: Sequence[_Pick],
    skipped: dict[str, str],
    refused: dict[str, str] | None = None,
) -> RoundSchedule:
    chosen_ids = {p.candidate.device_id for p in chosen}
    for pick in considered:
        device_id = pick.candidate.device_id
        if device_id not in chosen_ids:
            skipped[device_id] = (refused or {}).get(
                device_id, "not selected this round (lower utility)"
            )
    plans = tuple(
        sorted(
            (DevicePlan(p.candidate.device_id, p.plan, p.prediction) for p in chosen),
            key=lambda p: p.device_id,
        )
    )
    return RoundSchedule(plans=plans, skipped=skipped)


class OortScheduler(Scheduler):
    """Oort-style selection with the task's full plan and no equity floor."""

    def configure_round(
        self,
        task: TaskConfig,
        shape: ModelShape,
        candidates: Sequence[DeviceCandidate],
        round_number: int,
        context: RoundContext | None = None,
    ) -> RoundSchedule:
        context = context or RoundContext()
        history = context.history
        full_plan = task_plan(task, shape)
        limits = LadderLimits((task.rank,), task.local_steps, task.seq_len)
        fitter = PlanFitter(shape, full_plan, limits, task.schedule.round_deadline_seconds)
        preferred_seconds = fitter.budget_seconds
        utilities = statistical_utilities(candidates, history, round_number)
        skipped: dict[str, str] = {}
        explored: list[_Pick] = []
        unexplored: list[_Pick] = []
        for candidate in sorted(candidates, key=lambda c: c.device_id):
            stats = history.devices.get(candidate.device_id)
            speed = stats.speed_factor if stats else 1.0
            # The task's full plan, with the memory levers it needs to fit the device (they
            # change step time, not what the device learns).
            plan = fitter.fit_memory(candidate.profile, full_plan)
            if isinstance(plan, str):
                skipped[candidate.device_id] = plan
                continue
            prediction = fitter.predict(candidate.profile, plan, None, speed)
            penalty = 1.0
            if prediction.round_seconds > preferred_seconds:
                penalty = (preferred_seconds / prediction.round_seconds) ** LATENESS_ALPHA
            if candidate.device_id in utilities:
                pick = _Pick(candidate, plan, prediction, utilities[candidate.device_id] * penalty)
                explored.append(pick)
            else:
                unexplored.append(_Pick(candidate, plan, prediction, 0.0))
        wanted = task.schedule.devices_to_assign
        explore_slots = _explore_slots(
            wanted, task.schedule.exploration, len(explored), len(unexplored)
        )
        rng = random.Random(f"{task.id}/{round_number}")
        explored = _sample_by_utility(explored, rng)
        unexplored.sort(key=lambda p: (p.prediction.round_seconds, p.candidate.device_id))
        chosen = explored[: wanted - explore_slots] + unexplored[:explore_slots]
        return _schedule(chosen, [*explored, *unexplored], skipped)


class EquityScheduler(Scheduler):
    """schoolfl's scheduler: utility selection with shrunk plans, shared school links,
    an equity floor per school, and drop-out-sized over-selection."""

    def configure_round(
        self,
        task: TaskConfig,
        shape: ModelShape,
        candidates: Sequence[DeviceCandidate],
        round_number: int,
        context: RoundContext | None = None,
    ) -> RoundSchedule:
        context = context or RoundContext()
        history = context.history
        full_plan = task_plan(task, shape)
        limits = LadderLimits(
            task.ladder_ranks, task.ladder_min_local_steps, task.ladder_min_seq_len
        )
        fitter = PlanFitter(shape, full_plan, limits, task.schedule.round_deadline_seconds)
        utilities = statistical_utilities(candidates, history, round_number)
        mean_utility = sum(utilities.values()) / len(utilities) if utilities else 1.0
        quota = task.schedule.devices_per_round
        feasible, skipped, preferred = _fit_candidates(
            fitter, candidates, utilities, context, quota
        )
        selection = _Selection(fitter, context.schools, history, task)
        _add_equity_floor(selection, feasible, round_number, task, mean_utility)
        _add_by_utility(selection, feasible, full_plan, round_number, task)
        chosen = _align_finish_times(selection, preferred)
        return _schedule(chosen, feasible, skipped, selection.refused)


def scheduler_named(name: str) -> Scheduler:
    """The scheduler a task's `scheduler` key names (see `coordinator.config.SCHEDULERS`)."""
    from coordinator.scheduler import FitFirstScheduler, RandomScheduler

    choices: dict[str, type[Scheduler]] = {
        "equity": EquityScheduler,
        "oort": OortScheduler,
        "random": RandomScheduler,
        "fit-first": FitFirstScheduler,
    }
    if name not in choices:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(choices)}")
    return choices[name]()
