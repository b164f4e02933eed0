"""Chunked transfers of large frames: pure logic, no MQTT.

Why: an SmolLM2 adapter update is tens of MB, brokers cap payload sizes, and a school link
drops mid-upload. The sender splits the *encoded, signed frame* into chunk frames (transfer
id, index, count, sha256 of the whole); the receiver reassembles, verifies the digest and
de-duplicates; after a failure the sender asks which chunks are missing
(`TransferStatusRequest`) and resends only those (`TransferStatus.missing_ranges`).

Memory safety: a chunk's declared sizes are checked against `Limits` and against each other
before anything is stored, and the receiver only ever holds bytes that actually arrived, so
a lying `total_bytes` cannot make it allocate.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

from edge_runtime.wire.errors import ChunkError, LimitExceededError
from edge_runtime.wire.frames import DEFAULT_LIMITS, Frame, Limits, decode_frame, encode_frame
from edge_runtime.wire.messages import ChunkHeader, TransferStatus, TransferStatusRequest

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 512 * 1024
"""512 KiB: small enough that a lost chunk on a 1 Mbit/s school uplink costs ~4 s, large
enough that per-message overhead (header, PUBACK round trip) stays under 1 %."""
COMPLETED_MEMORY = 4096
"""How many finished transfer ids a receiver remembers to drop late duplicates."""


def indices_to_ranges(indices: Iterable[int]) -> tuple[int, ...]:
    """Sorted indices -> flattened half-open ranges (start0, stop0, start1, stop1, ...)."""
    ranges: list[int] = []
    for index in sorted(set(indices)):
        if ranges and ranges[-1] == index:
            ranges[-1] = index + 1
        else:
            ranges.extend((index, index + 1))
    return tuple(ranges)


class ChunkSender:
    """Splits one payload (normally an encoded frame) into chunk frames.

    `frames()` yields every chunk; `frames(indices)` only the ones asked for, which is what
    a resume after `TransferStatus` uses. `sent_count` counts chunk frames produced, so a
    caller (and the tests) can see that a resume resent only what was missing.
    """

    def __init__(
        self,
        payload: bytes,
        *,
        transfer_id: str,
        sender: str,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        if not payload:
            raise ValueError("nothing to send: payload is empty")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.payload = payload
        self.transfer_id = transfer_id
        self.sender = sender
        self.chunk_bytes = chunk_bytes
        self.count = math.ceil(len(payload) / chunk_bytes)
        self.sha256 = hashlib.sha256(payload).hexdigest()
        self.sent_count = 0

    def header(self, index: int) -> ChunkHeader:
        return ChunkHeader(
            transfer_id=self.transfer_id,
            index=index,
            count=self.count,
            chunk_bytes=self.chunk_bytes,
            total_bytes=len(self.payload),
            sha256=self.sha256,
        )

    def frame(self, index: int) -> bytes:
        """Chunk frame `index` (unsigned; the reassembled payload carries the signature)."""
        start = index * self.chunk_bytes
        piece = self.payload[start : start + self.chunk_bytes]
        self.sent_count += 1
        return encode_frame(self.header(index), sender=self.sender, body=piece)

    def frames(self, indices: Iterable[int] | None = None) -> Iterator[tuple[int, bytes]]:
        """(index, frame bytes) for every chunk, or only for `indices`."""
        for index in range(self.count) if indices is None else indices:
            if not 0 <= index < self.count:
                raise ChunkError(f"chunk index {index} outside 0..{self.count - 1}")
            yield index, self.frame(index)

    def missing_from(self, status: TransferStatus) -> list[int]:
        """Indices to resend after the receiver's reply (all of them if it never saw us)."""
        if status.transfer_id != self.transfer_id:
            raise ChunkError(
                f"status for transfer {status.transfer_id!r}, expected {self.transfer_id!r}"
            )
        if status.complete:
            return []
        if not status.known:
            return list(range(self.count))
        return status.missing_indices(self.count)


@dataclass
class _OpenTransfer:
    header: ChunkHeader
    sender: str
    parts: dict[int, bytes] = field(default_factory=dict)
    received_bytes: int = 0
    last_activity: float = 0.0


@dataclass(frozen=True)
class ExpiredTransfer:
    """A transfer dropped because its sender went quiet before sending every chunk."""

    transfer_id: str
    sender: str
    received_chunks: int
    count: int

    @property
    def reason(self) -> str:
        return (
            f"transfer {self.transfer_id} expired idle with {self.received_chunks} of "
            f"{self.count} chunks"
        )


@dataclass(frozen=True)
class CompletedTransfer:
    """A reassembled, digest-verified payload."""

    transfer_id: str
    payload: bytes
    chunk_count: int

    def decode(self, limits: Limits = DEFAULT_LIMITS) -> Frame:
        """Decode the reassembled frame, allowing it up to `limits.max_transfer_bytes`
        (a single MQTT frame is capped lower, at `max_frame_bytes`)."""
        return decode_frame(
            self.payload, replace(limits, max_frame_bytes=limits.max_transfer_bytes)
        )


class ChunkReassembler:
    """Collects chunks of many transfers and returns each payload once, verified.

    Counters (`duplicates`, `rejected`, `completed`) are plain ints so a daemon can export
    them. `now` is injectable so tests can drive expiry without sleeping.
    """

    def __init__(
        self,
        limits: Limits = DEFAULT_LIMITS,
        *,
        idle_timeout_seconds: float = 3600.0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.idle_timeout_seconds = idle_timeout_seconds
        """Open transfers idle this long are dropped (a device that vanished mid-upload)."""
        self._now = now
        self._open: dict[str, _OpenTransfer] = {}
        self._expired: list[ExpiredTransfer] = []
        """Dropped since the last `expire()` call, including those dropped to make room."""
        self._completed: OrderedDict[str, None] = OrderedDict()
        self.duplicates = 0
        self.rejected = 0
        self.completed = 0

    @property
    def buffered_bytes(self) -> int:
        return sum(transfer.received_bytes for transfer in self._open.values())

    def _check_limits(self, header: ChunkHeader) -> None:
        limits = self.limits
        if header.total_bytes > limits.max_transfer_bytes:
            raise LimitExceededError(
                f"transfer {header.transfer_id} declares {header.total_bytes} bytes > "
                f"max_transfer_bytes={limits.max_transfer_bytes}"
            )
        if header.chunk_bytes > limits.max_chunk_bytes:
            raise LimitExceededError(
                f"chunk size {header.chunk_bytes} > max_chunk_bytes={limits.max_chunk_bytes}"
            )
        if header.count > limits.max_chunk_count:
            raise LimitExceededError(
                f"{header.count} chunks > max_chunk_count={limits.max_chunk_count}"
            )

    def _open_transfer(self, header: ChunkHeader, sender: str) -> _OpenTransfer:
        self._drop_idle()
        if len(self._open) >= self.limits.max_open_transfers:
            raise LimitExceededError(
                f"{len(self._open)} transfers already open (max_open_transfers="
                f"{self.limits.max_open_transfers}); refusing {header.transfer_id}"
            )
        transfer = _OpenTransfer(header=header, sender=sender, last_activity=self._now())
        self._open[header.transfer_id] = transfer
        return transfer

    def accept(
        self, header: ChunkHeader, body: bytes, sender: str = ""
    ) -> CompletedTransfer | None:
        """Store one chunk; return the payload when this chunk completes its transfer.
        `sender` (the publishing device, when known) is named if the transfer expires.

        Duplicates (a QoS 1 redelivery, a resend that crossed a late original) are counted
        and ignored. Raises `ChunkError`/`LimitExceededError` for inconsistent or oversized
        chunks; a digest mismatch drops the whole transfer so the sender can start over.
        """
        try:
            return self._accept(header, body, sender)
        except (ChunkError, LimitExceededError):
            self.rejected += 1
            raise

    def _accept(self, header: ChunkHeader, body: bytes, sender: str) -> CompletedTransfer | None:
        if header.transfer_id in self._completed:
            self.duplicates += 1
            return None
        self._check_limits(header)
        if len(body) != header.expected_body_bytes:
            raise ChunkError(
                f"chunk {header.index} of {header.transfer_id} carries {len(body)} bytes, "
                f"expected {header.expected_body_bytes}"
            )
        transfer = self._open.get(header.transfer_id)
        if transfer is None:
            transfer = self._open_transfer(header, sender)
        elif _shape(transfer.header) != _shape(header):
            raise ChunkError(
                f"chunk {header.index} of {header.transfer_id} disagrees with earlier chunks "
                f"(count/size/digest); expected {_shape(transfer.header)}, got {_shape(header)}"
            )
        transfer.last_activity = self._now()
        if header.index in transfer.parts:
            self.duplicates += 1
            return None
        if self.buffered_bytes + len(body) > self.limits.max_buffered_bytes:
            raise LimitExceededError(
                f"buffering chunk {header.index} of {header.transfer_id} would exceed "
                f"max_buffered_bytes={self.limits.max_buffered_bytes}"
            )
        transfer.parts[header.index] = bytes(body)
        transfer.received_bytes += len(body)
        if len(transfer.parts) < header.count:
            return None
        return self._finish(transfer)

    def _finish(self, transfer: _OpenTransfer) -> CompletedTransfer:
        header = transfer.header
        del self._open[header.transfer_id]
        payload = b"".join(transfer.parts[index] for index in range(header.count))
        if hashlib.sha256(payload).hexdigest() != header.sha256:
            raise ChunkError(
                f"transfer {header.transfer_id}: reassembled sha256 does not match the "
                "declared digest; dropped, the sender must resend it"
            )
        self._completed[header.transfer_id] = None
        while len(self._completed) > COMPLETED_MEMORY:
            self._completed.popitem(last=False)
        self.completed += 1
        logger.debug("transfer %s complete: %d bytes", header.transfer_id, len(payload))
        return CompletedTransfer(header.transfer_id, payload, header.count)

    def expire(self) -> list[ExpiredTransfer]:
        """Drop transfers idle longer than `idle_timeout_seconds`; return every transfer
        dropped since the last call, so the caller can count each refusal."""
        self._drop_idle()
        expired, self._expired = self._expired, []
        return expired

    def _drop_idle(self) -> None:
        cutoff = self._now() - self.idle_timeout_seconds
        stale = [t for t in self._open.values() if t.last_activity < cutoff]
        for transfer in stale:
            header = transfer.header
            logger.warning("dropping idle transfer %s", header.transfer_id)
            del self._open[header.transfer_id]
            self._expired.append(
                ExpiredTransfer(
                    header.transfer_id, transfer.sender, len(transfer.parts), header.count
                )
            )

    def status(self, request: TransferStatusRequest) -> TransferStatus:
        """The answer to a sender's "which chunks do you have?"."""
        transfer_id = request.transfer_id
        if transfer_id in self._completed:
            return TransferStatus(transfer_id, request.request_id, known=True, complete=True)
        transfer = self._open.get(transfer_id)
        if transfer is None:
            return TransferStatus(transfer_id, request.request_id, known=False, complete=False)
        missing = (i for i in range(transfer.header.count) if i not in transfer.parts)
        return TransferStatus(
            transfer_id,
            request.request_id,
            known=True,
            complete=False,
            missing_ranges=indices_to_ranges(missing),
        )


def _shape(header: ChunkHeader) -> tuple[int, int, int, str]:
    return (header.count, header.chunk_bytes, header.total_bytes, header.sha256)
