"""Which devices a new round gets: policy, capability and the scheduler's choice.

The round manager asks this for every task without an open round on each tick where one
could open, so what it logs it logs once (a task waiting for devices is normal, not news);
the scheduler's history is replayed from the store once and then kept in memory.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from coordinator.assignments import shape_of
from coordinator.config import CoordinatorConfig, TaskConfig
from coordinator.device_status import scheduler_reason
from coordinator.fleet_history import FleetHistory, RoundOutcome, history_from_store
from coordinator.plan_fitting import SchoolLink
from coordinator.scheduler import DeviceCandidate, DevicePlan, RoundContext, Scheduler
from coordinator.school_policy import schools_below_minimum, split_by_policy
from coordinator.store import CoordinatorStore
from coordinator.utility_scheduler import scheduler_named
from edge_runtime.wire import SECURE_AGGREGATION_CAPABILITY

logger = logging.getLogger(__name__)

LATE_ROUNDS_KEPT = 3
"""Rounds per task whose late deliveries are remembered (so a resend is counted once)."""

GATHER_RETRY_SECONDS = 2.0
"""While a task gathers devices (fewer free than devices_per_round, inside gather_seconds),
its scheduler runs at most this often; a round may open up to this much later."""


class DeviceSelection:
    """Chooses the devices of each task's next round from the free candidates."""

    def __init__(
        self,
        config: CoordinatorConfig,
        store: CoordinatorStore,
        scheduler: Scheduler | None,
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.scheduler = scheduler
        """Used for every task when given (tests); otherwise each task's [tasks.schedule]
        `strategy`."""
        self.now = now
        self.school_links = {
            school.id: SchoolLink(school.down_mbps, school.up_mbps)
            for school in config.schools
            if school.link_known
        }
        self.schools = {school.id: school for school in config.schools}
        """School id -> its policy (see coordinator.school_policy)."""
        self._policy_logged: set[tuple[str, str, str]] = set()
        self._late_deliveries: dict[tuple[str, int], set[str]] = {}
        """(task, round) -> devices whose update came after it closed (the last few rounds
        of each task only: a late update of an older round is not counted again)."""
        self._histories: dict[str, FleetHistory] = {}
        """Task id -> its scheduler history (replayed once, then fed each closed round)."""
        self._waiting_logged: set[str] = set()
        self._short_since: dict[str, float] = {}
        """Task id -> when it first could open a round, but with fewer than the quota."""
        self._last_scheduled: dict[str, float] = {}
        """Task id -> when its scheduler last ran (`_gathering`)."""
        self.left_out: dict[str, dict[str, str]] = {}
        """Task id -> device id -> why the last selection for the task left the device out
        (school policy, secure aggregation, the scheduler): the daemon stores it with the
        round when one opens (coordinator.device_status)."""

    def eligible(
        self, task: TaskConfig, candidates: list[DeviceCandidate]
    ) -> list[DeviceCandidate] | None:
        """The free candidates the schools' policies (and secure aggregation) allow for
        the task; None, logged once, while they are fewer than its quorum."""
        free, excluded = split_by_policy(self.schools, task, candidates)
        self.log_policy_exclusions(task.id, excluded)
        left_out = self.left_out[task.id] = {
            c.device_id: f"school policy: {excluded[c.school]}"
            for c in candidates
            if c.school in excluded
        }
        if task.secure_aggregation.enabled:
            capable = self._secure_capable(task.id, free)
            kept = {c.device_id for c in capable}
            for candidate in free:
                if candidate.device_id not in kept:
                    left_out[candidate.device_id] = (
                        "its agent cannot do secure aggregation (the task uses it)"
                    )
            free = capable
        if len(free) < task.schedule.min_updates:
            self._log_waiting(task.id, "%d eligible free devices, quorum is %d", len(free))
            return None
        return free

    def choose(
        self, task: TaskConfig, free: list[DeviceCandidate], round_number: int
    ) -> list[DevicePlan] | None:
        """The scheduler's selection among the free devices, less the schools whose minimum
        aggregate size it misses; None while the task should wait (below quorum, or short of
        devices_per_round and still inside gather_seconds)."""
        if self._gathering(task, len(free)):
            return None
        scheduler = self.scheduler or scheduler_named(task.schedule.strategy)
        context = RoundContext(self.history(task.id), self.school_links)
        schedule = scheduler.configure_round(task, shape_of(task), free, round_number, context)
        strategy = task.schedule.strategy if self.scheduler is None else type(scheduler).__name__
        left_out = self.left_out.setdefault(task.id, {})
        for device_id, reason in schedule.skipped.items():
            logger.debug(
                "task %s round %d: %s left out: %s", task.id, round_number, device_id, reason
            )
            left_out[device_id] = scheduler_reason(strategy, reason)
        school_of = {c.device_id: c.school for c in free}
        too_small = schools_below_minimum(
            self.schools, [school_of[p.device_id] for p in schedule.plans]
        )
        self.log_policy_exclusions(task.id, too_small)
        for plan in schedule.plans:
            if school_of[plan.device_id] in too_small:
                school = school_of[plan.device_id]
                left_out[plan.device_id] = f"school policy: {school}: {too_small[school]}"
        chosen = [p for p in schedule.plans if school_of[p.device_id] not in too_small]
        if len(chosen) < task.schedule.min_updates:
            self._log_waiting(
                task.id,
                "only %d devices fit the plan and the schools' policies (quorum %d)",
                len(chosen),
            )
            return None
        if len(chosen) < task.schedule.devices_per_round:
            first_seen = self._short_since.setdefault(task.id, self.now())
            if self.now() - first_seen < task.schedule.gather_seconds:
                return None  # give more devices a moment to come online
        self._short_since.pop(task.id, None)
        self._waiting_logged.discard(task.id)
        return chosen

    def _gathering(self, task: TaskConfig, free_count: int) -> bool:
        """True to skip the scheduler this tick: the task waits inside gather_seconds for
        more devices, still has fewer free than devices_per_round, and the scheduler ran
        less than GATHER_RETRY_SECONDS ago. The scheduler costs ~0.2 s per 5,000
        candidates; run on every 0.2 s tick of a 30 s gather it would take the loop."""
        now = self.now()
        first_seen = self._short_since.get(task.id)
        waiting = (
            first_seen is not None
            and free_count < task.schedule.devices_per_round
            and now - first_seen < task.schedule.gather_seconds
            and now - self._last_scheduled.get(task.id, -math.inf) < GATHER_RETRY_SECONDS
        )
        if not waiting:
            self._last_scheduled[task.id] = now
        return waiting

    def note_late_delivery(self, task_id: str, round_number: int, device_id: str) -> None:
        """An assigned device's update came after its round closed (the quota was met
        without it): it delivered, it did not drop out. Counted as a drop-out, every late
        update raised the drop-out rate the next round is sized by, so each round assigned
        more devices and made more of them late (186 assigned for a quota of 100 at 10 %
        real drop-outs). Once per device and round; in memory only (the store keeps no late
        updates, so a restart's replay counts them as drop-outs again)."""
        for task, number in list(self._late_deliveries):
            if task == task_id and number < round_number - LATE_ROUNDS_KEPT:
                del self._late_deliveries[(task, number)]
        late = self._late_deliveries.setdefault((task_id, round_number), set())
        if device_id in late:
            return
        late.add(device_id)
        stats = self.history(task_id).device(device_id)
        stats.delivered = min(stats.assigned, stats.delivered + 1)

    def history(self, task_id: str) -> FleetHistory:
        """The scheduler's history of the task: replayed from the store on first use (at
        start), then kept up to date in memory as rounds close (`observe_closed`), so
        neither opening nor closing a round replays the task's past."""
        history = self._histories.get(task_id)
        if history is None:
            history = self._histories[task_id] = history_from_store(self.store, task_id)
        return history

    def observe_closed(self, task_id: str, round_number: int, outcomes: list[RoundOutcome]) -> None:
        """A round of the task closed: what its devices did goes into the history (a
        history not replayed yet will replay the round with the rest)."""
        history = self._histories.get(task_id)
        if history is not None:
            history.observe(round_number, outcomes)

    def _log_waiting(self, task_id: str, why: str, count: int) -> None:
        """INFO once while a task waits for devices (it asks again on every tick)."""
        if task_id not in self._waiting_logged:
            quorum = self.config.task(task_id).schedule.min_updates
            logger.info("task %s waits: " + why, task_id, count, quorum)
            self._waiting_logged.add(task_id)

    def _secure_capable(
        self, task_id: str, candidates: list[DeviceCandidate]
    ) -> list[DeviceCandidate]:
        """The candidates whose agent can take part in secure aggregation. The others are
        left out of the task's rounds (logged once per device): a secure round never
        includes a device that would send its update in the clear."""
        capable = []
        for candidate in candidates:
            if SECURE_AGGREGATION_CAPABILITY in candidate.capabilities:
                capable.append(candidate)
            elif (task_id, candidate.device_id, "secagg") not in self._policy_logged:
                self._policy_logged.add((task_id, candidate.device_id, "secagg"))
                logger.info(
                    "task %s: %s left out: its agent cannot do secure aggregation",
                    task_id,
                    candidate.device_id,
                )
        return capable

    def log_policy_exclusions(self, task_id: str, excluded: dict[str, str]) -> None:
        """INFO once per task, school and reason: a policy exclusion is configuration
        working as intended, not a failure, so it is neither repeated nor counted."""
        for school_id, reason in sorted(excluded.items()):
            if (task_id, school_id, reason) not in self._policy_logged:
                self._policy_logged.add((task_id, school_id, reason))
                logger.info(
                    "task %s: devices of school %s excluded: %s", task_id, school_id, reason
                )
