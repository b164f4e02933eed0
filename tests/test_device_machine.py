"""The device's real architecture: sent at enrollment, stored, shown, checked against the profile.

Before this, enrollment carried only the configured profile, so a Pi enrolled with a laptop
profile was recorded (and scheduled) as an x86 laptop.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
from pathlib import Path

import pytest

from coordinator.store import CoordinatorStore
from device_profiles.architecture import (
    architecture_mismatch,
    architectures_disagree,
    normalize_architecture,
)
from edge_runtime import enrollment
from edge_runtime.agent_config import AgentConfig, AgentSettings
from edge_runtime.wire import (
    BrokerSettings,
    EnrollmentRequest,
    SchemaError,
    decode_frame,
    encode_frame,
    generate_private_key,
    public_key_hex,
    save_private_key,
)

KEY = generate_private_key()


def _request(machine: str) -> EnrollmentRequest:
    return EnrollmentRequest(
        fleet="district-7",
        device_id="north-pi-01",
        request_id="abcd1234",
        token="t" * 32,
        public_key=public_key_hex(KEY),
        profile_digest="0" * 64,
        school="north",
        machine=machine,
    )


def test_enrollment_request_carries_the_machine_over_the_wire() -> None:
    frame = decode_frame(encode_frame(_request("aarch64"), sender="north-pi-01", signing_key=KEY))
    assert frame.expect(EnrollmentRequest).machine == "aarch64"


@pytest.mark.parametrize("bad", ["x86 64", "a" * 33, "arm;rm -rf"])
def test_a_malformed_machine_is_refused_with_its_value(bad: str) -> None:
    with pytest.raises(SchemaError, match="machine"):
        _request(bad)


def test_architecture_names_compare_across_platform_spellings() -> None:
    assert normalize_architecture("arm64") == normalize_architecture("aarch64") == "aarch64"
    assert normalize_architecture("AMD64") == "x86_64"
    assert not architectures_disagree("aarch64", "arm64")
    assert not architectures_disagree("x86_64", "")  # an old agent: unknown, no alarm
    assert architectures_disagree("x86_64", "aarch64")
    message = architecture_mismatch("x86_64", "aarch64")
    assert message is not None and "aarch64" in message and "profile" in message


def _old_store(path: Path) -> None:
    """A store as a coordinator before the `machine` column wrote it."""
    CoordinatorStore(path).close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE devices DROP COLUMN machine")
    db.commit()
    db.close()


def test_store_keeps_the_machine_and_upgrades_an_old_store(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.db"
    _old_store(path)
    store = CoordinatorStore(path)
    store.add_enrollment_token("t" * 32, "north", valid_seconds=60)
    store.redeem_enrollment_token(
        "t" * 32, "north-pi-01", b"k" * 32, "profile", agent_school="north", machine="aarch64"
    )
    store.close()
    reopened = CoordinatorStore(path)
    device = reopened.device("north-pi-01")
    assert device is not None and device.machine == "aarch64"
    assert [d.machine for d in reopened.devices()] == ["aarch64"]
    reopened.close()


class _SilentTransport:
    """Captures what enrollment publishes; no coordinator ever answers."""

    published: list[bytes] = []

    def __init__(self, config: object) -> None:
        self.received: queue.Queue[object] = queue.Queue()

    def subscribe(self, topic: str) -> None:
        pass

    def start(self, timeout_seconds: float) -> None:
        pass

    def stop(self) -> None:
        pass

    def publish(self, topic: str, payload: bytes) -> None:
        _SilentTransport.published.append(payload)


def _pi_enrolling_with_a_laptop_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, emulate_profile: bool = False
) -> AgentConfig:
    """An aarch64 machine whose agent.toml names an x86_64 reference profile; enrollment
    publishes into `_SilentTransport` and nobody answers."""
    config = AgentConfig(
        agent=AgentSettings(
            fleet="district-7",
            device_id="north-pi-01",
            school="north",
            state_dir=str(tmp_path / "state"),
            data_dir=str(tmp_path / "data"),
            profile="laptop-low-4gb",  # an x86_64 reference profile
            emulate_profile=emulate_profile,
        ),
        broker=BrokerSettings(url="mqtt://127.0.0.1:1"),
    )
    save_private_key(generate_private_key(), config.key_path)
    monkeypatch.setattr(enrollment.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(enrollment, "MqttTransport", _SilentTransport)
    _SilentTransport.published.clear()
    return config


def test_enroll_sends_platform_machine_and_warns_on_a_wrong_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = _pi_enrolling_with_a_laptop_profile(tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING), pytest.raises(enrollment.EnrollmentError):
        enrollment.enroll_device(config, "t" * 32, timeout_seconds=0.2)
    request = decode_frame(_SilentTransport.published[0]).expect(EnrollmentRequest)
    assert request.machine == "aarch64"
    assert any(
        "aarch64" in record.getMessage() and "x86_64" in record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING
    )


def test_enroll_does_not_warn_when_the_profile_is_emulated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The demo emulates a Pi's profile on an x86 laptop on purpose: no mismatch warning."""
    config = _pi_enrolling_with_a_laptop_profile(tmp_path, monkeypatch, emulate_profile=True)
    with caplog.at_level(logging.WARNING), pytest.raises(enrollment.EnrollmentError):
        enrollment.enroll_device(config, "t" * 32, timeout_seconds=0.2)
    assert _SilentTransport.published  # it did send the request
    assert not [r for r in caplog.records if "x86_64" in r.getMessage()]
