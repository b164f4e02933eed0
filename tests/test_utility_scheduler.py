"""Utility selection with an equity floor, shrunk plans, shared school links, drop-out-sized
over-selection and online re-rating (issue 7). Pure arithmetic: no model, no broker."""

from __future__ import annotations

import pytest

from coordinator.config import CoordinatorConfigError, ScheduleConfig, TaskConfig
from coordinator.fleet_history import FleetHistory, RoundOutcome
from coordinator.plan_fitting import DEADLINE_SAFETY, SchoolLink
from coordinator.scheduler import DeviceCandidate, RandomScheduler, RoundContext
from coordinator.utility_scheduler import EquityScheduler, OortScheduler, scheduler_named
from device_profiles.profile import find_profile
from device_profiles.shapes import resolve_shape
from device_profiles.transfer import UPLOAD_BYTES_PER_PARAM, adapter_bytes, transfer_seconds

MINILM = resolve_shape("minilm-l6")
FAST = find_profile("laptop-mid-16gb")
SLOW = find_profile("raspberry-pi-4-4gb")


def _task(local_steps: int = 20, **schedule: object) -> TaskConfig:
    """A task; `schedule` changes its [tasks.schedule] keys."""
    values: dict[str, object] = dict(
        allowed_ranks=(4, 2),
        devices_per_round=4,
        min_updates=2,
        over_selection=0.0,
        round_deadline_seconds=120.0,
        exploration=0.0,
        equity_rounds=3,
    )
    values.update(schedule)
    return TaskConfig(
        id="t",
        kind="classification",
        base_model="minilm-l6",
        labels=("a", "b"),
        rank=8,
        local_steps=local_steps,
        seq_len=64,
        schedule=ScheduleConfig(**values),  # type: ignore[arg-type]
    )


def _fleet(schools: dict[str, list[object]]) -> list[DeviceCandidate]:
    return [
        DeviceCandidate(f"{school}-{index}", school, profile)  # type: ignore[arg-type]
        for school, profiles in schools.items()
        for index, profile in enumerate(profiles)
    ]


def _history(losses: dict[str, float], school_last_round: dict[str, int]) -> FleetHistory:
    history = FleetHistory()
    for device_id, loss in losses.items():
        school = device_id.rsplit("-", 1)[0]
        history.observe(1, [RoundOutcome(device_id, school, True, loss=loss, samples=10)])
    history.school_last_round.update(school_last_round)
    return history


def test_a_slow_device_on_a_slow_link_gets_a_smaller_plan_not_exclusion() -> None:
    candidates = _fleet({"rural": [SLOW], "city": [FAST]})
    links = {"rural": SchoolLink(0.5, 0.15), "city": SchoolLink(200.0, 50.0)}
    schedule = EquityScheduler().configure_round(
        _task(devices_per_round=2, round_deadline_seconds=40.0),
        MINILM,
        candidates,
        1,
        RoundContext(FleetHistory(), links),
    )
    plans = {p.device_id: p for p in schedule.plans}
    assert set(plans) == {"rural-0", "city-0"}
    assert plans["city-0"].plan.rank == 8 and plans["city-0"].plan.local_steps == 20
    rural = plans["rural-0"]
    assert (rural.plan.rank, rural.plan.local_steps, rural.plan.seq_len) < (8, 20, 64)
    assert rural.prediction.round_seconds <= 40.0 * DEADLINE_SAFETY


def test_random_gives_everyone_the_full_plan_even_when_it_misses_the_deadline() -> None:
    candidates = _fleet({"rural": [SLOW] * 3})
    schedule = RandomScheduler().configure_round(
        _task(devices_per_round=3, round_deadline_seconds=10.0), MINILM, candidates, 1
    )
    assert len(schedule.plans) == 3
    assert all(p.plan.local_steps == 20 and p.plan.rank == 8 for p in schedule.plans)
    assert all(p.prediction.round_seconds > 10.0 for p in schedule.plans)


def test_devices_of_one_school_share_its_link() -> None:
    """Alone, a device on this link fits the full plan; five at once get a fifth of the link
    each, so their plans shrink (and every one still fits the deadline)."""
    link = {"school": SchoolLink(8.0, 1.2)}
    task = _task(devices_per_round=5, min_updates=1, local_steps=5)
    alone = EquityScheduler().configure_round(
        task, MINILM, _fleet({"school": [FAST]}), 1, RoundContext(FleetHistory(), link)
    )
    assert alone.plans[0].plan.rank == 8
    crowded = EquityScheduler().configure_round(
        task, MINILM, _fleet({"school": [FAST] * 5}), 1, RoundContext(FleetHistory(), link)
    )
    assert len(crowded.plans) >= 2
    share = link["school"].share(len(crowded.plans))
    for plan in crowded.plans:
        upload_bytes = adapter_bytes(
            MINILM, plan.plan.rank, plan.plan.target_modules, UPLOAD_BYTES_PER_PARAM
        )
        expected = transfer_seconds(upload_bytes, share.up_mbps, FAST.network.rtt_ms)
        assert plan.prediction.upload_seconds == pytest.approx(expected)
        assert plan.prediction.upload_seconds > alone.plans[0].prediction.upload_seconds
        assert plan.prediction.round_seconds <= 120.0 * DEADLINE_SAFETY


def test_a_school_whose_link_is_full_takes_no_more_devices() -> None:
    link = {"tiny": SchoolLink(0.15, 0.1)}  # downloading the adapter alone takes 24 s
    schedule = EquityScheduler().configure_round(
        _task(devices_per_round=6, min_updates=1),
        MINILM,
        _fleet({"tiny": [FAST] * 6}),
        1,
        RoundContext(FleetHistory(), link),
    )
    assert 1 <= len(schedule.plans) < 6
    share = link["tiny"].share(len(schedule.plans))
    for plan in schedule.plans:
        assert plan.prediction.download_seconds >= 450_000 * 8 / (share.down_mbps * 1e6)
        assert plan.prediction.round_seconds <= 120.0 * DEADLINE_SAFETY
    assert any("link is full" in reason for reason in schedule.skipped.values())


def test_higher_statistical_utility_is_chosen_first() -> None:
    candidates = _fleet({"a": [FAST, FAST], "b": [FAST, FAST]})
    history = _history({"a-0": 2.0, "a-1": 0.1, "b-0": 1.5, "b-1": 0.2}, {"a": 1, "b": 1})
    schedule = EquityScheduler().configure_round(
        _task(devices_per_round=2), MINILM, candidates, 2, RoundContext(history, {})
    )
    assert set(schedule.device_ids) == {"a-0", "b-0"}


def test_equity_floor_brings_back_a_school_that_waited_k_rounds() -> None:
    """Without the floor (Oort) a low-utility school is passed over; with it, it returns."""
    candidates = _fleet({"busy": [FAST] * 8, "quiet": [FAST]})
    losses = {f"busy-{index}": 3.0 for index in range(8)} | {"quiet-0": 0.01}
    history = _history(losses, {"busy": 4, "quiet": 1})
    context = RoundContext(history, {})
    equity = EquityScheduler().configure_round(_task(), MINILM, candidates, 5, context)
    oort = OortScheduler().configure_round(_task(), MINILM, candidates, 5, context)
    assert "quiet-0" in equity.device_ids
    assert "quiet-0" not in oort.device_ids
    # Not yet due (waited 2 < 3 rounds, took part as often as the mean): utility decides.
    history.school_last_round["quiet"] = 3
    history.school_rounds.update({"busy": 2, "quiet": 2})
    assert (
        "quiet-0"
        not in EquityScheduler().configure_round(_task(), MINILM, candidates, 5, context).device_ids
    )


def test_over_selection_grows_with_observed_dropouts() -> None:
    candidates = _fleet({"s": [FAST] * 20})
    reliable, flaky = FleetHistory(), FleetHistory()
    for round_number in range(1, 6):
        outcomes_ok = [
            RoundOutcome(c.device_id, "s", True, loss=1.0, samples=5) for c in candidates
        ]
        outcomes_flaky = [
            RoundOutcome(c.device_id, "s", index % 2 == 0, loss=1.0, samples=5)
            for index, c in enumerate(candidates)
        ]
        reliable.observe(round_number, outcomes_ok)
        flaky.observe(round_number, outcomes_flaky)
    task = _task(devices_per_round=4)
    few = EquityScheduler().configure_round(task, MINILM, candidates, 6, RoundContext(reliable))
    many = EquityScheduler().configure_round(task, MINILM, candidates, 6, RoundContext(flaky))
    assert len(few.plans) == 4
    assert len(many.plans) >= 7  # about 4 / (1 - 0.5)


def test_a_device_slower_than_its_profile_is_re_rated() -> None:
    candidates = _fleet({"s": [SLOW]})
    history = FleetHistory()
    for round_number in range(1, 4):
        history.observe(
            round_number,
            [
                RoundOutcome(
                    "s-0",
                    "s",
                    True,
                    loss=1.0,
                    samples=5,
                    actual_seconds=90.0,
                    predicted_seconds=30.0,
                )
            ],
        )
    assert history.devices["s-0"].speed_factor > 2.0
    task = _task(devices_per_round=1, min_updates=1, round_deadline_seconds=60.0)
    as_profiled = EquityScheduler().configure_round(task, MINILM, candidates, 4)
    re_rated = EquityScheduler().configure_round(task, MINILM, candidates, 4, RoundContext(history))
    before, after = as_profiled.plans[0], re_rated.plans[0]
    assert (after.plan.local_steps, after.plan.rank) < (before.plan.local_steps, before.plan.rank)
    assert after.prediction.step_seconds > 2.0 * before.prediction.step_seconds


def test_same_round_same_selection_and_unknown_names_refused() -> None:
    candidates = _fleet({"a": [FAST] * 5, "b": [SLOW] * 5})
    task = _task(exploration=0.5)
    first = EquityScheduler().configure_round(task, MINILM, candidates, 7)
    again = EquityScheduler().configure_round(task, MINILM, candidates, 7)
    assert first.device_ids == again.device_ids
    assert isinstance(scheduler_named("oort"), OortScheduler)
    with pytest.raises(ValueError, match="unknown scheduler"):
        scheduler_named("fastest")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strategy": "fastest"}, "strategy must be one of"),
        ({"allowed_ranks": (16,)}, "allowed_ranks must hold integers in 1..rank"),
        ({"equity_rounds": 0}, "equity_rounds must be >= 1"),
        ({"exploration": 1.5}, "exploration must be within 0..1"),
    ],
)
def test_bad_scheduler_settings_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(CoordinatorConfigError, match=message):
        _task(**changes)


def test_equity_floor_lifts_a_school_far_below_the_mean_participation() -> None:
    candidates = _fleet({"often": [FAST] * 8, "rare": [FAST]})
    losses = {f"often-{index}": 3.0 for index in range(8)} | {"rare-0": 0.01}
    history = _history(losses, {"often": 4, "rare": 4})
    history.school_rounds.update({"often": 10, "rare": 2})  # rare: 2 < 0.6 x mean 6
    schedule = EquityScheduler().configure_round(
        _task(), MINILM, candidates, 5, RoundContext(history, {})
    )
    assert "rare-0" in schedule.device_ids


def test_chosen_plans_are_aligned_to_one_finish_time() -> None:
    """A slow device the equity floor brings in gets fewer steps, so that it finishes with
    the fast devices instead of after the quota closed the round."""
    candidates = _fleet({"a": [FAST, FAST, FAST], "b": [SLOW]})
    history = _history({"a-0": 1.0, "a-1": 1.0, "a-2": 1.0, "b-0": 0.1}, {"a": 4, "b": 1})
    schedule = EquityScheduler().configure_round(
        _task(devices_per_round=2, round_deadline_seconds=600.0),
        MINILM,
        candidates,
        5,
        RoundContext(history, {}),
    )
    plans = {p.device_id: p for p in schedule.plans}
    assert "b-0" in plans and len(plans) >= 2
    slow = plans.pop("b-0")
    assert 5 <= slow.plan.local_steps < 20  # min_local_steps = local_steps / 4
    assert all(p.plan.local_steps == 20 for p in plans.values())
    fast_seconds = max(p.prediction.round_seconds for p in plans.values())
    assert slow.prediction.round_seconds <= 2 * fast_seconds
    assert slow.prediction.round_seconds < 0.1 * 600.0
