"""Chunked transfers of large frames: pure logic, no MQTT.

Why: an SmolLM2 adapter update is tens of MB, brokers cap payload sizes, and a school link
drops mid-upload. The sender splits the *encoded, signed frame* into chunk frames (transfer
id, index, count, sha256 of the whole); the receiver reassembles, verifies the digest and
de-duplicates; after a failure the sender asks which chunks are missing
(`TransferStatusRequest`) and resends only those (`TransferStatus.missing_ranges`).

Memory safety: a chunk's declared sizes are checked against `Limits` and against each other
before anything is stored, and the receiver only ever holds bytes that actually arrived, so
a lying `total_bytes` cannot make it allocate.

Fairness: the coordinator has one reassembler for every device, so one enrolled device that
opens transfers and never finishes them must not use up the room honest uploads need. Each
sender has its own quota of open transfers and buffered bytes
(`Limits.max_open_transfers_per_sender`, `max_buffered_bytes_per_sender`), far below the
receiver-wide caps; a new transfer or chunk over the sender's quota is refused with
`LimitExceededError` naming the sender, and abandoned transfers are dropped after an idle
timeout the daemon ties to its round deadlines (`idle_timeout_for_deadlines`).
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
DEFAULT_IDLE_TIMEOUT_SECONDS = 300.0
"""An open transfer with no chunk for this long is dropped. Five minutes is the default round
deadline (`[tasks.schedule] round_deadline_seconds`): an update that arrives later is stale
anyway, and a transfer held longer only keeps its sender's quota and memory busy. A chunk of
512 KiB takes ~4 s on a 1 Mbit/s uplink, so honest uploads never go quiet this long unless
their device is offline, and then the sender resumes from `TransferStatus`."""
MIN_IDLE_TIMEOUT_SECONDS = 60.0
"""The floor `idle_timeout_for_deadlines` keeps: paho's reconnect backoff tops out at 60 s,
so a device that lost its link for one backoff period still resumes its transfer."""


def idle_timeout_for_deadlines(
    round_deadlines_seconds: Iterable[float], minimum_seconds: float = MIN_IDLE_TIMEOUT_SECONDS
) -> float:
    """The idle timeout for a coordinator serving tasks with these round deadlines: the
    longest one (a transfer quiet for a whole round cannot deliver a timely update), never
    below `minimum_seconds`; `DEFAULT_IDLE_TIMEOUT_SECONDS` when there are no tasks."""
    deadlines = [float(seconds) for seconds in round_deadlines_seconds]
    if any(not math.isfinite(seconds) or seconds <= 0 for seconds in deadlines):
        raise ValueError(f"round deadlines must be positive and finite, got {deadlines[:5]}")
    return max(minimum_seconds, max(deadlines, default=DEFAULT_IDLE_TIMEOUT_SECONDS))


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
class SenderUsage:
    """What one sender holds in a reassembler right now (compare with its `Limits` quota)."""

    open_transfers: int = 0
    buffered_bytes: int = 0


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

    Room is shared fairly: each sender may hold at most `Limits.max_open_transfers_per_sender`
    transfers and `max_buffered_bytes_per_sender` bytes, and all senders together at most
    `max_open_transfers` and `max_buffered_bytes`. With the per-sender quotas well below the
    totals, one device that floods transfers is refused while others still get through.
    (Several colluding devices can still fill the totals; the quotas make that take many
    enrolled devices, which the operator sees in the rejection counts and can revoke.)

    Counters (`duplicates`, `rejected`, `quota_refused`, `completed`) are plain ints so a
    daemon can export them. `now` is injectable so tests can drive expiry without sleeping.
    """

    def __init__(
        self,
        limits: Limits = DEFAULT_LIMITS,
        *,
        idle_timeout_seconds: float = DEFAULT_IDLE_TIMEOUT_SECONDS,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(idle_timeout_seconds) and idle_timeout_seconds > 0):
            raise ValueError(
                f"idle_timeout_seconds must be a positive number, got {idle_timeout_seconds!r}"
            )
        self.limits = limits
        self.idle_timeout_seconds = idle_timeout_seconds
        """Open transfers idle this long are dropped (a device that vanished mid-upload, or
        one holding room it never uses). A daemon may change it while running."""
        self._now = now
        self._open: dict[str, _OpenTransfer] = {}
        self._senders: dict[str, SenderUsage] = {}
        """Usage of every sender with at least one open transfer."""
        self._buffered_bytes = 0
        self._expired: list[ExpiredTransfer] = []
        """Dropped since the last `expire()` call, including those dropped to make room."""
        self._completed: OrderedDict[str, None] = OrderedDict()
        self.duplicates = 0
        self.rejected = 0
        self.quota_refused = 0
        """Chunks refused because their sender was over its own quota (also in `rejected`)."""
        self.completed = 0
        if (
            limits.max_open_transfers_per_sender >= limits.max_open_transfers
            or limits.max_buffered_bytes_per_sender >= limits.max_buffered_bytes
        ):
            logger.warning(
                "per-sender transfer quotas (%d transfers, %d bytes) are not below the totals "
                "(%d, %d): one sender can use up the room of every other",
                limits.max_open_transfers_per_sender,
                limits.max_buffered_bytes_per_sender,
                limits.max_open_transfers,
                limits.max_buffered_bytes,
            )

    @property
    def buffered_bytes(self) -> int:
        """Chunk bytes held across every open transfer."""
        return self._buffered_bytes

    @property
    def open_transfers(self) -> int:
        return len(self._open)

    def usage(self, sender: str) -> SenderUsage:
        """What `sender` holds now (zeros for a sender with nothing open)."""
        return self._senders.get(sender, SenderUsage())

    def _check_limits(self, header: ChunkHeader) -> None:
        limits = self.limits
        if header.total_bytes > limits.max_transfer_bytes:
            raise LimitExceededError(
                f"transfer {header.transfer_id} declares {header.total_bytes} bytes > "
                f"max_transfer_bytes={limits.max_transfer_bytes}"
            )
        if header.total_bytes > limits.max_buffered_bytes_per_sender:
            raise LimitExceededError(
                f"transfer {header.transfer_id} declares {header.total_bytes} bytes > "
                f"max_buffered_bytes_per_sender={limits.max_buffered_bytes_per_sender}: it "
                "could never complete; send a smaller update or raise the quota"
            )
        if header.chunk_bytes > limits.max_chunk_bytes:
            raise LimitExceededError(
                f"chunk size {header.chunk_bytes} > max_chunk_bytes={limits.max_chunk_bytes}"
            )
        if header.count > limits.max_chunk_count:
            raise LimitExceededError(
                f"{header.count} chunks > max_chunk_count={limits.max_chunk_count}"
            )

    def _over_quota(self, message: str) -> LimitExceededError:
        self.quota_refused += 1
        return LimitExceededError(message)

    def _check_room(self, header: ChunkHeader, sender: str, size: int) -> None:
        """Refuse a chunk of `size` bytes that would take `sender` (or everyone) over the
        buffered-bytes quota; the sender's own quota first, so a flood names its sender."""
        limits = self.limits
        held = self.usage(sender).buffered_bytes
        if held + size > limits.max_buffered_bytes_per_sender:
            raise self._over_quota(
                f"sender {sender!r} holds {held} bytes of unfinished transfers; chunk "
                f"{header.index} of {header.transfer_id} would exceed "
                f"max_buffered_bytes_per_sender={limits.max_buffered_bytes_per_sender}; "
                "finish an open transfer or let it expire first"
            )
        if self._buffered_bytes + size > limits.max_buffered_bytes:
            raise LimitExceededError(
                f"buffering chunk {header.index} of {header.transfer_id} would exceed "
                f"max_buffered_bytes={limits.max_buffered_bytes} (all senders together); "
                "retry later"
            )

    def _admit(self, header: ChunkHeader, sender: str, size: int) -> _OpenTransfer:
        """Open a transfer for the first chunk that names it, if its sender and the receiver
        have room; nothing is stored when they do not."""
        self._drop_idle()
        limits = self.limits
        open_by_sender = self.usage(sender).open_transfers
        if open_by_sender >= limits.max_open_transfers_per_sender:
            raise self._over_quota(
                f"sender {sender!r} already has {open_by_sender} transfers open "
                f"(max_open_transfers_per_sender={limits.max_open_transfers_per_sender}); "
                f"refusing {header.transfer_id}: finish one, or let it expire after "
                f"{self.idle_timeout_seconds:.0f} s idle"
            )
        if len(self._open) >= limits.max_open_transfers:
            raise LimitExceededError(
                f"{len(self._open)} transfers already open (max_open_transfers="
                f"{limits.max_open_transfers}, all senders together); refusing "
                f"{header.transfer_id}; retry later"
            )
        self._check_room(header, sender, size)
        transfer = _OpenTransfer(header=header, sender=sender, last_activity=self._now())
        self._open[header.transfer_id] = transfer
        usage = self.usage(sender)
        self._senders[sender] = replace(usage, open_transfers=usage.open_transfers + 1)
        return transfer

    def _store(self, transfer: _OpenTransfer, index: int, body: bytes) -> None:
        transfer.parts[index] = bytes(body)
        transfer.received_bytes += len(body)
        self._buffered_bytes += len(body)
        usage = self._senders[transfer.sender]
        self._senders[transfer.sender] = replace(
            usage, buffered_bytes=usage.buffered_bytes + len(body)
        )

    def _remove(self, transfer: _OpenTransfer) -> None:
        del self._open[transfer.header.transfer_id]
        self._buffered_bytes -= transfer.received_bytes
        usage = self._senders[transfer.sender]
        if usage.open_transfers <= 1:
            del self._senders[transfer.sender]
        else:
            self._senders[transfer.sender] = SenderUsage(
                usage.open_transfers - 1, usage.buffered_bytes - transfer.received_bytes
            )

    def accept(
        self, header: ChunkHeader, body: bytes, sender: str = ""
    ) -> CompletedTransfer | None:
        """Store one chunk; return the payload when this chunk completes its transfer.

        `sender` is the publishing device (the coordinator passes the topic's device id,
        which the broker ACL vouches for); quotas are kept per sender, expiries name it,
        and a transfer only takes chunks from the sender that opened it. Duplicates (a QoS
        1 redelivery, a resend that crossed a late original) are counted and ignored.
        Raises `ChunkError`/`LimitExceededError` for inconsistent or oversized chunks and
        for a sender over its quota; a digest mismatch drops the whole transfer so the
        sender can start over.
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
            transfer = self._admit(header, sender, len(body))
        else:
            if transfer.sender != sender:
                raise ChunkError(
                    f"chunk {header.index} of {header.transfer_id} comes from {sender!r}, but "
                    f"{transfer.sender!r} opened that transfer; a sender uses its own ids"
                )
            if _shape(transfer.header) != _shape(header):
                raise ChunkError(
                    f"chunk {header.index} of {header.transfer_id} disagrees with earlier "
                    f"chunks (count/size/digest); expected {_shape(transfer.header)}, got "
                    f"{_shape(header)}"
                )
            transfer.last_activity = self._now()
            if header.index in transfer.parts:
                self.duplicates += 1
                return None
            self._check_room(header, sender, len(body))
        self._store(transfer, header.index, body)
        if len(transfer.parts) < header.count:
            return None
        return self._finish(transfer)

    def _finish(self, transfer: _OpenTransfer) -> CompletedTransfer:
        header = transfer.header
        self._remove(transfer)
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
            logger.warning(
                "dropping transfer %s from %r: idle over %.0f s with %d of %d chunks",
                header.transfer_id,
                transfer.sender,
                self.idle_timeout_seconds,
                len(transfer.parts),
                header.count,
            )
            self._remove(transfer)
            self._expired.append(
                ExpiredTransfer(
                    header.transfer_id, transfer.sender, len(transfer.parts), header.count
                )
            )

    def quiet_transfers(self, sender: str, quiet_seconds: float) -> list[str] | None:
        """The ids of `sender`'s open transfers, or None while one of them received a chunk
        within `quiet_seconds` (its remaining chunks may still be on their way)."""
        open_ids = []
        for transfer in self._open.values():
            if transfer.sender != sender:
                continue
            if self._now() - transfer.last_activity < quiet_seconds:
                return None
            open_ids.append(transfer.header.transfer_id)
        return open_ids

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
