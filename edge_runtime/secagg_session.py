"""One device's side of one secure-aggregation round, driven by the coordinator's messages.

The round's secrets (two X25519 private keys, the self-mask seed, the Shamir shares the
device holds for its peers) live in this object only: never in the outbox, never on disk.
An agent that restarts mid-round has lost them, and the protocol treats it as a device that
dropped out: before its masked input arrived, its peers' shares let the coordinator cancel
its pairwise masks; after, its input still counts, because its peers hold the shares of its
self-mask. That is also why the rule "never reveal both shares of one device" needs no
persistence: a restarted agent can reveal nothing at all. Only the fact that the agent
joined a round goes to disk (its round history), so that, handed the round's assignment
again after a restart, it declines at once instead of holding the round until its deadline.

A repeated coordinator message (a restarted coordinator re-sends its last phase's messages)
gets the answer given the first time; a different message for a step already answered is
refused, so a coordinator cannot collect two different share sets or two unmask answers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from edge_runtime.outbox import JOINED_SECURE_ROUND, RoundHistory
from edge_runtime.secagg import (
    SecAggClient,
    SecAggConfig,
    SecAggRefusal,
    UnmaskRequest,
    message_body,
    parse_forwarded,
    parse_message,
    parse_roster,
    quantization_of,
    secagg_round_id,
)
from edge_runtime.wire import (
    Ed25519PrivateKey,
    SchemaError,
    SecAggEnvelope,
    SecAggStep,
    TaskAssignment,
    encode_frame,
)

PLACEHOLDER_THRESHOLD = 2
"""The client is made before the roster fixes t (`share_keys` replaces it)."""
KEYS_LOST_ON_RESTART = (
    "secure-aggregation keys lost on restart (they are kept in memory only); "
    "this device cannot take part in the round any more"
)
"""The reason an agent declines a secure round it had joined before it restarted."""


class SecureSession:
    """Keys, shares and answers of one device in one secure round (memory only)."""

    def __init__(
        self, assignment: TaskAssignment, device_id: str, signing_key: Ed25519PrivateKey
    ) -> None:
        spec = assignment.spec.secure_aggregation
        if spec is None:
            raise ValueError(f"task {assignment.task} does not run secure aggregation")
        self.fleet = assignment.fleet
        self.task = assignment.task
        self.server_round = assignment.server_round
        self.device_id = device_id
        self._key = signing_key
        self.client = SecAggClient(
            device_id,
            secagg_round_id(assignment.task, assignment.server_round),
            SecAggConfig(PLACEHOLDER_THRESHOLD, quantization_of(spec)),
        )
        self.ready_to_mask = False
        """True once the peers' share boxes are in: the masks are then fixed."""
        self._answers: dict[SecAggStep, tuple[str, bytes | None]] = {}
        """Coordinator step -> (sha256 of the message answered, the answer frame)."""

    def frame(
        self,
        step: SecAggStep,
        body: bytes,
        num_samples: int = 0,
        num_steps: int = 0,
        metrics: Mapping[str, float] | None = None,
    ) -> tuple[str, bytes]:
        """(message id, signed frame) of one of this device's steps."""
        envelope = SecAggEnvelope(
            fleet=self.fleet,
            task=self.task,
            server_round=self.server_round,
            device_id=self.device_id,
            step=step,
            num_samples=num_samples,
            num_steps=num_steps,
            metrics=dict(metrics or {}),
        )
        frame = encode_frame(envelope, sender=self.device_id, body=body, signing_key=self._key)
        return envelope.message_id, frame

    def advertise_frame(self) -> bytes:
        """ADVERTISE_KEYS (the same keys however often it is asked)."""
        return self.frame(SecAggStep.ADVERTISE_KEYS, message_body(self.client.advertise_keys()))[1]

    def answer(self, step: SecAggStep, body: bytes) -> bytes | None:
        """The reply frame to a coordinator step (None when the step needs no reply).
        Raises SecAggRefusal for a request that would reveal too much, SchemaError for
        a malformed one."""
        digest = hashlib.sha256(body).hexdigest()
        if step in self._answers:
            answered, reply = self._answers[step]
            if answered != digest:
                raise SecAggRefusal(
                    f"a second, different {step.value} for round {self.server_round} of "
                    f"{self.task}; refusing to answer twice"
                )
            return reply
        reply = self._first_answer(step, body)
        self._answers[step] = (digest, reply)
        return reply

    def _first_answer(self, step: SecAggStep, body: bytes) -> bytes | None:
        if step is SecAggStep.ROSTER:
            threshold, roster = parse_roster(body)
            shares = self.client.share_keys(roster, threshold)
            return self.frame(SecAggStep.SHARE_KEYS, message_body(shares))[1]
        if step is SecAggStep.FORWARDED_SHARES:
            self.client.receive_shares(parse_forwarded(body))
            self.ready_to_mask = True
            return None
        if step is SecAggStep.UNMASK_REQUEST:
            if not self.ready_to_mask:
                raise SecAggRefusal("unmask request before the shares were exchanged")
            response = self.client.unmask(parse_message(UnmaskRequest, body))
            return self.frame(SecAggStep.UNMASK_RESPONSE, message_body(response))[1]
        raise SchemaError(f"a coordinator does not send {step.value} to answer")

    def masked_input(
        self,
        delta: Mapping[str, torch.Tensor],
        num_samples: int,
        num_steps: int,
        metrics: Mapping[str, float],
    ) -> tuple[str, bytes]:
        """(message id, frame) of MASKED_INPUT: the delta quantized and masked. Safe to keep
        in the outbox: without the masks it is uniform noise."""
        masked = self.client.mask_input(delta)
        return self.frame(SecAggStep.MASKED_INPUT, masked.vector, num_samples, num_steps, metrics)


class SecureSessions:
    """An agent's secure rounds: one session per (task, round) it was assigned, kept until
    a newer round of the task starts or the coordinator aborts the round."""

    def __init__(
        self, device_id: str, signing_key: Ed25519PrivateKey, history: RoundHistory
    ) -> None:
        """`history`: where joining a round is marked (never its secrets), so that a
        restarted agent knows which rounds' keys it lost."""
        self.device_id = device_id
        self._key = signing_key
        self._history = history
        self._sessions: dict[tuple[str, int], SecureSession] = {}

    def join(self, assignment: TaskAssignment) -> SecureSession | None:
        """The round's session, made on its first assignment; older rounds of the same task
        are forgotten (their secrets are of no use any more).

        None when this agent joined the round before it restarted: new keys cannot replace
        the lost ones (the coordinator keeps the first advert, and once the roster is out
        refuses any), so the round must be declined. The mark is written before the first
        advert can leave, so a kill at any point after it is caught."""
        for task, server_round in list(self._sessions):
            if task == assignment.task and server_round < assignment.server_round:
                del self._sessions[(task, server_round)]
        key = (assignment.task, assignment.server_round)
        if key not in self._sessions:
            if self._history.outcome(*key) == JOINED_SECURE_ROUND:
                return None
            self._history.record(*key, JOINED_SECURE_ROUND, "secure-aggregation keys advertised")
            self._sessions[key] = SecureSession(assignment, self.device_id, self._key)
        return self._sessions[key]

    def session(self, task: str, server_round: int) -> SecureSession | None:
        return self._sessions.get((task, server_round))

    def ready_to_mask(self, task: str, server_round: int) -> bool:
        session = self.session(task, server_round)
        return session is not None and session.ready_to_mask

    def forget(self, task: str, server_round: int) -> None:
        self._sessions.pop((task, server_round), None)

    def answer(self, envelope: SecAggEnvelope, body: bytes) -> bytes | None:
        """The reply frame to a coordinator step, if it needs one."""
        session = self.session(envelope.task, envelope.server_round)
        if session is None:
            raise SchemaError(
                f"{envelope.step.value} for round {envelope.server_round} of {envelope.task}, "
                "which this device holds no secure-aggregation keys for (restarted?)"
            )
        return session.answer(envelope.step, body)
