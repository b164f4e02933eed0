"""Read and check a safetensors header without touching the tensor data.

Why: `safetensors.torch.load` builds every tensor a body declares before the caller can look
at the list. A hostile update of 10^6 one-element tensors (72 MiB) then costs tens of seconds
of the coordinator's single loop and gigabytes of memory before `decode_update` could say
"wrong names". Reading the header first (8-byte little-endian length, then that many bytes
of JSON) lets the caller refuse such a body for the price of a bounded `json.loads`.

The layout (https://github.com/huggingface/safetensors, "Format"): `header_length` (u64
little-endian), then a UTF-8 JSON object mapping each tensor name to `{"dtype", "shape",
"data_offsets": [begin, end]}` (offsets relative to the byte after the header) plus an
optional `"__metadata__"` object of strings, then the data. Every check here is on the
declared structure; the values are checked by `update_codec` once it knows what to expect.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from edge_runtime.wire.errors import CodecError

LENGTH_BYTES = 8
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
"""Bytes per element of every safetensors dtype name."""
MAX_DIMENSIONS = 8
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    """Data offsets, relative to the first byte after the header."""


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed header whose offsets tile the data region exactly."""

    header_bytes: int
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads` keeps the last of repeated keys silently; a body that names a tensor
    twice says two different things, so it is refused instead."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise CodecError(f"update header names {repeated!r:.80} twice")
    return result


def loads_unique(text: bytes | str, what: str) -> Any:
    """`json.loads` refusing duplicate keys, with every failure as a `CodecError`."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except CodecError:
        raise
    except (ValueError, RecursionError) as error:
        raise CodecError(f"{what} is not valid JSON: {error}") from error


def _entry(name: str, value: object) -> TensorEntry:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise CodecError(
            f"header entry {name!r:.80} must be an object with exactly dtype, shape and "
            f"data_offsets; got {value!r:.120}"
        )
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise CodecError(f"{name!r:.80}: unknown dtype {dtype!r:.20}")
    valid_shape = isinstance(shape, list) and len(shape) <= MAX_DIMENSIONS
    if not (valid_shape and all(type(d) is int and 0 <= d < 2**31 for d in shape)):
        raise CodecError(
            f"{name!r:.80}: shape must be at most {MAX_DIMENSIONS} integers in 0..2^31-1, "
            f"got {shape!r:.80}"
        )
    valid_offsets = isinstance(offsets, list) and len(offsets) == 2
    if not (valid_offsets and all(type(o) is int and o >= 0 for o in offsets)):
        raise CodecError(f"{name!r:.80}: data_offsets must be [begin, end], got {offsets!r:.80}")
    begin, end = offsets
    size = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - begin != size:
        raise CodecError(
            f"{name!r:.80}: {dtype} {shape} needs {size} bytes, data_offsets span {end - begin}"
        )
    return TensorEntry(dtype, tuple(shape), begin, end)


def read_header(
    body: bytes, max_header_bytes: int, max_tensors: int | None = None
) -> SafetensorsHeader:
    """Parse the header of `body`, reading at most `max_header_bytes` of JSON.

    Refuses, with `CodecError`, a body too short for its length prefix, a header longer
    than `max_header_bytes` or than the body, JSON that is not an object of well-formed
    entries, more than `max_tensors` entries (counted before any entry is checked), repeated
    names, and data offsets that do not tile the data region exactly (gaps, overlaps, or
    bytes beyond it). Nothing of the data region is read."""
    if len(body) < LENGTH_BYTES:
        raise CodecError(
            f"update body of {len(body)} bytes is too short for a safetensors header "
            f"(needs at least {LENGTH_BYTES})"
        )
    header_bytes = int.from_bytes(body[:LENGTH_BYTES], "little")
    if header_bytes > max_header_bytes:
        raise CodecError(
            f"update header declares {header_bytes} bytes > {max_header_bytes} allowed for "
            "this update; refused before parsing (too many or too long tensor names)"
        )
    data_bytes = len(body) - LENGTH_BYTES - header_bytes
    if data_bytes < 0:
        raise CodecError(
            f"update header declares {header_bytes} bytes but the body has only "
            f"{len(body) - LENGTH_BYTES} after the length prefix; truncated or forged"
        )
    parsed = loads_unique(body[LENGTH_BYTES : LENGTH_BYTES + header_bytes], "update header")
    if not isinstance(parsed, dict):
        raise CodecError(f"update header must be a JSON object, got {type(parsed).__name__}")
    metadata = parsed.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()
    ):
        raise CodecError("update header __metadata__ must map strings to strings")
    if max_tensors is not None and len(parsed) > max_tensors:
        raise CodecError(
            f"update header declares {len(parsed)} tensors, at most {max_tensors} expected; "
            "refused before checking them"
        )
    tensors = {name: _entry(name, value) for name, value in parsed.items()}
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            raise CodecError(
                f"{name!r:.80}: data starts at {entry.begin}, expected {position} (tensors "
                "must tile the data region without gaps or overlaps)"
            )
        position = entry.end
    if position != data_bytes:
        raise CodecError(
            f"update header covers {position} data bytes but the body holds {data_bytes}"
        )
    return SafetensorsHeader(header_bytes, metadata, tensors)
