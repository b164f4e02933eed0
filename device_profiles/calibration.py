"""Fit a profile's cost-model calibration to measured train steps.

The cost model's step time is linear in six coefficients (1/flop_efficiency,
1/memory_efficiency, two dequantize factors, per-layer and fixed seconds), and its peak memory
is linear in two (activation factor, overhead). Both are fitted by non-negative least squares
on *relative* error, so a 0.1 s point weighs as much as a 20 s point, with a light pull towards
the default coefficients so that a small grid cannot produce absurd values for a term it
barely exercises.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from device_profiles.gpu_path import (
    MemoryKind,
    dequantized_width,
    gpu_time_features,
    memory_kind,
    trains_on_gpu,
)
from device_profiles.plan import TrainingPlan
from device_profiles.profile import Calibration, DeviceProfile
from device_profiles.shapes import ModelShape
from device_profiles.step_counts import StepCounts, count_step

logger = logging.getLogger(__name__)

PRIOR_WEIGHT = 0.05
"""Strength of the pull towards default coefficients, relative to one measured point."""


@dataclass(frozen=True)
class Observation:
    """One measured grid point in the cost model's terms."""

    model_shape: ModelShape
    plan: TrainingPlan
    step_seconds: float
    peak_bytes: float


def nonnegative_least_squares(matrix: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Lawson-Hanson active set NNLS (small problems; avoids a scipy dependency)."""
    rows, columns = matrix.shape
    solution = np.zeros(columns)
    passive = np.zeros(columns, dtype=bool)
    gradient = matrix.T @ (target - matrix @ solution)
    for _ in range(3 * columns + 10):
        if passive.all() or gradient[~passive].max(initial=-np.inf) <= 1e-12:
            break
        candidate = np.where(~passive, gradient, -np.inf)
        passive[int(np.argmax(candidate))] = True
        while True:
            trial = np.zeros(columns)
            trial[passive] = np.linalg.lstsq(matrix[:, passive], target, rcond=None)[0]
            if (trial[passive] > 0).all():
                solution = trial
                break
            negative = passive & (trial <= 0)
            ratios = solution[negative] / (solution[negative] - trial[negative])
            alpha = float(ratios.min()) if ratios.size else 0.0
            solution = solution + alpha * (trial - solution)
            passive &= solution > 1e-15
        gradient = matrix.T @ (target - matrix @ solution)
    return solution


def _fit(features: np.ndarray, target: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Relative-error NNLS with a ridge row per coefficient pulling it towards `prior`."""
    weights = 1.0 / target
    matrix = features * weights[:, None]
    goal = np.ones_like(target)
    active = np.abs(features).sum(axis=0) > 0
    solution = prior.copy()
    if not active.any():
        return solution
    scale = np.sqrt(PRIOR_WEIGHT)
    ridge = np.diag(scale / prior[active])
    stacked = np.vstack([matrix[:, active], ridge])
    stacked_goal = np.concatenate([goal, np.full(int(active.sum()), scale)])
    solution[active] = nonnegative_least_squares(stacked, stacked_goal)
    return solution


_CALIBRATED_FIELDS = (
    "flop_efficiency",
    "memory_efficiency",
    "dequant_int8",
    "dequant_nf4",
    "per_layer_seconds",
    "fixed_seconds",
    "activation_factor_encoder",
    "activation_factor_decoder",
    "dequant_memory_fraction",
    "memory_overhead_bytes",
)
"""Every coefficient the fit sets, so each can cite the fit as its source."""


def _time_features(profile: DeviceProfile, counts: Sequence[StepCounts]) -> np.ndarray:
    """Each term of step time at unit coefficient, on the rate the cost model would use
    (times the scheme's CPU step factor, so a bitsandbytes point fits the same coefficients;
    the GPU path's own terms for a CUDA profile, whose layer column is kernel launch)."""
    if trains_on_gpu(profile):
        return np.array([gpu_time_features(profile, step) for step in counts])
    throughput = profile.throughput
    gflops = throughput.cpu_fp32_gflops * 1e9
    bandwidth = throughput.memory_bandwidth_gbps * 1e9
    return np.array(
        [
            [
                factor * step.matmul_flops / gflops,
                factor * step.elementwise_bytes / bandwidth,
                factor * step.dequant_bytes_int8 / bandwidth,
                factor * step.dequant_bytes_nf4 / bandwidth,
                factor * float(step.layer_executions),
                factor * step.passes,
            ]
            for step in counts
            for factor in (step.cpu_step_factor,)
        ]
    )


def _time_prior(defaults: Calibration, on_gpu: bool = False) -> np.ndarray:
    """The default time coefficients, in the same column order as `_time_features`."""
    return np.array(
        [
            1 / defaults.flop_efficiency,
            1 / defaults.memory_efficiency,
            defaults.dequant_int8,
            defaults.dequant_nf4,
            defaults.gpu_launch_seconds_per_layer if on_gpu else defaults.per_layer_seconds,
            defaults.fixed_seconds,
        ]
    )


def _memory_features(profile: DeviceProfile, counts: Sequence[StepCounts]) -> np.ndarray:
    """Encoder and decoder activations get separate columns: the cost model has a factor each.
    The dequantize workspace is the CPU heap's share on the CPU path, and on a GPU all block
    weights at the dequantized width (half under autocast), as `cost_model.memory_peaks`."""
    on_cpu = memory_kind(profile) is MemoryKind.RAM
    width = dequantized_width(profile)
    rows = []
    for step in counts:
        encoder = step.family == "encoder"
        workspace = (
            step.heap_dequant_workspace_bytes if on_cpu else width * step.dequant_workspace_bytes
        )
        activations = step.activation_bytes if on_cpu else step.all_activation_bytes
        rows.append(
            [
                activations if encoder else 0.0,
                0.0 if encoder else activations,
                workspace,
                1.0,
            ]
        )
    return np.array(rows)


def _memory_prior(defaults: Calibration) -> np.ndarray:
    """The default memory coefficients, in the same column order as `_memory_features`."""
    return np.array(
        [
            defaults.activation_factor_encoder,
            defaults.activation_factor_decoder,
            defaults.dequant_memory_fraction,
            defaults.memory_overhead_bytes,
        ]
    )


def _fixed_memory_base(profile: DeviceProfile) -> float:
    """The part of a measured peak no coefficient scales, besides weights and trainable
    state, in the memory the cost model checks (`cost_model.memory_peaks`): the process
    baseline on the CPU path, plus the CUDA context on unified memory, the context alone
    for a discrete GPU's device-side peak."""
    kind = memory_kind(profile)
    context = profile.calibration.cuda_context_bytes
    if kind is MemoryKind.RAM:
        return float(profile.throughput.baseline_rss_bytes)
    if kind is MemoryKind.UNIFIED:
        return profile.throughput.baseline_rss_bytes + context
    return context


def _fit_memory(
    profile: DeviceProfile,
    observations: Sequence[Observation],
    counts: Sequence[StepCounts],
    defaults: Calibration,
) -> np.ndarray:
    """Peak = fixed + factor * activations + overhead: fit on the part the fixed terms leave.

    Unlike `_fit`, the relative error is taken against the whole peak (fixed part included),
    and the pull towards the defaults is ten times weaker than for step time.
    """
    peaks = np.array([observation.peak_bytes for observation in observations])
    fixed_parts = np.array(
        [
            _fixed_memory_base(profile)
            + step.weight_bytes
            + step.trainable_state_bytes
            + (step.mapped_activation_bytes if memory_kind(profile) is MemoryKind.RAM else 0.0)
            for step in counts
        ]
    )
    memory_matrix = _memory_features(profile, counts) / peaks[:, None]
    memory_goal = (peaks - fixed_parts) / peaks
    memory_prior = _memory_prior(defaults)
    memory_fit = memory_prior.copy()
    active = np.abs(memory_matrix).sum(axis=0) > 0
    scale = np.sqrt(PRIOR_WEIGHT) / 10
    memory_fit[active] = nonnegative_least_squares(
        np.vstack([memory_matrix[:, active], np.diag(scale / memory_prior[active])]),
        np.concatenate([memory_goal, np.full(int(active.sum()), scale)]),
    )
    return memory_fit


def _calibration_from(
    time_fit: np.ndarray,
    memory_fit: np.ndarray,
    source: str,
    defaults: Calibration | None = None,
    on_gpu: bool = False,
) -> Calibration:
    """Efficiencies and activation factors are clamped so that none comes out zero or
    infinite. On the GPU path the layer coefficient is kernel launch, and the CPU path's
    per-layer cost keeps its default (and the reverse); the CUDA context is not fitted."""
    defaults = defaults or Calibration()
    layer = float(time_fit[4])
    fitted = _CALIBRATED_FIELDS + (("gpu_launch_seconds_per_layer",) if on_gpu else ())
    if on_gpu:
        fitted = tuple(name for name in fitted if name != "per_layer_seconds")
    return Calibration(
        flop_efficiency=float(1.0 / max(time_fit[0], 1e-3)),
        memory_efficiency=float(1.0 / max(time_fit[1], 1e-3)),
        dequant_int8=float(time_fit[2]),
        dequant_nf4=float(time_fit[3]),
        per_layer_seconds=defaults.per_layer_seconds if on_gpu else layer,
        fixed_seconds=float(time_fit[5]),
        activation_factor_encoder=max(float(memory_fit[0]), 1e-3),
        activation_factor_decoder=max(float(memory_fit[1]), 1e-3),
        dequant_memory_fraction=float(memory_fit[2]),
        memory_overhead_bytes=float(memory_fit[3]),
        gpu_launch_seconds_per_layer=layer if on_gpu else defaults.gpu_launch_seconds_per_layer,
        cuda_context_bytes=defaults.cuda_context_bytes,
        sources={name: source for name in fitted} if source else {},
    )


def fit_calibration(
    profile: DeviceProfile, observations: Sequence[Observation], source: str = ""
) -> Calibration:
    """Calibration that best explains `observations` on `profile`'s measured rates."""
    if not observations:
        raise ValueError("fit_calibration needs at least one observation")
    defaults = Calibration()
    on_gpu = trains_on_gpu(profile)
    counts = [count_step(o.model_shape, o.plan) for o in observations]
    time_target = np.array([observation.step_seconds for observation in observations])
    time_fit = _fit(_time_features(profile, counts), time_target, _time_prior(defaults, on_gpu))
    memory_fit = _fit_memory(profile, observations, counts, defaults)
    calibration = _calibration_from(time_fit, memory_fit, source, defaults, on_gpu)
    logger.info("fitted calibration on %d points: %s", len(observations), calibration)
    return calibration


def calibrated(
    profile: DeviceProfile, observations: Sequence[Observation], source: str = ""
) -> DeviceProfile:
    """A copy of `profile` whose calibration is fitted to `observations`."""
    return dataclasses.replace(profile, calibration=fit_calibration(profile, observations, source))
