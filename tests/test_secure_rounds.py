"""Secure aggregation over a real Mosquitto: five devices, drop-outs, an abort below the
threshold, a coordinator restart mid-round, and rounds that would mix a school requiring
secure aggregation with a device that cannot do it.

The coordinator is the real daemon (in a thread, on the real broker). The devices are
scripted (`tests.daemon_helpers.ScriptedDevice`) but run the agent's own
`edge_runtime.secagg_session.SecureSession`, with deltas the test chooses, so the test can
check the sum exactly and make devices drop out at chosen steps. `test_real_agents_...`
runs the real agent processes end to end.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from coordinator.config import (
    CoordinatorConfig,
    CoordinatorSettings,
    PrivacyConfig,
    ScheduleConfig,
    SchoolConfig,
    SecureAggregationConfig,
    TaskConfig,
)
from coordinator.daemon import CoordinatorDaemon
from coordinator.mosquitto import MosquittoProcess
from coordinator.rounds import RoundManager
from coordinator.scheduler import DeviceCandidate, RandomScheduler
from coordinator.secure.store import SecurePhase
from coordinator.store import CoordinatorStore, RoundState
from device_profiles.profile import find_profile
from edge_runtime.secagg import (
    TensorLayout,
    flatten_delta,
    parse_roster,
    quantization_error_bound,
    quantization_of,
    quantize_delta,
)
from edge_runtime.secagg_session import SecureSession
from edge_runtime.wire import (
    SECURE_AGGREGATION_CAPABILITY,
    Acknowledgement,
    AckStatus,
    BrokerSettings,
    DeviceChannel,
    EnrollmentResponse,
    SecAggEnvelope,
    SecAggStep,
    TaskAssignment,
    decode_frame,
    generate_private_key,
)
from tests.daemon_helpers import ScriptedDevice, wait_until

pytestmark = pytest.mark.integration

FLEET = "securefleet"
DEVICES = [f"dev-{i}" for i in range(5)]
ROUND_DEADLINE = 10.0
STEP_SECONDS = 3.0


def _config(tmp_path: Path, broker: MosquittoProcess, model: Path) -> CoordinatorConfig:
    return CoordinatorConfig(
        coordinator=CoordinatorSettings(
            fleet=FLEET, state_dir=str(tmp_path / "coord"), tick_seconds=0.05
        ),
        broker=BrokerSettings(url=broker.url),
        tasks=(
            TaskConfig(
                id="t",
                kind="classification",
                base_model=str(model),
                labels=("a", "b", "c"),
                scheme="none",
                rank=4,
                rounds=1,
                local_steps=2,
                schedule=ScheduleConfig(
                    strategy="random",
                    devices_per_round=5,
                    min_updates=3,
                    over_selection=0.0,
                    gather_seconds=60.0,
                    round_deadline_seconds=ROUND_DEADLINE,
                ),
                secure_aggregation=SecureAggregationConfig(
                    enabled=True, step_seconds=STEP_SECONDS, clip_bound=0.5
                ),
            ),
        ),
    )


class SecureDevice:
    """A scripted device that speaks the secure-aggregation steps with a chosen delta."""

    def __init__(self, device: ScriptedDevice) -> None:
        self.device = device
        self.session: SecureSession | None = None
        self.assignment: TaskAssignment | None = None

    def envelope(self, step: SecAggStep) -> tuple[SecAggEnvelope, bytes]:
        """The next coordinator message of secure step `step` (fails on another step)."""
        frame = self.device.next_frame(SecAggEnvelope)
        envelope = frame.expect(SecAggEnvelope)
        assert envelope.step is step, f"{self.device.device_id}: {envelope.step} != {step}"
        return envelope, frame.body

    def advertise(self) -> None:
        self.assignment = self.device.next_frame(TaskAssignment).expect(TaskAssignment)
        assert self.assignment.spec.secure_aggregation is not None
        self.session = SecureSession(self.assignment, self.device.device_id, self.device.key)
        self.device.publish(DeviceChannel.SECAGG, self.session.advertise_frame())

    def answer(self, step: SecAggStep) -> bytes:
        assert self.session is not None
        _, body = self.envelope(step)
        reply = self.session.answer(step, body)
        if reply is not None:
            self.device.publish(DeviceChannel.SECAGG, reply)
        return body

    def send_masked(self, delta: dict[str, torch.Tensor]) -> bytes:
        assert self.session is not None
        _, frame = self.session.masked_input(delta, 10, 2, {"train_loss": 1.0})
        self.device.publish(DeviceChannel.UPDATE, frame)
        ack = self.device.next_frame(Acknowledgement).expect(Acknowledgement)
        assert ack.status is AckStatus.ACCEPTED, ack.reason
        return decode_frame(frame).body


def _start(config: CoordinatorConfig) -> tuple[CoordinatorDaemon, threading.Thread]:
    daemon = CoordinatorDaemon(config, scheduler=RandomScheduler())
    daemon.start()
    loop = threading.Thread(target=daemon.run, daemon=True)
    loop.start()
    return daemon, loop


def _stop(daemon: CoordinatorDaemon, loop: threading.Thread) -> None:
    daemon.stop_requested.set()
    loop.join(timeout=30)
    daemon.stop()


def _enrolled_devices(
    tmp_path: Path, broker: MosquittoProcess
) -> tuple[CoordinatorStore, dict[str, SecureDevice]]:
    operator = CoordinatorStore(tmp_path / "coord" / "coordinator.db")
    devices = {}
    for name in DEVICES:
        scripted = ScriptedDevice(FLEET, name, broker.host, broker.port)
        operator.add_enrollment_token(f"token-for-{name}-0123456789", "north", 600)
        scripted.enroll(f"token-for-{name}-0123456789")
        assert scripted.next_frame(EnrollmentResponse).message.accepted
        devices[name] = SecureDevice(scripted)
    for device in devices.values():
        device.device.heartbeat(capabilities=(SECURE_AGGREGATION_CAPABILITY,))
    return operator, devices


def _deltas(reference: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return {
        name: {
            key: 0.05 * torch.randn(tensor.shape, generator=generator)
            for key, tensor in reference.items()
        }
        for name in DEVICES
    }


@pytest.mark.parametrize("not_delivered", [1, 2])
def test_five_devices_sum_with_dropouts_and_a_coordinator_restart(
    tmp_path: Path, mosquitto: MosquittoProcess, tiny_bert_folder: Path, not_delivered: int
) -> None:
    """`not_delivered` devices share keys but never deliver their masked input (their
    pairwise masks must be cancelled); one more survivor never answers the unmask request
    when that leaves t = 3 answers. The coordinator is restarted between the share exchange
    and the masked inputs and must resume without asking any device to share again."""
    config = _config(tmp_path, mosquitto, tiny_bert_folder)
    daemon, loop = _start(config)
    operator, devices = _enrolled_devices(tmp_path, mosquitto)
    try:
        reference = daemon.rounds.current["t"].state()
        deltas = _deltas(reference)
        for device in devices.values():
            device.advertise()
        for device in devices.values():
            threshold, roster = parse_roster(device.answer(SecAggStep.ROSTER))
            assert threshold == 3 and len(roster) == 5
        for device in devices.values():
            device.answer(SecAggStep.FORWARDED_SHARES)
            assert device.session is not None and device.session.ready_to_mask

        _stop(daemon, loop)  # a crash-like restart between two phases
        daemon, loop = _start(config)
        for device in devices.values():  # the restarted coordinator re-sends the last step
            device.answer(SecAggStep.FORWARDED_SHARES)

        survivors = DEVICES[: 5 - not_delivered]
        masked = {name: devices[name].send_masked(deltas[name]) for name in survivors}
        silent = survivors[-1] if len(survivors) > 3 else None
        for name in survivors:
            if name != silent:
                devices[name].answer(SecAggStep.UNMASK_REQUEST)

        wait_until(
            lambda: operator.round("t", 1).state is not RoundState.OPEN,  # type: ignore[union-attr]
            timeout=ROUND_DEADLINE + 4 * STEP_SECONDS + 30,
            what="the secure round to close",
        )
        record = operator.round("t", 1)
        assert record is not None and record.state is RoundState.COMPLETED, record.reason
        assert f"summed {len(survivors)} masked inputs, {not_delivered} dropped" in record.reason
        assert record.metrics["updates"] == len(survivors)

        # The new global adapter is the old one plus the mean of the survivors' deltas,
        # within the ring quantization error (per coordinate, of a mean of n inputs).
        new_state = daemon.rounds.current["t"].state()
        quantization = quantization_of(devices[DEVICES[0]].assignment.spec.secure_aggregation)  # type: ignore[union-attr, arg-type]
        tolerance = quantization_error_bound(quantization, len(survivors)) / len(survivors)
        for key, tensor in reference.items():
            expected = tensor + sum(deltas[name][key] for name in survivors) / len(survivors)
            assert torch.allclose(new_state[key], expected, atol=tolerance + 1e-6), key

        # What the coordinator (and the broker) saw of one device is noise: uncorrelated with
        # its quantized delta and uniform over the ring.
        layout = TensorLayout.of(reference)
        words = np.frombuffer(masked[DEVICES[0]], dtype="<u4").astype(np.float64)
        true_codes = quantize_delta(deltas[DEVICES[0]], layout, quantization).double().numpy()
        assert words.size == layout.num_coordinates > 3000
        correlation = float(np.corrcoef(words, true_codes)[0, 1])
        assert abs(correlation) < 4 / np.sqrt(words.size)
        assert stats.kstest(words / 2**32, "uniform").pvalue > 1e-3
        plain = flatten_delta(deltas[DEVICES[0]], layout).numpy()
        assert abs(float(np.corrcoef(words, plain)[0, 1])) < 4 / np.sqrt(words.size)

        secure_state = daemon.rounds.secure.secure_store.state("t", 1)
        assert secure_state is not None and secure_state.phase is SecurePhase.COMPLETED
        assert daemon.rounds.secure.secure_store.messages("t", 1, "share_keys") == {}
    finally:
        _stop(daemon, loop)
        for device in devices.values():
            device.device.close()
        operator.close()


def test_below_the_threshold_the_round_aborts_without_unmasking(
    tmp_path: Path, mosquitto: MosquittoProcess, tiny_bert_folder: Path
) -> None:
    daemon, loop = _start(_config(tmp_path, mosquitto, tiny_bert_folder))
    operator, devices = _enrolled_devices(tmp_path, mosquitto)
    try:
        reference = daemon.rounds.current["t"].state()
        version_before = daemon.rounds.current["t"].version
        deltas = _deltas(reference)
        for device in devices.values():
            device.advertise()
        for device in devices.values():
            device.answer(SecAggStep.ROSTER)
        for device in devices.values():
            device.answer(SecAggStep.FORWARDED_SHARES)
        for name in DEVICES[:2]:  # three of five drop out: 2 < t = 3
            devices[name].send_masked(deltas[name])

        for device in devices.values():  # every device is told to forget the round
            envelope, _ = device.envelope(SecAggStep.ABORT)
            assert "only 2 of 5 devices sent masked inputs; threshold is 3" in envelope.reason
        record = operator.round("t", 1)
        assert record is not None and record.state is RoundState.FAILED
        assert "secure aggregation aborted" in (record.reason or "")
        assert daemon.rounds.current["t"].version == version_before  # nothing aggregated
        assert len(operator.adapter_versions("t")) == 1
        assert daemon.rounds.secure.secure_store.messages("t", 1, "advertise_keys") == {}
    finally:
        _stop(daemon, loop)
        for device in devices.values():
            device.device.close()
        operator.close()


# ---------------------------------------------------------------------------------------
# rounds are never formed across the secure-aggregation line


def _manager(
    tmp_path: Path, model: Path, schedule: dict[str, object] | None = None, **keys: object
) -> RoundManager:
    """A round manager (no broker) for one small task "alpha" on the tiny BERT; `keys`
    override the task's, `schedule` its [tasks.schedule] keys; a school "strict" requires
    secure aggregation."""
    schedule_keys = {
        "devices_per_round": 6,
        "min_updates": 2,
        "over_selection": 0.0,
        "gather_seconds": 0.0,
        **(schedule or {}),
    }
    task = {
        "id": "alpha",
        "kind": "classification",
        "base_model": str(model),
        "labels": ("a", "b"),
        "scheme": "none",
        "rank": 2,
        "schedule": ScheduleConfig(**schedule_keys),  # type: ignore[arg-type]
        **keys,
    }
    config = CoordinatorConfig(
        coordinator=CoordinatorSettings(fleet="f", state_dir=str(tmp_path / "state")),
        tasks=(TaskConfig(**task),),  # type: ignore[arg-type]
        schools=(SchoolConfig("strict", require_secure_aggregation=True),),
    )
    store = CoordinatorStore(config.state_dir / "coordinator.db")
    manager = RoundManager(config, store, RandomScheduler(), generate_private_key())
    manager.start()
    return manager


def _candidates() -> list[DeviceCandidate]:
    profile = find_profile("laptop-mid-16gb")
    capable = frozenset({SECURE_AGGREGATION_CAPABILITY})
    return [
        DeviceCandidate("strict-0", "strict", profile, capabilities=capable),
        DeviceCandidate("strict-1", "strict", profile, capabilities=capable),
        DeviceCandidate("open-0", "open", profile, capabilities=capable),
        DeviceCandidate("old-agent", "open", profile),  # predates secure aggregation
    ]


def _assigned(outgoing: list) -> set[str]:  # noqa: ANN001
    return {
        decode_frame(item.payload).expect(TaskAssignment).device_id
        for item in outgoing
        if item.topic.endswith("/task") and item.payload
    }


@pytest.mark.parametrize("secure", [True, False])
def test_a_round_never_mixes_a_secure_school_with_a_device_that_cannot(
    tmp_path: Path, tiny_bert_folder: Path, secure: bool
) -> None:
    manager = _manager(
        tmp_path, tiny_bert_folder, secure_aggregation=SecureAggregationConfig(enabled=secure)
    )
    assigned = _assigned(manager.open_rounds_if_possible(_candidates()))
    if secure:  # the school's devices join; the old agent, which would send in the clear, not
        assert assigned == {"strict-0", "strict-1", "open-0"}
    else:  # a plain task: the school's policy keeps its devices out
        assert assigned == {"open-0", "old-agent"}


# ---------------------------------------------------------------------------------------
# the real agents, end to end


@pytest.mark.slow
def test_real_agents_run_a_secure_round(
    tmp_path: Path, mosquitto: MosquittoProcess, tiny_bert_folder: Path
) -> None:
    """Three `schoolfl agent run` processes and `schoolfl coordinator serve` complete a secure
    round: the agents advertise, share, train, mask and unmask on their own; the coordinator
    stores only masked vectors and aggregates their sum."""
    from tests.fleet import TASK, make_fleet

    fleet = make_fleet(tmp_path, mosquitto)
    fleet.write_coordinator_config(
        base_model=str(tiny_bert_folder),
        scheme="none",
        rounds=1,
        local_steps=4,
        schedule={"round_deadline_seconds": 180.0},
        secure_aggregation={"enabled": True, "step_seconds": 60.0, "clip_bound": 0.5},
    )
    fleet.add_agents(fleet.shards, ["raspberry-pi-5-8gb", "laptop-mid-16gb", "laptop-low-4gb"])
    try:
        coordinator = fleet.start_coordinator()
        fleet.enroll_agents()
        for index in range(3):
            fleet.start_agent(index)
        coordinator.wait(timeout=300)
        assert coordinator.returncode == 0, fleet.log("coordinator")[-4000:]
    finally:
        fleet.stop_all()
    store = CoordinatorStore(tmp_path / "coordinator" / "coordinator.db")
    try:
        record = store.round(TASK, 1)
        assert record is not None and record.state is RoundState.COMPLETED, (
            record and record.reason,
            fleet.log("coordinator")[-3000:],
        )
        assert "summed 3 masked inputs, 0 dropped" in (record.reason or "")
        assert [v.version for v in store.adapter_versions(TASK)] == [0, 1]
        for index in range(3):
            log = fleet.log(f"dev-{index}")
            assert "masked for secure aggregation" not in log or "Traceback" not in log
            assert "refused message" not in log, log[-3000:]
        # The coordinator kept masked vectors, 4 bytes per coordinate, never a plain update.
        bodies = [u.body for u in store.updates(TASK, 1)]
        assert len(bodies) == 3 and all(len(body) % 4 == 0 for body in bodies)
        assert "refused message" not in fleet.log("coordinator")
    finally:
        store.close()


# ---------------------------------------------------------------------------------------
# without a broker: the device's refusals, the coordinator's checks, DP on top


def _assignment(task: TaskConfig, device_id: str, server_round: int = 1) -> TaskAssignment:
    from coordinator.task_models import wire_task_spec
    from device_profiles.plan import TrainingPlan

    return TaskAssignment(
        fleet="f",
        task=task.id,
        server_round=server_round,
        device_id=device_id,
        attempt=0,
        plan=TrainingPlan(scheme="none", rank=2, batch_size=4, seq_len=16, local_steps=2),
        deadline=2e9,
        model_version="ab" * 32,
        spec=wire_task_spec(task),
    )


def test_a_device_answers_a_repeated_step_the_same_and_refuses_a_different_one() -> None:
    from edge_runtime.secagg import SecAggRefusal, roster_body

    task = TaskConfig(
        id="alpha", kind="classification", base_model="m", labels=("a", "b"),
        secure_aggregation=SecureAggregationConfig(enabled=True),
    )  # fmt: skip
    sessions = [
        SecureSession(_assignment(task, f"d{i}"), f"d{i}", generate_private_key()) for i in range(5)
    ]
    roster = tuple(s.client.advertise_keys() for s in sessions)
    first = sessions[0].answer(SecAggStep.ROSTER, roster_body(3, roster))
    assert first is not None
    assert sessions[0].answer(SecAggStep.ROSTER, roster_body(3, roster)) == first
    with pytest.raises(SecAggRefusal, match="a second, different roster"):
        sessions[0].answer(SecAggStep.ROSTER, roster_body(4, roster))
    # A coordinator may not lower t below a strict majority of the roster.
    with pytest.raises(SecAggRefusal, match="strict majority"):
        sessions[1].answer(SecAggStep.ROSTER, roster_body(2, roster))
    with pytest.raises(SecAggRefusal, match="before the shares were exchanged"):
        sessions[2].answer(SecAggStep.UNMASK_REQUEST, b"{}")


def _envelopes(outgoing: list) -> list[tuple[SecAggEnvelope, bytes]]:  # noqa: ANN001
    frames = [decode_frame(item.payload) for item in outgoing if item.topic.endswith("/secagg")]
    return [(frame.expect(SecAggEnvelope), frame.body) for frame in frames]


def _device_message(frame: bytes) -> tuple[SecAggEnvelope, bytes]:
    decoded = decode_frame(frame)
    return decoded.expect(SecAggEnvelope), decoded.body


def test_secure_round_in_process_with_central_dp_and_refusals(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    from edge_runtime.secagg import message_body
    from edge_runtime.wire import Update, UpdateEncoding

    manager = _manager(
        tmp_path,
        tiny_bert_folder,
        schedule={"devices_per_round": 3, "min_updates": 3},
        secure_aggregation=SecureAggregationConfig(enabled=True),
        privacy=PrivacyConfig(
            mode="central", clip_norm=1.0, noise_multiplier=0.5, epsilon_budget=100.0
        ),
    )
    capable = frozenset({SECURE_AGGREGATION_CAPABILITY})
    profile = find_profile("laptop-mid-16gb")
    candidates = [DeviceCandidate(f"d{i}", "s", profile, capabilities=capable) for i in range(3)]
    assignments = [
        decode_frame(item.payload).expect(TaskAssignment)
        for item in manager.open_rounds_if_possible(candidates)
        if item.topic.endswith("/task") and item.payload
    ]
    assert len(assignments) == 3
    sessions = {
        a.device_id: SecureSession(a, a.device_id, generate_private_key()) for a in assignments
    }
    reference = manager.current["alpha"].state()
    delta = {name: torch.full_like(tensor, 1e-4) for name, tensor in reference.items()}

    # A masked input before the key exchange is refused as out of order.
    coordinates = TensorLayout.of(reference).num_coordinates
    early = sessions["d0"].frame(SecAggStep.MASKED_INPUT, bytes(4 * coordinates))[1]
    status, reason, _ = manager.accept_secure(*_device_message(early))
    assert status is AckStatus.REJECTED and "arrived in its advertising phase" in reason
    # So is a plain update to a secure task.
    update = Update("f", "alpha", 1, "d0", 0, "ab" * 32, 1, 1, UpdateEncoding.FP32)
    assert "send a masked input" in manager.accept_update(update, b"")[1]

    pending: list[tuple[SecAggEnvelope, bytes]] = []
    for session in sessions.values():
        status, reason, outgoing = manager.accept_secure(
            *_device_message(session.advertise_frame())
        )
        assert status is AckStatus.ACCEPTED, reason
        pending += _envelopes(outgoing)
    # A share message that leaves out a peer is refused and does not count.
    rosters = list(pending)
    assert [e.step for e, _ in rosters] == [SecAggStep.ROSTER] * 3
    forged = sessions["d0"].client.share_keys(parse_roster(rosters[0][1])[1], 2)
    forged = type(forged)(
        forged.round_id, forged.sender_id, dict(list(forged.encrypted_shares.items())[:1])
    )
    forged_frame = sessions["d0"].frame(SecAggStep.SHARE_KEYS, message_body(forged))[1]
    status, reason, _ = manager.accept_secure(*_device_message(forged_frame))
    assert status is AckStatus.REJECTED and "one box for each of the other 2 devices" in reason

    # Keys re-advertised after the phase moved on (a restarted coordinator re-sends the
    # assignment) are a duplicate, not a refusal.
    status, _, _ = manager.accept_secure(*_device_message(sessions["d1"].advertise_frame()))
    assert status is AckStatus.DUPLICATE

    # Run the rest of the protocol by relaying the manager's messages to the sessions.
    while pending:
        envelope, body = pending.pop(0)
        reply = sessions[envelope.device_id].answer(envelope.step, body)
        if reply is not None:
            _, _, more = manager.accept_secure(*_device_message(reply))
            pending += _envelopes(more)
        session = sessions[envelope.device_id]
        if envelope.step is SecAggStep.FORWARDED_SHARES and session.ready_to_mask:
            _, _, more = manager.accept_secure(
                *_device_message(session.masked_input(delta, 5, 2, {"train_loss": 0.7})[1])
            )
            pending += _envelopes(more)

    record = manager.store.round("alpha", 1)
    assert record is not None and record.state is RoundState.COMPLETED, record.reason
    # An outbox resend of a masked input after the round closed is acknowledged as counted.
    resent = sessions["d2"].masked_input(delta, 5, 2, {"train_loss": 0.7})[1]
    assert manager.accept_secure(*_device_message(resent))[0] is AckStatus.DUPLICATE
    ledger = manager.store.privacy_rounds("alpha")
    assert len(ledger) == 1 and ledger[0].secure_aggregation and ledger[0].participants == 3
    assert record.metrics["samples"] == 15.0
    # Central noise of std z*C/n = 0.5/3 was added to the mean delta of 1e-4.
    new_state = manager.current["alpha"].state()
    noise = torch.cat([(new_state[n] - reference[n] - 1e-4).flatten() for n in reference])
    assert abs(float(noise.std()) - 0.5 / 3) < 0.02
