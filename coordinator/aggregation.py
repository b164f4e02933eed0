"""Aggregation of adapter updates: one small interface, one class per strategy.

An update is the *delta* between a device's trained adapter and the global adapter it
started from, as named tensors. The numerics are free functions so tests (and later
strategies such as secure aggregation) can call them without a coordinator. Validation
happens before anything touches the running sum: a non-finite, misnamed or misshapen update
is refused with a reason, never averaged (DESIGN.md invariant 5).

Updates of different LoRA ranks (slow devices get a smaller rank r than the global R) are
combined by zero padding ("rank-sliced" averaging, as in HeteroLoRA): a rank-r delta is
padded with zeros to rank R, and component k of every LoRA factor (lora_A row k, lora_B
column k) is averaged over only the updates whose rank exceeds k, with the weights
renormalised over those; tensors without a rank axis (the classification head) are averaged
over all updates. Why zero padding and not SVD re-factorisation (FlexLoRA): a rank-r device
starts from the first r components of the global adapter (`truncate_to_rank`), so its delta
lives in the same basis as the global factors and can be added to them component by
component; padding costs nothing and is exactly FedAvg when every rank is equal. SVD would
need the full product B @ A of every layer from every device, and re-factorising the average
changes the basis every round, so the components a small-rank device holds would not be the
ones it trained. What we give up: components r..R-1 learn only from devices of rank above r,
so with few high-rank devices the high components learn slowly (and from a skewed subset of
schools); the product of averaged factors is also not the average of the products, as in
any factor-wise FedAvg of LoRA.
"""

from __future__ import annotations

import enum
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from quantization.adapter_deltas import TensorMap, clip_update, update_l2_norm
from quantization.lora_ranks import adapter_rank, pad_to_shapes, rank_axis, truncated_shapes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientUpdate:
    """One device's contribution to a round."""

    device_id: str
    delta: TensorMap
    num_samples: int
    num_steps: int
    rank: int | None = None
    """LoRA rank of `delta` when the device's plan gave it a smaller rank than the global
    adapter's; None = the global rank."""

    def __post_init__(self) -> None:
        if self.rank is not None and (
            not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1
        ):
            raise ValueError(
                f"rank must be a positive int or None for device {self.device_id!r}, "
                f"got {self.rank!r}"
            )
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
    """Guard against outliers: poisoned, diverged or buggy devices.

    Two bounds, either or both: an absolute L2 norm, and a multiple of the round's median
    update norm. The relative one needs no tuning per model and holds against a minority:
    the median of the round's norms is an honest device's norm as long as fewer than half
    the updates are hostile (the lower median, so with two updates it is the smaller)."""

    max_l2_norm: float = 0.0
    """Absolute bound; 0 = none."""
    mode: NormBoundMode = NormBoundMode.CLIP
    median_multiple: float = 0.0
    """Bound at this multiple of the lower median norm of the round's updates; 0 = none."""

    def __post_init__(self) -> None:
        for name in ("max_l2_norm", "median_multiple"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value}")
        if self.max_l2_norm == 0 and self.median_multiple == 0:
            raise ValueError("a NormBound needs max_l2_norm or median_multiple above 0")

    def limit(self, norms: Sequence[float]) -> float:
        """The bound for a round whose well-formed updates have these L2 norms."""
        bounds = [self.max_l2_norm] if self.max_l2_norm > 0 else []
        if self.median_multiple > 0 and norms:
            lower_median = sorted(norms)[(len(norms) - 1) // 2]
            if lower_median > 0:  # all-zero updates: nothing to scale against
                bounds.append(self.median_multiple * lower_median)
        return min(bounds) if bounds else math.inf


# ---------------------------------------------------------------------------------------
# Numerics


def update_problem(delta: TensorMap, reference: TensorMap, rank: int | None = None) -> str | None:
    """Why `delta` cannot be aggregated against `reference` (names, rank, shapes, dtype,
    finite); None when it can.

    `rank` is the update's LoRA rank when its plan gave it a smaller one than the global
    adapter's (None = the reference's own shapes): its LoRA factors must then have the
    reference's shapes truncated to that rank.
    """
    missing = sorted(set(reference) - set(delta))
    unexpected = sorted(set(delta) - set(reference))
    if missing:
        return f"missing tensors {missing[:3]}{'...' if len(missing) > 3 else ''}"
    if unexpected:
        return f"unexpected tensors {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
    expected_shapes = {name: tuple(tensor.shape) for name, tensor in reference.items()}
    has_factors = any(rank_axis(name) is not None for name in reference)
    if rank is not None:
        if not has_factors:
            return f"a rank-{rank} update needs LoRA factors, the global adapter has none"
        full_rank = adapter_rank(reference)
        if not 1 <= rank <= full_rank:
            return (
                f"rank {rank} is outside 1..{full_rank} (the global adapter's rank); "
                "the plan that assigned it is wrong"
            )
        expected_shapes = truncated_shapes(expected_shapes, rank)
    if has_factors:
        try:
            delta_rank = adapter_rank(delta)
        except ValueError as error:
            return f"malformed LoRA update: {error}"
        expected_rank = adapter_rank(reference) if rank is None else rank
        if delta_rank != expected_rank:
            return f"update has LoRA rank {delta_rank}, its plan says rank {expected_rank}"
    for name, expected in expected_shapes.items():
        tensor = delta[name]
        if tuple(tensor.shape) != expected:
            return f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected}"
        if not tensor.is_floating_point():
            return f"tensor {name!r} has dtype {tensor.dtype}, expected a floating dtype"
        if not bool(torch.isfinite(tensor).all()):
            return f"tensor {name!r} contains NaN or Inf"
    return None


@dataclass(frozen=True)
class ScreenedUpdates:
    """A round's updates after the per-update checks, before anything is combined."""

    accepted: tuple[ClientUpdate, ...]
    deltas: tuple[dict[str, torch.Tensor], ...]
    """The float32 delta of each accepted update, clipped where the norm bound says so."""
    rejected: dict[str, str] = field(default_factory=dict)
    """device id -> reason the update was refused."""
    clipped: tuple[str, ...] = ()


def screen_updates(
    updates: Sequence[ClientUpdate], reference: TensorMap, norm_bound: NormBound | None = None
) -> ScreenedUpdates:
    """Check every update on its own: one per device, then `update_problem` (names, rank,
    shapes, dtype, finite), then the optional norm bound (clip with `clip_update`, or
    reject). Only the relative bound looks across updates, at their norms' median."""
    wellformed: list[ClientUpdate] = []
    rejected: dict[str, str] = {}
    seen_devices: set[str] = set()
    for update in updates:
        if update.device_id in seen_devices:
            rejected[update.device_id] = "more than one update from this device"
            continue
        seen_devices.add(update.device_id)
        problem = update_problem(update.delta, reference, update.rank)
        if problem is not None:
            rejected[update.device_id] = problem
            continue
        wellformed.append(update)
    norms = [update_l2_norm(u.delta) for u in wellformed] if norm_bound else []
    limit = norm_bound.limit(norms) if norm_bound else math.inf
    accepted: list[ClientUpdate] = []
    deltas: list[dict[str, torch.Tensor]] = []
    clipped: list[str] = []
    for index, update in enumerate(wellformed):
        delta = {name: tensor.float() for name, tensor in update.delta.items()}
        if norm_bound is not None and norms[index] > limit:
            if norm_bound.mode is NormBoundMode.REJECT:
                rejected[update.device_id] = f"L2 norm {norms[index]:.4g} exceeds bound {limit:.4g}"
                continue
            delta = clip_update(update.delta, limit)
            clipped.append(update.device_id)
        accepted.append(update)
        deltas.append(delta)
    return ScreenedUpdates(tuple(accepted), tuple(deltas), rejected, tuple(clipped))


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


def rank_weighted_mean(
    deltas: Sequence[TensorMap],
    weights: Sequence[float],
    ranks: Sequence[int | None],
    reference: TensorMap,
) -> dict[str, torch.Tensor]:
    """Weighted mean of updates of different LoRA ranks, by zero padding.

    Each delta is padded to the reference's shapes; component k of a LoRA factor is averaged
    over the updates whose rank exceeds k (weights renormalised over those), every other
    tensor over all updates. A component no update reaches stays zero. `ranks[i]` None means
    the reference's rank. With every rank equal this performs the same float64 operations
    as `weighted_mean`, in the same order, so it returns the same bits.
    """
    if not deltas:
        raise ValueError("rank_weighted_mean needs at least one update")
    if not len(deltas) == len(weights) == len(ranks):
        raise ValueError(f"{len(deltas)} updates, {len(weights)} weights, {len(ranks)} ranks")
    total_weight = float(sum(weights))
    if total_weight <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total_weight}")
    full_rank = adapter_rank(reference)
    effective = [full_rank if rank is None else rank for rank in ranks]
    if any(not 1 <= rank <= full_rank for rank in effective):
        raise ValueError(f"ranks {effective} must lie in 1..{full_rank}")
    component_weights = [
        float(sum(w for w, rank in zip(weights, effective, strict=True) if rank > k))
        for k in range(full_rank)
    ]
    shapes = {name: tuple(tensor.shape) for name, tensor in reference.items()}
    padded = [pad_to_shapes(delta, shapes) for delta in deltas]
    result: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        axis = rank_axis(name)
        accumulator = torch.zeros(shape, dtype=torch.float64)
        for delta, weight, rank in zip(padded, weights, effective, strict=True):
            if axis is None:
                accumulator += delta[name].double() * (weight / total_weight)
                continue
            scale = torch.tensor(  # [R]: this update's share of each rank component
                [
                    weight / component_weights[k] if k < rank and component_weights[k] > 0 else 0.0
                    for k in range(full_rank)
                ],
                dtype=torch.float64,
            )
            view = [1] * len(shape)
            view[axis] = full_rank
            accumulator += delta[name].double() * scale.view(view)
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
    norm bound that clips or rejects outliers before they enter the mean.

    Updates of a smaller LoRA rank are padded and averaged per rank component (see the
    module docstring); the norm bound applies to the update as sent.

    `aggregate` is a template: every update is screened the same way (`screen_updates`),
    then `combine` turns the accepted ones into the delta. A variant overrides only
    `combine`, as DP-FedAvg does (`coordinator.privacy.DpFedAvg`)."""

    def __init__(self, norm_bound: NormBound | None = None) -> None:
        self.norm_bound = norm_bound

    def aggregate(self, updates: Sequence[ClientUpdate], reference: TensorMap) -> AggregationResult:
        screened = screen_updates(updates, reference, self.norm_bound)
        for device_id, reason in screened.rejected.items():
            logger.warning("update from %s refused: %s", device_id, reason)
        if not screened.accepted:
            return AggregationResult(
                delta={}, accepted_devices=(), rejected_devices=screened.rejected
            )
        return AggregationResult(
            delta=self.combine(screened, reference),
            accepted_devices=tuple(u.device_id for u in screened.accepted),
            rejected_devices=screened.rejected,
            clipped_devices=screened.clipped,
            total_samples=sum(u.num_samples for u in screened.accepted),
        )

    def combine(self, screened: ScreenedUpdates, reference: TensorMap) -> dict[str, torch.Tensor]:
        """The global delta from the round's screened updates.

        Parameters
        ----------
        screened
            The accepted updates (at least one) and their float32, bounded deltas.
        reference
            The global adapter the round started from: fixes names, shapes and rank.

        Returns
        -------
        dict[str, torch.Tensor]
            The delta to add to the global adapter, with the reference's names and shapes.
        """
        weights = [u.num_samples for u in screened.accepted]
        ranks = [u.rank for u in screened.accepted]
        if any(rank is not None for rank in ranks):  # full rank stated explicitly = None
            full_rank = adapter_rank(reference)
            ranks = [None if rank == full_rank else rank for rank in ranks]
        if all(rank is None for rank in ranks):
            return weighted_mean(screened.deltas, weights)
        return rank_weighted_mean(screened.deltas, weights, ranks, reference)
