"""The edge agent daemon: heartbeats, assignments, local training, durable upload.

One loop drains the broker queue (paho callbacks only enqueue). Training runs inside the
loop: while it runs, paho's own thread keeps the connection alive and messages queue up.
Each task's quantized base stays loaded between rounds and is built before the first
assignment, in a worker thread, for a task the device has data for (edge_runtime.task_preload).
A round's fixed cost stays off the critical path: the CPU load is read without waiting, the
global adapter is loaded once, the personal copy is written after the upload. An update
goes to the outbox before its first publish and leaves it only on the coordinator's
acknowledgement, so a restarted agent re-sends it; the coordinator counts it once.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable

import torch

from device_profiles.gpu_path import with_compute_device
from device_profiles.profile import DeviceProfile, find_profile, profile_toml_text
from durable.atomic_files import sweep_leftovers
from durable.crash_points import crash_point
from durable.state_lock import lock_state_folder
from edge_runtime.activity import HEARTBEAT_SECONDS, ActivityTracker, Phase
from edge_runtime.agent_config import AgentConfig
from edge_runtime.assignment_models import start_state_for_rank, task_model_spec
from edge_runtime.device_state import (
    Heartbeat,
    PublishedHeartbeat,
    heartbeat_due,
    signed_heartbeat,
)
from edge_runtime.eligibility import CpuLoadMeter, DeviceReadings, check_eligibility, read_device
from edge_runtime.enrollment import warn_if_architecture_mismatch
from edge_runtime.enrollment_record import AgentError, Enrollment
from edge_runtime.outbox import Outbox, RoundHistory
from edge_runtime.personal_copy import save_personal_copy
from edge_runtime.privacy_policy import privacy_refusals
from edge_runtime.round_work import UPLOAD_MARGIN_SECONDS, TrainingStart, train_locally
from edge_runtime.secagg import SecAggError
from edge_runtime.secagg_session import KEYS_LOST_ON_RESTART, SecureSessions
from edge_runtime.task_preload import (
    TaskModels,
    choose_preloads,
    predicted_peaks,
    remember_announced,
)
from edge_runtime.trainer import LocalTrainer, TrainingResult
from edge_runtime.update_frames import (
    OutgoingUpdate,
    update_frame,
)
from edge_runtime.uploads import Uploads
from edge_runtime.wire import (
    COORDINATOR_SENDER,
    Acknowledgement,
    AckStatus,
    AssignmentDecline,
    ChunkHeader,
    ChunkReassembler,
    DeviceChannel,
    Ed25519PublicKey,
    Frame,
    ModelManifest,
    MqttTransport,
    ProtocolError,
    ReceivedMessage,
    SchemaError,
    SecAggEnvelope,
    SecAggStep,
    TaskAssignment,
    TransferStatus,
    WillConfig,
    decode_frame,
    decode_update,
    device_subscriptions,
    device_topic,
    encode_frame,
    load_private_key,
    model_blob_topic,
    public_key_from_hex,
    verify_frame,
)
from quantization.allocator import configure_training_allocator
from quantization.bnb_backend import keep_bitsandbytes_out
from quantization.compute_device import ComputeDevice, resolve_compute_device

logger = logging.getLogger(__name__)


def blob_filter(fleet: str, version: str) -> str:
    """Subscription filter for every retained chunk of one adapter version."""
    return model_blob_topic(fleet, version, 0).rsplit("/", 1)[0] + "/+"


class AgentDaemon:
    """One school device's agent."""

    transport_class: type[MqttTransport] = MqttTransport
    trainer_class: type[LocalTrainer] = LocalTrainer
    device_reader: Callable[..., DeviceReadings] = staticmethod(read_device)
    """Where heartbeats and assignment checks read the device (tests give readings)."""

    def __init__(self, config: AgentConfig, *, now: Callable[[], float] = time.time) -> None:
        self.config = config
        self.fleet = config.agent.fleet
        self.device_id = config.agent.device_id
        self.now = now
        if not config.key_path.is_file():
            raise AgentError(f"no device key at {config.key_path}; run `schoolfl agent init`")
        self.key = load_private_key(config.key_path)
        self.enrollment = Enrollment.load(config.state_dir)
        self.coordinator_key: Ed25519PublicKey = public_key_from_hex(
            self.enrollment.coordinator_public_key
        )
        self.profile: DeviceProfile = find_profile(config.agent.profile)
        warn_if_architecture_mismatch(self.profile.hardware.architecture)
        if not any(s.startswith("bnb-") for s in self.profile.throughput.quant_schemes):
            keep_bitsandbytes_out()
        logger.info(configure_training_allocator())
        self.compute: ComputeDevice = resolve_compute_device(config.agent.device)
        self.local_profile = with_compute_device(
            self.profile,
            on_gpu=self.compute.is_cuda,
            compute_dtype=self.compute.dtype_name,
            gpu_memory_bytes=self.compute.total_memory_bytes,
        )
        """The profile priced for where this agent trains (the coordinator prices the
        enrolled one): the agent's own memory checks use it."""
        self.profile_digest = hashlib.sha256(profile_toml_text(self.profile).encode()).hexdigest()
        self._state_lock = lock_state_folder(config.state_dir, "agent")
        sweep_leftovers(config.state_dir)  # ours alone now: a kill mid-save leaves these
        self.outbox = Outbox(config.outbox_path, now=now)
        self.history = RoundHistory(config.outbox_path, now=now)
        self.models = TaskModels(
            config, lambda spec, examples: self.trainer_class(spec, examples, device=self.compute)
        )
        self.trainers: dict[str, LocalTrainer] = self.models.trainers
        """Each task's loaded model, by task id (owned by this loop; see task_preload)."""
        self.cpu_meter = CpuLoadMeter()
        self.cpu_meter.prime()  # so the first reading has a baseline (see CpuLoadMeter)
        self.global_states: dict[str, dict[str, torch.Tensor]] = {}
        """Downloaded global adapters by version (sha256)."""
        self.waiting: dict[str, TaskAssignment] = {}
        """Assignments waiting for their model version to download, or (secure rounds) for
        the peers' share boxes, by assignment id."""
        self.secure_sessions = SecureSessions(self.device_id, self.key, self.history)
        """This device's secure-aggregation state per round; memory only."""
        self.downloads = ChunkReassembler()
        self.stop_requested = threading.Event()
        self.activity = ActivityTracker(config.state_dir, now=now, stop=self.stop_requested)
        self.uploads = Uploads(
            self.fleet,
            self.device_id,
            self.key,
            self.outbox,
            self._connected,
            now=now,
            progress=self.activity.upload_progress,
        )
        self._last_heartbeat = 0.0
        self._published: PublishedHeartbeat | None = None
        self._preload_wanted = False  # a manifest announced a task with local data
        self._subscribed_blobs: set[str] = set()
        self.transport: MqttTransport | None = None
        if config.agent.threads:
            torch.set_num_threads(config.agent.threads)

    # -- lifecycle -----------------------------------------------------------------------

    def _state_frame(self, online: bool) -> Heartbeat:
        return signed_heartbeat(
            self.fleet,
            self.device_id,
            self.key,
            online=online,
            sequence=int(self.now() * 1000),
            profile_digest=self.profile_digest,
            eligibility=self.config.eligibility,
            compute=self.compute,
            reader=self._read_device,
        )

    def _read_device(self, **options: object) -> DeviceReadings:
        """The device readings, the CPU load from this agent's meter (never blocking)."""
        return self.device_reader(**options, cpu_meter=self.cpu_meter)

    def start(self) -> None:
        offline = self._state_frame(False).frame
        will = WillConfig(device_topic(self.fleet, self.device_id, DeviceChannel.STATE), offline)
        self.transport = self.transport_class(
            self.config.broker.transport_config(self.device_id, will)
        )
        for topic_filter in device_subscriptions(self.fleet, self.device_id):
            self.transport.subscribe(topic_filter)
        self.transport.start(timeout_seconds=30)
        logger.info(
            "agent %s (school %s, profile %s, training on %s) started; %d update(s) waiting "
            "in the outbox",
            self.device_id,
            self.config.agent.school,
            self.profile.name,
            self.compute.describe(),
            len(self.outbox),
        )
        self.heartbeat()
        self.uploads.resend_pending(force=True)
        self._preload()

    def _preload(self) -> None:
        """Build, in the worker thread, the models this device can use now (task_preload)."""
        readings = self._read_device(compute=self.compute)
        chosen = choose_preloads(self.config, self.local_profile, readings, self.models.trainers)
        if chosen:
            self.activity.preloading([m.spec.task_id for m in chosen])
            self.models.preload(chosen)

    def stop(self) -> None:
        self.models.close()
        if self.transport is not None:
            self.transport.publish(
                device_topic(self.fleet, self.device_id, DeviceChannel.STATE),
                self._state_frame(False).frame,
                retain=True,
            )
            self.transport.stop()
        self.outbox.close()
        self.history.close()
        self._state_lock.close()

    def run(self) -> None:
        while not self.stop_requested.is_set():
            assert self.transport is not None
            try:
                message = self.transport.received.get(timeout=0.2)
            except queue.Empty:
                message = None
            if message is not None:
                self.handle(message)
            self.tick()

    def tick(self) -> None:
        try:
            if self.now() - self._last_heartbeat >= HEARTBEAT_SECONDS:
                self.heartbeat()
            self.uploads.resend_pending()
            self._recover_dropped_messages()
            self.cpu_meter.sample()
            self.models.adopt()
            if self._preload_wanted and not self.models.preloading:
                self._preload_wanted = False
                self._preload()  # a task the coordinator just announced
            if not self.models.preloading:
                self.activity.preloaded()  # shows idle again once a start-up build is done
            self.activity.flush_if_due()
        except Exception:  # noqa: BLE001 - the daemon loop boundary: log and go on
            logger.exception("agent tick failed; continuing")

    def _connected(self) -> MqttTransport:
        assert self.transport is not None  # start() ran
        return self.transport

    def _recover_dropped_messages(self) -> None:
        """The transport dropped messages while this loop was busy (training, most likely).
        Subscribing again makes the broker send the retained ones again: the assignment in
        the inbox and the chunks of the models still awaited (repeats are ignored: handled
        assignments by the history and outbox, held chunks by the reassembler). The rest
        recovers by itself: an unacknowledged update is resent, and so is its ack."""
        transport = self._connected()
        drops = transport.take_drops()
        if not drops:
            return
        awaited = {
            blob_filter(self.fleet, assignment.model_version)
            for assignment in self.waiting.values()
            if assignment.model_version not in self.global_states
        }
        logger.warning(
            "receive queue dropped %d message(s) while busy; fetching %d model(s) again",
            sum(drops.values()),
            len(awaited),
        )
        for topic_filter in [*device_subscriptions(self.fleet, self.device_id), *sorted(awaited)]:
            transport.subscribe(topic_filter)

    def heartbeat(self) -> None:
        """Check the device; publish the state when the verdict changed or the last one is
        HEARTBEAT_REFRESH_SECONDS old; log the verdict once per change, not per tick."""
        assert self.transport is not None
        beat = self._state_frame(True)
        now = self.now()
        connects = self.transport.connect_count
        if heartbeat_due(self._published, beat.verdict, now, connects):
            self.transport.publish(
                device_topic(self.fleet, self.device_id, DeviceChannel.STATE),
                beat.frame,
                retain=True,
            )
            self._published = PublishedHeartbeat(now, beat.verdict, connects)
        self._last_heartbeat = now
        self.activity.heartbeat(beat.verdict, now)

    # -- receiving -----------------------------------------------------------------------

    def handle(self, received: ReceivedMessage) -> None:
        """One message from the broker. Never raises: bad input is logged and dropped."""
        if not received.payload:
            return
        try:
            frame = decode_frame(received.payload)
            if isinstance(frame.message, ChunkHeader):
                self._model_chunk(frame)
                return
            if frame.sender != COORDINATOR_SENDER:
                raise SchemaError(f"unexpected sender {frame.sender!r} on {received.topic}")
            verify_frame(frame, self.coordinator_key)
            message = frame.message
            if isinstance(message, TaskAssignment):
                self._assignment(message)
            elif isinstance(message, Acknowledgement):
                self._acknowledgement(message)
            elif isinstance(message, TransferStatus):
                self.uploads.transfer_status(message)
            elif isinstance(message, SecAggEnvelope):
                self._secure_step(message, frame.body)
            elif isinstance(message, ModelManifest) and message.fleet == self.fleet:
                self._preload_wanted |= remember_announced(self.config, message)
        except (ProtocolError, SecAggError) as error:
            logger.warning("refused message on %s: %s", received.topic[:200], error)
        except Exception:  # noqa: BLE001 - the daemon loop boundary
            logger.exception("failure handling %s; continuing", received.topic[:200])

    def _assignment(self, assignment: TaskAssignment) -> None:
        if assignment.device_id != self.device_id or assignment.fleet != self.fleet:
            raise SchemaError("assignment addressed to another device")
        task, server_round = assignment.task, assignment.server_round
        if self.history.seen(task, server_round) or self.outbox.holds(task, server_round):
            logger.debug("assignment %s already handled", assignment.message_id)
            return
        allowed = self.config.agent.tasks
        if allowed and assignment.task not in allowed:
            self._decline(assignment, [f"task {assignment.task} is not in this device's tasks"])
            return
        refusals = privacy_refusals(self.config.privacy, assignment.task, assignment.spec)
        if refusals:  # before the model download: the school's policy rules the task out
            self._decline(assignment, refusals)
            return
        if assignment.spec.secure_aggregation is not None and not self._join_secure_round(
            assignment
        ):
            return
        self.waiting[assignment.message_id] = assignment
        if assignment.model_version in self.global_states:
            self._train_ready()
            return
        topic_filter = blob_filter(self.fleet, assignment.model_version)
        if topic_filter not in self._subscribed_blobs:
            assert self.transport is not None
            self.transport.subscribe(topic_filter)
            self._subscribed_blobs.add(topic_filter)
        logger.info(
            "task %s round %d: fetching model %s",
            assignment.task,
            assignment.server_round,
            assignment.model_version[:12],
        )

    def _model_chunk(self, frame: Frame) -> None:
        header = frame.expect(ChunkHeader)
        if header.transfer_id != header.sha256:
            raise SchemaError("model chunks must be content-addressed (transfer id = sha256)")
        if header.sha256 in self.global_states:
            return
        completed = self.downloads.accept(header, frame.body)
        if completed is None:
            return
        self.global_states[header.sha256] = decode_update(completed.payload)
        logger.info("model %s downloaded (%d bytes)", header.sha256[:12], len(completed.payload))
        self._train_ready()

    def _train_ready(self) -> None:
        """Train every waiting assignment whose model is here and, in a secure round, whose
        share exchange is done (the masks must be fixed before the delta is masked)."""
        for assignment in list(self.waiting.values()):
            if assignment.model_version not in self.global_states:
                continue
            if assignment.spec.secure_aggregation is not None and not (
                self.secure_sessions.ready_to_mask(assignment.task, assignment.server_round)
            ):
                continue
            del self.waiting[assignment.message_id]
            self._train(assignment)

    # -- secure aggregation ------------------------------------------------------------

    def _join_secure_round(self, assignment: TaskAssignment) -> bool:
        """Advertise this round's keys (again, for a repeated assignment), before the
        model download: the key exchange runs while the model downloads. A round joined
        before a restart is declined at once instead (False): its keys are gone, and
        silence would hold the round until its deadline."""
        session = self.secure_sessions.join(assignment)
        if session is None:
            self._decline(assignment, [KEYS_LOST_ON_RESTART])
            return False
        self._publish_secure(session.advertise_frame())
        return True

    def _secure_step(self, envelope: SecAggEnvelope, body: bytes) -> None:
        if envelope.device_id != self.device_id or envelope.fleet != self.fleet:
            raise SchemaError("secure-aggregation message addressed to another device")
        key = (envelope.task, envelope.server_round)
        if envelope.step is SecAggStep.ABORT:
            logger.warning(
                "task %s round %d: secure aggregation aborted by the coordinator: %s",
                envelope.task,
                envelope.server_round,
                envelope.reason,
            )
            self.secure_sessions.forget(*key)
            for assignment_id, assignment in list(self.waiting.items()):
                if (assignment.task, assignment.server_round) == key:
                    del self.waiting[assignment_id]
            return
        reply = self.secure_sessions.answer(envelope, body)
        if reply is not None:
            self._publish_secure(reply)
        self._train_ready()

    def _publish_secure(self, frame: bytes) -> None:
        assert self.transport is not None
        self.transport.publish(
            device_topic(self.fleet, self.device_id, DeviceChannel.SECAGG), frame
        )

    def _acknowledgement(self, ack: Acknowledgement) -> None:
        if ack.status is AckStatus.REJECTED:
            logger.warning("coordinator refused %s: %s", ack.acked_message_id, ack.reason)
        if self.outbox.acknowledge(ack.acked_message_id):
            logger.info("update %s acknowledged (%s)", ack.acked_message_id, ack.status.value)
        self.uploads.acknowledged(ack.acked_message_id)

    # -- training and upload -------------------------------------------------------------

    def _decline(self, assignment: TaskAssignment, reasons: list[str]) -> None:
        assert self.transport is not None
        decline = AssignmentDecline(
            fleet=self.fleet,
            task=assignment.task,
            server_round=assignment.server_round,
            device_id=self.device_id,
            attempt=assignment.attempt,
            reasons=tuple(reasons),
        )
        self.transport.publish(
            device_topic(self.fleet, self.device_id, DeviceChannel.UPDATE),
            encode_frame(decline, sender=self.device_id, signing_key=self.key),
        )
        self.history.record(
            assignment.task, assignment.server_round, "declined", "; ".join(reasons)
        )
        self.activity.declined(assignment.task, assignment.server_round, reasons)
        logger.info(
            "declined task %s round %d: %s",
            assignment.task,
            assignment.server_round,
            "; ".join(reasons),
        )

    def _trainer(self, assignment: TaskAssignment, global_rank: int) -> LocalTrainer:
        spec = task_model_spec(
            assignment.task,
            assignment.spec,
            assignment.plan.scheme,
            assignment.plan.rank,
            global_rank,
        )
        if self.models.holds(spec):  # the usual round: no "loading model" shown
            return self.models.trainer_for(spec, assignment.plan)
        with self.activity.part(Phase.LOADING_MODEL, "load_seconds"):
            return self.models.trainer_for(spec, assignment.plan)

    def _training_start(self, assignment: TaskAssignment) -> TrainingStart | None:
        """Where training starts and how long it may run, or None once declined: the checks
        come before the model is loaded, so a device that cannot take part wastes nothing."""
        try:
            start_state, global_rank = start_state_for_rank(
                self.global_states[assignment.model_version], assignment.plan.rank
            )
        except ValueError as error:
            self._decline(assignment, [str(error)])
            return None
        if self.models.preloading:  # its model is part of the memory the check reads
            with self.activity.part(Phase.LOADING_MODEL, "load_seconds"):
                self.models.settle()
        ram_peak, gpu_peak = predicted_peaks(
            self.local_profile, assignment.spec.base_model, assignment.plan
        )
        resident = 0 if self.compute.is_cuda else self.models.resident_bytes(assignment.task)
        verdict = check_eligibility(
            self.config.eligibility,
            self._read_device(compute=self.compute),
            max(ram_peak - resident, 0),  # a loaded model is in the peak, not in free memory
            gpu_peak,
        )
        if not verdict.eligible:
            self._decline(assignment, list(verdict.reasons))
            return None
        seconds_left = assignment.deadline - self.now() - UPLOAD_MARGIN_SECONDS
        if seconds_left <= 0:
            self._decline(assignment, ["the deadline has already passed"])
            return None
        return TrainingStart(start_state, global_rank, seconds_left)

    def _keep_and_send(
        self,
        assignment: TaskAssignment,
        trainer: LocalTrainer,
        start: TrainingStart,
        result: TrainingResult,
        outgoing: OutgoingUpdate,
        masked: bool,
    ) -> None:
        """The outbox holds the update before its first publish, so a crash in between
        still leaves it to be re-sent on restart."""
        task, server_round = assignment.task, assignment.server_round
        self.outbox.put(outgoing.message_id, task, server_round, outgoing.frame)
        crash_point("update-queued")  # in the outbox, not in the history, not sent
        self.history.record(
            task,
            server_round,
            "trained",
            f"{result.num_steps}/{assignment.plan.local_steps} steps, loss "
            f"{result.first_loss:.3f} -> {result.last_loss:.3f}, {outgoing.bytes_up} bytes up"
            + (" (masked for secure aggregation)" if masked else ""),
        )
        with self.activity.part(Phase.UPLOADING, "upload_seconds"):
            self.uploads.send(outgoing.message_id, outgoing.frame)
        # Off the critical path: the update is with the broker; the copy is for classroom use.
        try:
            save_personal_copy(
                self.config.state_dir / "adapters", assignment, trainer, start.start_state
            )
        except (OSError, ValueError) as error:  # the update is sent: a copy lost is a warning
            logger.warning("task %s: could not keep the personal copy: %s", task, error)
        self.activity.end_round("uploaded")
        logger.info(
            "task %s round %d: trained %d steps in %.3f s, loss %.3f -> %.3f, uploading %d bytes",
            task,
            server_round,
            result.num_steps,
            result.seconds,
            result.first_loss,
            result.last_loss,
            outgoing.bytes_up,
        )

    def _train(self, assignment: TaskAssignment) -> None:
        """Train one assignment and hand its update to the outbox. A secure task whose keys
        are gone is declined rather than sent in the clear."""
        self.activity.begin_round(assignment.task, assignment.server_round)
        start = self._training_start(assignment)
        if start is None:
            return
        try:
            trainer = self._trainer(assignment, start.global_rank)
            result = train_locally(
                assignment,
                trainer,
                start,
                self.activity,
                emulate_profile=self.config.agent.emulate_profile,
            )
            session = self.secure_sessions.session(assignment.task, assignment.server_round)
            if assignment.spec.secure_aggregation is not None and session is None:
                self._decline(assignment, ["the round's secure-aggregation keys are gone"])
                return  # never send a secure task's delta in the clear
            outgoing = update_frame(
                assignment, self.fleet, self.device_id, self.key, result, session
            )
        except Exception as error:  # every failure to train is answered at once
            # A data file missing or malformed, a model file unreadable, out of memory, a
            # loss that diverged, a delta that will not encode: each becomes a decline with
            # the reason, so the round need not wait out its deadline for a silent device.
            logger.warning(
                "task %s round %d: could not train: %s",
                assignment.task,
                assignment.server_round,
                error,
                exc_info=True,
            )
            reason = str(error) or type(error).__name__
            self._decline(assignment, [f"could not train: {reason[:500]}"])
            return
        self._keep_and_send(assignment, trainer, start, result, outgoing, session is not None)
