"""Bad input through a real broker: refused, logged, counted; the daemon stays up and the
aggregate only contains the valid updates."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_save

from coordinator.config import (
    CoordinatorConfig,
    CoordinatorSettings,
    ScheduleConfig,
    TaskConfig,
)
from coordinator.daemon import CoordinatorDaemon
from coordinator.mosquitto import MosquittoProcess
from coordinator.store import CoordinatorStore, RoundState
from edge_runtime.wire import (
    Acknowledgement,
    AckStatus,
    AssignmentDecline,
    BrokerSettings,
    CodecConfig,
    DeviceChannel,
    EnrollmentResponse,
    TaskAssignment,
    Update,
    UpdateEncoding,
    encode_update,
    generate_private_key,
)
from quantization.adapters import read_adapter_folder
from tests.daemon_helpers import ScriptedDevice, wait_until

pytestmark = pytest.mark.integration

FLEET = "badfleet"


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
                rank=4,
                rounds=1,
                local_steps=2,
                batch_size=32,  # 2 x 32 examples: the counts below are within the plan
                update_encoding="fp32",
                schedule=ScheduleConfig(
                    devices_per_round=2,
                    min_updates=2,
                    over_selection=0.0,
                    round_deadline_seconds=600,
                ),
            ),
        ),
    )


def _update(device: ScriptedDevice, assignment: TaskAssignment, samples: int) -> Update:
    return Update(
        fleet=FLEET,
        task="t",
        server_round=assignment.server_round,
        device_id=device.device_id,
        attempt=0,
        model_version=assignment.model_version,
        num_samples=samples,
        num_steps=2,
        encoding=UpdateEncoding.FP32,
    )


def _nan_body(reference: dict[str, torch.Tensor]) -> bytes:
    """A well-formed fp32 update body full of NaN: the encoder refuses to make one, so a
    malicious or broken device would have to write it by hand, as here."""
    good = encode_update(
        {n: torch.zeros_like(t) for n, t in reference.items()},
        CodecConfig(encoding=UpdateEncoding.FP32),
    ).body
    header_length = int.from_bytes(good[:8], "little")
    metadata = json.loads(good[8 : 8 + header_length])["__metadata__"]
    poisoned = {name: torch.full_like(t, math.nan) for name, t in reference.items()}
    return safetensors_save(poisoned, metadata=metadata)


def test_bad_messages_are_refused_and_counted(
    tmp_path: Path, mosquitto: MosquittoProcess, tiny_bert_folder: Path
) -> None:
    daemon = CoordinatorDaemon(_config(tmp_path, mosquitto, tiny_bert_folder))
    daemon.start()
    loop = threading.Thread(target=daemon.run, daemon=True)
    loop.start()
    operator = CoordinatorStore(tmp_path / "coord" / "coordinator.db")
    devices = {
        name: ScriptedDevice(FLEET, name, mosquitto.host, mosquitto.port)
        for name in ("dev-a", "dev-b", "dev-c", "dev-r")
    }
    try:
        for name, device in devices.items():
            operator.add_enrollment_token(f"token-for-{name}-0123456789", "north", 600)
            device.enroll(f"token-for-{name}-0123456789")
            assert device.next_frame(EnrollmentResponse).message.accepted
        assert operator.revoke_device("dev-r")

        # 1. garbage bytes, 2. a revoked device, 3. a device speaking on another's topic
        devices["dev-a"].publish(DeviceChannel.UPDATE, b"\x00garbage\xff" * 10)
        devices["dev-r"].heartbeat()
        devices["dev-c"].publish(
            DeviceChannel.STATE,
            devices["dev-c"].frame(
                Acknowledgement(
                    fleet=FLEET, device_id="dev-c", acked_message_id="x", status=AckStatus.ACCEPTED
                )
            ),
            as_device="dev-a",
        )
        wait_until(
            lambda: operator.rejection_counts().get("revoked-device", 0) >= 1,
            what="the revoked device's refusal",
        )
        # 4. a decline for a round that does not exist is refused and counted, not dropped
        devices["dev-c"].publish(
            DeviceChannel.UPDATE,
            devices["dev-c"].frame(
                AssignmentDecline(
                    fleet=FLEET,
                    task="t",
                    server_round=7,
                    device_id="dev-c",
                    attempt=0,
                    reasons=("busy",),
                )  # fmt: skip
            ),
        )
        wait_until(
            lambda: operator.rejection_counts().get("decline-refused", 0) >= 1,
            what="the refused decline",
        )
        assert any(
            refused.category == "decline-refused"
            and "round 7 of t is unknown" in refused.last_reason
            for refused in operator.refusals()
        )

        devices["dev-a"].heartbeat()
        devices["dev-b"].heartbeat()
        assignment_a = devices["dev-a"].next_frame(TaskAssignment).message
        assignment_b = devices["dev-b"].next_frame(TaskAssignment).message
        version0 = operator.latest_adapter_version("t")
        assert version0 is not None
        _, reference = read_adapter_folder(version0.folder)
        delta_a = {name: torch.full_like(t, 0.01) for name, t in reference.items()}
        delta_b = {name: torch.full_like(t, -0.02) for name, t in reference.items()}
        fp32 = CodecConfig(encoding=UpdateEncoding.FP32)

        # 4. a forged signature
        forged = devices["dev-a"].frame(
            _update(devices["dev-a"], assignment_a, 10),
            encode_update(delta_a, fp32).body,
            key=generate_private_key(),
        )
        devices["dev-a"].publish(DeviceChannel.UPDATE, forged)
        # 5. an update from an enrolled device without an assignment in that round
        sneaky = _update(devices["dev-c"], assignment_a, 1000)
        devices["dev-c"].publish(
            DeviceChannel.UPDATE, devices["dev-c"].frame(sneaky, encode_update(delta_a, fp32).body)
        )
        ack = devices["dev-c"].next_frame(Acknowledgement).message
        assert ack.status is AckStatus.REJECTED and "no assignment" in ack.reason
        # 6. a NaN update and 7. a wrong-shape update, both properly signed
        devices["dev-a"].publish(
            DeviceChannel.UPDATE,
            devices["dev-a"].frame(
                _update(devices["dev-a"], assignment_a, 10), _nan_body(reference)
            ),
        )
        ack = devices["dev-a"].next_frame(Acknowledgement).message
        assert ack.status is AckStatus.REJECTED and "NaN" in ack.reason
        misshapen = {
            name: torch.zeros(t.shape[0] + 1, *t.shape[1:]) for name, t in reference.items()
        }
        devices["dev-b"].publish(
            DeviceChannel.UPDATE,
            devices["dev-b"].frame(
                _update(devices["dev-b"], assignment_b, 30), encode_update(misshapen, fp32).body
            ),
        )
        ack = devices["dev-b"].next_frame(Acknowledgement).message
        assert ack.status is AckStatus.REJECTED

        assert loop.is_alive(), "the daemon died on bad input"
        assert operator.round("t", 1).state is RoundState.OPEN  # nothing bad was counted

        # The valid updates still make a round, and only they are in the aggregate.
        for device, assignment, delta, samples in (
            (devices["dev-a"], assignment_a, delta_a, 10),
            (devices["dev-b"], assignment_b, delta_b, 30),
        ):
            device.publish(
                DeviceChannel.UPDATE,
                device.frame(_update(device, assignment, samples), encode_update(delta, fp32).body),
            )
            assert device.next_frame(Acknowledgement).message.status is AckStatus.ACCEPTED
        # A replay of an accepted update is acknowledged as a duplicate and changes nothing.
        devices["dev-a"].publish(
            DeviceChannel.UPDATE,
            devices["dev-a"].frame(
                _update(devices["dev-a"], assignment_a, 10), encode_update(delta_a, fp32).body
            ),
        )
        assert devices["dev-a"].next_frame(Acknowledgement).message.status is AckStatus.DUPLICATE
        wait_until(
            lambda: operator.round("t", 1).state is RoundState.COMPLETED, what="round 1 to complete"
        )
    finally:
        for device in devices.values():
            device.close()
        daemon.stop_requested.set()
        loop.join(timeout=30)
        daemon.stop()

    _, new_state = read_adapter_folder(operator.latest_adapter_version("t").folder)
    expected_delta = (0.01 * 10 - 0.02 * 30) / 40  # within 3x the median norm: not clipped
    for name, tensor in reference.items():
        assert torch.allclose(new_state[name], tensor + expected_delta, atol=1e-6), name
    counts = operator.rejection_counts()
    assert counts.get("FrameError", 0) >= 1
    assert counts.get("SignatureError", 0) >= 1
    assert counts.get("revoked-device", 0) >= 1
    assert counts.get("SchemaError", 0) >= 1  # sender does not match the topic
    assert counts.get("update-refused", 0) >= 3  # no assignment, NaN, wrong shape
    assert len(operator.updates("t", 1)) == 2
