"""A hostile insider against the coordinator: one enrolled device, with its real key and
broker password, that lies about its sample count, sends a huge update, floods refusals,
re-enrolls after its revocation, or redeems another school's token. Real Mosquitto running
the generated production config (TLS, per-device credentials and roles), the real daemon in
a thread, scripted devices speaking the real protocol; honest rounds still complete."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from coordinator.config import CoordinatorConfig, CoordinatorSettings, ScheduleConfig, TaskConfig
from coordinator.daemon import CoordinatorDaemon
from coordinator.scheduler import RandomScheduler
from coordinator.store import CoordinatorStore, RoundState
from edge_runtime.wire import (
    Acknowledgement,
    AckStatus,
    CodecConfig,
    DeviceChannel,
    EnrollmentResponse,
    ReceivedMessage,
    TaskAssignment,
    Update,
    UpdateEncoding,
    device_topic,
    encode_update,
)
from quantization.adapter_deltas import update_l2_norm
from quantization.adapters import read_adapter_folder
from tests.daemon_helpers import ScriptedDevice, wait_until
from tests.production_broker import ProductionBroker, production_broker

pytestmark = pytest.mark.integration

FLEET = "hostile"
DEVICES = ("honest-1", "honest-2", "hostile", "pi-north", "pi-south")
LOCAL_STEPS = 4
BATCH_SIZE = 8
"""A plan of 4 steps x 8 examples: no honest device trains on more than 32 examples."""


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ProductionBroker]:
    with production_broker(tmp_path / "broker", fleet=FLEET, device_ids=DEVICES) as running:
        yield running


def _config(
    tmp_path: Path, broker: ProductionBroker, model: Path, **task: object
) -> CoordinatorConfig:
    return CoordinatorConfig(
        coordinator=CoordinatorSettings(
            fleet=FLEET,
            state_dir=str(tmp_path / "coord"),
            tick_seconds=0.05,
            startup_grace_seconds=0.0,
        ),  # fmt: skip
        broker=broker.settings(broker.coordinator_user),
        tasks=(
            TaskConfig(
                id="t",
                kind="classification",
                base_model=str(model),
                labels=("a", "b"),
                scheme="none",
                rank=2,
                local_steps=LOCAL_STEPS,
                batch_size=BATCH_SIZE,
                update_encoding="fp32",
                schedule=ScheduleConfig(
                    devices_per_round=3,
                    min_updates=3,
                    over_selection=0.0,
                    gather_seconds=0.0,
                    round_deadline_seconds=600,
                ),
                **{"rounds": 1, **task},  # type: ignore[arg-type]
            ),
        ),
    )


class Round:
    """A coordinator in a thread, three enrolled scripted devices and their assignments."""

    def __init__(self, config: CoordinatorConfig, broker: ProductionBroker) -> None:
        self.daemon = CoordinatorDaemon(config, scheduler=RandomScheduler())
        self.daemon.start()
        self.loop = threading.Thread(target=self.daemon.run, daemon=True)
        self.loop.start()
        self.operator = CoordinatorStore(config.state_dir / "coordinator.db")
        self.devices = {
            name: ScriptedDevice(FLEET, name, transport=broker.transport(name))
            for name in ("honest-1", "honest-2", "hostile")
        }
        for name, device in self.devices.items():
            token = f"token-for-{name}-0123456789"
            self.operator.add_enrollment_token(token, "north", 600)
            device.enroll(token)
            assert device.next_frame(EnrollmentResponse).message.accepted
        for device in self.devices.values():
            device.heartbeat()
        self.assignments: dict[str, TaskAssignment] = {
            name: device.next_frame(TaskAssignment).message for name, device in self.devices.items()
        }
        version = self.operator.latest_adapter_version("t")
        assert version is not None
        _, self.reference = read_adapter_folder(version.folder)

    def send(
        self, name: str, delta: dict[str, torch.Tensor], samples: int, steps: int = LOCAL_STEPS
    ) -> Acknowledgement:
        device, assignment = self.devices[name], self.assignments[name]
        update = Update(
            fleet=FLEET,
            task="t",
            server_round=assignment.server_round,
            device_id=name,
            attempt=0,
            model_version=assignment.model_version,
            num_samples=samples,
            num_steps=steps,
            encoding=UpdateEncoding.FP32,
        )
        body = encode_update(delta, CodecConfig(encoding=UpdateEncoding.FP32)).body
        device.publish(DeviceChannel.UPDATE, device.frame(update, body))
        return device.next_frame(Acknowledgement).message

    def new_delta(self, server_round: int = 1) -> dict[str, torch.Tensor]:
        """The version `server_round` published minus the one before it."""
        wait_until(
            lambda: self.operator.round("t", server_round).state is RoundState.COMPLETED,  # type: ignore[union-attr]
            what=f"round {server_round} to complete",
        )
        version = self.operator.latest_adapter_version("t")
        assert version is not None and version.version == server_round
        _, state = read_adapter_folder(version.folder)
        delta = {name: state[name] - self.reference[name] for name in self.reference}
        self.reference = state
        return delta

    def next_assignments(self) -> None:
        """Each device's assignment for the round the coordinator opened next."""
        self.assignments = {
            name: device.next_frame(TaskAssignment).message for name, device in self.devices.items()
        }

    def close(self) -> None:
        for device in self.devices.values():
            device.close()
        self.daemon.stop_requested.set()
        self.loop.join(timeout=30)
        self.daemon.stop()


def _filled(reference: dict[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    return {name: torch.full_like(tensor, value) for name, tensor in reference.items()}


def _close(delta: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return all(torch.allclose(delta[n], expected[n], atol=1e-6) for n in expected)


def test_a_lying_sample_count_weighs_no_more_than_the_plan_allows(
    tmp_path: Path, broker: ProductionBroker, tiny_bert_folder: Path
) -> None:
    """Before: weighted by its own claim of 10^9 samples, the hostile update took
    0.99999982 of the aggregate. Now it weighs at most steps x batch = 32 examples, what an
    honest device that ran the whole plan weighs, and a claim of more steps than the plan
    is refused outright."""
    round_ = Round(_config(tmp_path, broker, tiny_bert_folder), broker)
    try:
        ack = round_.send("hostile", _filled(round_.reference, 0.02), 10**9, steps=10**6)
        assert ack.status is AckStatus.REJECTED and "its plan allows 4" in ack.reason
        for name, value in (("honest-1", 0.01), ("honest-2", 0.01), ("hostile", 0.02)):
            samples = 32 if name != "hostile" else 10**9
            ack = round_.send(name, _filled(round_.reference, value), samples)
            assert ack.status is AckStatus.ACCEPTED, ack.reason
        delta = round_.new_delta()
    finally:
        round_.close()
    expected = (0.01 * 32 + 0.01 * 32 + 0.02 * 32) / 96  # three equal weights
    assert _close(delta, _filled(round_.reference, expected))


def test_one_huge_update_is_clipped_to_the_rounds_median_norm_by_default(
    tmp_path: Path, broker: ProductionBroker, tiny_bert_folder: Path
) -> None:
    """Before: no bound by default, and one update 1000x the honest norm moved the
    aggregate to hundreds of times an honest update. Now, without any setting, it counts as
    at most 3x the median norm, so the aggregate stays within 5/3 of an honest update."""
    round_ = Round(_config(tmp_path, broker, tiny_bert_folder), broker)
    try:
        honest = _filled(round_.reference, 0.01)
        for name in ("honest-1", "honest-2"):
            assert round_.send(name, honest, 32).status is AckStatus.ACCEPTED
        poisoned = _filled(round_.reference, -10.0)  # 1000x the honest norm
        assert round_.send("hostile", poisoned, 32).status is AckStatus.ACCEPTED
        delta = round_.new_delta()
    finally:
        round_.close()
    honest_norm = update_l2_norm(honest)
    expected = {n: (2 * honest[n] - 3 * honest[n]) / 3 for n in honest}  # clipped to 3x
    assert _close(delta, expected)
    assert update_l2_norm(delta) <= honest_norm * 5 / 3 + 1e-6


def test_after_an_attacked_round_an_honest_round_is_exactly_fedavg(
    tmp_path: Path, broker: ProductionBroker, tiny_bert_folder: Path
) -> None:
    """The default settings, two rounds: the first takes a huge update (clipped) and a lie
    about the sample count; the second, with every device honest, publishes exactly the
    FedAvg of its updates. Nothing of the attack outlives its round."""
    round_ = Round(_config(tmp_path, broker, tiny_bert_folder, rounds=2), broker)
    try:
        for name in ("honest-1", "honest-2"):
            assert (
                round_.send(name, _filled(round_.reference, 0.01), 32).status is AckStatus.ACCEPTED
            )
        ack = round_.send("hostile", _filled(round_.reference, -10.0), 10**9)
        assert ack.status is AckStatus.ACCEPTED
        round_.new_delta(1)
        round_.next_assignments()
        assert {a.server_round for a in round_.assignments.values()} == {2}
        sent = {"honest-1": (0.01, 32), "honest-2": (0.03, 16), "hostile": (0.02, 8)}
        for name, (value, samples) in sent.items():
            ack = round_.send(name, _filled(round_.reference, value), samples)
            assert ack.status is AckStatus.ACCEPTED, ack.reason
        delta = round_.new_delta(2)
    finally:
        round_.close()
    expected = sum(value * samples for value, samples in sent.values()) / 56
    assert _close(delta, _filled(round_.reference, expected))


def test_in_reject_mode_the_aggregate_is_exactly_the_honest_fedavg(
    tmp_path: Path, broker: ProductionBroker, tiny_bert_folder: Path
) -> None:
    round_ = Round(_config(tmp_path, broker, tiny_bert_folder, norm_mode="reject"), broker)
    try:
        for name, value in (("honest-1", 0.01), ("honest-2", 0.03)):
            assert (
                round_.send(name, _filled(round_.reference, value), 32).status is AckStatus.ACCEPTED
            )
        assert (
            round_.send("hostile", _filled(round_.reference, 50.0), 32).status is AckStatus.ACCEPTED
        )
        delta = round_.new_delta()
        wait_until(  # acknowledged on arrival, refused by the screening: counted, not only logged
            lambda: (
                [(r.device_id, r.category) for r in round_.operator.refusals(10)]
                == [("hostile", "update-refused-at-aggregation")]
            ),
            what="the aggregation's refusal to be counted",
        )
    finally:
        round_.close()
    assert _close(delta, _filled(round_.reference, (0.01 + 0.03) / 2))


def test_a_flood_of_refusals_is_one_counted_row_and_a_few_log_lines(
    tmp_path: Path,
    broker: ProductionBroker,
    tiny_bert_folder: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: one fsync'd row and one WARNING per refused message (11,246 rows in 15
    minutes from one device)."""
    daemon = CoordinatorDaemon(_config(tmp_path, broker, tiny_bert_folder))
    garbage = ReceivedMessage(
        device_topic(FLEET, "hostile", DeviceChannel.UPDATE), b"\x00", 1, False
    )
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(2000):
                daemon.handle(garbage)
            daemon.flush_refusals()
        rows = daemon.store.refusals(100)
        assert [(r.device_id, r.count) for r in rows] == [("hostile", 2000)]
        assert daemon.store.rejection_counts() == {rows[0].category: 2000}
        lines = [r for r in caplog.records if "hostile" in r.getMessage()]
        assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]
    finally:
        daemon.stop()


def test_tokens_are_refused_clearly_for_a_bad_lifetime_or_another_school(
    tmp_path: Path, broker: ProductionBroker, tiny_bert_folder: Path
) -> None:
    config = _config(tmp_path, broker, tiny_bert_folder)
    config_path = tmp_path / "coordinator.toml"
    config_path.write_text(
        f'[coordinator]\nfleet = "{FLEET}"\nstate_dir = "{config.state_dir}"\n\n'
        f'[broker]\nurl = "{broker.url}"\n\n[[tasks]]\nid = "t"\nkind = "classification"\n'
        f'base_model = "{tiny_bert_folder}"\nlabels = ["a", "b"]\n'
    )
    for hours in ("0", "-5"):
        refused = subprocess.run(
            [sys.executable, "-m", "schoolfl", "coordinator", "enroll-token", "--config",
             str(config_path), "--school", "north", "--valid-hours", hours],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert refused.returncode == 2, refused.stderr
        assert "--valid-hours" in refused.stderr and "positive" in refused.stderr

    daemon = CoordinatorDaemon(config)
    daemon.start()
    loop = threading.Thread(target=daemon.run, daemon=True)
    loop.start()
    operator = CoordinatorStore(config.state_dir / "coordinator.db")
    south = ScriptedDevice(FLEET, "pi-south", transport=broker.transport("pi-south"))
    north = ScriptedDevice(FLEET, "pi-north", transport=broker.transport("pi-north"))
    try:
        operator.add_enrollment_token("a-token-for-north-0123456", "north", 600)
        south.enroll("a-token-for-north-0123456", school="south")
        response = south.next_frame(EnrollmentResponse).message
        assert not response.accepted
        assert "'north'" in response.reason and "'south'" in response.reason
        assert operator.device("pi-south") is None
        north.enroll("a-token-for-north-0123456", school="north")  # still unused: it works
        assert north.next_frame(EnrollmentResponse).message.accepted

        assert operator.revoke_device("pi-north")
        north.enroll("a-token-for-north-0123456", school="north")  # with its key, revoked
        response = north.next_frame(EnrollmentResponse).message
        assert not response.accepted and "revoked" in response.reason
    finally:
        south.close()
        north.close()
        daemon.stop_requested.set()
        loop.join(timeout=30)
        daemon.stop()
    record = operator.device("pi-north")
    assert record is not None and record.revoked and record.school == "north"
