"""A scripted device for daemon tests: speaks the real protocol over the real broker, and
can also misbehave (garbage, forged signatures, NaN updates) on purpose."""

from __future__ import annotations

import hashlib
import queue
import secrets
import time

from device_profiles.profile import find_profile, profile_toml_text
from edge_runtime.wire import (
    DeviceChannel,
    DeviceState,
    Ed25519PrivateKey,
    EnrollmentRequest,
    Frame,
    MqttTransport,
    PowerSource,
    TransportConfig,
    decode_frame,
    device_subscriptions,
    device_topic,
    encode_frame,
    generate_private_key,
    public_key_hex,
)

WAIT_SECONDS = 60.0


class ScriptedDevice:
    def __init__(
        self,
        fleet: str,
        device_id: str,
        host: str = "",
        port: int = 0,
        profile: str = "laptop-mid-16gb",
        *,
        transport: MqttTransport | None = None,
    ) -> None:
        """Connects to a lab broker at host:port, or through `transport` (a production
        broker's TLS transport with this device's credential)."""
        self.fleet = fleet
        self.device_id = device_id
        self.key: Ed25519PrivateKey = generate_private_key()
        self.profile_text = profile_toml_text(find_profile(profile))
        self.transport = transport or MqttTransport(
            TransportConfig(host=host, port=port, client_id=device_id)
        )
        for topic_filter in device_subscriptions(fleet, device_id):
            self.transport.subscribe(topic_filter)
        self.transport.start(timeout_seconds=10)

    def publish(self, channel: DeviceChannel, payload: bytes, as_device: str | None = None) -> None:
        topic = device_topic(self.fleet, as_device or self.device_id, channel)
        info = self.transport.publish(topic, payload)
        assert self.transport.wait_published(info, 10)

    def frame(
        self, message: object, body: bytes = b"", key: Ed25519PrivateKey | None = None
    ) -> bytes:
        return encode_frame(
            message,
            sender=self.device_id,
            body=body,  # type: ignore[arg-type]
            signing_key=key or self.key,
        )

    def enroll(self, token: str, school: str = "") -> None:
        body = self.profile_text.encode()
        request = EnrollmentRequest(
            fleet=self.fleet,
            device_id=self.device_id,
            request_id=secrets.token_hex(4),
            token=token,
            public_key=public_key_hex(self.key),
            profile_digest=hashlib.sha256(body).hexdigest(),
            school=school,
        )
        self.publish(DeviceChannel.ENROLL, self.frame(request, body))

    def heartbeat(self, eligible: bool = True, capabilities: tuple[str, ...] | None = None) -> None:
        state = DeviceState(
            fleet=self.fleet,
            device_id=self.device_id,
            sequence=int(time.time() * 1e6),
            online=True,
            eligible=eligible,
            cpu_load=1.0,
            free_memory_bytes=8 * 2**30,
            power_source=PowerSource.MAINS,
            profile_digest=hashlib.sha256(self.profile_text.encode()).hexdigest(),
            capabilities=capabilities,
        )
        self.publish(DeviceChannel.STATE, self.frame(state))

    def next_frame(self, kind: type, timeout: float = WAIT_SECONDS) -> Frame:
        """The next message of type `kind` from the coordinator (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.device_id}: no {kind.__name__} within {timeout} s")
            try:
                received = self.transport.received.get(timeout=remaining)
            except queue.Empty:
                continue
            if not received.payload:
                continue
            frame = decode_frame(received.payload)
            if isinstance(frame.message, kind):
                return frame

    def close(self) -> None:
        self.transport.stop()


def wait_until(predicate, timeout: float = WAIT_SECONDS, what: str = "condition") -> None:  # noqa: ANN001
    """Poll an in-process predicate with a deadline (state lives in another thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
