"""The scheduler's memory of past rounds: from outcomes, and replayed from a real store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.fleet_history import FleetHistory, RoundOutcome, history_from_store
from coordinator.store import CoordinatorStore, RoundState, StoredUpdate


def test_outcomes_update_losses_dropouts_speed_and_school_participation() -> None:
    history = FleetHistory()
    history.observe(
        1,
        [
            RoundOutcome(
                "a1", "a", True, loss=0.9, samples=12, actual_seconds=60.0, predicted_seconds=30.0
            ),
            RoundOutcome("b1", "b", False),
            RoundOutcome(
                "b2", "b", False, actual_seconds=200.0, predicted_seconds=50.0, delivered=True
            ),
        ],
    )
    a1, b1, b2 = (history.devices[d] for d in ("a1", "b1", "b2"))
    assert (a1.last_loss, a1.last_samples, a1.completed, a1.dropouts) == (0.9, 12, 1, 0)
    assert a1.speed_factor == pytest.approx(1.5)  # half way from 1.0 towards 2.0
    assert b1.dropouts == 1 and not b1.explored
    assert b2.dropouts == 0 and b2.speed_factor == pytest.approx(2.5)  # late, not a drop-out
    assert history.school_last_round == {"a": 1}
    assert history.school_rounds == {"a": 1}
    assert history.dropout_rate(prior_rate=0.2) == pytest.approx((1 + 0.8) / (3 + 4))


def test_history_is_replayed_from_the_store(tmp_path: Path) -> None:
    clock = [1000.0]
    store = CoordinatorStore(tmp_path / "coordinator.db", now=lambda: clock[0])
    for device, school in (("north-1", "north"), ("south-1", "south")):
        store.add_enrollment_token(f"token-{device}", school, 3600.0)
        store.redeem_enrollment_token(f"token-{device}", device, device.encode() * 4, "")
    plan = json.dumps({"predicted_round_seconds": 20.0})
    store.open_round(
        "t", 1, base_version=0, deadline=1100.0, plans_json={"north-1": plan, "south-1": plan}
    )
    clock[0] = 1040.0  # north-1 reports 40 s after the round opened: twice its prediction
    store.record_update(StoredUpdate("u1", "t", 1, "north-1", 32, 5, {"train_loss": 1.25}, b"body"))
    store.close_round("t", 1, RoundState.COMPLETED, "test")
    history = history_from_store(store, "t")
    store.close()
    north, south = history.devices["north-1"], history.devices["south-1"]
    assert (north.last_loss, north.last_samples, north.completed) == (1.25, 32, 1)
    assert north.speed_factor == pytest.approx(1.5)
    assert south.dropouts == 1 and south.last_loss is None
    assert history.school_last_round == {"north": 1}
