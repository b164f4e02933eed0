"""A trained delta turned into the signed frame the agent keeps in its outbox and uploads.

Two shapes leave a device: a plain `Update` (the delta in the assignment's encoding) or,
in a secure round, a masked input the coordinator can only sum. Both are built here so the
daemon's training step reads as a sequence of decisions, not of message fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from edge_runtime.local_privacy import privatize_update
from edge_runtime.secagg_session import SecureSession
from edge_runtime.trainer import TrainingResult
from edge_runtime.wire import (
    CodecConfig,
    Ed25519PrivateKey,
    TaskAssignment,
    Update,
    encode_frame,
    encode_update,
)


@dataclass(frozen=True)
class OutgoingUpdate:
    """A frame ready for the outbox, with what it costs the uplink (for the history and the
    log: the plain encoding's size, or the whole masked frame)."""

    message_id: str
    frame: bytes
    bytes_up: int


def round_metrics(result: TrainingResult) -> dict[str, float]:
    """The training metrics a device reports; the losses are 0 for a round with no step,
    because a loss that was never measured must still be a finite number on the wire."""
    return {
        "train_loss": result.mean_loss if result.num_steps else 0.0,
        "first_loss": result.first_loss if result.num_steps else 0.0,
        "last_loss": result.last_loss if result.num_steps else 0.0,
        "train_seconds": result.seconds,
    }


def masked_update_frame(
    session: SecureSession,
    result: TrainingResult,
    delta: Mapping[str, torch.Tensor],
    metrics: Mapping[str, float],
) -> OutgoingUpdate:
    """Secure round: only the masked delta leaves the device."""
    message_id, frame = session.masked_input(delta, result.num_examples, result.num_steps, metrics)
    return OutgoingUpdate(message_id, frame, len(frame))


def plain_update_frame(
    assignment: TaskAssignment,
    fleet: str,
    device_id: str,
    signing_key: Ed25519PrivateKey,
    result: TrainingResult,
    delta: dict[str, torch.Tensor],
    metrics: Mapping[str, float],
) -> OutgoingUpdate:
    """The delta in the encoding the assignment asked for, its size among the metrics so the
    coordinator can account for the uplink."""
    encoded = encode_update(
        delta, CodecConfig(assignment.update_encoding, assignment.top_k_fraction)
    )
    bytes_up = encoded.encoded_bytes
    update = Update(
        fleet=fleet,
        task=assignment.task,
        server_round=assignment.server_round,
        device_id=device_id,
        attempt=assignment.attempt,
        model_version=assignment.model_version,
        num_samples=result.num_examples,
        num_steps=result.num_steps,
        encoding=assignment.update_encoding,
        metrics={**metrics, "bytes_up": float(bytes_up)},
        top_k_fraction=assignment.top_k_fraction,
    )
    frame = encode_frame(update, sender=device_id, body=encoded.body, signing_key=signing_key)
    return OutgoingUpdate(update.message_id, frame, bytes_up)


def update_frame(
    assignment: TaskAssignment,
    fleet: str,
    device_id: str,
    signing_key: Ed25519PrivateKey,
    result: TrainingResult,
    session: SecureSession | None,
) -> OutgoingUpdate:
    """The update as it leaves the device: clipped (and noised under local DP) first, then
    masked in a secure round (`session`) or signed in the clear."""
    delta = result.delta
    if assignment.spec.privacy is not None:
        delta = privatize_update(delta, assignment.spec.privacy)
    metrics = round_metrics(result)
    if session is not None:
        return masked_update_frame(session, result, delta, metrics)
    return plain_update_frame(assignment, fleet, device_id, signing_key, result, delta, metrics)
