"""The coordinator's cost follows the work, not the fleet (issue 20): the running FedAvg sum
equals the batch aggregate, the device roster parses a profile once and sees another
process's revocation, a round's messages cost the same store work in a round of 40 as of 4,
and the scheduler's history kept in memory equals the replay from the store."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from coordinator.aggregation import ClientUpdate, FedAvg, NormBound, NormBoundMode
from coordinator.candidates import DeviceRoster
from coordinator.config import CoordinatorConfig, CoordinatorSettings, ScheduleConfig, TaskConfig
from coordinator.daemon import CoordinatorDaemon, DeviceLiveness
from coordinator.fleet_history import history_from_store
from coordinator.mosquitto import MosquittoProcess
from coordinator.rounds import RoundManager
from coordinator.running_aggregate import RunningAggregate
from coordinator.scheduler import DeviceCandidate, FitFirstScheduler
from coordinator.store import CoordinatorStore, RoundState
from device_profiles.profile import find_profile, profile_toml_text
from edge_runtime.wire import (
    BrokerSettings,
    CodecConfig,
    DeviceState,
    PowerSource,
    TaskAssignment,
    Update,
    UpdateEncoding,
    decode_frame,
    encode_update,
    generate_private_key,
)
from quantization.lora_ranks import truncated_shapes

FULL_RANK = 4


def _reference() -> dict[str, torch.Tensor]:
    return {
        "layer.0.lora_A.weight": torch.zeros(FULL_RANK, 6),
        "layer.0.lora_B.weight": torch.zeros(5, FULL_RANK),
        "layer.1.lora_A.weight": torch.zeros(FULL_RANK, 3),
        "layer.1.lora_B.weight": torch.zeros(7, FULL_RANK),
        "head.weight": torch.zeros(2, 6),
        "head.bias": torch.zeros(2),
    }


def _random_updates(count: int, seed: int) -> list[ClientUpdate]:
    """Mixed ranks, mixed weights, and every seventh update an outlier 50x the others."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {name: tuple(t.shape) for name, t in _reference().items()}
    updates = []
    for index in range(count):
        rank = (1, 2, FULL_RANK, FULL_RANK)[index % 4]
        scale = 50.0 if index % 7 == 3 else 1.0
        delta = {
            name: torch.randn(shape, generator=generator) * scale
            for name, shape in truncated_shapes(shapes, rank).items()
        }
        samples = int(torch.randint(1, 60, (1,), generator=generator))
        updates.append(ClientUpdate(f"dev-{index:03d}", delta, samples, 3, rank))
    return updates


def _streamed(
    updates: list[ClientUpdate], bound: NormBound | None, left_out: set[str] = frozenset()
):  # noqa: ANN202
    running = RunningAggregate(_reference())
    for update in updates:
        running.add(update.device_id, update.delta, update.num_samples, update.rank or FULL_RANK)
    by_device = {u.device_id: u.delta for u in updates}
    return running.finish(bound, left_out, by_device.__getitem__)


@pytest.mark.parametrize(
    "bound",
    [
        None,
        NormBound(median_multiple=3.0),
        NormBound(median_multiple=3.0, mode=NormBoundMode.REJECT),
        NormBound(max_l2_norm=4.0, median_multiple=2.0),
    ],
    ids=["no-bound", "median-clip", "median-reject", "absolute-and-median"],
)
def test_the_running_sum_equals_the_batch_aggregate(bound: NormBound | None) -> None:
    updates = _random_updates(29, seed=7)
    batch = FedAvg(bound).aggregate(updates, _reference())
    streamed = _streamed(updates, bound)
    assert set(streamed.accepted_devices) == set(batch.accepted_devices)
    assert streamed.rejected_devices == batch.rejected_devices
    assert set(streamed.clipped_devices) == set(batch.clipped_devices)
    assert streamed.total_samples == batch.total_samples
    if bound is not None:
        assert batch.clipped_devices or batch.rejected_devices  # the outliers were caught
    for name, tensor in batch.delta.items():
        assert torch.allclose(streamed.delta[name], tensor, rtol=1e-5, atol=1e-6), name


def test_left_out_schools_and_unreached_components_match_the_batch_path() -> None:
    """Updates withdrawn at close (a school below its minimum) leave the same mean as never
    sending them; a rank component only the withdrawn updates reached stays zero."""
    updates = [u for u in _random_updates(12, seed=3) if u.rank != FULL_RANK]
    left_out = {u.device_id for u in updates if u.rank == 2}
    bound = NormBound(median_multiple=3.0)
    kept = [u for u in updates if u.device_id not in left_out]
    batch = FedAvg(bound).aggregate(kept, _reference())
    streamed = _streamed(updates, bound, left_out)
    assert set(streamed.accepted_devices) == set(batch.accepted_devices)
    for name, tensor in batch.delta.items():
        assert torch.allclose(streamed.delta[name], tensor, rtol=1e-5, atol=1e-6), name
    assert not streamed.delta["layer.0.lora_A.weight"][1:].any()  # only rank 1 is left


def test_every_update_rejected_is_an_empty_result() -> None:
    updates = _random_updates(2, seed=1)
    result = _streamed(updates, NormBound(max_l2_norm=1e-3, mode=NormBoundMode.REJECT))
    assert result.is_empty and set(result.rejected_devices) == {"dev-000", "dev-001"}


# -- the device roster -----------------------------------------------------------------------


def _enroll(store: CoordinatorStore, count: int, profile: str = "laptop-mid-16gb") -> None:
    text = profile_toml_text(find_profile(profile))
    for index in range(count):
        store.add_enrollment_token(f"token-{index}", "north", 3600.0)
        store.redeem_enrollment_token(f"token-{index}", f"dev-{index}", bytes([index]) * 32, text)


class _Live:
    def __init__(self, device_id: str, received_at: float) -> None:
        self.state = DeviceState(
            fleet="f",
            device_id=device_id,
            sequence=1,
            online=True,
            eligible=True,
            cpu_load=0.1,
            free_memory_bytes=2**33,
            power_source=PowerSource.MAINS,
            profile_digest="00" * 32,
        )
        self.received_at = received_at


def test_the_roster_parses_once_and_sees_another_process_revoke(tmp_path: Path) -> None:
    store = CoordinatorStore(tmp_path / "coordinator.db")
    _enroll(store, 4)
    roster = DeviceRoster(store)
    roster.refresh()
    live = {f"dev-{i}": _Live(f"dev-{i}", 100.0) for i in range(3)}
    candidates, dropped = roster.candidates(live, 110.0, 60.0)
    assert [c.device_id for c in candidates] == ["dev-0", "dev-1", "dev-2"]
    assert dropped == {"dev-3": "offline (no heartbeat since the coordinator started)"}
    first = candidates[0].profile
    for _ in range(5):
        assert roster.refresh() == frozenset()
    assert roster.reloads == 1  # nothing changed: one PRAGMA per refresh, no re-read
    assert roster.candidates(live, 111.0, 60.0)[0][0].profile is first  # parsed once

    other = CoordinatorStore(tmp_path / "coordinator.db")  # `schoolfl coordinator revoke`
    assert other.revoke_device("dev-1")
    other.close()
    assert roster.refresh() == frozenset({"dev-1"})
    candidates, dropped = roster.candidates(live, 112.0, 60.0)
    assert [c.device_id for c in candidates] == ["dev-0", "dev-2"]
    assert dropped["dev-1"] == "revoked"

    store.add_enrollment_token("token-again", "north", 3600.0)  # re-enrolled, new profile
    store.redeem_enrollment_token(
        "token-again", "dev-0", bytes([0]) * 32, profile_toml_text(find_profile("laptop-low-4gb"))
    )
    roster.refresh()
    assert roster.reloads == 2  # this connection's own write: only that device re-read
    [again, _] = roster.candidates(live, 113.0, 60.0)[0]
    assert again.profile is not first and again.profile.name != first.name
    store.close()


# -- the round manager -----------------------------------------------------------------------


def _config(tmp_path: Path, model: Path, quota: int) -> CoordinatorConfig:
    return CoordinatorConfig(
        coordinator=CoordinatorSettings(fleet="f", state_dir=str(tmp_path / "state")),
        tasks=(
            TaskConfig(
                id="alpha",
                kind="classification",
                base_model=str(model),
                labels=("a", "b"),
                scheme="none",
                rank=2,
                rounds=5,
                schedule=ScheduleConfig(
                    devices_per_round=quota,
                    min_updates=2,
                    over_selection=0.0,
                    round_deadline_seconds=60.0,
                    gather_seconds=0.0,
                ),
            ),
        ),
    )


def _run_round(manager: RoundManager, quota: int, statements: list[str]) -> list[int]:
    """Open a round of `quota` devices and send every update; the SQL statements each
    accept_update ran (but the last, which closes the round)."""
    profile = find_profile("laptop-mid-16gb")
    candidates = [DeviceCandidate(f"dev-{i}", "north", profile) for i in range(quota)]
    assigned = [
        message
        for item in manager.open_rounds_if_possible(candidates)
        if "/task" in item.topic
        and item.payload
        and isinstance(message := decode_frame(item.payload).message, TaskAssignment)
    ]
    assert len(assigned) == quota
    reference = manager.current["alpha"].state()
    version = manager.current["alpha"].version
    per_update = []
    for index, assignment in enumerate(sorted(assigned, key=lambda a: a.device_id)):
        value = 0.01 * (index + 1)
        delta = {name: torch.full(t.shape, value) for name, t in reference.items()}
        body = encode_update(delta, CodecConfig(UpdateEncoding.FP32)).body
        update = Update(
            "f",
            "alpha",
            assignment.server_round,
            assignment.device_id,
            0,
            version,
            10,
            2,
            UpdateEncoding.FP32,
        )
        statements.clear()
        status, reason, _ = manager.accept_update(update, body)
        assert status.value == "accepted", reason
        per_update.append(len(statements))
    return per_update[:-1]


@pytest.mark.slow
def test_an_update_costs_the_same_store_work_in_a_big_round(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    """Before: each update re-read every assignment and report of its round (O(N) rows,
    O(N^2) per round) and decoded the global adapter again."""
    costs = {}
    for quota in (4, 40):
        config = _config(tmp_path / str(quota), tiny_bert_folder, quota)
        store = CoordinatorStore(config.state_dir / "coordinator.db")
        manager = RoundManager(config, store, FitFirstScheduler(), generate_private_key())
        manager.start()
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)  # noqa: SLF001 - count what runs
        costs[quota] = set(_run_round(manager, quota, statements))
        store._db.set_trace_callback(None)  # noqa: SLF001
        record = store.round("alpha", 1)
        assert record is not None and record.state is RoundState.COMPLETED
        store.close()
    assert costs[4] == costs[40] and len(costs[40]) == 1, costs


@pytest.mark.slow
def test_history_in_memory_equals_the_replay_and_a_restart_rebuilds_the_sum(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    config = _config(tmp_path, tiny_bert_folder, 3)
    store = CoordinatorStore(config.state_dir / "coordinator.db")
    manager = RoundManager(config, store, FitFirstScheduler(), generate_private_key())
    manager.start()
    _run_round(manager, 3, [])
    _run_round(manager, 3, [])
    kept = manager.selection.history("alpha")
    assert kept == history_from_store(store, "alpha")
    assert kept.devices["dev-0"].completed == 2

    # A round left open with two of three updates stored: a restarted manager rebuilds the
    # running sum from the store, and the third update closes the round with all three.
    profile = find_profile("laptop-mid-16gb")
    candidates = [DeviceCandidate(f"dev-{i}", "north", profile) for i in range(3)]
    manager.open_rounds_if_possible(candidates)
    reference = manager.current["alpha"].state()
    version = manager.current["alpha"].version
    for index, device_id in enumerate(("dev-0", "dev-1", "dev-2")):
        if index == 2:
            store.close()
            store = CoordinatorStore(config.state_dir / "coordinator.db")
            manager = RoundManager(config, store, FitFirstScheduler(), generate_private_key())
            manager.start()
            [view] = manager.book.views.values()
            assert view.running is not None and set(view.running.contributions) == {
                "dev-0",
                "dev-1",
            }
        delta = {name: torch.full(t.shape, float(index + 1)) for name, t in reference.items()}
        body = encode_update(delta, CodecConfig(UpdateEncoding.FP32)).body
        update = Update("f", "alpha", 3, device_id, 0, version, 10, 2, UpdateEncoding.FP32)
        assert manager.accept_update(update, body)[0].value == "accepted"
    new = manager.current["alpha"].state()
    name = next(iter(reference))
    assert math.isclose(float((new[name] - reference[name]).mean()), 2.0, rel_tol=1e-5)
    assert manager.selection.history("alpha") == history_from_store(store, "alpha")
    store.close()


@pytest.mark.slow
def test_an_update_after_the_quota_counts_as_delivered_not_as_a_drop_out(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    """Over-selected devices whose updates come after the quota closed the round are not
    drop-outs: counting them so made every next round assign more devices."""
    config = _config(tmp_path, tiny_bert_folder, 2)
    store = CoordinatorStore(config.state_dir / "coordinator.db")
    manager = RoundManager(config, store, FitFirstScheduler(), generate_private_key())
    manager.start()
    profile = find_profile("laptop-mid-16gb")
    candidates = [DeviceCandidate(f"dev-{i}", "north", profile) for i in range(3)]
    task = config.task("alpha")
    over = dataclasses.replace(task.schedule, over_selection=0.5)  # 3 assigned for 2
    manager.config = dataclasses.replace(config, tasks=(dataclasses.replace(task, schedule=over),))
    manager.selection.config = manager.config
    manager.open_rounds_if_possible(candidates)
    assigned = sorted(store.assignments("alpha", 1))
    assert len(assigned) == 3
    reference = manager.current["alpha"].state()
    version = manager.current["alpha"].version
    delta = {name: torch.full(t.shape, 0.01) for name, t in reference.items()}
    body = encode_update(delta, CodecConfig(UpdateEncoding.FP32)).body
    for device_id in assigned:
        update = Update("f", "alpha", 1, device_id, 0, version, 10, 2, UpdateEncoding.FP32)
        status, reason, _ = manager.accept_update(update, body)
        if device_id == assigned[-1]:
            assert status.value == "rejected" and reason == "round 1 is completed"
            manager.accept_update(update, body)  # resent: counted once
    history = manager.selection.history("alpha")
    late = history.devices[assigned[-1]]
    assert (late.assigned, late.delivered, late.completed, late.dropouts) == (1, 1, 0, 0)
    assert history.dropout_rate(0.0, prior_weight=0.0) == 0.0
    store.close()


# -- the daemon's idle tick ------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 3_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.integration
def test_an_idle_tick_reads_only_the_change_marker(
    tmp_path: Path, mosquitto: MosquittoProcess, tiny_bert_folder: Path
) -> None:
    """With a round open, a tick touches no device row, no round row and no profile: one
    PRAGMA. A revocation by another process is still seen at the next tick."""
    config = replace(
        _config(tmp_path, tiny_bert_folder, 3),
        broker=BrokerSettings(url=mosquitto.url),
        coordinator=CoordinatorSettings(
            fleet="f", state_dir=str(tmp_path / "state"), startup_grace_seconds=0.0
        ),
    )
    clock = _Clock()
    daemon = CoordinatorDaemon(config, now=clock)
    daemon.start()
    try:
        _enroll(daemon.store, 3)
        for index in range(3):
            live = _Live(f"dev-{index}", clock.now)
            daemon.liveness[live.state.device_id] = DeviceLiveness(live.state, clock.now)
        daemon.tick()
        assert set(daemon.store.assignments("alpha", 1)) == {"dev-0", "dev-1", "dev-2"}
        statements: list[str] = []
        daemon.store._db.set_trace_callback(statements.append)  # noqa: SLF001 - count
        for _ in range(5):
            clock.now += 0.2
            daemon.tick()
        assert statements == ["PRAGMA data_version"] * 5, statements

        other = CoordinatorStore(config.state_dir / "coordinator.db")  # the revoke CLI
        assert other.revoke_device("dev-2")
        other.close()
        daemon.tick()
        daemon.store._db.set_trace_callback(None)  # noqa: SLF001
        assert daemon.store.declined_devices("alpha", 1) == {"dev-2": "device revoked"}
    finally:
        daemon.stop()
