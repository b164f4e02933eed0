"""Aggregation of adapter updates: one small interface, one class per strategy.

An update is the *delta* between a device's trained adapter and the global adapter it
started from, as named tensors. The numerics are free functions so tests (and later
strategies such as secure aggregation) can call them without a coordinator. Validation
happens before anything touches the running sum: a non-finite, misnamed or misshapen update
is refused with a reason, never averaged (DESIGN.md invariant 5).
"""

from __future__ import annotations

import enum
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

TensorMap = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """One device's contribution to a round."""

    device_id: str
    delta: TensorMap
    num_samples: int
    num_steps: int

    def __post_init__(self) -> None:
        if self.num_samples <= 0:
            raise ValueError(
                f"num_samples must be positive for device {self.device_id!r}, "
                f"got {self.num_samples}"
            )
        if self.num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {self.num_steps}")


@dataclass(frozen=True)
class AggregationResult:
    """The new global delta and an account of what went into it."""

    delta: dict[str, torch.Tensor]
    accepted_devices: tuple[str, ...]
    rejected_devices: dict[str, str] = field(default_factory=dict)
    """device id -> reason the update was refused."""
    clipped_devices: tuple[str, ...] = ()
    total_samples: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.accepted_devices


class NormBoundMode(enum.Enum):
    CLIP = "clip"
    """Scale an update whose L2 norm exceeds the bound down to the bound."""
    REJECT = "reject"
    """Refuse an update whose L2 norm exceeds the bound."""


@dataclass(frozen=True)
class NormBound:
    """Guard against outliers: poisoned, diverged or buggy devices."""

    max_l2_norm: float
    mode: NormBoundMode = NormBoundMode.CLIP

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_l2_norm) and self.max_l2_norm > 0):
            raise ValueError(f"max_l2_norm must be a positive number, got {self.max_l2_norm}")


# ---------------------------------------------------------------------------------------
# Numerics


def update_problem(delta: TensorMap, reference: TensorMap) -> str | None:
    """Why `delta` cannot be aggregated against `reference` (names, shapes, dtype, finite);
    None when it can."""
    missing = sorted(set(reference) - set(delta))
    unexpected = sorted(set(delta) - set(reference))
    if missing:
        return f"missing tensors {missing[:3]}{'...' if len(missing) > 3 else ''}"
    if unexpected:
        return f"unexpected tensors {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
    for name, expected in reference.items():
        tensor = delta[name]
        if tuple(tensor.shape) != tuple(expected.shape):
            return (
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected.shape)}"
            )
        if not tensor.is_floating_point():
            return f"tensor {name!r} has dtype {tensor.dtype}, expected a floating dtype"
        if not bool(torch.isfinite(tensor).all()):
            return f"tensor {name!r} contains NaN or Inf"
    return None


def l2_norm(delta: TensorMap) -> float:
    """Global L2 norm over all tensors of an update (float64 accumulation)."""
    total = 0.0
    for tensor in delta.values():
        total += float(tensor.double().pow(2).sum())
    return math.sqrt(total)


def clip_to_norm(delta: TensorMap, max_l2_norm: float) -> tuple[dict[str, torch.Tensor], bool]:
    """Scale `delta` so its L2 norm is at most `max_l2_norm`; says whether it scaled."""
    norm = l2_norm(delta)
    if norm <= max_l2_norm:
        return {name: tensor.float() for name, tensor in delta.items()}, False
    scale = max_l2_norm / norm
    return {name: tensor.float() * scale for name, tensor in delta.items()}, True


def weighted_mean(deltas: Sequence[TensorMap], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Sum_i w_i * delta_i / Sum_i w_i, tensor by tensor, accumulated in float64."""
    if not deltas:
        raise ValueError("weighted_mean needs at least one update")
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} updates but {len(weights)} weights")
    total_weight = float(sum(weights))
    if total_weight <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total_weight}")
    result: dict[str, torch.Tensor] = {}
    for name in deltas[0]:
        accumulator = torch.zeros(deltas[0][name].shape, dtype=torch.float64)
        for delta, weight in zip(deltas, weights, strict=True):
            accumulator += delta[name].double() * (weight / total_weight)
        result[name] = accumulator.float()
    return result


def apply_delta(global_state: TensorMap, delta: TensorMap) -> dict[str, torch.Tensor]:
    """New global adapter = old + delta; refuses a non-finite result (safe merge)."""
    merged = {name: global_state[name].float() + delta[name].float() for name in global_state}
    for name, tensor in merged.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"merged tensor {name!r} is not finite; aggregate refused")
    return merged


# ---------------------------------------------------------------------------------------
# Strategies


class Aggregator(ABC):
    """Turns a round's updates into one global delta."""

    @abstractmethod
    def aggregate(self, updates: Sequence[ClientUpdate], reference: TensorMap) -> AggregationResult:
        """Combine the round's updates.

        Parameters
        ----------
        updates
            The updates received for the round, at most one per device.
        reference
            The global adapter the round started from: fixes names and shapes.

        Returns
        -------
        AggregationResult
            The delta to add to the global adapter, with every refused update and its
            reason. An empty result (no accepted update) must leave the global unchanged.
        """


class FedAvg(Aggregator):
    """Sample-weighted mean of the deltas (McMahan et al. 2017), with an optional L2
    norm bound that clips or rejects outliers before they enter the mean."""

    def __init__(self, norm_bound: NormBound | None = None) -> None:
        self.norm_bound = norm_bound

    def aggregate(self, updates: Sequence[ClientUpdate], reference: TensorMap) -> AggregationResult:
        accepted: list[ClientUpdate] = []
        accepted_deltas: list[dict[str, torch.Tensor]] = []
        rejected: dict[str, str] = {}
        clipped: list[str] = []
        seen_devices: set[str] = set()
        for update in updates:
            if update.device_id in seen_devices:
                rejected[update.device_id] = "more than one update from this device"
                continue
            seen_devices.add(update.device_id)
            problem = update_problem(update.delta, reference)
            if problem is not None:
                rejected[update.device_id] = problem
                continue
            delta = {name: tensor.float() for name, tensor in update.delta.items()}
            if self.norm_bound is not None:
                norm = l2_norm(delta)
                if norm > self.norm_bound.max_l2_norm:
                    if self.norm_bound.mode is NormBoundMode.REJECT:
                        rejected[update.device_id] = (
                            f"L2 norm {norm:.4g} exceeds bound {self.norm_bound.max_l2_norm:.4g}"
                        )
                        continue
                    delta, _ = clip_to_norm(delta, self.norm_bound.max_l2_norm)
                    clipped.append(update.device_id)
            accepted.append(update)
            accepted_deltas.append(delta)
        for device_id, reason in rejected.items():
            logger.warning("update from %s refused: %s", device_id, reason)
        if not accepted:
            return AggregationResult(delta={}, accepted_devices=(), rejected_devices=rejected)
        mean = weighted_mean(accepted_deltas, [u.num_samples for u in accepted])
        return AggregationResult(
            delta=mean,
            accepted_devices=tuple(u.device_id for u in accepted),
            rejected_devices=rejected,
            clipped_devices=tuple(clipped),
            total_samples=sum(u.num_samples for u in accepted),
        )
