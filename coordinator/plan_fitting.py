"""Fitting one device's plan to a round: deadline, memory, and the school's shared link.

A slow or poorly connected device gets a smaller plan rather than no plan. The ladder, in
order of how little it costs the model: fewer local steps first (down to the task's
`min_local_steps`), then a smaller LoRA rank from `allowed_ranks` (fewer FLOPs and a smaller
upload), then a shorter sequence (down to `min_seq_len`), and only as a last resort fewer
steps than `min_local_steps`. A device whose one-step plan still misses the deadline is left
out, with the reason. This is the one deadline fitter: the fit-first scheduler uses it with a
one-rung ladder (`LadderLimits.steps_only`), so only its steps shrink.

Devices of one school share its uplink and downlink: when m of a school's devices train in the
same round, each is predicted to get 1/m of the school's link (or its own link, if slower).
The scheduler refits a school's plans whenever it adds one of the school's devices.

The cost model is pure arithmetic, but the scheduler may call it for 10,000 devices per round;
the compute part of a prediction (step time, peak memory) depends only on the profile and the
plan, so it is cached per (profile, plan) and the transfer part is computed directly.

Memory is the cost model's answer (`estimate_compute`): a CUDA profile is checked where its
peak lives (RAM shared with a Jetson's GPU, or a discrete GPU's own memory), and a device's
reported free memory is compared with the peak of the memory it describes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from device_profiles.cost_model import (
    UPLOAD_BYTES_PER_PARAM,
    ComputeEstimate,
    MemoryKind,
    Prediction,
    adapter_bytes,
    count_step,
    estimate_compute,
    prediction_from,
    transfer_seconds,
)
from device_profiles.plan import TrainingPlan
from device_profiles.profile import DeviceProfile
from device_profiles.shapes import ModelShape

DEADLINE_SAFETY = 0.8
"""A plan must be predicted to finish within this share of the deadline."""


@dataclass(frozen=True)
class SchoolLink:
    """A school's internet link, shared by every device of the school that trains at once."""

    down_mbps: float
    up_mbps: float

    def __post_init__(self) -> None:
        for name in ("down_mbps", "up_mbps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"SchoolLink.{name} must be a positive number, got {value!r}")

    def share(self, devices_at_once: int) -> SchoolLink:
        """Each device's fair share when `devices_at_once` transfer in the same round."""
        count = max(1, devices_at_once)
        return SchoolLink(self.down_mbps / count, self.up_mbps / count)


@dataclass(frozen=True)
class LadderLimits:
    """How far a plan may shrink (from the task's configuration)."""

    allowed_ranks: tuple[int, ...]
    """Ranks a device may be given, largest first; the first is the task's rank."""
    min_local_steps: int
    min_seq_len: int

    @classmethod
    def steps_only(cls, plan: TrainingPlan) -> LadderLimits:
        """A one-rung ladder: the plan's own rank and sequence, any number of steps >= 1
        (the fit-first scheduler's fitting)."""
        return cls((plan.rank,), 1, plan.seq_len)


class PlanFitter:
    """Predicts and shrinks plans for one task's model shape, with a per-profile cache."""

    def __init__(
        self,
        shape: ModelShape,
        full_plan: TrainingPlan,
        limits: LadderLimits,
        deadline_seconds: float,
    ) -> None:
        self.shape = shape
        self.full_plan = full_plan
        self.limits = limits
        self.budget_seconds = deadline_seconds * DEADLINE_SAFETY
        self.download_bytes = adapter_bytes(shape, full_plan.rank, full_plan.target_modules)
        """Devices always download the full-rank global adapter, whatever rank they train."""
        self._compute_cache: dict[tuple[object, ...], ComputeEstimate] = {}
        self._ladder = [
            full_plan
            if (rank, seq_len) == (full_plan.rank, full_plan.seq_len)
            else replace(full_plan, rank=rank, seq_len=seq_len)
            for rank in limits.allowed_ranks
            for seq_len in _seq_lengths(full_plan.seq_len, limits.min_seq_len)
        ]
        """Plan shapes in the order they are tried, built once (plans validate on creation).
        Within one fitter every plan has the task's scheme, batch and target modules, so the
        caches below key on what varies."""
        self._plans_by_steps: dict[tuple[int, int, int], TrainingPlan] = {}
        self._upload_bytes: dict[int, int] = {}

    def _estimate(
        self,
        profile: DeviceProfile,
        plan: TrainingPlan,
        link: SchoolLink | None,
        speed_factor: float,
    ) -> tuple[float, float, float, ComputeEstimate]:
        """(step, download, upload, the cached compute estimate) as plain floats: the fitter
        tries up to a dozen plans per device, and building a `Prediction` for each would
        cost more than the arithmetic."""
        key = (profile.name, plan.scheme, plan.rank, plan.batch_size, plan.seq_len)
        estimate = self._compute_cache.get(key)
        if estimate is None:
            counts = count_step(self.shape, plan)
            estimate = self._compute_cache[key] = estimate_compute(profile, counts, plan.scheme)
        upload_bytes = self._upload_bytes.get(plan.rank)
        if upload_bytes is None:
            upload_bytes = adapter_bytes(
                self.shape, plan.rank, plan.target_modules, UPLOAD_BYTES_PER_PARAM
            )
            self._upload_bytes[plan.rank] = upload_bytes
        network = profile.network
        down_mbps = min(network.down_mbps, link.down_mbps) if link else network.down_mbps
        up_mbps = min(network.up_mbps, link.up_mbps) if link else network.up_mbps
        download = transfer_seconds(self.download_bytes, down_mbps, network.rtt_ms)
        upload = transfer_seconds(upload_bytes, up_mbps, network.rtt_ms)
        return estimate.step_seconds * speed_factor, download, upload, estimate

    def predict(
        self,
        profile: DeviceProfile,
        plan: TrainingPlan,
        link: SchoolLink | None = None,
        speed_factor: float = 1.0,
    ) -> Prediction:
        """The cost model's prediction, with the device's observed slowness and its share of
        the school link applied (same arithmetic as `device_profiles.cost_model.predict`)."""
        step, download, upload, estimate = self._estimate(profile, plan, link, speed_factor)
        return prediction_from(
            profile,
            estimate,
            step_seconds=step,
            local_steps=plan.local_steps,
            download_seconds=download,
            upload_seconds=upload,
        )

    def full_round_seconds(
        self, profile: DeviceProfile, link: SchoolLink | None = None, speed_factor: float = 1.0
    ) -> float:
        """Predicted seconds of the task's full plan on this device."""
        step, download, upload, _ = self._estimate(profile, self.full_plan, link, speed_factor)
        return download + upload + step * self.full_plan.local_steps

    def fit(
        self,
        profile: DeviceProfile,
        link: SchoolLink | None = None,
        speed_factor: float = 1.0,
        free_memory_bytes: int | None = None,
        budget_seconds: float | None = None,
    ) -> tuple[TrainingPlan, Prediction] | str:
        """The largest plan on the ladder predicted to finish within `budget_seconds` (by
        default the deadline's safe share), or why even the smallest does not."""
        budget = self.budget_seconds if budget_seconds is None else budget_seconds
        last_reason = ""
        fallback: TrainingPlan | None = None
        for shaped in self._ladder:
            fitted = self._fit_steps(profile, shaped, link, speed_factor, free_memory_bytes, budget)
            if isinstance(fitted, str):
                last_reason = fitted
                continue
            if fitted.local_steps >= self.limits.min_local_steps:
                return fitted, self.predict(profile, fitted, link, speed_factor)
            if fallback is None or fitted.local_steps > fallback.local_steps:
                fallback = fitted
        if fallback is not None:
            return fallback, self.predict(profile, fallback, link, speed_factor)
        return last_reason or "no plan on the ladder fits"

    def _fit_steps(
        self,
        profile: DeviceProfile,
        plan: TrainingPlan,
        link: SchoolLink | None,
        speed_factor: float,
        free_memory_bytes: int | None,
        budget: float,
    ) -> TrainingPlan | str:
        step, download, upload, estimate = self._estimate(profile, plan, link, speed_factor)
        if estimate.reason:
            return estimate.reason
        peaks = estimate.peaks
        on_gpu_memory = peaks.kind is MemoryKind.GPU
        peak = peaks.gpu_bytes if on_gpu_memory else peaks.ram_bytes
        if free_memory_bytes is not None and peak > free_memory_bytes:
            memory = " of GPU memory" if on_gpu_memory else ""
            return (
                f"predicted peak {peak / 2**20:.0f} MiB exceeds the "
                f"{free_memory_bytes / 2**20:.0f} MiB{memory} free right now"
            )
        transfer = download + upload
        if transfer + step * plan.local_steps <= budget:
            return plan
        steps = math.floor((budget - transfer) / step)
        if steps < 1:
            return (
                f"predicted {transfer + step * plan.local_steps:.0f} s per round "
                f"({step:.2f} s per step, {transfer:.0f} s transfer) does "
                f"not fit {budget:.0f} s of the deadline even with one step"
            )
        return self._with_steps(plan, min(steps, plan.local_steps))

    def _with_steps(self, plan: TrainingPlan, steps: int) -> TrainingPlan:
        """`plan` with fewer steps, memoised: a validated dataclass copy costs more than the
        whole prediction, and 10,000 devices need only a few dozen distinct plans."""
        key = (plan.rank, plan.seq_len, steps)
        cached = self._plans_by_steps.get(key)
        if cached is None:
            cached = self._plans_by_steps[key] = replace(plan, local_steps=steps)
        return cached


def fit_plan_to_deadline(
    profile: DeviceProfile, shape: ModelShape, plan: TrainingPlan, deadline_seconds: float
) -> tuple[TrainingPlan, Prediction] | str:
    """`plan` with as many of its local steps as fit the deadline, or why none fits: a
    `PlanFitter` on `LadderLimits.steps_only` (the rank and sequence stay the plan's). A
    scheduler fitting many devices builds the fitter once instead."""
    return PlanFitter(shape, plan, LadderLimits.steps_only(plan), deadline_seconds).fit(profile)


def _seq_lengths(full: int, minimum: int) -> Sequence[int]:
    """The task's sequence length, then halvings down to `minimum`."""
    lengths = [full]
    while lengths[-1] // 2 >= max(1, minimum):
        lengths.append(lengths[-1] // 2)
    return lengths


def work_fraction(plan: TrainingPlan, full_plan: TrainingPlan) -> float:
    """How much of the task's full plan a shrunk plan does (tokens x steps x rank share)."""
    tokens = plan.local_steps * plan.seq_len * plan.batch_size
    full_tokens = full_plan.local_steps * full_plan.seq_len * full_plan.batch_size
    return (tokens / full_tokens) * math.sqrt(plan.rank / full_plan.rank)
