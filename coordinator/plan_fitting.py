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
reported free memory is compared with the peak of the memory it describes. When a plan's
predicted peak does not fit, the fitter pulls the memory levers before it shrinks anything
the model learns from (`device_profiles.memory_levers`): gradient checkpointing, then micro-
batches with gradient accumulation (halved down to one example), and only then the ladder's
next rung (a shorter sequence, a smaller rank). The levers change step time, not the
gradient, so the deadline fit that follows sees their cost.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from device_profiles.cost_model import (
    ComputeEstimate,
    MemoryKind,
    Prediction,
    estimate_compute,
    prediction_from,
)
from device_profiles.memory_levers import lever_note, with_memory_levers
from device_profiles.plan import TrainingPlan
from device_profiles.profile import DeviceProfile
from device_profiles.shapes import ModelShape
from device_profiles.step_counts import count_step
from device_profiles.transfer import UPLOAD_BYTES_PER_PARAM, adapter_bytes, transfer_seconds

logger = logging.getLogger(__name__)

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
        self._levered: dict[TrainingPlan, tuple[TrainingPlan, ...]] = {}
        """Each ladder shape with its memory levers, in the order they are pulled."""
        self._plans_by_steps: dict[tuple[int, int, bool, int, int], TrainingPlan] = {}
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
        estimate = self._compute(profile, plan)
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

    def _compute(self, profile: DeviceProfile, plan: TrainingPlan) -> ComputeEstimate:
        """The cached step time and memory of `plan` on `profile`."""
        key = (
            profile.name,
            plan.scheme,
            plan.rank,
            plan.batch_size,
            plan.seq_len,
            plan.gradient_checkpointing,
            plan.micro_batch_size,
        )
        estimate = self._compute_cache.get(key)
        if estimate is None:
            counts = count_step(self.shape, plan)
            estimate = self._compute_cache[key] = estimate_compute(profile, counts, plan.scheme)
        return estimate

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
        fitted = self.fit_memory(profile, plan, free_memory_bytes)
        if isinstance(fitted, str):
            return fitted
        plan = fitted
        step, download, upload, _ = self._estimate(profile, plan, link, speed_factor)
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

    def fit_memory(
        self, profile: DeviceProfile, plan: TrainingPlan, free_memory_bytes: int | None = None
    ) -> TrainingPlan | str:
        """`plan` as it is when its predicted peak fits the device (the profile's usable
        memory with the cost model's margin, and `free_memory_bytes` when the device
        reported it), else with the first memory lever that makes it fit (gradient
        checkpointing, then micro-batches of half the batch, a quarter, ... one example),
        else why even the last does not fit. Nothing the model learns from changes; only
        step time does, and the caller fits the deadline with the lever's step time."""
        reason = self._memory_problem(profile, plan, free_memory_bytes)
        if not reason or plan.scheme not in profile.throughput.quant_schemes:
            return reason or plan
        levered = self._levered.get(plan)
        if levered is None:
            levered = self._levered[plan] = with_memory_levers(plan)
        for candidate in levered:
            problem = self._memory_problem(profile, candidate, free_memory_bytes)
            if not problem:
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug(
                        "%s: %s; %s", profile.name, reason, self.lever_note(profile, candidate)
                    )
                return candidate
            reason = problem
        if levered:
            return f"{reason}, even with {lever_note(levered[-1])}"
        return reason

    def lever_note(self, profile: DeviceProfile, plan: TrainingPlan) -> str:
        """Which memory levers `plan` pulls and what each costs on `profile`, one after the
        other: predicted peak and step time before and after each (for logs and the
        operator's view of a round; empty for a plan without levers)."""
        steps = [replace(plan, gradient_checkpointing=False, micro_batch_size=0)]
        if plan.gradient_checkpointing:
            steps.append(replace(plan, micro_batch_size=0))
        if plan.micro_batch_size:
            steps.append(plan)
        notes = []
        for before, after in zip(steps, steps[1:], strict=False):
            old, new = self._compute(profile, before), self._compute(profile, after)
            lever = (
                "gradient checkpointing"
                if after.micro_batch_size == 0
                else lever_note(replace(after, gradient_checkpointing=False))
            )
            notes.append(
                f"{lever}: predicted peak {_checked_peak(old) / 2**20:.0f} -> "
                f"{_checked_peak(new) / 2**20:.0f} MiB, step {old.step_seconds:.2f} -> "
                f"{new.step_seconds:.2f} s ({new.step_seconds / old.step_seconds - 1:+.0%})"
            )
        return "; then ".join(notes)

    def _memory_problem(
        self, profile: DeviceProfile, plan: TrainingPlan, free_memory_bytes: int | None
    ) -> str:
        """Why `plan` does not fit the device's memory now; empty when it does."""
        estimate = self._compute(profile, plan)
        if estimate.reason:
            return estimate.reason
        peak = _checked_peak(estimate)
        if free_memory_bytes is not None and peak > free_memory_bytes:
            memory = " of GPU memory" if estimate.peaks.kind is MemoryKind.GPU else ""
            return (
                f"predicted peak {peak / 2**20:.0f} MiB exceeds the "
                f"{free_memory_bytes / 2**20:.0f} MiB{memory} free right now"
            )
        return ""

    def _with_steps(self, plan: TrainingPlan, steps: int) -> TrainingPlan:
        """`plan` with fewer steps, memoised: a validated dataclass copy costs more than the
        whole prediction, and 10,000 devices need only a few dozen distinct plans."""
        key = (
            plan.rank,
            plan.seq_len,
            plan.gradient_checkpointing,
            plan.micro_batch_size,
            steps,
        )
        cached = self._plans_by_steps.get(key)
        if cached is None:
            cached = self._plans_by_steps[key] = replace(plan, local_steps=steps)
        return cached


def _checked_peak(estimate: ComputeEstimate) -> float:
    """The peak of the memory the plan is checked against (a discrete GPU's, else RAM)."""
    peaks = estimate.peaks
    return peaks.gpu_bytes if peaks.kind is MemoryKind.GPU else peaks.ram_bytes


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
