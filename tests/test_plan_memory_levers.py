"""The plan fitter's memory levers on a 4 GB Raspberry Pi, priced by the cost model.

SmolLM2-135M at batch 4 x 64 with LoRA on all seven projections: the fitter pulls gradient
checkpointing first, then micro-batches, then a shorter sequence, as the device's memory
tightens; each lever lowers the predicted peak and raises the predicted step time; the
plan carries the choice through the wire codec; a plan without levers prices and encodes
exactly as before the levers existed. No models, no torch. (At 4 x 64 every pass stays
below the agent's mmap threshold, where each lever lowers the peak; at 4 x 128 one does not:
the last test.)
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import replace

import pytest

from coordinator.plan_fitting import LadderLimits, PlanFitter
from coordinator.scheduler import DECODER_TARGET_ROLES
from device_profiles.cost_model import predict
from device_profiles.errors import ProfileError
from device_profiles.memory_levers import lever_note, smaller_micro_batch, with_memory_levers
from device_profiles.plan import TrainingPlan
from device_profiles.profile import DeviceProfile, find_profile
from device_profiles.shapes import KNOWN_SHAPES
from device_profiles.step_counts import count_step
from edge_runtime.wire import (
    SchemaError,
    TaskAssignment,
    TaskSpec,
    decode_frame,
    encode_frame,
    from_json_fields,
    generate_private_key,
    to_json_fields,
)

SMOLLM = KNOWN_SHAPES["smollm2-135m"]
PLAN = TrainingPlan(
    scheme="nf4",
    rank=8,
    batch_size=4,
    seq_len=64,
    local_steps=10,
    target_modules=DECODER_TARGET_ROLES,
)
LIMITS = LadderLimits(allowed_ranks=(8,), min_local_steps=1, min_seq_len=32)
DEADLINE_SECONDS = 24 * 3600.0
"""Generous: these tests are about memory, not the deadline."""


@pytest.fixture(scope="module")
def pi() -> DeviceProfile:
    return find_profile("raspberry-pi-4-4gb")


def _peak(profile: DeviceProfile, plan: TrainingPlan) -> int:
    return predict(profile, SMOLLM, plan).peak_bytes


def _between(lower: int, upper: int) -> int:
    """Free memory halfway between two predicted peaks."""
    assert lower < upper
    return (lower + upper) // 2


def _fit(profile: DeviceProfile, free_memory_bytes: int | None = None) -> TrainingPlan:
    fitter = PlanFitter(SMOLLM, PLAN, LIMITS, DEADLINE_SECONDS)
    fitted = fitter.fit(profile, free_memory_bytes=free_memory_bytes)
    assert not isinstance(fitted, str), fitted
    plan, prediction = fitted
    assert prediction.fits, prediction.reason
    return plan


GC = replace(PLAN, gradient_checkpointing=True)
GC_MICRO2 = replace(GC, micro_batch_size=2)
GC_MICRO1 = replace(GC, micro_batch_size=1)


def test_each_lever_lowers_the_peak_and_costs_step_time(pi: DeviceProfile) -> None:
    ladder = [PLAN, GC, GC_MICRO2, GC_MICRO1, replace(GC_MICRO1, seq_len=32)]
    predictions = [predict(pi, SMOLLM, plan) for plan in ladder]
    peaks = [p.peak_bytes for p in predictions]
    steps = [p.step_seconds for p in predictions[:4]]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks), peaks
    assert steps == sorted(steps) and len(set(steps)) == len(steps), steps
    # Checkpointing saves most of the blocks' activations; it costs one more forward of the
    # blocks (half again a frozen linear's FLOPs, which have no weight gradient), not of
    # the LM head.
    plain, checkpointed = count_step(SMOLLM, PLAN), count_step(SMOLLM, GC)
    assert checkpointed.activation_bytes < 0.5 * plain.activation_bytes
    assert 1.1 < checkpointed.matmul_flops / plain.matmul_flops < 1.5
    # Micro-batches keep the FLOPs and pass over the weights once per micro-batch.
    micro = count_step(SMOLLM, GC_MICRO1)
    assert micro.matmul_flops == checkpointed.matmul_flops
    assert micro.passes == 4 and micro.dequant_bytes_nf4 == 4 * checkpointed.dequant_bytes_nf4


def test_the_pi_gets_gradient_checkpointing_first(pi: DeviceProfile) -> None:
    free = _between(_peak(pi, GC), _peak(pi, PLAN))
    plan = _fit(pi, free)
    assert plan == replace(GC, local_steps=plan.local_steps)
    assert plan.micro_batch_size == 0 and plan.seq_len == PLAN.seq_len


def test_a_pi_with_less_free_memory_gets_micro_batches_too(pi: DeviceProfile) -> None:
    plan = _fit(pi, _between(_peak(pi, GC_MICRO2), _peak(pi, GC)))
    assert plan.gradient_checkpointing and plan.micro_batch_size == 2
    assert plan.seq_len == PLAN.seq_len
    plan = _fit(pi, _between(_peak(pi, GC_MICRO1), _peak(pi, GC_MICRO2)))
    assert plan.gradient_checkpointing and plan.micro_batch_size == 1
    assert plan.seq_len == PLAN.seq_len


def test_the_tightest_pi_gets_a_shorter_sequence(pi: DeviceProfile) -> None:
    free = _peak(pi, GC_MICRO1) - 2**20
    plan = _fit(pi, free)
    assert plan.seq_len < PLAN.seq_len
    assert _peak(pi, plan) <= free
    # At the shorter sequence the fitter again pulls only the levers it needs.
    shorter = replace(PLAN, seq_len=plan.seq_len, local_steps=plan.local_steps)
    assert _peak(pi, shorter) > free or plan == shorter


def test_a_desktop_pi_is_fitted_against_its_usable_ram(pi: DeviceProfile) -> None:
    """Without a heartbeat: the profile's usable RAM (with the model's margin) decides."""
    peak_plain, peak_gc = _peak(pi, PLAN), _peak(pi, GC)
    usable = int(_between(peak_gc, peak_plain) * 1.15)
    hardware = replace(pi.hardware, os_reserved_bytes=pi.hardware.ram_bytes - usable)
    desktop = dataclasses.replace(pi, hardware=hardware)
    assert not predict(desktop, SMOLLM, PLAN).fits
    assert _fit(desktop).gradient_checkpointing


def test_a_plan_that_fits_pulls_no_lever(pi: DeviceProfile) -> None:
    plan = _fit(pi)
    assert not plan.gradient_checkpointing and plan.micro_batch_size == 0


def test_the_fitter_says_what_each_lever_costs(pi: DeviceProfile) -> None:
    fitter = PlanFitter(SMOLLM, PLAN, LIMITS, DEADLINE_SECONDS)
    note = fitter.lever_note(pi, GC_MICRO2)
    assert "gradient checkpointing" in note and "micro-batches of 2" in note
    assert "step" in note and "%" in note and "MiB" in note
    assert fitter.lever_note(pi, PLAN) == ""
    refused = fitter.fit(pi, free_memory_bytes=10 * 2**20)
    assert isinstance(refused, str)
    assert "even with gradient checkpointing and micro-batches of 1" in refused


def test_a_lever_that_costs_the_deadline_is_paid_in_steps(pi: DeviceProfile) -> None:
    """The deadline fit sees the lever's slower step: fewer local steps, not a miss."""
    free = _between(_peak(pi, GC), _peak(pi, PLAN))
    plain_step = predict(pi, SMOLLM, PLAN).step_seconds
    gc_step = predict(pi, SMOLLM, GC).step_seconds
    transfer = predict(pi, SMOLLM, PLAN).download_seconds + predict(pi, SMOLLM, PLAN).upload_seconds
    deadline = (transfer + plain_step * PLAN.local_steps + 1.0) / 0.8
    fitter = PlanFitter(SMOLLM, PLAN, LadderLimits.steps_only(PLAN), deadline)
    fitted = fitter.fit(pi, free_memory_bytes=free)
    assert not isinstance(fitted, str), fitted
    plan, prediction = fitted
    assert plan.gradient_checkpointing
    assert plan.local_steps == int((deadline * 0.8 - transfer) // gc_step) < PLAN.local_steps
    assert prediction.round_seconds <= deadline * 0.8


def test_plans_without_levers_price_and_encode_as_before(pi: DeviceProfile) -> None:
    fields = to_json_fields(PLAN)
    assert "gradient_checkpointing" not in fields and "micro_batch_size" not in fields
    # What a coordinator that predates the levers sends still decodes, to the same plan.
    assert from_json_fields(TrainingPlan, fields) == PLAN
    plain = count_step(SMOLLM, PLAN)
    assert plain.passes == 1 and not plain.recomputes_forward
    assert plain.layer_executions == SMOLLM.layers
    assert count_step(SMOLLM, replace(PLAN, micro_batch_size=4)).activation_bytes == (
        plain.activation_bytes
    )


@pytest.mark.parametrize("plan", [GC, GC_MICRO2, GC_MICRO1, replace(PLAN, micro_batch_size=2)])
def test_levers_travel_in_the_assignment(plan: TrainingPlan) -> None:
    key = generate_private_key()
    assignment = TaskAssignment(
        "f", "alpha", 1, "pi-1", 0, plan, time.time() + 600, "ab" * 32, TaskSpec("causal-lm", "x")
    )
    decoded = decode_frame(encode_frame(assignment, sender="coordinator", signing_key=key))
    assert decoded.message.plan == plan
    assert decoded.message.plan.passes_per_step == plan.passes_per_step


def test_an_agent_that_predates_the_levers_refuses_a_levered_plan() -> None:
    """It refuses unknown fields, naming them, instead of training without the lever."""

    @dataclasses.dataclass(frozen=True)
    class OldPlan:
        scheme: str = "none"
        rank: int = 8
        batch_size: int = 8
        seq_len: int = 128
        local_steps: int = 10
        target_modules: tuple[str, ...] = ("q", "v")
        optimizer_states: int = 2
        learning_rate: float = 2e-3

    with pytest.raises(SchemaError, match="gradient_checkpointing"):
        from_json_fields(OldPlan, json.loads(json.dumps(to_json_fields(GC))))
    assert from_json_fields(OldPlan, to_json_fields(PLAN)).batch_size == PLAN.batch_size


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 6, "micro_batch_size": 4}, "micro_batch_size is 4, which does not divide"),
        ({"batch_size": 4, "micro_batch_size": 8}, "micro_batch_size is 8"),
        ({"micro_batch_size": -1}, "micro_batch_size is -1"),
        ({"micro_batch_size": True}, "micro_batch_size is True"),
        ({"gradient_checkpointing": 1}, "gradient_checkpointing is 1"),
    ],
)
def test_a_bad_lever_is_refused_naming_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        replace(PLAN, **changes)
    fields = {**to_json_fields(PLAN), **changes}
    with pytest.raises(SchemaError, match="micro_batch_size|gradient_checkpointing"):
        from_json_fields(TrainingPlan, fields, "plan")


def test_micro_batches_halve_through_divisors() -> None:
    assert [smaller_micro_batch(12, size) for size in (0, 6, 3, 1)] == [6, 3, 1, 0]
    assert [smaller_micro_batch(4, size) for size in (0, 2, 1)] == [2, 1, 0]
    assert smaller_micro_batch(1, 0) == 0
    levered = with_memory_levers(PLAN)
    assert [(p.gradient_checkpointing, p.micro_batch_size) for p in levered] == [
        (True, 0),
        (True, 2),
        (True, 1),
    ]
    assert lever_note(PLAN) == "" and lever_note(GC) == "gradient checkpointing"


def test_across_the_mmap_threshold_a_lever_can_save_nothing(pi: DeviceProfile) -> None:
    """At 4 x 128 with checkpointing a pass's (tokens, hidden) activation is 1.18 MB, its own
    mapping; micro-batches of 2 bring it under 1 MiB, into glibc's heap and its slack, so they
    save nothing, and a Pi that needs less gets micro-batches of 1 straight away."""
    from device_profiles.step_counts import activations_are_mapped

    wide = replace(GC, seq_len=128)
    halves, singles = replace(wide, micro_batch_size=2), replace(wide, micro_batch_size=1)
    assert activations_are_mapped(SMOLLM, wide) and not activations_are_mapped(SMOLLM, halves)
    assert _peak(pi, halves) >= _peak(pi, wide) * 0.999
    fitter = PlanFitter(SMOLLM, replace(PLAN, seq_len=128), LIMITS, DEADLINE_SECONDS)
    fitted = fitter.fit(pi, free_memory_bytes=_between(_peak(pi, singles), _peak(pi, wide)))
    assert not isinstance(fitted, str), fitted
    assert fitted[0].micro_batch_size == 1 and fitted[0].seq_len == 128


def test_the_coordinator_pulls_the_levers_the_planner_prices() -> None:
    """One set of levers, below the coordinator: `schoolfl profile plan` (device_profiles,
    which must not import the coordinator) and the fitter use the same functions."""
    import coordinator.plan_fitting as plan_fitting
    import device_profiles.memory_levers as levers

    assert plan_fitting.with_memory_levers is levers.with_memory_levers
    assert plan_fitting.lever_note is levers.lever_note


def test_the_planner_fits_the_pi_with_the_fitters_first_lever(pi: DeviceProfile) -> None:
    """SmolLM2 at 4 x 64 on all seven projections fits the Pi as it is; on a Pi with less
    RAM the planner prices the same plan the coordinator's fitter chooses, levers named."""
    from device_profiles.planner import fit_with_levers

    plain_peak = _peak(pi, PLAN)
    checkpointed_peak = _peak(pi, replace(PLAN, gradient_checkpointing=True))
    usable = int(1.15 * (plain_peak + checkpointed_peak) / 2)
    tight = dataclasses.replace(
        pi,
        hardware=dataclasses.replace(pi.hardware, ram_bytes=pi.hardware.os_reserved_bytes + usable),
    )
    priced, prediction = fit_with_levers(tight, SMOLLM, PLAN)
    assert prediction.fits and priced.gradient_checkpointing and not priced.micro_batch_size
    fitter = PlanFitter(SMOLLM, PLAN, LIMITS, DEADLINE_SECONDS)
    assert fitter.fit_memory(tight, PLAN) == priced
    assert lever_note(priced) == "gradient checkpointing"
