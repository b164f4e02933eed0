"""The `[privacy]` table of agent.toml: the school's privacy policy, enforced on the device.

The coordinator already applies each school's policy when it picks devices (see
`coordinator.school_policy`); the device checks again what it can see in an assignment, so
a misconfigured or compromised coordinator cannot enrol it in a task its school refused.
A device cannot verify the coordinator's epsilon accounting, only the DP instructions that
arrive with the assignment (mode, clip norm, noise multiplier).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from edge_runtime.wire import TaskSpec


@dataclass(frozen=True)
class PrivacyPolicy:
    """What this device's school allows; the defaults allow every task."""

    require_dp: bool = False
    """Decline assignments that carry no differential privacy instructions (a task with
    [tasks.privacy] mode = 'off' on the coordinator)."""
    min_noise_multiplier: float = 0.0
    """Decline DP assignments whose noise multiplier is below this; 0 = any. Under central
    DP the coordinator adds the noise, so the device checks the figure it was told."""
    allowed_tasks: tuple[str, ...] = ()
    """Task ids this device may join for its school; empty = every task."""
    require_secure_aggregation: bool = False
    """Decline assignments of tasks that do not run secure aggregation (the device would
    send its update where the coordinator can read it)."""

    def __post_init__(self) -> None:
        for name in ("require_dp", "require_secure_aggregation"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"[privacy] {name} must be true or false, got {getattr(self, name)!r}"
                )
        value = self.min_noise_multiplier
        if not (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value >= 0
        ):
            raise ValueError(f"[privacy] min_noise_multiplier must be a number >= 0, got {value!r}")
        if not all(isinstance(task_id, str) for task_id in self.allowed_tasks):
            raise ValueError(
                f"[privacy] allowed_tasks must be a list of task ids, got {self.allowed_tasks!r}"
            )
        if self.min_noise_multiplier > 0 and not self.require_dp:
            raise ValueError(
                "[privacy] min_noise_multiplier > 0 needs require_dp = true "
                "(otherwise a task without DP would pass the noise check)"
            )

    @classmethod
    def from_table(cls, table: dict[str, object]) -> PrivacyPolicy:
        """Build from a parsed TOML table; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"unknown keys in [privacy]: {unknown}; known: {sorted(known)}")
        values = dict(table)
        if "allowed_tasks" in values:
            tasks = values["allowed_tasks"]
            if not isinstance(tasks, list):
                raise ValueError(f"[privacy] allowed_tasks must be a list, got {tasks!r}")
            values["allowed_tasks"] = tuple(tasks)
        return cls(**values)  # type: ignore[arg-type]

    def to_table(self) -> dict[str, object]:
        return {
            "require_dp": self.require_dp,
            "min_noise_multiplier": self.min_noise_multiplier,
            "allowed_tasks": list(self.allowed_tasks),
            "require_secure_aggregation": self.require_secure_aggregation,
        }


def privacy_refusals(policy: PrivacyPolicy, task_id: str, spec: TaskSpec) -> list[str]:
    """Why this device must decline an assignment of `task_id` with `spec` (empty: it may
    train). The reasons go back to the coordinator in the decline."""
    reasons = []
    if policy.allowed_tasks and task_id not in policy.allowed_tasks:
        reasons.append(f"task {task_id} is not in the school's [privacy] allowed_tasks")
    if policy.require_secure_aggregation and spec.secure_aggregation is None:
        reasons.append(f"the school requires secure aggregation; task {task_id} runs without it")
    if policy.require_dp and spec.privacy is None:
        reasons.append(f"the school requires differential privacy; task {task_id} has none")
    if spec.privacy is not None and spec.privacy.noise_multiplier < policy.min_noise_multiplier:
        reasons.append(
            f"task {task_id} noise multiplier {spec.privacy.noise_multiplier} is below the "
            f"school's min_noise_multiplier {policy.min_noise_multiplier}"
        )
    return reasons
