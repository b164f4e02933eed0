"""Secure-aggregation rounds on the coordinator: relay the key exchange, collect masked
inputs, and unmask only their sum (protocol and threat model: docs/secagg.md).

A secure round is an ordinary round (assignments, deadline, store record) plus four phases,
each waiting for one message from every device still in the round:

    ADVERTISING  devices' public keys          -> ROSTER (and t) to each advertiser
    SHARING      devices' sealed share boxes   -> FORWARDED_SHARES to each sharer
    MASKING      devices' masked inputs        -> UNMASK_REQUEST to each survivor
    UNMASKING    revealed shares               -> the sum, handed to the round manager

A phase ends when every device it waits for has answered (or declined), or at its deadline
([tasks.secure_aggregation] `step_seconds`; the masking phase ends at the round's
deadline); it then goes on with the devices that answered, and the round is aborted,
revealing nothing, when fewer than t did. The coordinator keeps no in-memory protocol
state: every device message is stored as it arrives (`coordinator.secure.store`, masked
inputs in the main store's updates table) and a `SecAggServer` is replayed from them at
each phase change (`coordinator.secure.replay`), so a restarted coordinator resumes where
it stopped: it moves on a phase whose answers were all stored before it stopped, and
otherwise re-sends its last phase's messages (devices answer a repeated message with the
answer they already gave). The last phase's unmasking, and the recording of devices
caught revealing wrong shares, is `coordinator.secure.unmasking`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from coordinator.config import CoordinatorConfig, TaskConfig
from coordinator.outgoing import Outgoing
from coordinator.school_policy import schools_below_minimum
from coordinator.secure.replay import RoundReplay, SecureStepRefused, secure_spec
from coordinator.secure.store import SecurePhase, SecureRoundState, SecureRoundStore
from coordinator.secure.unmasking import (
    RejectHook,
    SecureOutcome,
    store_rejections,
    unmask_round,
)
from coordinator.store import CoordinatorStore, RoundState, StoredUpdate, UpdateOutcome
from durable.crash_points import crash_point
from edge_runtime.secagg import (
    COMMITMENT_BYTES,
    AdvertiseKeys,
    SecAggAbort,
    ShareKeys,
    TensorLayout,
    UnmaskResponse,
    forwarded_body,
    message_body,
    parse_message,
    quantization_of,
    reconstruction_threshold,
    ring_vector_from_bytes,
    roster_body,
    secagg_round_id,
)
from edge_runtime.wire import (
    COORDINATOR_SENDER,
    AckStatus,
    Ed25519PrivateKey,
    InboxChannel,
    SchemaError,
    SecAggEnvelope,
    SecAggStep,
    encode_frame,
    inbox_topic,
)

logger = logging.getLogger(__name__)

PHASE_OF_STEP = {
    SecAggStep.ADVERTISE_KEYS: SecurePhase.ADVERTISING,
    SecAggStep.SHARE_KEYS: SecurePhase.SHARING,
    SecAggStep.MASKED_INPUT: SecurePhase.MASKING,
    SecAggStep.UNMASK_RESPONSE: SecurePhase.UNMASKING,
}
"""The device steps, and the phase in which each is accepted."""


class SecureRounds:
    """The secure phases of every open secure round, over the coordinator's stores."""

    def __init__(
        self,
        config: CoordinatorConfig,
        store: CoordinatorStore,
        secure_store: SecureRoundStore,
        signing_key: Ed25519PrivateKey,
        layout_of: Callable[[str], TensorLayout],
        *,
        now: Callable[[], float] = time.time,
        reject: RejectHook | None = None,
    ) -> None:
        """`reject`: how a device caught revealing wrong shares is recorded (the daemon
        passes its own `reject`; the default logs and stores the rejection)."""
        self.config = config
        self.schools = {school.id: school for school in config.schools}
        self.fleet = config.coordinator.fleet
        self.store = store
        self.secure_store = secure_store
        self.key = signing_key
        self.layout_of = layout_of
        """Task id -> the layout of its global adapter, which every masked input has."""
        self.now = now
        self.reject = reject or store_rejections(store)
        self.replay = RoundReplay(store, secure_store, layout_of)

    def open(self, task: TaskConfig, round_number: int) -> None:
        step_deadline = self.now() + task.secure_aggregation.step_seconds
        self.secure_store.start(task.id, round_number, step_deadline)

    def recover(self, task: TaskConfig, round_number: int) -> None:
        """Give an open round that has no secure state its advertising phase: the
        coordinator stopped between the main store's commit and the secure store's write.
        No assignment had gone out yet (they are published after both), so the key
        exchange simply starts now, with a fresh phase deadline."""
        if self.secure_store.state(task.id, round_number) is not None:
            return
        logger.warning(
            "task %s round %d: open without secure-aggregation state (the coordinator "
            "stopped between its two stores' writes); its key exchange starts now",
            task.id,
            round_number,
        )
        self.open(task, round_number)

    # -- device messages ---------------------------------------------------------------

    def accept(
        self, envelope: SecAggEnvelope, body: bytes
    ) -> tuple[AckStatus, str, list[Outgoing], list[SecureOutcome]]:
        """Check and keep one device message; move the round on when the phase is done.

        Returns the status a masked input is acknowledged with (the other steps are not
        acknowledged), the refusal reason, what to publish and any round that ended."""
        if self.already_kept(envelope, body):  # a re-sent message, in any later phase
            return self._duplicate(envelope)
        try:
            task, state = self._round_of(envelope)
            is_new = self._keep(task, state, envelope, body)
        except (SecureStepRefused, SchemaError) as error:
            return AckStatus.REJECTED, str(error), [], []
        if not is_new:
            return self._duplicate(envelope)
        crash_point("secure-message-stored")  # stored; the phase not yet moved on
        outgoing, outcomes = self._advance(task, state, deadline_passed=False)
        return AckStatus.ACCEPTED, "", outgoing, outcomes

    def _duplicate(
        self, envelope: SecAggEnvelope
    ) -> tuple[AckStatus, str, list[Outgoing], list[SecureOutcome]]:
        """A re-sent message is not kept twice, but its phase is checked again: the first
        copy was stored, and what should have followed it (the phase change) may not have
        run if the coordinator failed right after the commit. Without this check such a
        phase would wait out its deadline although nobody is left to answer."""
        state = self.secure_store.state(envelope.task, envelope.server_round)
        if (
            state is None
            or state.phase is not PHASE_OF_STEP.get(envelope.step)
            or not self._round_is_open(state)
        ):
            return AckStatus.DUPLICATE, "already received", [], []
        task = self.config.task(state.task_id)
        return AckStatus.DUPLICATE, "already received", *self._advance(task, state, False)

    def already_kept(self, envelope: SecAggEnvelope, body: bytes) -> bool:
        """The same message was stored before: an outbox resend of a masked input, or keys
        re-advertised because a restarted coordinator re-sent the assignment."""
        task, server_round = envelope.task, envelope.server_round
        if envelope.step is SecAggStep.MASKED_INPUT:
            reported = self.store.reported_devices(task, server_round)
            return reported.get(envelope.device_id) == envelope.message_id
        kept = self.secure_store.message(
            task, server_round, envelope.step.value, envelope.device_id
        )
        return kept == body

    def _round_of(self, envelope: SecAggEnvelope) -> tuple[TaskConfig, SecureRoundState]:
        if envelope.fleet != self.fleet:
            raise SecureStepRefused(f"message for fleet {envelope.fleet!r}")
        expected_phase = PHASE_OF_STEP.get(envelope.step)
        if expected_phase is None:
            raise SecureStepRefused(f"a device may not send {envelope.step.value} messages")
        state = self.secure_store.state(envelope.task, envelope.server_round)
        if state is None:
            raise SecureStepRefused(
                f"no secure round {envelope.server_round} of task {envelope.task!r}"
            )
        if state.phase is not expected_phase:
            raise SecureStepRefused(
                f"{envelope.step.value} for round {envelope.server_round} of {envelope.task} "
                f"arrived in its {state.phase.value} phase: too late or out of order"
            )
        if envelope.device_id not in self.store.assignments(envelope.task, envelope.server_round):
            raise SecureStepRefused(f"{envelope.device_id!r} is not assigned to this round")
        return self.config.task(envelope.task), state

    def _keep(
        self, task: TaskConfig, state: SecureRoundState, envelope: SecAggEnvelope, body: bytes
    ) -> bool:
        """Validate the step's body against what the round holds, then store it once."""
        device_id = envelope.device_id
        round_id = secagg_round_id(task.id, state.round_number)
        step = envelope.step
        if step is SecAggStep.MASKED_INPUT:
            return self._keep_masked_input(task, state, envelope, body)
        if step is SecAggStep.ADVERTISE_KEYS:
            advert = parse_message(AdvertiseKeys, body)
            _check_identity(advert.round_id, advert.device_id, round_id, device_id)
        elif step is SecAggStep.SHARE_KEYS:
            shares = parse_message(ShareKeys, body)
            _check_identity(shares.round_id, shares.sender_id, round_id, device_id)
            roster = self.replay.senders(state, SecAggStep.ADVERTISE_KEYS)
            if device_id not in roster or set(shares.encrypted_shares) != roster - {device_id}:
                raise SecureStepRefused(
                    f"{device_id!r} must seal one box for each of the other "
                    f"{len(roster) - 1} devices of the roster"
                )
            if len(shares.self_mask_commitment) != COMMITMENT_BYTES:
                raise SecureStepRefused(
                    f"{device_id!r} sent no commitment to its self-mask seed "
                    f"({COMMITMENT_BYTES} bytes); its seed could not be verified"
                )
        else:
            response = parse_message(UnmaskResponse, body)
            _check_identity(response.round_id, response.device_id, round_id, device_id)
            request = self.replay.unmask_request(task, state)
            if (
                device_id not in request.survivors
                or set(response.self_mask_shares) != set(request.survivors)
                or set(response.mask_key_shares) != set(request.dropped)
            ):
                raise SecureStepRefused(f"unmask response of {device_id!r} is not as requested")
        return self.secure_store.record(task.id, state.round_number, step.value, device_id, body)

    def _keep_masked_input(
        self, task: TaskConfig, state: SecureRoundState, envelope: SecAggEnvelope, body: bytes
    ) -> bool:
        if envelope.device_id not in self.replay.senders(state, SecAggStep.SHARE_KEYS):
            raise SecureStepRefused(f"{envelope.device_id!r} did not share keys in this round")
        coordinates = self.layout_of(task.id).num_coordinates
        if len(body) != 4 * coordinates:
            raise SecureStepRefused(
                f"masked input of {len(body)} bytes; the adapter has {coordinates} coordinates "
                f"({4 * coordinates} bytes)"
            )
        ring_vector_from_bytes(body, quantization_of(secure_spec(task)).ring_bits)  # range check
        outcome = self.store.record_update(
            StoredUpdate(
                update_id=envelope.message_id,
                task_id=task.id,
                round_number=state.round_number,
                device_id=envelope.device_id,
                num_samples=envelope.num_samples,
                num_steps=envelope.num_steps,
                metrics=dict(envelope.metrics),
                body=body,
            )
        )
        if outcome is UpdateOutcome.STORED:
            logger.info(
                "task %s round %d: masked input from %s (%d samples, %d steps)",
                task.id,
                state.round_number,
                envelope.device_id,
                envelope.num_samples,
                envelope.num_steps,
            )
        return outcome is UpdateOutcome.STORED

    def accept_decline(
        self, task: TaskConfig, round_number: int
    ) -> tuple[list[Outgoing], list[SecureOutcome]]:
        """A device declined (already recorded): the phase may wait for nobody now."""
        state = self.secure_store.state(task.id, round_number)
        if state is None or state.phase.is_final:
            return [], []
        return self._advance(task, state, deadline_passed=False)

    # -- phases ------------------------------------------------------------------------

    def tick(self) -> tuple[list[Outgoing], list[SecureOutcome]]:
        """Move on every secure round whose phase deadline has passed."""
        outgoing: list[Outgoing] = []
        outcomes: list[SecureOutcome] = []
        for state in self.secure_store.active():
            if self.now() < state.phase_deadline or not self._round_is_open(state):
                continue
            more, ended = self._advance(self.config.task(state.task_id), state, True)
            outgoing += more
            outcomes += ended
        return outgoing, outcomes

    def _round_is_open(self, state: SecureRoundState) -> bool:
        record = self.store.round(state.task_id, state.round_number)
        return record is not None and record.state is RoundState.OPEN

    def _waiting_for(self, state: SecureRoundState) -> set[str]:
        """Devices whose message the current phase still waits for."""
        task_id, round_number = state.task_id, state.round_number
        declined = set(self.store.declined_devices(task_id, round_number))
        if state.phase is SecurePhase.ADVERTISING:
            expected = set(self.store.assignments(task_id, round_number))
        elif state.phase is SecurePhase.SHARING:
            expected = self.replay.senders(state, SecAggStep.ADVERTISE_KEYS)
        elif state.phase is SecurePhase.MASKING:
            expected = self.replay.senders(state, SecAggStep.SHARE_KEYS)
            return expected - declined - self.replay.masked_senders(state)
        else:
            expected = set(self.replay.masked_senders(state))
            declined = set()  # a survivor's input counts; it is still asked for its shares
        step = {
            SecurePhase.ADVERTISING: SecAggStep.ADVERTISE_KEYS,
            SecurePhase.SHARING: SecAggStep.SHARE_KEYS,
            SecurePhase.UNMASKING: SecAggStep.UNMASK_RESPONSE,
        }[state.phase]
        return expected - declined - self.replay.senders(state, step)

    def _advance(
        self, task: TaskConfig, state: SecureRoundState, deadline_passed: bool
    ) -> tuple[list[Outgoing], list[SecureOutcome]]:
        """End the current phase if nobody is left to wait for or its deadline passed."""
        if not deadline_passed and self._waiting_for(state):
            return [], []
        round_number = state.round_number
        try:
            if state.phase is SecurePhase.ADVERTISING:
                return self._send_roster(task, state), []
            if state.phase is SecurePhase.SHARING:
                return self._forward_shares(task, state), []
            if state.phase is SecurePhase.MASKING:
                return self._request_unmasking(task, state), []
            outcome = unmask_round(self.replay, task, state, self.reject)
        except SecAggAbort as error:
            logger.warning(
                "task %s round %d: secure aggregation aborted: %s", task.id, round_number, error
            )
            return [], [SecureOutcome(task.id, round_number, None, str(error))]
        return [], [outcome]

    def _send_roster(self, task: TaskConfig, state: SecureRoundState) -> list[Outgoing]:
        adverts = self.replay.adverts(state)
        threshold = reconstruction_threshold(len(adverts), task.schedule.min_updates)
        if len(adverts) < threshold:
            assigned = len(self.store.assignments(task.id, state.round_number))
            raise SecAggAbort(
                f"only {len(adverts)} of {assigned} devices advertised keys; threshold is "
                f"{threshold}. The round is aborted and nothing is revealed"
            )
        self.secure_store.advance(
            task.id,
            state.round_number,
            SecurePhase.SHARING,
            self.now() + task.secure_aggregation.step_seconds,
            threshold=threshold,
        )
        logger.info(
            "task %s round %d: %d devices advertised keys; roster sent with threshold %d",
            task.id,
            state.round_number,
            len(adverts),
            threshold,
        )
        state = self.secure_store.state(task.id, state.round_number)  # type: ignore[assignment]
        return self._phase_messages(task, state)

    def _forward_shares(self, task: TaskConfig, state: SecureRoundState) -> list[Outgoing]:
        # the masking phase's messages, computed before it starts: aborts below the threshold
        outgoing = self._phase_messages(task, replace(state, phase=SecurePhase.MASKING))
        logger.info(
            "task %s round %d: share boxes of %d devices forwarded; waiting for masked inputs",
            task.id,
            state.round_number,
            len(outgoing),
        )
        record = self.store.round(task.id, state.round_number)
        assert record is not None  # callers check the round is open
        deadline = max(record.deadline, self.now() + task.secure_aggregation.step_seconds)
        self.secure_store.advance(task.id, state.round_number, SecurePhase.MASKING, deadline)
        return outgoing

    def _request_unmasking(self, task: TaskConfig, state: SecureRoundState) -> list[Outgoing]:
        request = self.replay.unmask_request(task, state)  # aborts below the threshold
        too_small = schools_below_minimum(
            self.schools, [self.store.school_of(device_id) for device_id in request.survivors]
        )
        if too_small:
            school, why = sorted(too_small.items())[0]
            raise SecAggAbort(
                f"{len(request.survivors)} masked inputs arrived, and school {school} forbids "
                f"such a sum ({why}); a sum cannot leave out one school's inputs, so the round "
                "is aborted before anything is unmasked"
            )
        self.secure_store.advance(
            task.id,
            state.round_number,
            SecurePhase.UNMASKING,
            self.now() + task.secure_aggregation.step_seconds,
        )
        logger.info(
            "task %s round %d: %d masked inputs, %d dropped; asking the survivors to unmask",
            task.id,
            state.round_number,
            len(request.survivors),
            len(request.dropped),
        )
        return self._phase_messages(task, self.secure_store.state(task.id, state.round_number))  # type: ignore[arg-type]

    def resume(self) -> tuple[list[Outgoing], list[SecureOutcome]]:
        """On start: move on every active round whose phase a previous run left complete,
        and re-send the others' last phase messages.

        A coordinator killed after storing the last message of a phase (the last masked
        input, say) and before moving the round on would otherwise leave the phase waiting
        for nobody until its deadline: the devices have answered, and what they re-send
        is a duplicate. A round still waiting gets what its devices were last sent (a
        device answers a repeated message with its earlier answer)."""
        outgoing: list[Outgoing] = []
        outcomes: list[SecureOutcome] = []
        for state in self.secure_store.active():
            if not self._round_is_open(state):
                continue
            task = self.config.task(state.task_id)
            more, ended = self._advance(task, state, deadline_passed=False)
            if more or ended:
                outgoing += more
                outcomes += ended
                continue
            try:
                outgoing += self._phase_messages(task, state)
            except SecAggAbort:
                continue  # the deadline tick aborts it properly
        return outgoing, outcomes

    def _phase_messages(self, task: TaskConfig, state: SecureRoundState) -> list[Outgoing]:
        """The coordinator's messages that opened the current phase, recomputed."""
        if state.phase is SecurePhase.SHARING:
            roster = tuple(sorted(self.replay.adverts(state), key=lambda advert: advert.device_id))
            body = roster_body(state.threshold, roster)
            return [
                self._envelope(task, state, a.device_id, SecAggStep.ROSTER, body) for a in roster
            ]
        if state.phase is SecurePhase.MASKING:
            server = self.replay.server(task, state, SecurePhase.ADVERTISING)
            routed = server.route_shares(list(self.replay.shares(state).values()))
            return [
                self._envelope(
                    task, state, device, SecAggStep.FORWARDED_SHARES, forwarded_body(boxes)
                )
                for device, boxes in routed.items()
            ]
        if state.phase is SecurePhase.UNMASKING:
            request = self.replay.unmask_request(task, state)
            body = message_body(request)
            return [
                self._envelope(task, state, device, SecAggStep.UNMASK_REQUEST, body)
                for device in request.survivors
            ]
        return []

    def abort_messages(self, task_id: str, round_number: int, reason: str) -> list[Outgoing]:
        """ABORT to every assigned device: forget the round's keys and shares."""
        task = self.config.task(task_id)
        state = self.secure_store.state(task_id, round_number)
        if state is None:
            return []
        return [
            self._envelope(task, state, device, SecAggStep.ABORT, b"", reason=reason[:1024])
            for device in sorted(self.store.assignments(task_id, round_number))
        ]

    def finish(self, task_id: str, round_number: int, completed: bool, outcome: str) -> None:
        """Called once the round manager has closed the round: drop the stored messages."""
        phase = SecurePhase.COMPLETED if completed else SecurePhase.ABORTED
        self.secure_store.finish(task_id, round_number, phase, outcome)

    def forget_closed_rounds(self) -> None:
        """Finish the secure state of rounds the main store already closed (a crash between
        closing the round and `finish`)."""
        for state in self.secure_store.active():
            record = self.store.round(state.task_id, state.round_number)
            if record is None or record.state is not RoundState.OPEN:
                completed = record is not None and record.state is RoundState.COMPLETED
                self.finish(state.task_id, state.round_number, completed, "closed before restart")

    def _envelope(
        self,
        task: TaskConfig,
        state: SecureRoundState,
        device_id: str,
        step: SecAggStep,
        body: bytes,
        reason: str = "",
    ) -> Outgoing:
        envelope = SecAggEnvelope(
            fleet=self.fleet,
            task=task.id,
            server_round=state.round_number,
            device_id=device_id,
            step=step,
            reason=reason,
        )
        frame = encode_frame(envelope, sender=COORDINATOR_SENDER, body=body, signing_key=self.key)
        return Outgoing(inbox_topic(self.fleet, device_id, InboxChannel.SECAGG), frame)


def _check_identity(round_id: str, device_id: str, expected_round: str, sender: str) -> None:
    if round_id != expected_round or device_id != sender:
        raise SecureStepRefused(
            f"message names round {round_id!r} and device {device_id!r}; expected "
            f"{expected_round!r} and the sender {sender!r}"
        )
