"""`schoolfl profile plan`: which plans fit which devices, and how long their rounds take.

A planner asks "can the Pi 4s train SmolLM2 at rank 8?" before a term starts. This module
evaluates the cost model over a small grid of plans for every profile and returns typed rows;
the CLI only renders them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from device_profiles.cost_model import Prediction, predict
from device_profiles.plan import KNOWN_SCHEMES, TrainingPlan
from device_profiles.profile import DeviceProfile
from device_profiles.shapes import ModelShape


@dataclass(frozen=True)
class PlanRow:
    """One (profile, plan) evaluated."""

    profile: DeviceProfile
    plan: TrainingPlan
    prediction: Prediction


def plan_grid(
    schemes: Sequence[str] = KNOWN_SCHEMES,
    ranks: Sequence[int] = (8,),
    batches: Sequence[int] = (1, 4, 8),
    seq_lens: Sequence[int] = (128, 256),
    local_steps: int = 10,
) -> list[TrainingPlan]:
    return [
        TrainingPlan(
            scheme=scheme, rank=rank, batch_size=batch, seq_len=seq, local_steps=local_steps
        )
        for scheme, rank, batch, seq in itertools.product(schemes, ranks, batches, seq_lens)
    ]


def evaluate(
    profiles: Iterable[DeviceProfile], model_shape: ModelShape, plans: Sequence[TrainingPlan]
) -> list[PlanRow]:
    """Every plan on every profile, profiles in the given order, plans in grid order."""
    return [
        PlanRow(profile, plan, predict(profile, model_shape, plan))
        for profile in profiles
        for plan in plans
    ]
