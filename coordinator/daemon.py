"""The coordinator daemon: one loop that drains the broker, runs rounds and never crashes.

Everything arrives through `MqttTransport.received`; the loop takes one message at a time
(paho's callbacks only enqueue), so there is no locking around the store or the models. A
message that fails any check (frame, schema, signature, identity, round, codec) is refused
with a reason, logged, counted in the store's `refusals` table, and the loop goes on:
no input can stop the daemon or reach an aggregate (DESIGN.md invariant 5).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coordinator.broker_acl import RESPONSE_TOPIC
from coordinator.broker_admin import BrokerRevocations
from coordinator.candidates import DeviceRoster
from coordinator.config import CoordinatorConfig
from coordinator.device_status import HeartbeatRecorder, facts_from_state, record_left_out
from coordinator.dropped_chunks import DroppedChunkRecovery
from coordinator.outgoing import Outgoing
from coordinator.refusals import RefusalLedger
from coordinator.retained_guard import (
    RETAINED_SWEEP_SECONDS,
    forbidden_retained,
    retained_sweep_filters,
)
from coordinator.rounds import RoundManager
from coordinator.scheduler import DeviceCandidate, Scheduler
from coordinator.store import CoordinatorStore
from device_profiles.profile import DeviceProfile, profile_from_toml_text
from durable.atomic_files import sweep_leftovers
from durable.state_lock import lock_state_folder
from edge_runtime.wire import (
    COORDINATOR_SENDER,
    Acknowledgement,
    AckStatus,
    AssignmentDecline,
    ChunkHeader,
    ChunkReassembler,
    CoordinatorStatus,
    DeviceChannel,
    DeviceState,
    Ed25519PrivateKey,
    Ed25519PublicKey,
    EnrollmentRequest,
    EnrollmentResponse,
    Frame,
    InboxChannel,
    Limits,
    MqttTransport,
    ProtocolError,
    ReceivedMessage,
    SchemaError,
    SecAggEnvelope,
    SecAggStep,
    TransferStatusRequest,
    Update,
    WillConfig,
    coordinator_status_topic,
    coordinator_subscriptions,
    decode_frame,
    encode_frame,
    generate_private_key,
    idle_timeout_for_deadlines,
    inbox_topic,
    load_private_key,
    parse_device_topic,
    public_key_from_hex,
    public_key_hex,
    save_private_key,
    verify_frame,
)
from quantization.allocator import configure_training_allocator

logger = logging.getLogger(__name__)

COORDINATOR_CLIENT_ID = "schoolfl-coordinator"


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The coordinator's signing key, created on first start."""
    if path.exists():
        return load_private_key(path)
    key = generate_private_key()
    save_private_key(key, path)
    return key


@functools.lru_cache(maxsize=65536)
def _device_public_key(raw: bytes) -> Ed25519PublicKey:
    """A device's verifying key, parsed once (every message of every device needs it)."""
    return public_key_from_hex(raw.hex())


DEGRADED_LOG_SECONDS = 60.0
"""While bookkeeping keeps failing, the DEGRADED error is repeated this often."""


@dataclass
class DegradedBookkeeping:
    """Since when (and why) the store refuses the daemon's bookkeeping rows."""

    since: float
    last_logged: float
    error: str


@dataclass(frozen=True)
class DeviceLiveness:
    state: DeviceState
    received_at: float


class CoordinatorDaemon:
    """Owns the store, the round manager and the broker connection."""

    transport_class: type[MqttTransport] = MqttTransport
    """The transport factory; tests can swap in a subclass."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        scheduler: Scheduler | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.fleet = config.coordinator.fleet
        self.now = now
        self._state_lock = lock_state_folder(config.state_dir, "coordinator")
        sweep_leftovers(config.state_dir)  # ours alone now: the lock is held
        self.store = CoordinatorStore(config.state_dir / "coordinator.db", now=now)
        self.key = load_or_create_key(config.state_dir / "coordinator_key.pem")
        self.rejected: Counter[str] = Counter()
        """Refusals by category since start (the store's `refusals` table keeps them all)."""
        self.refusals = RefusalLedger(now)
        """Refusals waiting to be written, per device and category (`flush_refusals`)."""
        self.degraded: DegradedBookkeeping | None = None
        """Set while the store refuses refusal counts (a full disk): the daemon goes on."""
        self.rounds = RoundManager(
            config, self.store, scheduler, self.key, now=now, reject=self.reject
        )
        self.reassembler = ChunkReassembler(
            Limits(),  # per-sender quotas: 4 open transfers, 512 MiB unfinished per device
            idle_timeout_seconds=idle_timeout_for_deadlines(
                task.schedule.round_deadline_seconds for task in config.tasks
            ),
        )
        """One for every device; a device over its own quota is refused (`LimitExceededError`),
        and a transfer quiet for the longest round deadline is dropped (`transfer-expired`)."""
        self.chunk_recovery = DroppedChunkRecovery(self.reassembler)
        self.liveness: dict[str, DeviceLiveness] = {}
        self.heartbeats = HeartbeatRecorder(self.store.device_status)
        """Writes the heartbeat facts operators see (`coordinator devices`), sparingly."""
        self.roster = DeviceRoster(self.store)
        """Device records and parsed profiles, read again only when the store changed."""
        self.not_candidates: dict[str, str] = {}
        """Device id -> why the last `candidates` call dropped it (offline, not eligible...)."""
        self.stop_requested = threading.Event()
        self._status_sequence = int(now() * 1000)
        self._last_status_at = 0.0
        self._started_at = now()
        self.transport: MqttTransport | None = None
        self.broker_revocations = (
            BrokerRevocations(self.fleet, config.broker_admin.retry_seconds)
            if config.broker_admin is not None
            else None
        )
        """With [broker_admin]: revoked devices are removed from the broker (dynamic security)."""
        self._last_retained_sweep = now()

    # -- lifecycle -----------------------------------------------------------------------

    def _status_frame(self, online: bool) -> bytes:
        self._status_sequence += 1
        status = CoordinatorStatus(
            fleet=self.fleet,
            sequence=self._status_sequence,
            online=online,
            public_key=public_key_hex(self.key),
        )
        return encode_frame(status, sender=COORDINATOR_SENDER, signing_key=self.key)

    def start(self) -> None:
        """Connect, subscribe, publish status, the current models and open assignments."""
        will = WillConfig(coordinator_status_topic(self.fleet), self._status_frame(False))
        transport_config = self.config.broker.transport_config(COORDINATOR_CLIENT_ID, will)
        self.transport = self.transport_class(transport_config)
        for topic_filter in coordinator_subscriptions(self.fleet):
            self.transport.subscribe(topic_filter)
        if self.broker_revocations is not None:
            self.transport.subscribe(RESPONSE_TOPIC)
        self.transport.start(timeout_seconds=30)
        logger.info(
            "coordinator for fleet %s: %d task(s) %s, state in %s; %s",
            self.fleet,
            len(self.config.tasks),
            [t.id for t in self.config.tasks],
            self.config.state_dir,
            configure_training_allocator(),  # decoded updates are MiB-sized tensors too
        )
        limits = self.reassembler.limits
        logger.info(
            "chunk reassembly: %d open transfers / %d bytes per device (%d / %d in all), "
            "idle timeout %.0f s; broker administration: %s",
            limits.max_open_transfers_per_sender,
            limits.max_buffered_bytes_per_sender,
            limits.max_open_transfers,
            limits.max_buffered_bytes,
            self.reassembler.idle_timeout_seconds,
            "revoked devices are removed from the broker ([broker_admin])"
            if self.broker_revocations is not None
            else "off (no [broker_admin]: remove revoked devices from the broker yourself)",
        )
        self._started_at = self.now()
        self._publish_all(self.rounds.start())
        self._publish_status()

    def stop(self) -> None:
        self.flush_refusals()
        self.heartbeats.flush()
        if self.transport is not None:
            self.transport.publish(
                coordinator_status_topic(self.fleet), self._status_frame(False), retain=True
            )
            self.transport.stop()
        self.rounds.secure.secure_store.close()
        self.store.close()
        self._state_lock.close()  # the next coordinator on this folder may start

    def run(self, exit_when_done: bool = False) -> None:
        """Loop until `stop_requested` is set (by a signal handler or a test), or, with
        `exit_when_done`, until every task has completed its rounds."""
        tick = self.config.coordinator.tick_seconds
        next_tick = time.monotonic()
        while not self.stop_requested.is_set():
            assert self.transport is not None  # start() ran
            timeout = max(0.0, next_tick - time.monotonic())
            try:
                message = self.transport.received.get(timeout=timeout)
            except queue.Empty:
                message = None
            if message is not None:
                self.handle(message)
            if time.monotonic() >= next_tick:
                self.tick()
                next_tick = time.monotonic() + tick
                if exit_when_done and self.all_tasks_finished():
                    logger.info("every task has completed its rounds; stopping")
                    return

    def all_tasks_finished(self) -> bool:
        return all(self.rounds.task_finished(task.id) for task in self.config.tasks)

    # -- periodic work -------------------------------------------------------------------

    def tick(self) -> None:
        """Deadlines, new rounds, status heartbeat. Broad except: a daemon loop boundary.

        An idle tick costs the same for 5 devices as for 5,000: the device records are
        cached (`DeviceRoster`), open rounds live in memory, and the candidate list is
        built only when some task could open a round."""
        try:
            revoked = self.roster.refresh()
            self._publish_all(self.rounds.release_revoked(revoked))
            if self.broker_revocations is not None:
                self._publish_all(self.broker_revocations.due(revoked, self.now()))
            self._sweep_retained()
            self._publish_all(self.rounds.close_due_rounds())
            settling = self.now() - self._started_at < self.config.coordinator.startup_grace_seconds
            if not settling and self.rounds.tasks_that_can_open():
                self._open_rounds()
            if self.now() - self._last_status_at >= self.config.coordinator.heartbeat_seconds:
                self._publish_status()
            for expired in self.reassembler.expire():
                self.reject(expired.sender or None, "transfer-expired", expired.reason)
            self._count_receive_drops()
            for device_id, missing in self.chunk_recovery.due():
                self._send(device_id, InboxChannel.TRANSFER, missing)
            self.heartbeats.flush()  # one transaction for the tick's heartbeats
            if self.refusals.due():
                self.flush_refusals()
        except Exception:  # noqa: BLE001 - log, count and keep the daemon alive
            logger.exception("tick failed; continuing")
            self.rejected["internal-error"] += 1

    def _open_rounds(self) -> None:
        """Open what the candidates allow, and store why each enrolled device sat each new
        round out (coordinator.device_status)."""
        candidates = self.candidates()
        open_before = set(self.rounds.book.views)
        self._publish_all(self.rounds.open_rounds_if_possible(candidates))
        assigned = self.rounds.open_assignments()
        opened = set(assigned) - open_before
        if opened:
            record_left_out(
                self.store,
                self.roster.records,
                opened,
                assigned,
                self.not_candidates,
                self.rounds.selection.left_out,
            )

    def _sweep_retained(self) -> None:
        """Every RETAINED_SWEEP_SECONDS, subscribe again to the device channels that are
        never retained: the broker re-sends what it retains there (by design nothing), and
        `handle` refuses and clears each one (coordinator/retained_guard.py)."""
        if self.now() - self._last_retained_sweep < RETAINED_SWEEP_SECONDS:
            return
        assert self.transport is not None  # start() ran
        for topic_filter in retained_sweep_filters(self.fleet):
            self.transport.subscribe(topic_filter)
        self._last_retained_sweep = self.now()

    def _count_receive_drops(self) -> None:
        """Messages the transport dropped while this loop was behind (its receive queue was
        full): counted per topic and tick against the topic's device."""
        assert self.transport is not None
        for topic, count in self.transport.take_drops().items():
            try:
                _, device_id, channel = parse_device_topic(topic)
                if channel is DeviceChannel.CHUNK:
                    self.chunk_recovery.note(device_id)  # asked for them once quiet
            except ProtocolError:
                device_id = None  # "" sums the topics past the first 1024
            self.reject(
                device_id,
                "receive-queue-full",
                f"{count} message(s) on {topic[:200] or 'other topics'} dropped: the receive "
                f"queue was full ({self.transport.dropped} since start)",
                count=count,
            )

    def candidates(self) -> list[DeviceCandidate]:
        """Enrolled, not revoked, online and eligible devices with their profiles (cached:
        parsed once per profile text); why each other one was dropped is left in
        `not_candidates`."""
        self.roster.refresh()
        result, self.not_candidates = self.roster.candidates(
            self.liveness, self.now(), self.config.coordinator.device_timeout_seconds
        )
        return result

    @staticmethod
    def _profile(text: str) -> DeviceProfile:
        return profile_from_toml_text(text)

    def _publish_status(self) -> None:
        assert self.transport is not None
        self.transport.publish(
            coordinator_status_topic(self.fleet), self._status_frame(True), retain=True
        )
        self._last_status_at = self.now()

    def _publish_all(self, outgoing: list[Outgoing]) -> None:
        assert self.transport is not None
        for item in outgoing:
            self.transport.publish(item.topic, item.payload, retain=item.retain)

    # -- messages ------------------------------------------------------------------------

    def reject(self, device_id: str | None, category: str, reason: str, *, count: int = 1) -> None:
        """Count and log `count` refusals (at a bounded rate); the store gets them with the
        next flush. Never raises: it runs inside the loop boundary's own handlers."""
        self.rejected[category] += count
        self.refusals.note(device_id, category, reason, count)

    def flush_refusals(self) -> None:
        """Write the pending refusal counts in one transaction. A store that cannot take
        them (a full disk) must not stop the daemon: the counts stay in memory for the
        next try and the daemon says loudly that it is degraded."""
        counts = self.refusals.take()
        if not counts:
            return
        try:
            self.store.record_refusals(counts)
        except Exception as error:  # noqa: BLE001 - bookkeeping must not stop the daemon
            self.refusals.restore(counts)
            self._bookkeeping_failed(error)
            return
        if self.degraded is not None:
            logger.error(
                "coordinator recovered: refusal counts are written again (%d were waiting)",
                sum(c.count for c in counts),
            )
            self.degraded = None

    def _bookkeeping_failed(self, error: Exception) -> None:
        """ERROR at once, then at most once a minute while the store keeps failing."""
        now = self.now()
        if self.degraded is None:
            self.degraded = DegradedBookkeeping(since=now, last_logged=now, error=str(error))
        else:
            self.degraded.error = str(error)
            if now - self.degraded.last_logged < DEGRADED_LOG_SECONDS:
                return
            self.degraded.last_logged = now
        logger.error(
            "coordinator DEGRADED: cannot write refusal counts to %s (%s); %d refusal(s) "
            "kept in memory since %s; still serving (counts by category so far: %s)",
            self.store.path,
            self.degraded.error,
            self.refusals.unwritten,
            time.strftime("%H:%M:%S", time.localtime(self.degraded.since)),
            dict(self.rejected),
        )

    def handle(self, received: ReceivedMessage) -> None:
        """One message from the broker. Never raises."""
        if received.topic == RESPONSE_TOPIC:
            if self.broker_revocations is not None:
                self.broker_revocations.accept_reply(received.payload)  # never raises
            return
        device_id: str | None = None
        try:
            fleet, device_id, channel = parse_device_topic(received.topic)
            if fleet != self.fleet:
                raise SchemaError(
                    f"message for fleet {fleet!r}, this coordinator serves {self.fleet!r}"
                )
            violation = forbidden_retained(self.fleet, received)
            if violation is not None:
                self._publish_all([violation.clearing])
                self.reject(device_id, "retained-refused", violation.reason)
                return
            if not received.payload:
                return  # a retained message being cleared
            frame = decode_frame(received.payload)
            if frame.sender != device_id:
                raise SchemaError(
                    f"sender {frame.sender!r} does not match the topic's device {device_id!r}"
                )
            if channel is DeviceChannel.CHUNK:
                header = frame.expect(ChunkHeader)
                completed = self.reassembler.accept(header, frame.body, device_id)
                if completed is None:
                    return
                frame = completed.decode()
                if frame.sender != device_id:
                    raise SchemaError("reassembled frame's sender does not match the topic")
            self._dispatch(frame, device_id)
        except ProtocolError as error:
            self.reject(device_id, type(error).__name__, str(error))
        except Exception as error:  # noqa: BLE001 - the daemon loop boundary
            logger.exception("unexpected failure handling %s", received.topic[:200])
            self.reject(device_id, "internal-error", f"{type(error).__name__}: {error}")

    def _dispatch(self, frame: Frame, device_id: str) -> None:
        message = frame.message
        if isinstance(message, EnrollmentRequest):
            self._enroll(frame, message)
            return
        self.roster.refresh()  # one PRAGMA unless the devices changed
        record = self.roster.records.get(device_id)
        if record is None:
            self.reject(device_id, "unknown-device", f"{device_id!r} is not enrolled")
            return
        if record.revoked:
            self.reject(device_id, "revoked-device", f"{device_id!r} was revoked")
            return
        verify_frame(frame, _device_public_key(record.public_key))
        if isinstance(message, DeviceState):
            previous = self.liveness.get(device_id)
            if previous is None or message.sequence > previous.state.sequence:
                self.liveness[device_id] = DeviceLiveness(message, self.now())
                self.heartbeats.note(facts_from_state(message, self.now()))  # written at the tick
        elif isinstance(message, Update):
            self._update(frame, message)
        elif isinstance(message, AssignmentDecline):
            reasons = "; ".join(message.reasons)
            logger.info(
                "task %s round %d: %s declined: %s",
                message.task,
                message.server_round,
                device_id,
                reasons,
            )
            refused, outgoing = self.rounds.accept_decline(
                message.task, message.server_round, device_id, reasons
            )
            if refused:
                self.reject(device_id, "decline-refused", refused)
            self._publish_all(outgoing)
        elif isinstance(message, SecAggEnvelope):
            self._secure_step(frame, message)
        elif isinstance(message, TransferStatusRequest):
            status = self.reassembler.status(message)
            self._send(device_id, InboxChannel.TRANSFER, status)
        else:
            raise SchemaError(f"a device may not send {frame.kind.value} messages")

    def _send(self, device_id: str, channel: InboxChannel, message: object) -> None:
        assert self.transport is not None
        frame = encode_frame(message, sender=COORDINATOR_SENDER, signing_key=self.key)  # type: ignore[arg-type]
        self.transport.publish(inbox_topic(self.fleet, device_id, channel), frame)

    def _acknowledge(self, device_id: str, message_id: str, status: AckStatus, reason: str) -> None:
        """Tell a device the fate of an upload; it clears its outbox copy on this."""
        self._send(
            device_id,
            InboxChannel.ACK,
            Acknowledgement(
                fleet=self.fleet,
                device_id=device_id,
                acked_message_id=message_id,
                status=status,
                reason=reason,
            ),
        )

    def _update(self, frame: Frame, update: Update) -> None:
        if update.fleet != self.fleet or update.device_id != frame.sender:
            raise SchemaError("update names another fleet or device than its sender")
        status, reason, outgoing = self.rounds.accept_update(update, frame.body)
        if status is AckStatus.REJECTED:
            self.reject(update.device_id, "update-refused", reason)
        self._acknowledge(update.device_id, update.message_id, status, reason)
        self._publish_all(outgoing)

    def _secure_step(self, frame: Frame, envelope: SecAggEnvelope) -> None:
        """A secure-aggregation step; a masked input is acknowledged like an update (the
        agent keeps it in its outbox until then), the other steps are not."""
        if envelope.fleet != self.fleet or envelope.device_id != frame.sender:
            raise SchemaError("secure-aggregation message names another fleet or device")
        status, reason, outgoing = self.rounds.accept_secure(envelope, frame.body)
        if status is AckStatus.REJECTED:
            self.reject(envelope.device_id, "secagg-refused", reason)
        if envelope.step is SecAggStep.MASKED_INPUT:
            self._acknowledge(envelope.device_id, envelope.message_id, status, reason)
        self._publish_all(outgoing)

    def _enroll(self, frame: Frame, request: EnrollmentRequest) -> None:
        """Verify proof of possession and the profile, then redeem the one-time token."""
        verify_frame(frame, public_key_from_hex(request.public_key))
        if hashlib.sha256(frame.body).hexdigest() != request.profile_digest:
            raise SchemaError("enrollment profile does not match its digest")
        reason = ""
        accepted = True
        existing = self.store.device(request.device_id)
        if existing is not None and existing.revoked:
            accepted = False
            reason = (
                f"device {request.device_id!r} was revoked; a revoked device stays revoked "
                "(enroll the machine again under a new device id)"
            )
            self.reject(request.device_id, "enrollment-refused", reason)
        elif existing is not None and existing.public_key.hex() == request.public_key:
            reason = "already enrolled with this key"
        else:
            try:
                profile_text = frame.body.decode("utf-8")
                self._profile(profile_text)
                self.store.redeem_enrollment_token(
                    request.token,
                    request.device_id,
                    bytes.fromhex(request.public_key),
                    profile_text,
                    agent_school=request.school,
                    machine=request.machine,
                )
                logger.info(
                    "enrolled device %s (machine %s)", request.device_id, request.machine or "?"
                )
            except (ValueError, UnicodeDecodeError) as error:
                accepted, reason = False, str(error)
                self.reject(request.device_id, "enrollment-refused", reason)
        self._send(
            request.device_id,
            InboxChannel.ENROLLED,
            EnrollmentResponse(
                fleet=self.fleet,
                device_id=request.device_id,
                request_id=request.request_id,
                accepted=accepted,
                reason=reason,
                coordinator_public_key=public_key_hex(self.key),
            ),
        )
