"""Secure aggregation over MQTT: the bodies of `SecAggEnvelope` frames, both directions.

A `SecAggEnvelope` header names the fleet, task, round, device and step; its body holds the
step's content, and this module turns one into the other. Every body but a masked input's is
UTF-8 JSON of the typed messages in `edge_runtime.secagg.messages` (bytes as base64); a masked
input's body is the ring vector itself (little-endian uint32 words), so the largest message
of a round travels without base64's third more bytes and through the usual chunking. The
frame's signature covers the body (its sha256 is in the signed header), so a relayed roster
or share box cannot be altered by the broker.

Topics: devices publish on `.../dev/<device>/secagg`, the coordinator on
`.../to/<device>/secagg` (see `edge_runtime.wire.topics`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from edge_runtime.secagg.in_process import MessageT
from edge_runtime.secagg.messages import (
    MAX_DEVICES,
    AdvertiseKeys,
    MaskedInput,
    SecAggMessage,
    ShareKeys,
)
from edge_runtime.secagg.ring import QuantizationConfig
from edge_runtime.wire import SchemaError, SecureAggregationSpec

MAX_JSON_BODY_BYTES = 4 * 1024 * 1024
"""A roster or a set of share boxes of MAX_DEVICES devices stays far below this."""


def secagg_round_id(task: str, server_round: int) -> str:
    """The round id bound into every key derivation and share box of one task's round
    (a short hash when `task.round` would not be an identifier of at most 64 chars)."""
    round_id = f"{task}.{server_round}"
    if len(round_id) <= 64:
        return round_id
    return "r" + hashlib.sha256(round_id.encode()).hexdigest()[:40]


def quantization_of(spec: SecureAggregationSpec) -> QuantizationConfig:
    """The ring encoding a task's spec asks for (the rest at QuantizationConfig's defaults)."""
    return QuantizationConfig(clip_bound=spec.clip_bound, ring_bits=spec.ring_bits)


def reconstruction_threshold(roster_size: int, min_updates: int) -> int:
    """t for a round whose roster holds `roster_size` devices: a strict majority (so the
    coordinator needs more than half of the devices to collude before it can unmask anyone),
    and never below the task's quorum or 2."""
    return max(2, min_updates, roster_size // 2 + 1)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _parse_json(body: bytes, what: str) -> Any:
    if len(body) > MAX_JSON_BODY_BYTES:
        raise SchemaError(f"{what} body of {len(body)} bytes exceeds {MAX_JSON_BODY_BYTES}")
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise SchemaError(f"{what} body is not UTF-8 JSON: {error}") from None


def message_body(message: SecAggMessage) -> bytes:
    """Body of ADVERTISE_KEYS, SHARE_KEYS, UNMASK_REQUEST and UNMASK_RESPONSE."""
    return _json_bytes(message.to_dict())


def parse_message(cls: type[MessageT], body: bytes) -> MessageT:
    return cls.from_dict(_parse_json(body, cls.kind))


def roster_body(threshold: int, roster: tuple[AdvertiseKeys, ...]) -> bytes:
    """Body of ROSTER: the threshold every device splits its secrets with, and the keys."""
    return _json_bytes({"threshold": threshold, "adverts": [a.to_dict() for a in roster]})


def parse_roster(body: bytes) -> tuple[int, tuple[AdvertiseKeys, ...]]:
    data = _parse_json(body, "roster")
    if not isinstance(data, dict) or set(data) != {"threshold", "adverts"}:
        raise SchemaError('roster body must be {"threshold": int, "adverts": [...]}')
    threshold, adverts = data["threshold"], data["adverts"]
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 2:
        raise SchemaError(f"roster threshold must be an int >= 2, got {threshold!r:.40}")
    if not isinstance(adverts, list) or not 0 < len(adverts) <= MAX_DEVICES:
        raise SchemaError(f"roster adverts must be a list of 1..{MAX_DEVICES} adverts")
    return threshold, tuple(AdvertiseKeys.from_dict(item) for item in adverts)


def forwarded_body(messages: list[ShareKeys]) -> bytes:
    """Body of FORWARDED_SHARES: one ShareKeys per other device, holding only the box
    addressed to the recipient."""
    return _json_bytes([message.to_dict() for message in messages])


def parse_forwarded(body: bytes) -> tuple[ShareKeys, ...]:
    data = _parse_json(body, "forwarded shares")
    if not isinstance(data, list) or len(data) > MAX_DEVICES:
        raise SchemaError(f"forwarded shares must be a list of at most {MAX_DEVICES} messages")
    return tuple(ShareKeys.from_dict(item) for item in data)


def masked_input_from_body(
    round_id: str, device_id: str, spec: SecureAggregationSpec, body: bytes
) -> MaskedInput:
    """The MaskedInput a MASKED_INPUT body carries (4 bytes per coordinate)."""
    if len(body) % 4:
        raise SchemaError(f"masked input of {len(body)} bytes is not a whole number of words")
    return MaskedInput(
        round_id=round_id,
        device_id=device_id,
        ring_bits=spec.ring_bits,
        num_coordinates=len(body) // 4,
        vector=body,
    )
