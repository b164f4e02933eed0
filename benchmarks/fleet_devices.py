"""Emulated school devices for `bench_fleet.py`: many protocol-level agents in one process.

Each device is a real agent on the wire, minus training: its own Ed25519 key and MQTT
connection (paho-mqtt 2.x, MQTT 3.1.1, persistent session, QoS 1, offline last will), a
one-time-token enrollment with its profile TOML as the body, a signed retained heartbeat
every HEARTBEAT_SECONDS, the retained model manifest (the blob too with download_models),
and per assignment a signed `Update` whose body is an encoded delta the parent made (read
from a file: no torch here), chunked as `edge_runtime.uploads.Uploads.send` does and
offered again after UPDATE_RESEND_SECONDS until acknowledged.

One selector loop drives every client of the process through paho's external-loop API
(`loop_read`, `loop_write`, `loop_misc`, the `on_socket_*` callbacks; paho's
`loop_asyncio` example) instead of a `loop_start` thread per client. `edge_runtime.wire`'s
`__init__` imports the update codec and with it torch; the submodules used here do not, so
`_wire_without_codec` registers the package without running its `__init__`.

Parent protocol: argv[1] is a JSON `WorkerConfig`; anything on stdin (`stop`), or its end,
ends the process; stdout carries JSON lines: `progress` every second, then `final`."""

# ruff: noqa: E402 - the wire submodules are imported after `_wire_without_codec()`

from __future__ import annotations

import contextlib
import hashlib
import heapq
import importlib.util
import itertools
import json
import logging
import random
import resource
import secrets
import selectors
import signal
import sys
import time
import types
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("fleet_devices")


def _wire_without_codec() -> None:
    """Wire submodules importable without the package `__init__` (it pulls torch)."""
    if "edge_runtime.wire" in sys.modules:
        return
    spec = importlib.util.find_spec("edge_runtime")
    assert spec is not None and spec.origin is not None, "run from the repository's venv"
    package = types.ModuleType("edge_runtime.wire")
    package.__path__ = [str(Path(spec.origin).parent / "wire")]
    package.__package__ = "edge_runtime.wire"
    sys.modules["edge_runtime.wire"] = package


_wire_without_codec()

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device_profiles.profile import find_profile, profile_toml_text
from edge_runtime.wire import messages as wm
from edge_runtime.wire import signing
from edge_runtime.wire.chunking import DEFAULT_CHUNK_BYTES, ChunkReassembler, ChunkSender
from edge_runtime.wire.errors import ProtocolError
from edge_runtime.wire.frames import Frame, decode_frame, encode_frame, verify_frame
from edge_runtime.wire.message_kinds import AckStatus, PowerSource
from edge_runtime.wire.topics import (
    DeviceChannel,
    device_subscriptions,
    device_topic,
    model_blob_topic,
    model_manifest_topic,
)

HEARTBEAT_SECONDS = 60.0
"""An idle agent whose verdict does not change publishes once a minute
(edge_runtime/device_state.heartbeat_due; not imported: it pulls torch)."""
ENROLL_RESEND_SECONDS = 5.0  # edge_runtime/enrollment.py: re-sent until answered
UPDATE_RESEND_SECONDS = 20.0  # edge_runtime/uploads.py RESEND_SECONDS
KEEPALIVE_SECONDS = 30  # the agent's TransportConfig default
PROGRESS_SECONDS = 1.0


@dataclass(frozen=True)
class WorkerConfig:
    """What the parent tells one worker process (a JSON file)."""

    worker: int
    host: str
    port: int
    fleet: str
    task: str
    devices: list[dict[str, str]]  # device_id, school, profile, token
    bodies: list[str]  # files of encoded update bodies, each valid for the task
    body_rank: int
    connect_rate: float
    dropout: float
    dropout_mode: str  # silent (never answers) or decline (sends AssignmentDecline)
    max_delay: float
    download_models: bool
    seed: int
    result_file: str


@dataclass
class RoundStats:
    """What one worker saw of one round."""

    assigned: int = 0
    dropped: int = 0
    declined: int = 0
    sent: int = 0
    resent: int = 0
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    version_mismatch: int = 0
    last_accepted_sent_at: float = 0.0
    last_ack_at: float = 0.0
    reject_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class Pending:
    """An update sent and not yet acknowledged."""

    server_round: int
    frame: bytes
    sent_at: float
    deadline: float
    sender: ChunkSender | None = None


def blob_filter(fleet: str, version: str) -> str:
    """Every retained chunk of one adapter version (as edge_runtime.agent.blob_filter)."""
    return model_blob_topic(fleet, version, 0).rsplit("/", 1)[0] + "/+"


class Device:
    """One emulated agent: key, connection, and where it stands in the protocol."""

    def __init__(self, worker: Worker, spec: dict[str, str]) -> None:
        self.worker = worker
        self.device_id = spec["device_id"]
        self.school = spec["school"]
        self.token = spec["token"]
        self.profile_text, self.profile_digest, self.ram_bytes = worker.profile(spec["profile"])
        self.key: signing.Ed25519PrivateKey = signing.generate_private_key()
        self.request_id = secrets.token_hex(8)
        self.coordinator_key: signing.Ed25519PublicKey | None = None
        self.enrolled = self.heartbeating = False
        self.handled: set[int] = set()
        self.pending: dict[str, Pending] = {}
        self.manifest_frames: list[Frame] = []  # arrived before the coordinator key
        self.models: set[str] = set()
        self.downloads: ChunkReassembler | None = None  # made on the first download
        self.client = self._client()

    def _client(self) -> mqtt.Client:
        """Configured as the agent's MqttTransport (TransportConfig defaults)."""
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, self.device_id, False, self, protocol=mqtt.MQTTv311
        )
        will_topic = device_topic(self.worker.fleet, self.device_id, DeviceChannel.STATE)
        client.will_set(will_topic, self.state_frame(online=False), qos=1, retain=True)
        client.max_inflight_messages_set(20)
        client.max_queued_messages_set(0)
        client.on_connect = _on_connect
        client.on_disconnect = _on_disconnect
        client.on_message = _on_message
        client.on_socket_open = self.worker.socket_opened
        client.on_socket_close = self.worker.socket_closed
        client.on_socket_register_write = self.worker.register_write
        client.on_socket_unregister_write = self.worker.unregister_write
        return client

    def publish(self, channel: DeviceChannel, payload: bytes, retain: bool = False) -> None:
        topic = device_topic(self.worker.fleet, self.device_id, channel)
        self.client.publish(topic, payload, qos=1, retain=retain)

    # -- what a device sends ----------------------------------------------------------

    def state_frame(self, online: bool) -> bytes:
        """The signed heartbeat (online) or last will (offline), as edge_runtime.device_state."""
        rng = self.worker.rng
        state = wm.DeviceState(
            fleet=self.worker.fleet,
            device_id=self.device_id,
            sequence=int(time.time() * 1000),
            online=online,
            eligible=online,
            cpu_load=round(rng.uniform(2.0, 25.0), 1) if online else 0.0,
            free_memory_bytes=int(self.ram_bytes * rng.uniform(0.5, 0.7)) if online else 0,
            power_source=PowerSource.MAINS if online else PowerSource.UNKNOWN,
            profile_digest=self.profile_digest,
            ineligible_reasons=() if online else ("offline",),
            capabilities=(wm.SECURE_AGGREGATION_CAPABILITY,),
        )
        return encode_frame(state, sender=self.device_id, signing_key=self.key)

    def enroll(self) -> None:
        if self.enrolled or not self.client.is_connected():
            return
        body = self.profile_text.encode()
        request = wm.EnrollmentRequest(
            fleet=self.worker.fleet,
            device_id=self.device_id,
            request_id=self.request_id,
            token=self.token,
            public_key=signing.public_key_hex(self.key),
            profile_digest=self.profile_digest,
            school=self.school,
            machine="x86_64",
        )
        frame = encode_frame(request, sender=self.device_id, body=body, signing_key=self.key)
        self.publish(DeviceChannel.ENROLL, frame)
        self.worker.counters["enroll_requests"] += 1
        if self.worker.first_enroll_sent == 0.0:
            self.worker.first_enroll_sent = time.time()
        self.worker.later(ENROLL_RESEND_SECONDS, self.enroll)

    def heartbeat(self) -> None:
        if self.client.is_connected():
            self.publish(DeviceChannel.STATE, self.state_frame(online=True), retain=True)
            self.worker.counters["heartbeats"] += 1
        self.worker.later(HEARTBEAT_SECONDS, self.heartbeat)

    def send_update(self, assignment: wm.TaskAssignment) -> None:
        """The plain update of edge_runtime.update_frames, sent as edge_runtime.uploads."""
        worker, plan, body = self.worker, assignment.plan, self.worker.body
        update = wm.Update(
            fleet=worker.fleet,
            task=assignment.task,
            server_round=assignment.server_round,
            device_id=self.device_id,
            attempt=assignment.attempt,
            model_version=assignment.model_version,
            num_samples=plan.local_steps * plan.batch_size,
            num_steps=plan.local_steps,
            encoding=assignment.update_encoding,
            metrics={"train_loss": round(worker.rng.uniform(0.5, 2.0), 4), "bytes_up": len(body)},
            top_k_fraction=assignment.top_k_fraction,
        )
        frame = encode_frame(update, sender=self.device_id, body=body, signing_key=self.key)
        pending = Pending(assignment.server_round, frame, time.time(), assignment.deadline)
        self.pending[update.message_id] = pending
        worker.rounds[assignment.server_round].sent += 1
        self._transmit(update.message_id, pending)

    def _transmit(self, update_id: str, pending: Pending) -> None:
        if len(pending.frame) <= DEFAULT_CHUNK_BYTES:
            self.publish(DeviceChannel.UPDATE, pending.frame)
        elif pending.sender is None:
            transfer_id = hashlib.sha256(pending.frame).hexdigest()[:32]
            pending.sender = ChunkSender(
                pending.frame, transfer_id=transfer_id, sender=self.device_id
            )
            for _, chunk in pending.sender.frames():
                self.publish(DeviceChannel.CHUNK, chunk)
        else:
            request = wm.TransferStatusRequest(
                transfer_id=pending.sender.transfer_id, request_id=f"r{int(time.time() * 1000)}"
            )
            self.publish(
                DeviceChannel.TRANSFER,
                encode_frame(request, sender=self.device_id, signing_key=self.key),
            )
        self.worker.later(UPDATE_RESEND_SECONDS, lambda: self._resend(update_id))

    def _resend(self, update_id: str) -> None:
        pending = self.pending.get(update_id)
        if pending is None or time.time() > pending.deadline:
            return
        self.worker.rounds[pending.server_round].resent += 1
        pending.sent_at = time.time()
        self._transmit(update_id, pending)

    def decline(self, assignment: wm.TaskAssignment, reason: str) -> None:
        a = assignment
        decline = wm.AssignmentDecline(
            a.fleet, a.task, a.server_round, self.device_id, a.attempt, reasons=(reason,)
        )
        frame = encode_frame(decline, sender=self.device_id, signing_key=self.key)
        self.publish(DeviceChannel.UPDATE, frame)
        self.worker.rounds[assignment.server_round].declined += 1

    # -- what a device receives -------------------------------------------------------

    def receive(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message (an assignment after its round)
        frame = decode_frame(payload)
        message = frame.message
        if isinstance(message, wm.ChunkHeader):
            self._model_chunk(frame)
        elif isinstance(message, wm.EnrollmentResponse):
            self._enrolled(frame, message)
        elif self.coordinator_key is None:  # not enrolled yet: keep a manifest for later
            if isinstance(message, wm.ModelManifest):
                self.manifest_frames.append(frame)
        elif not isinstance(message, wm.CoordinatorStatus):
            verify_frame(frame, self.coordinator_key)
            self._signed(message)

    def _signed(self, message: object) -> None:
        """A coordinator message whose signature has been checked."""
        if isinstance(message, wm.ModelManifest):
            self.worker.manifest(message)
        elif isinstance(message, wm.TaskAssignment):
            self._assignment(message)
        elif isinstance(message, wm.Acknowledgement):
            self._acknowledgement(message)
        elif isinstance(message, wm.TransferStatus):
            for pending in self.pending.values():
                if pending.sender is not None and pending.sender.transfer_id == message.transfer_id:
                    for _, chunk in pending.sender.frames(pending.sender.missing_from(message)):
                        self.publish(DeviceChannel.CHUNK, chunk)

    def _enrolled(self, frame: Frame, response: wm.EnrollmentResponse) -> None:
        if response.request_id != self.request_id or self.enrolled:
            return
        key = signing.public_key_from_hex(response.coordinator_public_key)
        verify_frame(frame, key)
        if not response.accepted:
            self.worker.counters["enroll_refused"] += 1
            logger.warning("%s: enrollment refused: %s", self.device_id, response.reason)
            self.enrolled = True  # stop re-sending; counted as refused
            return
        self.coordinator_key = key
        self.enrolled = True
        self.worker.counters["enrolled"] += 1
        self.worker.last_enrolled_at = time.time()
        for held in self.manifest_frames:
            verify_frame(held, key)
            self.worker.manifest(held.expect(wm.ModelManifest))
        self.manifest_frames = []
        if not self.heartbeating:  # as `agent run` starts: a heartbeat at once
            self.heartbeating = True
            self.heartbeat()

    def _assignment(self, assignment: wm.TaskAssignment) -> None:
        worker = self.worker
        if assignment.device_id != self.device_id or assignment.server_round in self.handled:
            return
        self.handled.add(assignment.server_round)
        stats = worker.rounds[assignment.server_round]
        stats.assigned += 1
        if worker.version is not None and assignment.model_version != worker.version:
            stats.version_mismatch += 1
        if worker.rng.random() < worker.config.dropout:
            stats.dropped += 1
            if worker.config.dropout_mode == "decline":
                self.decline(assignment, "emulated drop-out")
            return
        if assignment.plan.rank != worker.config.body_rank:
            self.decline(assignment, f"bench body has rank {worker.config.body_rank}")
            return
        if worker.config.download_models and assignment.model_version not in self.models:
            # as the agent: fetch the retained blob of a version this device lacks
            self.client.subscribe(blob_filter(worker.fleet, assignment.model_version), qos=1)
            worker.counters["model_fetches"] += 1

        def send_when_ready() -> None:
            if worker.config.download_models and assignment.model_version not in self.models:
                if time.time() < assignment.deadline:
                    worker.later(0.2, send_when_ready)  # the blob is still arriving
                return
            self.send_update(assignment)

        worker.later(worker.rng.uniform(0.0, worker.config.max_delay), send_when_ready)

    def _model_chunk(self, frame: Frame) -> None:
        header = frame.expect(wm.ChunkHeader)
        if header.sha256 in self.models or header.transfer_id != header.sha256:
            return
        self.worker.counters["model_chunks"] += 1
        if self.downloads is None:
            self.downloads = ChunkReassembler()
        if self.downloads.accept(header, frame.body) is not None:
            self.models.add(header.sha256)  # the reassembler checked the sha256
            self.worker.counters["models_downloaded"] += 1
            self.client.unsubscribe(blob_filter(self.worker.fleet, header.sha256))

    def _acknowledgement(self, ack: wm.Acknowledgement) -> None:
        pending = self.pending.pop(ack.acked_message_id, None)
        if pending is None:
            return
        stats = self.worker.rounds[pending.server_round]
        if ack.status is AckStatus.ACCEPTED:
            stats.accepted += 1
            stats.last_accepted_sent_at = max(stats.last_accepted_sent_at, pending.sent_at)
            stats.last_ack_at = max(stats.last_ack_at, time.time())
        elif ack.status is AckStatus.DUPLICATE:
            stats.duplicate += 1
        else:
            stats.rejected += 1
            reason = ack.reason[:80]
            stats.reject_reasons[reason] = stats.reject_reasons.get(reason, 0) + 1


def _on_connect(client: mqtt.Client, device: Device, flags: Any, reason: Any, props: Any) -> None:
    if reason.is_failure:
        device.worker.counters["connect_failures"] += 1
        return
    device.worker.counters["connects"] += 1
    wanted = [*device_subscriptions(device.worker.fleet, device.device_id)]
    wanted.append(model_manifest_topic(device.worker.fleet, device.worker.task))
    client.subscribe([(topic, 1) for topic in wanted])
    if not device.enrolled:
        device.enroll()


def _on_disconnect(client: mqtt.Client, device: Device, *_: Any) -> None:
    worker = device.worker
    if worker.stopping:
        return
    worker.counters["disconnects"] += 1
    worker.later(worker.rng.uniform(1.0, 5.0), lambda: worker.reconnect(device))


def _on_message(client: mqtt.Client, device: Device, message: mqtt.MQTTMessage) -> None:
    """The loop boundary: paho would let an exception out of `loop_read`, ending all."""
    try:
        device.receive(message.topic, bytes(message.payload))
    except ProtocolError as error:
        device.worker.counters["bad_messages"] += 1
        logger.warning("%s: refused message on %s: %s", device.device_id, message.topic, error)
    except Exception:  # noqa: BLE001 - logged; one device's trouble must not end the rest
        device.worker.counters["internal_errors"] += 1
        logger.exception("%s: failure handling %s", device.device_id, message.topic)


class Worker:
    """Every device of this process, one selector loop, one timer heap."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.fleet, self.task = config.fleet, config.task
        self.rng = random.Random(config.seed)
        self.selector = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = itertools.count()
        self.counters: dict[str, int] = defaultdict(int)
        self.rounds: dict[int, RoundStats] = defaultdict(RoundStats)
        self.manifests: dict[int, tuple[str, float]] = {}  # round -> version, first arrival
        self.version: str | None = None
        self.first_enroll_sent = self.last_enrolled_at = 0.0
        self.stopping = False
        self._profiles: dict[str, tuple[str, str, int]] = {}
        self.bodies = [Path(path).read_bytes() for path in config.bodies]
        self.devices = [Device(self, spec) for spec in config.devices]

    @property
    def body(self) -> bytes:
        return self.bodies[self.rng.randrange(len(self.bodies))]

    def profile(self, name: str) -> tuple[str, str, int]:
        """(TOML text, its sha256, RAM bytes) of a reference profile, read once."""
        if name not in self._profiles:
            profile = find_profile(name)
            text = profile_toml_text(profile)
            digest = hashlib.sha256(text.encode()).hexdigest()
            self._profiles[name] = (text, digest, profile.hardware.ram_bytes)
        return self._profiles[name]

    # -- paho's external-loop callbacks -------------------------------------------------

    def socket_opened(self, client: mqtt.Client, device: Device, sock: Any) -> None:
        self.selector.register(sock, selectors.EVENT_READ, device)

    def socket_closed(self, client: mqtt.Client, device: Device, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):  # never registered, or gone already
            self.selector.unregister(sock)

    def register_write(self, client: mqtt.Client, device: Device, sock: Any) -> None:
        self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, device)

    def unregister_write(self, client: mqtt.Client, device: Device, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):  # the socket closed in between
            self.selector.modify(sock, selectors.EVENT_READ, device)

    # -- timers and models --------------------------------------------------------------

    def later(self, seconds: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (time.monotonic() + seconds, next(self._sequence), action))

    def reconnect(self, device: Device) -> None:
        try:
            device.client.reconnect()
        except OSError:
            self.counters["reconnect_failures"] += 1
            self.later(self.rng.uniform(2.0, 8.0), lambda: self.reconnect(device))

    def manifest(self, manifest: wm.ModelManifest) -> None:
        if manifest.task != self.task:
            return
        if manifest.server_round not in self.manifests:
            self.manifests[manifest.server_round] = (manifest.version, time.time())
        self.version = manifest.version

    # -- the loop -----------------------------------------------------------------------

    def emit(self, kind: str, **values: object) -> None:
        line = {"kind": kind, "worker": self.config.worker, **values}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    def summary(self) -> dict[str, Any]:
        return {
            "connected": sum(1 for d in self.devices if d.client.is_connected()),
            "counters": dict(self.counters),
            "first_enroll_sent": self.first_enroll_sent,
            "last_enrolled_at": self.last_enrolled_at,
            "manifests": {str(k): v for k, v in self.manifests.items()},
        }

    def run(self) -> None:
        self.selector.register(sys.stdin, selectors.EVENT_READ, None)
        interval = 1.0 / max(self.config.connect_rate, 0.1)  # paced connects
        for index, device in enumerate(self.devices):
            self.later(index * interval, lambda d=device: self._connect(d))
        next_misc = next_progress = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            wait = min(next_misc, next_progress) - now
            if self.timers:
                wait = min(wait, self.timers[0][0] - now)
            for key, events in self.selector.select(max(0.0, min(wait, 0.5))):
                if key.data is None:  # the parent's `stop` line, or its end: it went away
                    self.stopping = True
                    continue
                client = key.data.client
                if events & selectors.EVENT_READ:
                    client.loop_read()
                if events & selectors.EVENT_WRITE and client.want_write():
                    client.loop_write()
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, action = heapq.heappop(self.timers)
                action()
            if now >= next_misc:
                for device in self.devices:
                    device.client.loop_misc()
                next_misc = now + 1.0
            if now >= next_progress:
                self.emit("progress", **self.summary())
                next_progress = now + PROGRESS_SECONDS
        self.finish()

    def _connect(self, device: Device) -> None:
        try:
            device.client.connect(self.config.host, self.config.port, KEEPALIVE_SECONDS)
        except OSError:
            self.counters["connect_errors"] += 1
            self.later(self.rng.uniform(1.0, 4.0), lambda: self._connect(device))

    def finish(self) -> None:
        lost = Counter(p.server_round for d in self.devices for p in d.pending.values())
        rounds = {
            str(number): {**vars(stats), "lost": lost.get(number, 0)}
            for number, stats in sorted(self.rounds.items())
        }
        result = {
            **self.summary(),
            "rounds": rounds,
            "torch_imported": "torch" in sys.modules,
            "peak_rss_kib": _peak_rss_kib(),
        }
        Path(self.config.result_file).write_text(json.dumps(result, indent=1))
        for device in self.devices:
            device.client.disconnect()
            device.client.loop_write()
        self.emit("final", result_file=self.config.result_file)


def _peak_rss_kib() -> int:
    """VmHWM (ru_maxrss would report the forking parent's peak: it survives exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops us through stdin
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    worker = Worker(WorkerConfig(**json.loads(Path(sys.argv[1]).read_text())))
    if "torch" in sys.modules:
        raise RuntimeError("torch was imported into a device process; see _wire_without_codec")
    worker.run()


if __name__ == "__main__":
    main()
