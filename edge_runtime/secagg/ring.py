"""Fixed-point encoding of an adapter delta into the secure-aggregation ring Z_R, R = 2^k.

Why a ring at all: pairwise masks only cancel exactly in modular integer arithmetic (float
addition is not associative, and a float mask would leak through rounding), so each device
maps its delta to integers mod R before masking, and the coordinator maps the *sum* back.

Encoding of one coordinate x (B = `clip_bound`, m = `max_inputs`):

    q_max = floor((R - 1) / m)            # so that a sum of m codes never wraps around R
    scale = q_max / (2 B)                 # codes per unit of the delta
    q     = round((clip(x, -B, B) + B) * scale)   in [0, q_max]

The decoder of a sum of n <= m codes subtracts the n offsets: sum_x = sum_q / scale - n B.
That is why it must know n, the number of inputs actually summed.

Error per coordinate, per input (inputs inside [-B, B]):
    deterministic rounding: |error| <= 1 / (2 scale)
    stochastic rounding:    |error| <  1 / scale, and the error has zero mean
For a sum of n inputs the bound is n times that (`quantization_error_bound`). Coordinates
outside [-B, B] are clipped first; the clipping error is not bounded here, so choose B above
the clipping norm the trainer already applies. With R = 2^32, m = 1024 and B = 1 the step
1 / scale is about 4.8e-7.

Ring vectors are int64 torch tensors holding values in [0, R); every operation that can leave
that range is followed by `reduce_mod` (a bitwise AND, exact for negative values because
int64 is two's complement and R is a power of two). k <= 32, so a sum of up to 2^31 ring
values fits in int64 before reduction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from edge_runtime.wire import CodecError, SchemaError

MAX_RING_BITS = 32
MIN_RING_BITS = 8


@dataclass(frozen=True)
class QuantizationConfig:
    """How deltas are encoded into the ring; devices and coordinator must use the same one."""

    clip_bound: float = 1.0
    """B: each coordinate is clipped to [-B, B]. 1.0 is far above typical LoRA deltas."""
    ring_bits: int = 32
    """k: the ring is Z_{2^k}; a masked coordinate costs ceil(k / 8) bytes (4 bytes at 32)."""
    max_inputs: int = 1024
    """m: the most inputs a sum may hold without wrapping; more costs precision (log2 m bits)."""
    stochastic_rounding: bool = True
    """Unbiased rounding, so errors average out across devices instead of accumulating."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_bound) and self.clip_bound > 0):
            raise SchemaError(f"clip_bound must be a finite number > 0, got {self.clip_bound!r}")
        if not MIN_RING_BITS <= self.ring_bits <= MAX_RING_BITS:
            raise SchemaError(
                f"ring_bits must be in [{MIN_RING_BITS}, {MAX_RING_BITS}], got {self.ring_bits!r}"
            )
        if not 1 <= self.max_inputs < 2**self.ring_bits // 4:
            raise SchemaError(
                f"max_inputs must be in [1, 2^(ring_bits-2)), got {self.max_inputs!r}; "
                "raise ring_bits or lower max_inputs"
            )

    @property
    def modulus(self) -> int:
        """R = 2^k."""
        return 1 << self.ring_bits

    @property
    def max_code(self) -> int:
        """q_max: the largest code of one input."""
        return (self.modulus - 1) // self.max_inputs

    @property
    def scale(self) -> float:
        """Codes per unit of the delta."""
        return self.max_code / (2.0 * self.clip_bound)


def quantization_error_bound(config: QuantizationConfig, num_inputs: int) -> float:
    """Worst-case |decoded sum - true sum| per coordinate for unclipped inputs."""
    per_input = 1.0 / config.scale if config.stochastic_rounding else 0.5 / config.scale
    return num_inputs * per_input


def reduce_mod(vector: torch.Tensor, ring_bits: int) -> torch.Tensor:
    """Reduce an int64 tensor into [0, 2^k) (exact for negatives: two's complement AND)."""
    return torch.bitwise_and(vector, (1 << ring_bits) - 1)


@dataclass(frozen=True)
class TensorLayout:
    """Names and shapes of a delta in a fixed (sorted) order, to flatten and rebuild it."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        names = [name for name, _ in self.entries]
        if names != sorted(set(names)):
            raise SchemaError(f"layout names must be unique and sorted, got {names!r:.200}")
        for name, shape in self.entries:
            if any(not isinstance(size, int) or size < 0 for size in shape):
                raise SchemaError(f"layout shape of {name!r} must be sizes >= 0, got {shape!r}")

    @property
    def num_coordinates(self) -> int:
        return sum(math.prod(shape) for _, shape in self.entries)

    @classmethod
    def of(cls, delta: Mapping[str, torch.Tensor]) -> TensorLayout:
        return cls(tuple((name, tuple(delta[name].shape)) for name in sorted(delta)))


def flatten_delta(delta: Mapping[str, torch.Tensor], layout: TensorLayout) -> torch.Tensor:
    """Concatenate the tensors in layout order into one float64 vector; check names/shapes."""
    if sorted(delta) != [name for name, _ in layout.entries]:
        raise CodecError(
            f"delta names {sorted(delta)!r:.200} differ from the round's layout "
            f"{[name for name, _ in layout.entries]!r:.200}"
        )
    parts = []
    for name, shape in layout.entries:
        tensor = delta[name]
        if tuple(tensor.shape) != shape or not tensor.is_floating_point():
            raise CodecError(
                f"{name}: expected a float tensor of shape {shape}, got {tensor.dtype} "
                f"{tuple(tensor.shape)}"
            )
        parts.append(tensor.detach().to("cpu", torch.float64).reshape(-1))
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)  # (d,)
    if not torch.isfinite(flat).all():
        raise CodecError("delta holds NaN or Inf; refusing to encode it")
    return flat


def unflatten_vector(vector: torch.Tensor, layout: TensorLayout) -> dict[str, torch.Tensor]:
    """Split a flat vector back into named float32 tensors of the layout's shapes."""
    result: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in layout.entries:
        size = math.prod(shape)
        result[name] = vector[offset : offset + size].reshape(shape).to(torch.float32)
        offset += size
    return result


def quantize_delta(
    delta: Mapping[str, torch.Tensor],
    layout: TensorLayout,
    config: QuantizationConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Encode one delta as an int64 ring vector of codes in [0, q_max].

    `generator` only drives stochastic rounding (it protects nothing, so torch's RNG is fine
    here; the masks use a cryptographic PRG).
    """
    flat = flatten_delta(delta, layout)  # (d,) float64
    shifted = (flat.clamp(-config.clip_bound, config.clip_bound) + config.clip_bound) * (
        config.scale
    )  # (d,) in [0, q_max]
    if config.stochastic_rounding:
        noise = torch.rand(flat.shape, dtype=torch.float64, generator=generator)  # (d,)
        codes = torch.floor(shifted + noise)
    else:
        codes = torch.round(shifted)
    return codes.clamp(0, config.max_code).to(torch.int64)  # (d,)


def dequantize_sum(
    ring_sum: torch.Tensor, num_inputs: int, layout: TensorLayout, config: QuantizationConfig
) -> dict[str, torch.Tensor]:
    """Decode the ring sum of `num_inputs` encoded deltas into the float sum of the deltas."""
    if not 1 <= num_inputs <= config.max_inputs:
        raise CodecError(
            f"num_inputs must be in [1, max_inputs={config.max_inputs}], got {num_inputs}"
        )
    total = reduce_mod(ring_sum, config.ring_bits).to(torch.float64)  # (d,)
    flat = total / config.scale - num_inputs * config.clip_bound  # (d,)
    return unflatten_vector(flat, layout)


def ring_vector_to_bytes(vector: torch.Tensor) -> bytes:
    return vector.numpy().astype("<u4").tobytes()


def ring_vector_from_bytes(data: bytes, ring_bits: int) -> torch.Tensor:
    words = np.frombuffer(data, dtype="<u4").astype(np.int64)  # (d,)
    if ring_bits < 32 and words.size and int(words.max()) >= 1 << ring_bits:
        raise SchemaError(f"masked vector holds values outside the ring Z_2^{ring_bits}")
    return torch.from_numpy(words)
