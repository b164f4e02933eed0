"""Chunk sender and reassembler: pure logic, no broker."""

from __future__ import annotations

import hashlib
import os
import random
import tracemalloc

import pytest

from edge_runtime.wire import (
    ChunkError,
    ChunkHeader,
    ChunkReassembler,
    ChunkSender,
    ExpiredTransfer,
    LimitExceededError,
    Limits,
    TransferStatus,
    TransferStatusRequest,
    decode_frame,
    indices_to_ranges,
)


def _accept_frame(reassembler: ChunkReassembler, data: bytes):  # noqa: ANN202
    frame = decode_frame(data)
    return reassembler.accept(frame.expect(ChunkHeader), frame.body)


def test_out_of_order_with_duplicates_reassembles_once() -> None:
    payload = os.urandom(10_000)
    sender = ChunkSender(payload, transfer_id="t-1", sender="dev", chunk_bytes=999)
    frames = [data for _, data in sender.frames()]
    shuffled = frames + frames[:4]
    random.Random(1).shuffle(shuffled)
    reassembler = ChunkReassembler()
    completed = [r for data in shuffled if (r := _accept_frame(reassembler, data)) is not None]
    assert len(completed) == 1
    assert completed[0].payload == payload
    assert reassembler.duplicates == 4
    assert _accept_frame(reassembler, frames[0]) is None  # late duplicate after completion
    assert reassembler.duplicates == 5
    assert reassembler.buffered_bytes == 0


def test_status_reports_missing_ranges_and_sender_resends_only_them() -> None:
    payload = os.urandom(10 * 100)
    sender = ChunkSender(payload, transfer_id="t-2", sender="dev", chunk_bytes=100)
    reassembler = ChunkReassembler()
    request = TransferStatusRequest("t-2", "q-1")
    assert reassembler.status(request).known is False
    assert sender.missing_from(reassembler.status(request)) == list(range(10))
    for _, data in sender.frames([0, 1, 2, 5, 9]):
        _accept_frame(reassembler, data)
    status = reassembler.status(request)
    assert status.missing_ranges == (3, 5, 6, 9)
    missing = sender.missing_from(status)
    assert missing == [3, 4, 6, 7, 8]
    before = sender.sent_count
    results = [_accept_frame(reassembler, data) for _, data in sender.frames(missing)]
    assert sender.sent_count - before == 5
    assert results[-1] is not None and results[-1].payload == payload
    assert reassembler.status(request).complete
    assert sender.missing_from(reassembler.status(request)) == []


def test_digest_mismatch_drops_the_transfer() -> None:
    header = ChunkHeader("t-3", 0, 1, 4, 4, "00" * 32)
    reassembler = ChunkReassembler()
    with pytest.raises(ChunkError, match="sha256"):
        reassembler.accept(header, b"abcd")
    assert reassembler.status(TransferStatusRequest("t-3", "q")).known is False
    assert reassembler.rejected == 1


def test_inconsistent_chunks_are_refused() -> None:
    digest = hashlib.sha256(b"x" * 10).hexdigest()
    reassembler = ChunkReassembler()
    reassembler.accept(ChunkHeader("t-4", 0, 2, 5, 10, digest), b"x" * 5)
    with pytest.raises(ChunkError, match="disagrees"):
        reassembler.accept(ChunkHeader("t-4", 1, 3, 4, 10, digest), b"x" * 4)
    with pytest.raises(ChunkError, match="carries 4 bytes, expected 5"):
        reassembler.accept(ChunkHeader("t-4", 1, 2, 5, 10, digest), b"x" * 4)


def test_limits_checked_before_storing_anything() -> None:
    limits = Limits(max_transfer_bytes=1000, max_chunk_bytes=100, max_open_transfers=2)
    reassembler = ChunkReassembler(limits)
    digest = "ab" * 32
    tracemalloc.start()
    with pytest.raises(LimitExceededError, match="max_transfer_bytes"):
        reassembler.accept(
            ChunkHeader("huge", 0, -(-(2**40) // 100), 100, 2**40, digest), b"x" * 100
        )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1_000_000
    with pytest.raises(LimitExceededError, match="max_chunk_bytes"):
        reassembler.accept(ChunkHeader("big", 0, 1, 500, 500, digest), b"x" * 500)
    reassembler.accept(ChunkHeader("a", 0, 2, 100, 200, digest), b"x" * 100)
    reassembler.accept(ChunkHeader("b", 0, 2, 100, 200, digest), b"x" * 100)
    with pytest.raises(LimitExceededError, match="max_open_transfers"):
        reassembler.accept(ChunkHeader("c", 0, 2, 100, 200, digest), b"x" * 100)


def test_buffered_bytes_limit() -> None:
    reassembler = ChunkReassembler(Limits(max_buffered_bytes=150, max_chunk_bytes=100))
    reassembler.accept(ChunkHeader("a", 0, 2, 100, 200, "ab" * 32), b"x" * 100)
    with pytest.raises(LimitExceededError, match="max_buffered_bytes"):
        reassembler.accept(ChunkHeader("b", 0, 2, 100, 200, "ab" * 32), b"x" * 100)


def test_idle_transfers_expire_on_an_injected_clock() -> None:
    clock = [0.0]
    reassembler = ChunkReassembler(idle_timeout_seconds=60, now=lambda: clock[0])
    reassembler.accept(ChunkHeader("a", 0, 2, 100, 200, "ab" * 32), b"x" * 100, "dev-1")
    clock[0] = 59
    assert reassembler.expire() == []
    clock[0] = 121
    assert reassembler.expire() == [ExpiredTransfer("a", "dev-1", 1, 2)]
    assert reassembler.expire() == []  # reported once
    assert reassembler.buffered_bytes == 0


def test_ranges() -> None:
    assert indices_to_ranges([]) == ()
    assert indices_to_ranges([5, 1, 2, 3, 9]) == (1, 4, 5, 6, 9, 10)
    status = TransferStatus("t", "q", True, False, indices_to_ranges([0, 7, 8]))
    assert status.missing_indices(9) == [0, 7, 8]


def test_sender_validates_its_inputs() -> None:
    with pytest.raises(ValueError, match="empty"):
        ChunkSender(b"", transfer_id="t", sender="d")
    sender = ChunkSender(b"abc", transfer_id="t", sender="d", chunk_bytes=2)
    with pytest.raises(ChunkError, match="outside"):
        list(sender.frames([2]))
    with pytest.raises(ChunkError, match="expected 't'"):
        sender.missing_from(TransferStatus("u", "q", True, True))


def test_a_device_whose_chunks_were_dropped_is_asked_for_them_once_it_is_quiet() -> None:
    """The coordinator's receive queue dropped chunks 3..5 of an update: once the device's
    transfer has been quiet for a second it gets a status naming them, and resends just
    those (instead of waiting ~20 s for its own resend timer)."""
    from coordinator.dropped_chunks import GIVE_UP_SECONDS, QUIET_SECONDS, DroppedChunkRecovery

    clock = [100.0]
    reassembler = ChunkReassembler(now=lambda: clock[0])
    recovery = DroppedChunkRecovery(reassembler, now=lambda: clock[0])
    sender = ChunkSender(os.urandom(800), transfer_id="t-9", sender="dev-1", chunk_bytes=100)
    recovery.note("dev-1")  # dropped before any of its chunks reached the reassembler
    clock[0] += QUIET_SECONDS + 0.1
    assert recovery.due() == [] and "dev-1" in recovery.pending  # waits for the transfer
    for index, data in sender.frames():
        if index not in (3, 4, 5):  # dropped by the receive queue
            frame = decode_frame(data)
            reassembler.accept(frame.expect(ChunkHeader), frame.body, "dev-1")
    recovery.note("dev-1")
    assert recovery.due() == []  # its last chunk came just now: more may be on the way
    clock[0] += QUIET_SECONDS + 0.1
    [(device_id, status)] = recovery.due()
    assert device_id == "dev-1" and status.transfer_id == "t-9"
    assert sender.missing_from(status) == [3, 4, 5]
    assert recovery.due() == []  # asked once
    for index, data in sender.frames():
        if index in sender.missing_from(status):
            frame = decode_frame(data)
            completed = reassembler.accept(frame.expect(ChunkHeader), frame.body, "dev-1")
    assert completed is not None and completed.chunk_count == 8
    recovery.note("dev-2")  # every chunk dropped: its transfer never opens
    clock[0] += GIVE_UP_SECONDS
    assert recovery.due() == [] and recovery.pending == {}  # left to the agent's timer
