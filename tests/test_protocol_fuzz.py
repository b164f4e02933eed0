"""Property-based fuzzing of every decoder.

The contract: whatever bytes arrive, a decoder either returns a valid value or raises a
`ProtocolError` subclass with a non-empty message; never another exception, and never an
allocation driven by a size field that the bytes merely declare.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.wire import (
    MAGIC,
    ChunkHeader,
    ChunkReassembler,
    ChunkSender,
    CodecConfig,
    Limits,
    ProtocolError,
    TransferStatus,
    UpdateEncoding,
    decode_frame,
    decode_update,
    encode_frame,
    encode_update,
    parse_device_topic,
    public_key_from_hex,
)
from tests.test_protocol import KEY, all_messages

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SMALL_LIMITS = Limits(
    max_header_bytes=16 * 1024,
    max_frame_bytes=1024 * 1024,
    max_chunk_bytes=4096,
    max_transfer_bytes=64 * 1024,
    max_open_transfers=8,
)


def only_protocol_errors(function: Callable[[], Any]) -> Any:
    """Run `function`; a ProtocolError must carry a message, anything else fails the test."""
    try:
        return function()
    except ProtocolError as error:
        assert str(error), f"{type(error).__name__} without a message"
        return None


def _frames() -> list[bytes]:
    frames = []
    for message in all_messages():
        body = b""
        if isinstance(message, ChunkHeader):
            body = b"c" * message.expected_body_bytes
        signing = {"signing_key": KEY} if message.KIND.requires_signature else {}  # type: ignore[attr-defined]
        frames.append(encode_frame(message, sender="dev-1", body=body, **signing))  # type: ignore[arg-type]
    return frames


VALID_FRAMES = _frames()
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=80),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


@st.composite
def mutated(draw: st.DrawFn, originals: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(originals)))
    for _ in range(draw(st.integers(1, 6))):
        operation = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
        position = draw(st.integers(0, max(0, len(data) - 1)))
        if operation == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif operation == "truncate":
            del data[position:]
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif operation == "delete":
            del data[position : position + draw(st.integers(1, 16))]
        else:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[position : position + len(chunk)] = chunk
    return bytes(data)


@st.composite
def structured_frames(draw: st.DrawFn) -> bytes:
    """Well-formed envelopes around hostile headers: the schema layer must hold."""
    original = draw(st.sampled_from(VALID_FRAMES))
    frame = decode_frame(original)
    header = json.loads(frame.signed_bytes)
    target = draw(st.sampled_from(["msg", "top"]))
    container = header["msg"] if target == "msg" else header
    key = draw(st.sampled_from(sorted(container) + ["__extra__"]))
    if draw(st.booleans()):
        container[key] = draw(json_values)
    else:
        container.pop(key, None)
    header_bytes = json.dumps(header).encode()
    body = frame.body
    flags = 0x01 if frame.signature else 0x00
    prefix = struct.pack(">2sBBI", MAGIC, 1, flags, len(header_bytes))
    return prefix + (frame.signature or b"") + header_bytes + body


@FUZZ
@given(st.binary(max_size=2048))
def test_decode_frame_random_bytes(data: bytes) -> None:
    only_protocol_errors(lambda: decode_frame(data, SMALL_LIMITS))


@FUZZ
@given(st.binary(max_size=64))
def test_decode_frame_random_bytes_after_valid_prefix(tail: bytes) -> None:
    only_protocol_errors(lambda: decode_frame(MAGIC + b"\x01" + tail, SMALL_LIMITS))


@FUZZ
@given(mutated(VALID_FRAMES))
def test_decode_frame_mutated(data: bytes) -> None:
    only_protocol_errors(lambda: decode_frame(data, SMALL_LIMITS))


@FUZZ
@given(structured_frames())
def test_decode_frame_hostile_headers(data: bytes) -> None:
    only_protocol_errors(lambda: decode_frame(data, SMALL_LIMITS))


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(0, 255), st.binary(max_size=64))
def test_lying_header_length_allocates_nothing(length: int, flags: int, rest: bytes) -> None:
    data = struct.pack(">2sBBI", MAGIC, 1, flags, length) + rest
    tracemalloc.start()
    try:
        only_protocol_errors(lambda: decode_frame(data, SMALL_LIMITS))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


@FUZZ
@given(
    st.integers(0, 2**53),
    st.integers(0, 2**53),
    st.integers(0, 2**53),
    st.integers(0, 2**53),
    st.binary(max_size=512),
)
def test_lying_chunk_sizes_allocate_nothing(
    index: int, count: int, chunk_bytes: int, total_bytes: int, body: bytes
) -> None:
    reassembler = ChunkReassembler(SMALL_LIMITS)
    tracemalloc.start()
    try:

        def accept() -> None:
            header = ChunkHeader("t-1", index, count, chunk_bytes, total_bytes, "ab" * 32)
            reassembler.accept(header, body)

        only_protocol_errors(accept)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024
    assert reassembler.buffered_bytes <= len(body)


CHUNK_FRAMES = [
    data
    for payload in (b"p" * 10_000, b"q" * 5)
    for _, data in ChunkSender(payload, transfer_id="t-9", sender="dev", chunk_bytes=1024).frames()
]


@FUZZ
@given(st.lists(st.one_of(st.sampled_from(CHUNK_FRAMES), mutated(CHUNK_FRAMES)), max_size=30))
def test_reassembler_with_mutated_chunk_streams(stream: list[bytes]) -> None:
    reassembler = ChunkReassembler(SMALL_LIMITS)
    for data in stream:

        def feed(data: bytes = data) -> None:
            frame = decode_frame(data, SMALL_LIMITS)
            completed = reassembler.accept(frame.expect(ChunkHeader), frame.body)
            if completed is not None:
                assert completed.payload in (b"p" * 10_000, b"q" * 5)
                only_protocol_errors(lambda: completed.decode(SMALL_LIMITS))

        only_protocol_errors(feed)
    assert reassembler.buffered_bytes <= SMALL_LIMITS.max_transfer_bytes


def _update_bodies() -> list[bytes]:
    state = {"a.lora_A.weight": torch.randn(4, 16), "a.lora_B.weight": torch.randn(16, 4)}
    return [
        encode_update(state, CodecConfig(encoding, top_k)).body
        for encoding in UpdateEncoding
        for top_k in (None, 0.25)
    ]


UPDATE_BODIES = _update_bodies()
UPDATE_SHAPES = {"a.lora_A.weight": (4, 16), "a.lora_B.weight": (16, 4)}


@FUZZ
@given(st.binary(max_size=1024))
def test_decode_update_random_bytes(data: bytes) -> None:
    only_protocol_errors(lambda: decode_update(data, max_elements=1 << 16))


@FUZZ
@given(mutated(UPDATE_BODIES), st.booleans())
def test_decode_update_mutated(data: bytes, with_expected: bool) -> None:
    expected = UPDATE_SHAPES if with_expected else None
    result = only_protocol_errors(lambda: decode_update(data, expected, max_elements=1 << 16))
    if result is not None:
        assert all(bool(torch.isfinite(t).all()) for t in result.values())


@FUZZ
@given(json_values, st.sampled_from(["fp32", "int8", "x"]), st.sampled_from(["", "0.5", "z"]))
def test_decode_update_hostile_metadata(shapes: object, encoding: str, top_k: str) -> None:
    from safetensors.torch import save

    body = save(
        {"w::idx": torch.tensor([0], dtype=torch.int32), "w::val": torch.ones(1)},
        metadata={
            "format": "schoolfl-update",
            "codec_version": "1",
            "encoding": encoding,
            "top_k_fraction": top_k,
            "shapes": json.dumps(shapes),
        },
    )
    only_protocol_errors(lambda: decode_update(body, max_elements=1 << 16))


@FUZZ
@given(st.lists(st.integers(-(2**40), 2**40), max_size=12), st.integers(0, 2**20))
def test_transfer_status_ranges(ranges: list[int], count: int) -> None:
    def decode() -> list[int]:
        status = TransferStatus("t", "q", True, False, tuple(ranges))
        return status.missing_indices(count) if sum(ranges[1::2]) - sum(ranges[::2]) < 10**5 else []

    only_protocol_errors(decode)


@FUZZ
@given(st.text(max_size=120))
def test_topic_and_key_parsers(text: str) -> None:
    only_protocol_errors(lambda: parse_device_topic(text))
    only_protocol_errors(lambda: parse_device_topic(f"schoolfl/f/dev/{text}/state"))
    only_protocol_errors(lambda: public_key_from_hex(text))
