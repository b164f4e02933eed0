"""`schoolfl profile plan`: which plans fit which devices, and how long their rounds take.

A planner asks "can the Pi 4s train SmolLM2 at rank 8?" before a term starts. This module
evaluates the cost model over a small grid of plans for every profile and returns typed rows;
the CLI only renders them.

The answer must be about the plans the trainer can run, not only the grid's literal ones: a
plan whose predicted peak does not fit gets the memory levers the coordinator's fitter pulls
(`device_profiles.memory_levers`: gradient checkpointing, then micro-batches), and the row
says which it uses. A shorter sequence, the fitter's next rung, is the grid's `seq` axis here.
A scheme the device cannot run is one `UnusableScheme` per (profile, scheme), not a row per
grid point: it is the same answer for every point.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from device_profiles.cost_model import Prediction, predict
from device_profiles.memory_levers import lever_note, with_memory_levers
from device_profiles.plan import DEFAULT_TARGET_MODULES, KNOWN_SCHEMES, TrainingPlan
from device_profiles.profile import DeviceProfile
from device_profiles.shapes import ModelShape
from device_profiles.transfer import RoundTransfer, SharedSchoolLink, round_transfer


@dataclass(frozen=True)
class PlanRow:
    """One grid plan on one profile, priced as the trainer would run it."""

    profile: DeviceProfile
    plan: TrainingPlan
    """The grid's plan, as asked."""
    priced_plan: TrainingPlan
    """What `prediction` prices: `plan` itself, or `plan` with the memory levers that make
    it fit (or, when none does, with every lever: the smallest peak there is)."""
    prediction: Prediction
    transfer: RoundTransfer

    @property
    def levers(self) -> str:
        """The memory levers `priced_plan` pulls, in words ('' for none)."""
        return lever_note(self.priced_plan)


@dataclass(frozen=True)
class UnusableScheme:
    """A scheme the profile cannot run: every grid plan of it has this one reason."""

    scheme: str
    reason: str
    plans: int
    """How many grid plans it stands for."""


@dataclass(frozen=True)
class ProfilePlans:
    """Everything the planner says about one profile."""

    profile: DeviceProfile
    rows: list[PlanRow] = field(default_factory=list)
    unusable: list[UnusableScheme] = field(default_factory=list)

    @property
    def any_fits(self) -> bool:
        return any(row.prediction.fits for row in self.rows)


def plan_grid(
    schemes: Sequence[str] = KNOWN_SCHEMES,
    ranks: Sequence[int] = (8,),
    batches: Sequence[int] = (1, 4, 8),
    seq_lens: Sequence[int] = (128, 256),
    local_steps: int = 10,
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES,
) -> list[TrainingPlan]:
    return [
        TrainingPlan(
            scheme=scheme,
            rank=rank,
            batch_size=batch,
            seq_len=seq,
            local_steps=local_steps,
            target_modules=target_modules,
        )
        for scheme, rank, batch, seq in itertools.product(schemes, ranks, batches, seq_lens)
    ]


def fit_with_levers(
    profile: DeviceProfile, model_shape: ModelShape, plan: TrainingPlan
) -> tuple[TrainingPlan, Prediction]:
    """`plan` and its prediction when it fits; else the first lever variant that fits (in the
    coordinator fitter's order); else the last variant, whose reason says what was tried."""
    prediction = predict(profile, model_shape, plan)
    if prediction.fits or plan.scheme not in profile.throughput.quant_schemes:
        return plan, prediction
    levered = with_memory_levers(plan)
    for candidate in levered:
        candidate_prediction = predict(profile, model_shape, candidate)
        if candidate_prediction.fits:
            return candidate, candidate_prediction
        prediction = candidate_prediction
    if not levered:
        return plan, prediction
    last = levered[-1]
    return last, replace(prediction, reason=f"{prediction.reason}, even with {lever_note(last)}")


def evaluate_profile(
    profile: DeviceProfile,
    model_shape: ModelShape,
    plans: Sequence[TrainingPlan],
    school_link: SharedSchoolLink,
    *,
    use_levers: bool = True,
) -> ProfilePlans:
    """Every usable plan on `profile` in grid order, and one line per unusable scheme."""
    rows: list[PlanRow] = []
    unusable: dict[str, UnusableScheme] = {}
    for plan in plans:
        if plan.scheme not in profile.throughput.quant_schemes:
            known = unusable.get(plan.scheme)
            if known is None:
                reason = predict(profile, model_shape, plan).reason
                unusable[plan.scheme] = UnusableScheme(plan.scheme, reason, 1)
            else:
                unusable[plan.scheme] = replace(known, plans=known.plans + 1)
            continue
        if use_levers:
            priced, prediction = fit_with_levers(profile, model_shape, plan)
        else:
            priced, prediction = plan, predict(profile, model_shape, plan)
        transfer = round_transfer(profile.network, model_shape, priced, school_link)
        rows.append(PlanRow(profile, plan, priced, prediction, transfer))
    return ProfilePlans(profile, rows, list(unusable.values()))


def evaluate(
    profiles: Iterable[DeviceProfile],
    model_shape: ModelShape,
    plans: Sequence[TrainingPlan],
    school_link: SharedSchoolLink | None = None,
    *,
    use_levers: bool = True,
) -> list[ProfilePlans]:
    """Every plan on every profile, profiles in the given order, plans in grid order."""
    link = school_link or SharedSchoolLink()
    return [
        evaluate_profile(profile, model_shape, plans, link, use_levers=use_levers)
        for profile in profiles
    ]
