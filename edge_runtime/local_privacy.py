"""Client-level differential privacy on the device: clip the update, and under local DP
noise it, before it is encoded and leaves the device.

The numerics (norm, clipping, noise) are `quantization.adapter_deltas`, which the coordinator
uses too.

Why the device clips even under central DP: clipping bounds what one device contributes
(the sensitivity the accountant assumes); doing it before upload also bounds what a
misbehaving network path or a curious broker could learn from an oversized update.
"""

from __future__ import annotations

import torch

from edge_runtime.wire import DevicePrivacy, PrivacyMode
from quantization.adapter_deltas import TensorMap, add_gaussian_noise, clip_update, secure_generator


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
