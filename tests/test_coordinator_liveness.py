"""The coordinator daemon's own liveness, tick by tick on an injected clock against a real
broker: it lets a restart settle before opening rounds, lets a revoked device go, counts
transfers that expired, and keeps serving when its store cannot take a rejection row."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from coordinator.config import (
    CoordinatorConfig,
    CoordinatorSettings,
    ScheduleConfig,
    TaskConfig,
)
from coordinator.daemon import CoordinatorDaemon, DeviceLiveness
from coordinator.mosquitto import MosquittoProcess
from coordinator.store import RoundState
from device_profiles.profile import find_profile, profile_toml_text
from edge_runtime.wire import (
    BrokerSettings,
    ChunkReassembler,
    ChunkSender,
    DeviceChannel,
    DeviceState,
    PowerSource,
    ReceivedMessage,
    device_topic,
    generate_private_key,
    public_key_hex,
)

pytestmark = pytest.mark.integration

FLEET = "livefleet"
DEVICES = ("dev-0", "dev-1", "dev-2")


class Clock:
    def __init__(self) -> None:
        self.now = 2_000_000.0

    def __call__(self) -> float:
        return self.now


def _config(tmp_path: Path, broker: MosquittoProcess, model: Path) -> CoordinatorConfig:
    return CoordinatorConfig(
        coordinator=CoordinatorSettings(
            fleet=FLEET, state_dir=str(tmp_path / "coord"), startup_grace_seconds=3.0
        ),
        broker=BrokerSettings(url=broker.url),
        tasks=(
            TaskConfig(
                id="t",
                kind="classification",
                base_model=str(model),
                labels=("a", "b"),
                scheme="none",
                rank=2,
                schedule=ScheduleConfig(
                    devices_per_round=3,
                    min_updates=2,
                    over_selection=0.0,
                    gather_seconds=0.0,
                    round_deadline_seconds=600.0,
                ),
            ),
        ),
    )


def _enrolled_online(daemon: CoordinatorDaemon) -> None:
    """Enroll the devices in the store and note a fresh heartbeat from each."""
    profile = profile_toml_text(find_profile("laptop-mid-16gb"))
    for device_id in DEVICES:
        token = f"token-for-{device_id}-0123456789"
        daemon.store.add_enrollment_token(token, "north", 600)
        key = bytes.fromhex(public_key_hex(generate_private_key()))
        daemon.store.redeem_enrollment_token(token, device_id, key, profile)
        state = DeviceState(
            fleet=FLEET,
            device_id=device_id,
            sequence=1,
            online=True,
            eligible=True,
            cpu_load=1.0,
            free_memory_bytes=8 * 2**30,
            power_source=PowerSource.MAINS,
            profile_digest="00" * 32,
        )
        daemon.liveness[device_id] = DeviceLiveness(state, daemon.now())


@pytest.fixture
def daemon(tmp_path: Path, mosquitto: MosquittoProcess, tiny_bert_folder: Path):  # noqa: ANN201
    clock = Clock()
    daemon = CoordinatorDaemon(_config(tmp_path, mosquitto, tiny_bert_folder), now=clock)
    daemon.start()
    yield daemon
    daemon.stop()


def test_a_restarted_coordinator_settles_before_opening_rounds(daemon: CoordinatorDaemon) -> None:
    """Right after a start the retained states of the devices online are still arriving;
    a round opened then would leave some of them out."""
    clock: Clock = daemon.now  # type: ignore[assignment]
    _enrolled_online(daemon)
    clock.now += 1.0
    daemon.tick()
    assert daemon.store.open_rounds() == [], "a round opened inside the startup grace"
    clock.now += 2.5
    for device_id, live in daemon.liveness.items():  # still fresh
        daemon.liveness[device_id] = DeviceLiveness(live.state, clock.now)
    daemon.tick()
    [record] = daemon.store.open_rounds()
    assert set(daemon.store.assignments("t", record.round_number)) == set(DEVICES)


def test_a_revoked_device_is_let_go_at_the_next_tick(daemon: CoordinatorDaemon) -> None:
    clock: Clock = daemon.now  # type: ignore[assignment]
    _enrolled_online(daemon)
    clock.now += 4.0
    for device_id, live in daemon.liveness.items():
        daemon.liveness[device_id] = DeviceLiveness(live.state, clock.now)
    daemon.tick()
    assert len(daemon.store.open_rounds()) == 1
    assert daemon.store.revoke_device("dev-2")  # `schoolfl coordinator revoke dev-2`
    daemon.tick()
    assert daemon.store.declined_devices("t", 1) == {"dev-2": "device revoked"}
    record = daemon.store.round("t", 1)
    assert record is not None and record.state is RoundState.OPEN  # two left to hear from


def test_an_expired_transfer_is_counted_as_a_refusal(daemon: CoordinatorDaemon) -> None:
    clock = [0.0]
    daemon.reassembler = ChunkReassembler(idle_timeout_seconds=60, now=lambda: clock[0])
    sender = ChunkSender(b"x" * 300, transfer_id="upload-1", sender="dev-1", chunk_bytes=100)
    _, first = next(sender.frames([0]))
    daemon.handle(
        ReceivedMessage(device_topic(FLEET, "dev-1", DeviceChannel.CHUNK), first, 1, False)
    )
    clock[0] = 61
    daemon.tick()
    daemon.flush_refusals()
    assert daemon.store.rejection_counts().get("transfer-expired") == 1
    [refused] = daemon.store.refusals(1)
    assert (refused.device_id, refused.category) == ("dev-1", "transfer-expired")
    assert "1 of 3 chunks" in refused.last_reason
    daemon.tick()
    daemon.flush_refusals()
    assert daemon.store.rejection_counts().get("transfer-expired") == 1  # counted once


def test_a_store_that_cannot_take_refusals_degrades_loudly_and_loses_none(
    daemon: CoordinatorDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    """A real SQLITE_FULL ("database or disk is full"): the daemon's connection is capped at
    its current size, as a full disk would cap it. The daemon keeps serving, says it is
    degraded, keeps the counts in memory and writes them once there is room again."""
    topic = device_topic(FLEET, "dev-9", DeviceChannel.UPDATE)
    garbage = ReceivedMessage(topic, b"\x00bad", 1, False)
    connection: sqlite3.Connection = daemon.store._db  # noqa: SLF001 - cap this connection only
    pages = connection.execute("PRAGMA page_count").fetchone()[0]
    connection.execute(f"PRAGMA max_page_count = {pages}")
    for size in (4096, 512, 64, 1):  # fill the last pages to the brim, one category each
        with pytest.raises(sqlite3.OperationalError, match="full"):  # the cap is real
            for index in range(1000):
                daemon.store.record_rejection(f"filler-{size}-{index}", "filler", "x" * size)
    before = sum(daemon.store.rejection_counts().values())
    with caplog.at_level(logging.ERROR, logger="coordinator.daemon"):
        for _ in range(3):
            daemon.handle(garbage)  # never raises out of the loop boundary
        daemon.flush_refusals()
    assert daemon.degraded is not None and daemon.refusals.unwritten == 3
    assert sum(daemon.rejected.values()) == 3  # still counted, in memory
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("DEGRADED" in message and "full" in message for message in errors), errors

    connection.execute("PRAGMA max_page_count = 1073741823")  # space again
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="coordinator.daemon"):
        daemon.handle(garbage)
        daemon.flush_refusals()
    assert daemon.degraded is None
    assert any("recovered" in r.getMessage() for r in caplog.records)
    assert sum(daemon.store.rejection_counts().values()) == before + 4  # none lost
    [refused] = [r for r in daemon.store.refusals(50) if r.device_id == "dev-9"]
    assert refused.count == 4  # one row for the device and category, not four
