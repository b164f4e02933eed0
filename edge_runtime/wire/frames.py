"""The frame codec: limits, encoding, decoding and verification of one wire message.

A message on the wire is a *frame*:

    offset  size  field
    0       2     magic b"SF"
    2       1     protocol version (PROTOCOL_VERSION)
    3       1     flags (bit 0: signed)
    4       4     header length H, big-endian
    8       64    Ed25519 signature over the header bytes (only when signed)
    ...     H     header: UTF-8 JSON, {"v", "kind", "sender", "sent_at", "body", "msg"}
    ...     rest  body (safetensors bytes, or a chunk of a larger frame)

The header names the body's length and sha256, so a signature over the header covers the
body as well, and the signature is over the exact header bytes (no re-canonicalisation on
the receiving side). Every size is checked against `Limits` before anything is parsed or
allocated. Decoders raise only `ProtocolError` subclasses (see `edge_runtime.wire.errors`).

Topics are in `edge_runtime.wire.topics`; docs/protocol.md has both.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from dataclasses import dataclass
from typing import Any, TypeVar

from edge_runtime.wire.errors import (
    FrameError,
    LimitExceededError,
    SchemaError,
    SignatureError,
    UnsupportedVersionError,
)
from edge_runtime.wire.message_kinds import MessageKind
from edge_runtime.wire.messages import MESSAGE_CLASSES, EnrollmentRequest, Message
from edge_runtime.wire.schema import (
    check_identifier,
    check_sha256,
    from_json_fields,
    to_json_fields,
)
from edge_runtime.wire.signing import (
    SIGNATURE_BYTES,
    Ed25519PrivateKey,
    Ed25519PublicKey,
    public_key_from_hex,
    sign,
    verify,
)
from edge_runtime.wire.topics import COORDINATOR_SENDER

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
MAGIC = b"SF"
FLAG_SIGNED = 0x01
_PREFIX = struct.Struct(">2sBBI")


@dataclass(frozen=True)
class Limits:
    """Size ceilings checked before parsing or allocating anything a peer declared."""

    max_header_bytes: int = 64 * 1024
    """JSON headers are small; 64 KiB leaves room for metrics and still bounds json.loads."""
    max_frame_bytes: int = 16 * 1024 * 1024
    """One MQTT payload. Bigger frames travel as chunks of at most `max_chunk_bytes`."""
    max_chunk_bytes: int = 8 * 1024 * 1024
    max_transfer_bytes: int = 1024 * 1024 * 1024
    """A whole reassembled frame (1 GiB: far above an r=64 adapter of a 1B model)."""
    max_chunk_count: int = 1 << 20
    max_open_transfers: int = 64
    """Transfers being reassembled at once, per receiver (all senders together)."""
    max_buffered_bytes: int = 2 * 1024 * 1024 * 1024
    """Chunk bytes held across all open transfers of one receiver (all senders together)."""
    max_open_transfers_per_sender: int = 4
    """Transfers one sender may have open at once. An agent uploads one update per task at a
    time (a restart resumes the same transfer id), so 4 covers a device in several tasks; at
    a sixteenth of `max_open_transfers`, one device cannot take the slots honest ones need."""
    max_buffered_bytes_per_sender: int = 512 * 1024 * 1024
    """Chunk bytes one sender may hold unfinished: two fp32 updates at `decode_update`'s
    `max_elements` (256 MiB each); a quarter of `max_buffered_bytes`. A transfer declaring
    more than this is refused at its first chunk, since it could never complete."""

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be >= 1, got {getattr(self, name)}")


DEFAULT_LIMITS = Limits()


M = TypeVar("M")


@dataclass(frozen=True)
class Frame:
    """A decoded frame. `signed_bytes` is what the signature covers (the raw header)."""

    message: Message
    sender: str
    sent_at: float
    body: bytes
    signature: bytes | None
    signed_bytes: bytes

    @property
    def kind(self) -> MessageKind:
        return self.message.KIND

    @property
    def message_id(self) -> str:
        return self.message.message_id

    def expect(self, cls: type[M]) -> M:
        """The message as `cls`, or `SchemaError` if it is another kind.

        Lets a handler that subscribed to, say, update topics get a typed `Update` without
        dispatching on strings."""
        if not isinstance(self.message, cls):
            raise SchemaError(
                f"expected a {cls.__name__} frame, got {type(self.message).__name__} "
                f"from {self.sender!r}"
            )
        return self.message


def encode_frame(
    message: Message,
    *,
    sender: str,
    body: bytes = b"",
    signing_key: Ed25519PrivateKey | None = None,
    sent_at: float | None = None,
) -> bytes:
    """Serialize `message` (+ optional body) to frame bytes, signed when a key is given.

    State-changing kinds must be signed; encoding one without a key raises
    `SignatureError`, so an unsigned one never leaves the process."""
    if message.KIND.requires_signature and signing_key is None:
        raise SignatureError(f"{message.KIND.value} messages must be signed; pass signing_key")
    if sender != COORDINATOR_SENDER:
        check_identifier("sender", sender)
    body_info: dict[str, Any] | None = None
    if body:
        body_info = {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    header = {
        "v": PROTOCOL_VERSION,
        "kind": message.KIND.value,
        "sender": sender,
        "sent_at": time.time() if sent_at is None else sent_at,
        "body": body_info,
        "msg": to_json_fields(message),
    }
    header_bytes = json.dumps(
        header, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")
    flags = 0
    signature = b""
    if signing_key is not None:
        flags |= FLAG_SIGNED
        signature = sign(signing_key, header_bytes)
    prefix = _PREFIX.pack(MAGIC, PROTOCOL_VERSION, flags, len(header_bytes))
    return b"".join((prefix, signature, header_bytes, body))


def _parse_header_json(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise FrameError(f"header is not valid UTF-8 JSON: {error}") from error
    if not isinstance(header, dict):
        raise FrameError(f"header must be a JSON object, got {type(header).__name__}")
    expected = {"v", "kind", "sender", "sent_at", "body", "msg"}
    if set(header) != expected:
        raise FrameError(
            f"header fields must be {sorted(expected)}, got {sorted(map(str, header))[:10]}"
        )
    return header


def _split_frame(data: bytes, limits: Limits) -> tuple[int, bytes | None, bytes, bytes]:
    """(version, signature or None, header bytes, body) of a frame, every declared size
    checked against `limits` before anything is sliced."""
    if len(data) > limits.max_frame_bytes:
        raise LimitExceededError(
            f"frame of {len(data)} bytes exceeds max_frame_bytes={limits.max_frame_bytes}; "
            "large bodies must be sent in chunks"
        )
    if len(data) < _PREFIX.size:
        raise FrameError(
            f"frame of {len(data)} bytes is shorter than the {_PREFIX.size}-byte prefix"
        )
    magic, version, flags, header_length = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}, expected {MAGIC!r}: not a schoolfl frame")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(
            f"frame speaks protocol version {version}; this build understands "
            f"{sorted(SUPPORTED_VERSIONS)}; upgrade the older side (agent or coordinator)"
        )
    if flags & ~FLAG_SIGNED:
        raise FrameError(f"unknown flag bits {flags:#04x}")
    if header_length > limits.max_header_bytes:
        raise LimitExceededError(
            f"declared header of {header_length} bytes exceeds "
            f"max_header_bytes={limits.max_header_bytes}"
        )
    offset = _PREFIX.size
    signature: bytes | None = None
    if flags & FLAG_SIGNED:
        signature = data[offset : offset + SIGNATURE_BYTES]
        offset += SIGNATURE_BYTES
    if offset + header_length > len(data):
        raise FrameError(
            f"declared header of {header_length} bytes runs past the end of a "
            f"{len(data)}-byte frame"
        )
    return version, signature, data[offset : offset + header_length], data[offset + header_length :]


def _check_envelope(
    header: dict[str, Any], version: int, signed: bool
) -> tuple[MessageKind, str, float]:
    """(kind, sender, sent_at) of a parsed header, each checked."""
    if header["v"] != version:
        raise UnsupportedVersionError(
            f"header says protocol version {header['v']!r:.20} but the frame prefix says "
            f"{version}; refusing an inconsistent frame"
        )
    try:
        kind = MessageKind(header["kind"])
    except (ValueError, TypeError) as error:
        raise SchemaError(
            f"unknown message kind {header['kind']!r:.40}; "
            f"expected one of {[k.value for k in MessageKind]}"
        ) from error
    if kind.requires_signature and not signed:
        raise SignatureError(f"{kind.value} frame is unsigned; state-changing messages are signed")
    sender = header["sender"]
    if not isinstance(sender, str):
        raise SchemaError(f"sender must be a string, got {type(sender).__name__}")
    if sender != COORDINATOR_SENDER:
        check_identifier("sender", sender)
    sent_at = header["sent_at"]
    if (
        not isinstance(sent_at, (int, float))
        or isinstance(sent_at, bool)
        or not math.isfinite(sent_at)
    ):
        raise SchemaError(f"sent_at must be a number, got {sent_at!r:.40}")
    return kind, sender, float(sent_at)


def decode_frame(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """Parse and validate frame bytes. Does not verify the signature: the caller looks up
    the sender's key and calls `verify_frame` (the codec does not know the registry)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FrameError(f"frame must be bytes, got {type(data).__name__}")
    version, signature, header_bytes, body = _split_frame(bytes(data), limits)
    header = _parse_header_json(header_bytes)
    kind, sender, sent_at = _check_envelope(header, version, signed=signature is not None)
    _check_body(header["body"], body)
    message = from_json_fields(MESSAGE_CLASSES[kind], header["msg"], kind.value)
    return Frame(
        message=message,
        sender=sender,
        sent_at=sent_at,
        body=body,
        signature=signature,
        signed_bytes=header_bytes,
    )


def _check_body(body_info: object, body: bytes) -> None:
    if body_info is None:
        if body:
            raise FrameError(f"header declares no body but {len(body)} bytes follow it")
        return
    if not isinstance(body_info, dict) or set(body_info) != {"bytes", "sha256"}:
        raise FrameError('header "body" must be null or {"bytes": int, "sha256": hex}')
    declared = body_info["bytes"]
    if not isinstance(declared, int) or isinstance(declared, bool) or declared != len(body):
        raise FrameError(f"header declares a {declared!r:.20}-byte body, got {len(body)} bytes")
    check_sha256("body.sha256", body_info["sha256"])
    if hashlib.sha256(body).hexdigest() != body_info["sha256"]:
        raise FrameError("body sha256 does not match the header: corrupted in transit")


def verify_frame(frame: Frame, public_key: Ed25519PublicKey) -> None:
    """Raise `SignatureError` unless `frame` is signed by `public_key`."""
    if frame.signature is None:
        raise SignatureError(f"{frame.kind.value} frame from {frame.sender!r} is unsigned")
    verify(public_key, frame.signed_bytes, frame.signature)


def verify_enrollment_request(frame: Frame) -> EnrollmentRequest:
    """The request, once its signature verifies under the key it registers (proof that the
    device holds the private half). The token check is the coordinator's job."""
    request = frame.expect(EnrollmentRequest)
    if frame.sender != request.device_id:
        raise SignatureError(
            f"enrollment for {request.device_id!r} was sent by {frame.sender!r}; refused"
        )
    verify_frame(frame, public_key_from_hex(request.public_key))
    return request
