"""Per-school privacy policies: which tasks a school's devices may join, and how large a
round that includes them must be.

Pure functions over the validated config, so the rules are tested without a coordinator;
`RoundManager` applies them before and after the scheduler picks a round's devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from coordinator.config import SchoolConfig, TaskConfig
from coordinator.scheduler import DeviceCandidate

SECURE_AGGREGATION_MISSING = (
    "the school requires secure aggregation and the task has [tasks.secure_aggregation] "
    "enabled = false"
)


def policy_problem(school: SchoolConfig | None, task: TaskConfig) -> str | None:
    """Why the devices of `school` may not join `task`, or None when they may.

    A school without a `[[schools]]` table (None) has no policy and may join every task.
    """
    if school is None:
        return None
    if school.allowed_tasks and task.id not in school.allowed_tasks:
        return f"task {task.id} is not in the school's allowed_tasks {list(school.allowed_tasks)}"
    if school.require_secure_aggregation and not task.secure_aggregation.enabled:
        return SECURE_AGGREGATION_MISSING
    if school.max_epsilon > 0:
        privacy = task.privacy
        if privacy.mode == "off":
            return (
                f"the school requires differential privacy (max_epsilon {school.max_epsilon}) "
                "but the task has [tasks.privacy] mode = 'off'"
            )
        if privacy.epsilon_budget > school.max_epsilon:
            return (
                f"the task's [tasks.privacy] epsilon_budget {privacy.epsilon_budget} exceeds "
                f"the school's max_epsilon {school.max_epsilon}"
            )
        if privacy.delta > school.max_delta:
            return (
                f"the task's [tasks.privacy] delta {privacy.delta} exceeds the school's "
                f"max_delta {school.max_delta}"
            )
    return None


def split_by_policy(
    schools: Mapping[str, SchoolConfig], task: TaskConfig, candidates: Sequence[DeviceCandidate]
) -> tuple[list[DeviceCandidate], dict[str, str]]:
    """The candidates whose school's policy admits `task`, and school id -> why the others'
    schools do not (a device of a school without a `[[schools]]` table is admitted)."""
    admitted: list[DeviceCandidate] = []
    excluded: dict[str, str] = {}
    for candidate in candidates:
        problem = policy_problem(schools.get(candidate.school), task)
        if problem is None:
            admitted.append(candidate)
        else:
            excluded[candidate.school] = problem
    return admitted, excluded


def aggregate_size_problem(school: SchoolConfig | None, devices_in_round: int) -> str | None:
    """Why a round of `devices_in_round` assigned devices may not include `school`'s
    devices (its min_devices_per_aggregate is larger), or None when it may."""
    if school is None or devices_in_round >= school.min_devices_per_aggregate:
        return None
    return (
        f"the round has {devices_in_round} devices, below the school's "
        f"min_devices_per_aggregate {school.min_devices_per_aggregate}"
    )


def schools_below_minimum(
    schools: Mapping[str, SchoolConfig], device_schools: Sequence[str]
) -> dict[str, str]:
    """School id -> why its devices must leave a round whose assigned devices belong to
    `device_schools` (one entry per device).

    Dropping a school's devices shrinks the round, which may push another school below its
    minimum, so schools are dropped until the rest is stable. A school below its minimum
    stays below it in any smaller round, so dropping all of them at each pass is safe.
    """
    remaining = list(device_schools)
    dropped: dict[str, str] = {}
    while True:
        problems = {
            school_id: problem
            for school_id in sorted(set(remaining))
            if (problem := aggregate_size_problem(schools.get(school_id), len(remaining)))
        }
        if not problems:
            return dropped
        dropped.update(problems)
        remaining = [school_id for school_id in remaining if school_id not in problems]
