"""Client-level differential privacy on the device: clip the update, and under local DP
noise it, before it is encoded and leaves the device.

These are the numerics both sides share: the coordinator (`coordinator.privacy`) re-clips
every update because it cannot trust a device to have done so, and adds the central noise
with the same function. They live on the agent side because the agent may not import the
coordinator (DESIGN.md, dependency direction).

Why the device clips even under central DP: clipping bounds what one device contributes
(the sensitivity the accountant assumes); doing it before upload also bounds what a
misbehaving network path or a curious broker could learn from an oversized update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from edge_runtime.messages import DevicePrivacy, PrivacyMode

TensorMap = Mapping[str, torch.Tensor]


def update_l2_norm(delta: TensorMap) -> float:
    """Global L2 norm over every tensor of an update (float64 accumulation)."""
    return math.sqrt(sum(float(tensor.double().pow(2).sum()) for tensor in delta.values()))


def clip_update(delta: TensorMap, clip_norm: float) -> dict[str, torch.Tensor]:
    """`delta` scaled by min(1, clip_norm / ||delta||), as float32.

    The scale is computed in float64 and shaved by one part in 10^6 so float32 rounding
    can never leave the clipped norm above the bound (the accountant's sensitivity)."""
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a positive number, got {clip_norm!r}")
    norm = update_l2_norm(delta)
    if norm <= clip_norm:
        return {name: tensor.float() for name, tensor in delta.items()}
    scale = clip_norm / norm * (1.0 - 1e-6)
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


def privatize_update(
    delta: TensorMap, privacy: DevicePrivacy, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """What the device sends under the task's policy: always clipped to `clip_norm`; under
    local DP also noised with N(0, (noise_multiplier * clip_norm)^2) per coordinate, the
    Gaussian mechanism for one device's update of sensitivity clip_norm."""
    clipped = clip_update(delta, privacy.clip_norm)
    if privacy.mode is not PrivacyMode.LOCAL or privacy.noise_multiplier == 0:
        return clipped
    return add_gaussian_noise(
        clipped,
        privacy.noise_multiplier * privacy.clip_norm,
        generator if generator is not None else secure_generator(),
    )
