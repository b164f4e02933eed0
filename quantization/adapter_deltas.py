"""Adapter-delta numerics both daemons share: L2 norm, clipping, Gaussian noise.

The agent clips (and under local DP noises) its update before upload
(`edge_runtime.local_privacy`); the coordinator re-clips every update because it cannot trust
a device to have done so, and adds central noise with the same functions
(`coordinator.aggregation`, `coordinator.privacy`). They live here, below both daemons, so
neither imports the other (DESIGN.md, dependency direction).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

TensorMap = Mapping[str, torch.Tensor]


def update_l2_norm(delta: TensorMap) -> float:
    """Global L2 norm over every tensor of an update (float64 accumulation)."""
    return math.sqrt(sum(float(tensor.double().pow(2).sum()) for tensor in delta.values()))


def clip_update(delta: TensorMap, clip_norm: float) -> dict[str, torch.Tensor]:
    """`delta` scaled by min(1, clip_norm / ||delta||), as float32.

    The scale is computed in float64 and shaved by 2^-22 (about 2.4e-7, four times the
    largest relative error of rounding to float32, 2^-24) so float32 rounding can never
    leave the clipped norm above the bound (the accountant's sensitivity), while the norm
    stays within 1e-6 of it. Whether an update was clipped: `update_l2_norm(delta) >
    clip_norm`."""
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a positive number, got {clip_norm!r}")
    norm = update_l2_norm(delta)
    if norm <= clip_norm:
        return {name: tensor.float() for name, tensor in delta.items()}
    scale = clip_norm / norm * (1.0 - 2.0**-22)
    return {name: (tensor.double() * scale).float() for name, tensor in delta.items()}


def add_gaussian_noise(
    delta: TensorMap, standard_deviation: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """`delta` + N(0, standard_deviation^2) independently on every coordinate.

    The generator is explicit so tests can fix the seed; in service it is seeded from the
    operating system's entropy (`secure_generator`)."""
    if not (math.isfinite(standard_deviation) and standard_deviation >= 0):
        raise ValueError(f"standard_deviation must be >= 0, got {standard_deviation!r}")
    noised: dict[str, torch.Tensor] = {}
    for name, tensor in delta.items():
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)  # same shape
        noised[name] = (tensor.double() + noise * standard_deviation).float()
    return noised


def secure_generator() -> torch.Generator:
    """A CPU generator seeded from os.urandom: noise a reader cannot predict or replay."""
    import secrets

    generator = torch.Generator()
    generator.manual_seed(secrets.randbits(63))
    return generator
