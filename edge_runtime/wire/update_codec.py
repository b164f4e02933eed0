"""Encode and decode adapter updates (LoRA deltas) as safetensors bytes.

Why these encodings: school uplinks are slow, so an update is compressed before upload.
- FP32: exact, the reference.
- INT8: per-row symmetric quantization (one fp32 scale per row; per column when the matrix
  is taller than wide, as a LoRA B factor [out, r] is, so every LoRA factor carries r
  scales), about a quarter of fp32's bytes with an error bounded by group_max / 254.
- Top-k (with either): keep only the largest-|x| fraction of each tensor, as int32 flat
  indices plus values. Aggregation treats the rest as zero.

Layout inside the safetensors file, for a tensor named N (names never contain "::"):
  fp32 dense   N                       float32, original shape
  int8 dense   N::q8 [rows, cols] int8, N::scale [groups] float32
  fp32 top-k   N::idx [k] int32, N::val [k] float32
  int8 top-k   N::idx [k] int32, N::q8 [k] int8, N::scale [groups] float32
The matrix view is [first dimension, rest] (a vector is one row); groups = rows if
rows <= cols else cols. Metadata holds the encoding and the original shapes. Decoding
rejects wrong names, shapes and dtypes, out-of-range indices and non-finite values with
`CodecError`, and bounds the elements it will allocate.

Decoding checks the safetensors header before it loads anything: the header's length is
bounded (by what the expected tensors can need), and its names, dtypes, shapes and data
offsets must be exactly those the metadata's shapes imply. A body declaring a million tiny
tensors, or a few huge ones, is refused after one bounded `json.loads` instead of after
building every tensor it names (tens of seconds and gigabytes on the coordinator's loop).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from edge_runtime.wire.errors import CodecError, LimitExceededError
from edge_runtime.wire.message_kinds import UpdateEncoding
from edge_runtime.wire.safetensors_header import TensorEntry, loads_unique, read_header

CODEC_FORMAT = "schoolfl-update"
CODEC_VERSION = "1"
SEPARATOR = "::"
DEFAULT_MAX_ELEMENTS = 64 * 1024 * 1024
"""64 Mi parameters (256 MB fp32) per update: 13x an SmolLM2-135M r=16 all-linear adapter."""
DEFAULT_MAX_HEADER_BYTES = 1024 * 1024
"""Safetensors header JSON an update may carry when the caller gives no expected shapes (a
global adapter the agent downloaded, the coordinator's own bodies). An SmolLM2-135M
all-linear adapter (420 tensors; int8 top-k stores 1260 entries) needs ~200 KB; 1 MiB
bounds the parse a hostile header can ask for at ~0.2 s on a busy 2-core box."""
STORED_PER_TENSOR = 3
"""Most stored entries one tensor takes (int8 top-k: idx, q8, scale)."""
HEADER_BYTES_BASE = 64 * 1024
"""With expected shapes, the header may hold this much beyond its per-tensor budget
(metadata keys, padding)."""
HEADER_BYTES_PER_TENSOR = 1024
"""...plus this much, and 8 bytes per character of the name, for each expected tensor: up to
three entries (idx, q8/val, scale) with 8-dimension shapes and offsets, and its shape in
the metadata, take ~550 bytes plus 4 per name character."""
SAFETENSORS_DTYPES = {"F32": torch.float32, "I8": torch.int8, "I32": torch.int32}
"""The dtypes an update stores, by their safetensors names."""


@dataclass(frozen=True)
class CodecConfig:
    """How to encode one update (normally taken from the round's `TaskAssignment`)."""

    encoding: UpdateEncoding = UpdateEncoding.INT8
    top_k_fraction: float | None = None
    """Keep this fraction of entries per tensor (at least one); None keeps all."""

    def __post_init__(self) -> None:
        if self.top_k_fraction is not None and not 0.0 < self.top_k_fraction <= 1.0:
            raise ValueError(f"top_k_fraction must be in (0, 1], got {self.top_k_fraction}")


@dataclass(frozen=True)
class EncodedUpdate:
    """The body to send, and what it costs compared with dense fp32."""

    body: bytes
    encoding: UpdateEncoding
    top_k_fraction: float | None
    raw_bytes: int
    """Dense fp32 size of the tensors (4 bytes per element)."""

    @property
    def encoded_bytes(self) -> int:
        return len(self.body)

    @property
    def compression_ratio(self) -> float:
        """raw_bytes / encoded_bytes (larger is better)."""
        return self.raw_bytes / max(1, self.encoded_bytes)


def tensor_shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Names -> shapes, the spec a receiver checks an update against."""
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def _rows(shape: tuple[int, ...]) -> int:
    """Rows of the matrix view: the first dimension of a matrix, 1 for a vector/scalar."""
    return shape[0] if len(shape) >= 2 else 1


def _scale_groups(rows: int, cols: int) -> tuple[int, bool]:
    """(number of scales, per_column). One scale per row, or per column when the matrix is
    taller than wide: a LoRA B factor is [out, r], and per-row scales there would cost 4/r
    bytes per entry (half the int8 saving at r=8); this way every factor has r scales."""
    per_column = rows > cols
    return (cols if per_column else rows), per_column


def _round_to_int8(scaled: torch.Tensor) -> torch.Tensor:
    """Round half away from zero into int8 [-127, 127].

    Not `torch.round`: on a 2-core box whose other core is busy, its parallel kernel ran
    ~50x slower than this add + truncating cast (measured: 1.4 s vs 0.05 s for the
    SmolLM2-135M r=16 update)."""
    shifted = scaled + 0.5 * torch.sign(scaled)
    return shifted.clamp_(-127.0, 127.0).to(torch.int8)


def _quantize_groups(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """matrix [rows, cols] fp32 -> (q [rows, cols] int8, scale [groups] fp32)."""
    _, per_column = _scale_groups(*matrix.shape)
    dim = 0 if per_column else 1
    scale = matrix.abs().amax(dim=dim) / 127.0  # [groups]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # [groups]
    divisor = safe[None, :] if per_column else safe[:, None]  # broadcast over [rows, cols]
    q = _round_to_int8(matrix / divisor)  # [rows, cols]
    return q, scale.to(torch.float32)


def _group_of(index: torch.Tensor, cols: int, per_column: bool) -> torch.Tensor:
    """Scale group of each flat index [k] (its row, or its column)."""
    cols = max(1, cols)
    return index % cols if per_column else index // cols


def encode_update(tensors: Mapping[str, torch.Tensor], config: CodecConfig) -> EncodedUpdate:
    """Encode fp32 (or fp16/bf16) delta tensors; raises `CodecError` on non-finite input."""
    out: dict[str, torch.Tensor] = {}
    raw_bytes = 0
    # Sorted for a stable tensor layout. (The safetensors metadata header is not ordered
    # stably, so equal tensors can still encode to different bytes: whoever names a body by
    # its sha256 must keep the bytes, not re-encode.)
    for name, tensor in sorted(tensors.items()):
        if SEPARATOR in name or not name:
            raise CodecError(f"tensor name {name!r} is empty or contains {SEPARATOR!r}")
        x = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not bool(torch.isfinite(x).all()):
            raise CodecError(f"tensor {name!r} holds NaN/Inf; refusing to send it")
        raw_bytes += 4 * x.numel()
        rows = _rows(tuple(x.shape))
        matrix = x.reshape(rows, -1)  # [rows, cols]
        if config.top_k_fraction is None:
            if config.encoding is UpdateEncoding.FP32:
                out[name] = x
            else:
                q, scale = _quantize_groups(matrix)
                out[name + SEPARATOR + "q8"] = q
                out[name + SEPARATOR + "scale"] = scale
            continue
        flat = x.reshape(-1)  # [numel]
        k = max(1, math.ceil(config.top_k_fraction * flat.numel()))
        index = torch.topk(flat.abs(), k, sorted=False).indices.sort().values  # [k]
        values = flat[index]  # [k]
        out[name + SEPARATOR + "idx"] = index.to(torch.int32)
        if config.encoding is UpdateEncoding.FP32:
            out[name + SEPARATOR + "val"] = values
            continue
        cols = matrix.shape[1]
        groups, per_column = _scale_groups(rows, cols)
        group_of = _group_of(index, cols, per_column)  # [k]
        scale = torch.zeros(groups, dtype=torch.float32).scatter_reduce_(
            0, group_of, values.abs() / 127.0, reduce="amax"
        )  # [groups]
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # [groups]
        q = _round_to_int8(values / safe[group_of])  # [k]
        out[name + SEPARATOR + "q8"] = q
        out[name + SEPARATOR + "scale"] = scale
    metadata = {
        "format": CODEC_FORMAT,
        "codec_version": CODEC_VERSION,
        "encoding": config.encoding.value,
        "top_k_fraction": "" if config.top_k_fraction is None else repr(config.top_k_fraction),
        "shapes": json.dumps(tensor_shapes(tensors), sort_keys=True),
    }
    body = safetensors_save(out, metadata=metadata)
    return EncodedUpdate(body, config.encoding, config.top_k_fraction, raw_bytes)


# ----------------------------------------------------------------------------- decoding


def header_budget(
    expected_shapes: Mapping[str, tuple[int, ...]], max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> int:
    """The most header bytes an honest body of `expected_shapes` can need (capped)."""
    need = HEADER_BYTES_BASE + sum(
        HEADER_BYTES_PER_TENSOR + 8 * len(name) for name in expected_shapes
    )
    return min(max_header_bytes, need)


def _load(body: bytes) -> dict[str, torch.Tensor]:
    try:
        return safetensors_load(body)
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError) as error:
        raise CodecError(f"update body is not a valid safetensors file: {error}") from error


def _parse_shapes(text: str) -> dict[str, tuple[int, ...]]:
    shapes = loads_unique(text, "metadata 'shapes'")
    if not isinstance(shapes, dict):
        raise CodecError("metadata 'shapes' must map names to shapes")
    parsed: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        valid = isinstance(shape, list) and len(shape) <= 8
        valid = valid and all(type(d) is int and 0 <= d < 2**31 for d in shape)
        if not valid:
            raise CodecError(f"metadata shape of {name!r:.80} is invalid: {shape!r:.80}")
        parsed[name] = tuple(shape)
    return parsed


def _expect(
    tensor: torch.Tensor | None, key: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    if tensor is None:
        raise CodecError(f"update lacks tensor {key!r}")
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        raise CodecError(
            f"{key!r}: expected {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}"
        )
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise CodecError(f"{key!r} holds NaN/Inf; update refused")
    return tensor


def _finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A dequantized tensor, refused when finite codes times finite scales overflowed."""
    if not bool(torch.isfinite(tensor).all()):
        raise CodecError(f"{name!r} dequantizes to NaN/Inf (scale too large); update refused")
    return tensor


def _layout(
    name: str, shape: tuple[int, ...], encoding: UpdateEncoding, sparse: bool, k: int
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Stored key -> (safetensors dtype, shape) that tensor `name` must be stored as; `k`
    is the number of kept entries of a top-k tensor."""
    numel = math.prod(shape)
    rows = _rows(shape)
    cols = numel // rows if rows else 0
    groups, _ = _scale_groups(rows, cols)
    key = name + SEPARATOR
    if not sparse:
        if encoding is UpdateEncoding.FP32:
            return {name: ("F32", shape)}
        return {key + "q8": ("I8", (rows, cols)), key + "scale": ("F32", (groups,))}
    if encoding is UpdateEncoding.FP32:
        return {key + "idx": ("I32", (k,)), key + "val": ("F32", (k,))}
    return {key + "idx": ("I32", (k,)), key + "q8": ("I8", (k,)), key + "scale": ("F32", (groups,))}


def _check_header(
    entries: Mapping[str, TensorEntry],
    shapes: Mapping[str, tuple[int, ...]],
    encoding: UpdateEncoding,
    sparse: bool,
) -> None:
    """The header must declare exactly the tensors `shapes` imply, with their dtypes and
    shapes, before any of them is loaded."""
    layouts: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        k = 0
        if sparse:
            index = entries.get(name + SEPARATOR + "idx")
            if index is None or index.dtype != "I32" or len(index.shape) != 1:
                raise CodecError(f"{name}{SEPARATOR}idx must be a 1-D int32 tensor")
            k, numel = index.shape[0], math.prod(shape)
            if not 1 <= k <= numel:
                raise CodecError(
                    f"{name}{SEPARATOR}idx holds {k} indices for a tensor of {numel} elements"
                )
        layouts.update(_layout(name, shape, encoding, sparse, k))
    if set(entries) != set(layouts):
        extra = sorted(set(entries) - set(layouts))[:3]
        missing = sorted(set(layouts) - set(entries))[:3]
        raise CodecError(
            f"update tensor names wrong: unexpected {extra}, missing {missing} "
            f"({len(entries)} stored, {len(layouts)} expected)"
        )
    for key, (dtype, shape) in layouts.items():
        entry = entries[key]
        if entry.dtype != dtype or entry.shape != shape:
            got = SAFETENSORS_DTYPES.get(entry.dtype, entry.dtype)
            raise CodecError(
                f"{key!r}: expected {SAFETENSORS_DTYPES[dtype]} {list(shape)}, got {got} "
                f"{list(entry.shape)} (declared in the header; nothing was loaded)"
            )


def decode_update(
    body: bytes,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> dict[str, torch.Tensor]:
    """Decode to dense fp32 tensors, checked against `expected_shapes` when given.

    The coordinator passes the shapes it expects for the device's plan (rank); without them
    the body's own declared shapes are used, bounded by `max_elements`. The header is
    checked first, bounded by `max_header_bytes` (and, with expected shapes, by what those
    tensors can need, `header_budget`): no tensor is built for a body whose header does not
    declare exactly the expected tensors."""
    if not isinstance(body, (bytes, bytearray)):
        raise CodecError(f"update body must be bytes, got {type(body).__name__}")
    body = bytes(body)
    expected = None
    budget = max_header_bytes
    if expected_shapes is not None:
        expected = {name: tuple(shape) for name, shape in expected_shapes.items()}
        budget = header_budget(expected, max_header_bytes)
    header = read_header(
        body, budget, None if expected is None else STORED_PER_TENSOR * len(expected)
    )
    metadata = header.metadata
    if not metadata:
        raise CodecError("update body has no schoolfl metadata; not produced by encode_update")
    if metadata.get("format") != CODEC_FORMAT or metadata.get("codec_version") != CODEC_VERSION:
        raise CodecError(
            f"unsupported update format {metadata.get('format')!r:.40} version "
            f"{metadata.get('codec_version')!r:.20}; expected {CODEC_FORMAT} {CODEC_VERSION}"
        )
    try:
        encoding = UpdateEncoding(metadata.get("encoding"))
    except ValueError as error:
        raise CodecError(f"unknown encoding {metadata.get('encoding')!r:.40}") from error
    sparse = metadata.get("top_k_fraction", "") != ""
    shapes = _parse_shapes(str(metadata.get("shapes", "")))
    if expected is not None and shapes != expected:
        wrong = (
            sorted(set(shapes) ^ set(expected))[:5]
            or [name for name in shapes if shapes[name] != expected[name]][:5]
        )
        raise CodecError(f"update tensors differ from the expected names/shapes: {wrong}")
    total = sum(math.prod(shape) for shape in shapes.values())
    if total > max_elements:
        raise LimitExceededError(
            f"update declares {total} elements > max_elements={max_elements}; refused"
        )
    if any(SEPARATOR in name or not name for name in shapes):
        raise CodecError(f"metadata names a tensor that is empty or contains {SEPARATOR!r}")
    _check_header(header.tensors, shapes, encoding, sparse)
    stored = _load(body)
    return {
        name: _decode_one(name, shape, stored, encoding, sparse) for name, shape in shapes.items()
    }


def _decode_one(
    name: str,
    shape: tuple[int, ...],
    stored: Mapping[str, torch.Tensor],
    encoding: UpdateEncoding,
    sparse: bool,
) -> torch.Tensor:
    numel = math.prod(shape)
    rows = _rows(shape)
    cols = numel // rows if rows else 0
    groups, per_column = _scale_groups(rows, cols)
    key = name + SEPARATOR
    if not sparse:
        if encoding is UpdateEncoding.FP32:
            return _expect(stored.get(name), name, torch.float32, shape).clone()
        q = _expect(stored.get(key + "q8"), key + "q8", torch.int8, (rows, cols))
        scale = _expect(stored.get(key + "scale"), key + "scale", torch.float32, (groups,))
        if bool((scale < 0).any()):
            raise CodecError(f"{key}scale holds negative scales")
        factor = scale[None, :] if per_column else scale[:, None]  # broadcast over [rows, cols]
        return _finite(name, (q.to(torch.float32) * factor).reshape(shape))
    index = stored.get(key + "idx")
    if index is None or index.dtype != torch.int32 or index.dim() != 1:
        raise CodecError(f"{key}idx must be a 1-D int32 tensor")
    k = index.shape[0]
    if not 1 <= k <= numel:
        raise CodecError(f"{key}idx holds {k} indices for a tensor of {numel} elements")
    index64 = index.to(torch.int64)  # [k]
    if bool((index64 < 0).any()) or bool((index64 >= numel).any()):
        raise CodecError(f"{key}idx has indices outside 0..{numel - 1}")
    if k > 1 and not bool((index64[1:] > index64[:-1]).all()):
        raise CodecError(f"{key}idx must be strictly increasing")
    if encoding is UpdateEncoding.FP32:
        values = _expect(stored.get(key + "val"), key + "val", torch.float32, (k,))
    else:
        q = _expect(stored.get(key + "q8"), key + "q8", torch.int8, (k,))
        scale = _expect(stored.get(key + "scale"), key + "scale", torch.float32, (groups,))
        if bool((scale < 0).any()):
            raise CodecError(f"{key}scale holds negative scales")
        values = _finite(name, q.to(torch.float32) * scale[_group_of(index64, cols, per_column)])
    dense = torch.zeros(numel, dtype=torch.float32)  # [numel]
    dense[index64] = values
    return dense.reshape(shape)
