"""Enrolling a device: trade the operator's one-time token for registration of our key.

The request is signed with the device's new key (proof that we hold it) and carries the
device's profile as its body, so the coordinator's scheduler knows what this hardware can
do from the first round. The response carries the coordinator's public key, which the agent
trusts from then on for assignments, acknowledgements and model manifests.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import queue
import secrets
import time

from device_profiles.architecture import architecture_mismatch
from device_profiles.profile import find_profile, profile_toml_text
from edge_runtime.agent_config import AgentConfig
from edge_runtime.enrollment_record import Enrollment
from edge_runtime.wire import (
    COORDINATOR_SENDER,
    DeviceChannel,
    EnrollmentRequest,
    EnrollmentResponse,
    InboxChannel,
    MqttTransport,
    ProtocolError,
    decode_frame,
    device_topic,
    encode_frame,
    inbox_topic,
    load_private_key,
    public_key_from_hex,
    public_key_hex,
    verify_frame,
)

logger = logging.getLogger(__name__)

RESEND_SECONDS = 5.0


class EnrollmentError(RuntimeError):
    """The coordinator refused the token, or did not answer in time."""


def warn_if_architecture_mismatch(profile_architecture: str, machine: str | None = None) -> None:
    """Log `architecture_mismatch` as a WARNING (the agent's commands show warnings)."""
    message = architecture_mismatch(
        profile_architecture, platform.machine() if machine is None else machine
    )
    if message is not None:
        logger.warning("%s", message)


def enroll_device(config: AgentConfig, token: str, timeout_seconds: float = 60.0) -> Enrollment:
    """Send the enrollment request and wait for the coordinator's signed answer."""
    key = load_private_key(config.key_path)
    profile = find_profile(config.agent.profile)
    profile_bytes = profile_toml_text(profile).encode()
    machine = platform.machine()
    if not config.agent.emulate_profile:  # emulating another machine's profile is the point
        warn_if_architecture_mismatch(profile.hardware.architecture, machine)
    request = EnrollmentRequest(
        fleet=config.agent.fleet,
        device_id=config.agent.device_id,
        request_id=secrets.token_hex(8),
        token=token,
        public_key=public_key_hex(key),
        profile_digest=hashlib.sha256(profile_bytes).hexdigest(),
        school=config.agent.school,
        machine=machine,
    )
    transport = MqttTransport(config.broker.transport_config(f"{config.agent.device_id}-enroll"))
    transport.subscribe(
        inbox_topic(config.agent.fleet, config.agent.device_id, InboxChannel.ENROLLED)
    )
    transport.start(timeout_seconds=timeout_seconds)
    topic = device_topic(config.agent.fleet, config.agent.device_id, DeviceChannel.ENROLL)
    frame_bytes = encode_frame(
        request, sender=config.agent.device_id, body=profile_bytes, signing_key=key
    )
    try:
        # Re-sent until answered: a coordinator that was not subscribed yet (just starting,
        # or restarting) never saw the first copy; a repeat is answered idempotently.
        deadline = time.monotonic() + timeout_seconds
        next_send = time.monotonic()
        while time.monotonic() < deadline:
            if time.monotonic() >= next_send:
                transport.publish(topic, frame_bytes)
                next_send = time.monotonic() + RESEND_SECONDS
            wait = max(0.0, min(next_send, deadline) - time.monotonic())
            try:
                received = transport.received.get(timeout=wait)
            except queue.Empty:
                continue
            try:
                frame = decode_frame(received.payload)
                response = frame.expect(EnrollmentResponse)
            except ProtocolError as error:
                logger.warning("ignoring a bad message while enrolling: %s", error)
                continue
            if response.request_id != request.request_id or frame.sender != COORDINATOR_SENDER:
                continue
            verify_frame(frame, public_key_from_hex(response.coordinator_public_key))
            if not response.accepted:
                raise EnrollmentError(f"the coordinator refused enrollment: {response.reason}")
            enrollment = Enrollment(
                fleet=config.agent.fleet,
                device_id=config.agent.device_id,
                coordinator_public_key=response.coordinator_public_key,
                enrolled_at=time.time(),
            )
            enrollment.save(config.state_dir)
            return enrollment
    finally:
        transport.stop()
    raise EnrollmentError(
        f"no answer from the coordinator within {timeout_seconds:.0f} s; is `schoolfl "
        f"coordinator serve` running for fleet {config.agent.fleet!r} on {config.broker.url}?"
    )
