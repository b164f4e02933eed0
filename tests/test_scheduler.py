"""The first scheduler: plans fit memory and the deadline by the cost model."""

from __future__ import annotations

import dataclasses

import pytest

from coordinator.config import ScheduleConfig, TaskConfig
from coordinator.plan_fitting import fit_plan_to_deadline
from coordinator.scheduler import DeviceCandidate, FitFirstScheduler, task_plan
from device_profiles.profile import find_profile
from device_profiles.shapes import resolve_shape

MINILM = resolve_shape("minilm-l6")


def _task(local_steps: int = 20, **schedule: object) -> TaskConfig:
    """A task; `schedule` changes its [tasks.schedule] keys."""
    values: dict[str, object] = dict(
        devices_per_round=2,
        min_updates=1,
        over_selection=0.5,
        round_deadline_seconds=600.0,
    )
    values.update(schedule)
    return TaskConfig(
        id="t",
        kind="classification",
        base_model="minilm-l6",
        labels=("a", "b"),
        local_steps=local_steps,
        schedule=ScheduleConfig(**values),  # type: ignore[arg-type]
    )


def _candidates() -> list[DeviceCandidate]:
    names = [
        "raspberry-pi-4-4gb",
        "raspberry-pi-5-8gb",
        "laptop-low-4gb",
        "laptop-mid-16gb",
        "jetson-orin-nano-8gb",
    ]
    return [
        DeviceCandidate(f"dev-{i}", f"school-{i % 2}", find_profile(name))
        for i, name in enumerate(names)
    ]


def test_selection_size_is_quota_plus_over_selection_and_reproducible() -> None:
    scheduler = FitFirstScheduler()
    first = scheduler.configure_round(_task(), MINILM, _candidates(), round_number=3)
    again = scheduler.configure_round(_task(), MINILM, _candidates(), round_number=3)
    assert len(first.plans) == 3  # ceil(2 x 1.5)
    assert first.device_ids == again.device_ids
    assert len(first.skipped) == 2
    assert all("not selected" in reason for reason in first.skipped.values())


def test_tight_deadline_shrinks_steps_on_slow_devices_only() -> None:
    task = _task(
        round_deadline_seconds=120.0, local_steps=200, devices_per_round=5, over_selection=0.0
    )
    schedule = FitFirstScheduler().configure_round(task, MINILM, _candidates(), 1)
    steps = {p.device_id: p.plan.local_steps for p in schedule.plans}
    for plan in schedule.plans:
        assert plan.prediction.round_seconds <= 120.0 * 0.8 + 1e-6
    assert steps["dev-3"] >= steps["dev-0"]  # the 16 GB laptop does at least a Pi 4's work
    assert min(steps.values()) < 200


def test_impossible_deadline_skips_with_reason() -> None:
    task = _task(round_deadline_seconds=0.001)
    schedule = FitFirstScheduler().configure_round(task, MINILM, _candidates(), 1)
    assert schedule.plans == ()
    assert all("does not fit" in reason for reason in schedule.skipped.values())


def test_memory_reported_by_heartbeat_is_respected() -> None:
    crowded = [dataclasses.replace(c, free_memory_bytes=10 * 2**20) for c in _candidates()]
    schedule = FitFirstScheduler().configure_round(_task(), MINILM, crowded, 1)
    assert schedule.plans == ()
    assert all("free right now" in reason for reason in schedule.skipped.values())


@pytest.mark.parametrize("deadline", [30.0, 300.0, 3000.0])
def test_fitted_plan_never_exceeds_the_task_plan(deadline: float) -> None:
    profile = find_profile("raspberry-pi-4-4gb")
    base = task_plan(_task(), MINILM)
    fitted = fit_plan_to_deadline(profile, MINILM, base, deadline)
    if isinstance(fitted, str):
        assert "does not fit" in fitted
    else:
        plan, prediction = fitted
        assert plan.local_steps <= base.local_steps
        assert prediction.round_seconds <= deadline
