"""FedAvg as a running sum: each update is folded in when it arrives, so closing a round
costs the same for 5 updates as for 500, and memory is one float64 accumulator per open
round instead of every decoded update at once.

The numerics are those of `coordinator.aggregation` (rank-sliced FedAvg with the norm
bound), reordered: the accumulator keeps the numerator sum_i w_i * padded(delta_i) per
tensor, the total weight and, per LoRA rank component k, the weight of the updates whose
rank exceeds k; the mean is divided out at close. The norm bound needs the round's median
norm, known only at close, so each update's norm is recorded at arrival and the few updates
above the limit are corrected at close by re-reading only their bodies (clip: subtract
(1 - scale) * w * delta; reject: subtract w * delta and w). Results equal the batch path's
(`make_aggregator(task).aggregate`) to float tolerance, not bit for bit: the batch path
divides each term before summing. DP-FedAvg keeps the batch path (coordinator.rounds).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from coordinator.aggregation import AggregationResult, NormBound, NormBoundMode
from quantization.adapter_deltas import TensorMap, update_l2_norm
from quantization.lora_ranks import adapter_rank, rank_axis

logger = logging.getLogger(__name__)

CLIP_SHAVE = 1.0 - 2.0**-22
"""`clip_update`'s safety factor on the scale, kept so both paths clip to the same norm."""


@dataclass(frozen=True)
class Contribution:
    """What the running sum remembers of one folded update (not the update itself)."""

    weight: int
    """Its FedAvg weight: the trusted sample count (an int, so subtracting it is exact)."""
    rank: int
    """Its LoRA rank (the global rank for a full-rank update)."""
    norm: float
    """Its L2 norm as sent (what the norm bound compares)."""


class RunningAggregate:
    """The running rank-sliced FedAvg sum of one open round."""

    def __init__(self, reference: TensorMap) -> None:
        self.shapes = {name: tuple(tensor.shape) for name, tensor in reference.items()}
        self.full_rank = adapter_rank(reference)
        self.numerator = {
            name: torch.zeros(shape, dtype=torch.float64) for name, shape in self.shapes.items()
        }
        self.total_weight = 0
        self.component_weights = [0] * self.full_rank
        """Per rank component k: the summed weight of the updates of rank above k."""
        self.contributions: dict[str, Contribution] = {}
        self.refused: dict[str, str] = {}
        """Device id -> why its stored update could not be folded (found on a rebuild)."""

    @property
    def devices(self) -> set[str]:
        return set(self.contributions) | set(self.refused)

    def add(self, device_id: str, delta: TensorMap, weight: int, rank: int) -> None:
        """Fold one validated update (`update_problem` found nothing) into the sum."""
        if device_id in self.contributions:
            raise ValueError(f"{device_id!r} is already in the running aggregate")
        self._accumulate(delta, float(weight), rank)
        self.total_weight += weight
        for k in range(rank):
            self.component_weights[k] += weight
        self.contributions[device_id] = Contribution(weight, rank, update_l2_norm(delta))

    def _accumulate(self, delta: TensorMap, factor: float, rank: int) -> None:
        """numerator += factor * padded(delta), without materialising the padding."""
        for name, tensor in delta.items():
            target = self.numerator[name]
            axis = rank_axis(name)
            if axis is not None and rank < self.full_rank:
                target = target.narrow(axis, 0, rank)  # [.., r, ..]: the components it has
            target.add_(tensor, alpha=factor)

    def _withdraw(self, device_id: str, delta: TensorMap, fraction: float) -> None:
        """Take `fraction` of a folded update's contribution back out of the numerator."""
        contribution = self.contributions[device_id]
        self._accumulate(delta, -fraction * contribution.weight, contribution.rank)

    def _drop_weight(self, device_id: str) -> None:
        contribution = self.contributions.pop(device_id)
        self.total_weight -= contribution.weight
        for k in range(contribution.rank):
            self.component_weights[k] -= contribution.weight

    def mean(self) -> dict[str, torch.Tensor]:
        """The rank-sliced weighted mean of what the sum holds now (float32)."""
        if self.total_weight <= 0:
            raise ValueError("the running aggregate holds no update")
        per_component = torch.tensor(self.component_weights, dtype=torch.float64)  # [R]
        result: dict[str, torch.Tensor] = {}
        for name, total in self.numerator.items():
            axis = rank_axis(name)
            if axis is None:
                result[name] = (total / self.total_weight).float()
                continue
            view = [1] * total.dim()
            view[axis] = self.full_rank
            weights = per_component.view(view)
            divided = total / weights.clamp(min=1.0)  # a component nobody reached stays 0
            result[name] = torch.where(weights > 0, divided, torch.zeros(())).float()
        return result

    def finish(
        self,
        norm_bound: NormBound | None,
        left_out: Iterable[str],
        body_of: Callable[[str], TensorMap],
    ) -> AggregationResult:
        """Close the sum: take out the updates of `left_out` devices (schools below their
        minimum aggregate size), apply the norm bound over the others, and return what
        `FedAvg.aggregate` returns for the same updates. `body_of(device)` decodes one
        stored update again; it is called only for the updates corrected here.

        The accumulator is changed in place: finish a round once."""
        for device_id in sorted(set(left_out) & set(self.contributions)):
            self._withdraw(device_id, body_of(device_id), 1.0)
            self._drop_weight(device_id)
        rejected = dict(self.refused)
        for device_id, reason in rejected.items():
            logger.warning("update from %s refused: %s", device_id, reason)
        norms = [c.norm for c in self.contributions.values()]
        limit = norm_bound.limit(norms) if norm_bound is not None else math.inf
        clipped: list[str] = []
        for device_id in sorted(self.contributions):
            norm = self.contributions[device_id].norm
            if norm_bound is None or not norm > limit:
                continue
            delta = body_of(device_id)
            if norm_bound.mode is NormBoundMode.REJECT:
                self._withdraw(device_id, delta, 1.0)
                self._drop_weight(device_id)
                rejected[device_id] = f"L2 norm {norm:.4g} exceeds bound {limit:.4g}"
                logger.warning("update from %s refused: %s", device_id, rejected[device_id])
                continue
            self._withdraw(device_id, delta, 1.0 - limit / norm * CLIP_SHAVE)
            clipped.append(device_id)
        if not self.contributions:
            return AggregationResult(delta={}, accepted_devices=(), rejected_devices=rejected)
        return AggregationResult(
            delta=self.mean(),
            accepted_devices=tuple(sorted(self.contributions)),
            rejected_devices=rejected,
            clipped_devices=tuple(clipped),
            total_samples=self.total_weight,
        )
