"""The cost model: (profile, model shape, plan) -> predicted step time, peak memory, round time.

Step time is built from counts, not from lookup tables, so it extrapolates to shapes and
devices nobody measured:

    step = matmul FLOPs / (GFLOPS x flop_efficiency)
         + elementwise bytes / (bandwidth x memory_efficiency)
         + dequantized weight bytes x dequant_factor[scheme] / bandwidth
         + per_layer_seconds x layers + fixed_seconds
    x the scheme's CPU step factor (bitsandbytes' CPU kernels, measured ~11x ours)

GFLOPS and bandwidth are the profile's (measured, or published for reference devices); the
efficiencies and overheads are the profile's calibration, fitted by `calibration.py` on a
measured grid. Peak memory is the process baseline (torch + transformers + peft imported)
plus quantized weights, adapter with gradients and optimizer state, saved activations and the
largest transient. Everything here is plain arithmetic (no torch) because the scheduler calls
`predict` for every device in every round.

A profile whose accelerator is CUDA is priced for the GPU path (the agent's `device = "auto"`
trains there when torch finds the GPU), which is more than FLOPs over GPU GFLOPS:

    step = matmul FLOPs / (half or fp32 GFLOPS x flop_efficiency)
         + elementwise bytes / (GPU bandwidth x memory_efficiency)
         + dequantized weight bytes (at the compute dtype's width) x dequant_factor / GPU bw
         + gpu_launch_seconds_per_layer x layers + fixed_seconds

Under autocast (bf16/fp16, the trainer's default on a GPU) matrix products run at the
tensor-core rate and quantized layers build their weight in the compute dtype, half fp32's
bytes. Kernel dispatch is host work per kernel, so it scales with layers, not with tokens:
it is why a small model gains little from a GPU. Activations are still counted at fp32
(autocast keeps norms and softmax in fp32): an over-estimate on the safe side until a GPU
measurement calibrates it. Memory is checked where it lives (`MemoryKind`): on a Jetson the
GPU allocates from system RAM, so the CUDA context and all training state count against
usable RAM with the process baseline; on a discrete GPU the device-side peak (CUDA context,
weights, trainable state, activations, dequantize workspace) counts against the GPU's own
memory and the host's RSS (baseline plus the context's host side) against RAM.
"""

from __future__ import annotations

from dataclasses import dataclass

from device_profiles.gpu_path import (
    MemoryKind,
    computes_in_half_precision,
    dequantized_width,
    gpu_step_seconds,
    memory_kind,
    trains_on_gpu,
    usable_gpu_memory_bytes,
)
from device_profiles.plan import TrainingPlan
from device_profiles.profile import Calibration, DeviceProfile
from device_profiles.shapes import ModelShape
from device_profiles.step_counts import StepCounts, count_step
from device_profiles.transfer import UPLOAD_BYTES_PER_PARAM, adapter_bytes, transfer_seconds

GIB = 2**30
"""Memory is reported in GiB: RAM and GPU memory are sold in binary units (a "4 GB" Pi has
4 GiB), so a device's figure reads as its label."""

DEFAULT_MEMORY_MARGIN = 0.15
"""A plan fits when peak x (1 + margin) <= RAM - OS reserve: the OS, page cache and other
processes move by more than a few percent during a round."""


@dataclass(frozen=True)
class Prediction:
    """What one device would spend on one round of one plan."""

    step_seconds: float
    peak_bytes: int
    round_seconds: float
    download_seconds: float
    upload_seconds: float
    compute_seconds: float
    """local_steps x step_seconds."""
    fits: bool
    reason: str
    """Why it does not fit (empty when it fits, or 'ok ...' with the headroom)."""
    usable_bytes: int = 0
    """Usable RAM (RAM - OS reserve), what `peak_bytes` is checked against."""
    validated: bool = False
    """True only when the profile records measurements from the device: otherwise the
    figures are unvalidated estimates (published rates and an x86 fit)."""
    memory_kind: MemoryKind = MemoryKind.RAM
    """Which memory the fit was checked against: RAM (CPU path), RAM shared with the GPU
    (UNIFIED: `peak_bytes` includes the CUDA context and everything the GPU holds) or a
    discrete GPU's own memory (GPU: `gpu_peak_bytes` against `usable_gpu_bytes`, and
    `peak_bytes`, the host RSS, against RAM)."""
    gpu_peak_bytes: int = 0
    """Device-side peak on a discrete GPU (CUDA context included); 0 otherwise."""
    usable_gpu_bytes: int = 0
    """The discrete GPU's memory; 0 otherwise."""
    half_precision: bool = False
    """True when priced for bf16/fp16 matrix products (GPU path under autocast)."""

    @property
    def free_memory_peak_bytes(self) -> int:
        """The peak to compare with a device's reported free memory: the agent reports the
        GPU's free memory on a discrete GPU and available RAM otherwise
        (quantization/compute_device.py, `free_memory_bytes`)."""
        return self.gpu_peak_bytes if self.memory_kind is MemoryKind.GPU else self.peak_bytes


def step_seconds_for(profile: DeviceProfile, counts: StepCounts) -> float:
    """Apply a profile's rates and calibration to the counts of one step (the GPU path for
    a CUDA profile, see `gpu_step_seconds`)."""
    if trains_on_gpu(profile):
        return gpu_step_seconds(profile, counts)
    calibration = profile.calibration
    throughput = profile.throughput
    gflops = throughput.cpu_fp32_gflops
    bandwidth = throughput.memory_bandwidth_gbps * 1e9
    factor = counts.cpu_step_factor
    return factor * (
        counts.matmul_flops / (gflops * 1e9 * calibration.flop_efficiency)
        + counts.elementwise_bytes / (bandwidth * calibration.memory_efficiency)
        + counts.dequant_bytes_int8 * calibration.dequant_int8 / bandwidth
        + counts.dequant_bytes_nf4 * calibration.dequant_nf4 / bandwidth
        + calibration.per_layer_seconds * counts.layer_executions
        + calibration.fixed_seconds * counts.passes
    )


def activation_factor(calibration: Calibration, family: str) -> float:
    """Measured / counted activation bytes; the counts are rough per family, so each family
    has its own factor (the allocator's slack also differs with tensor sizes)."""
    if family == "encoder":
        return calibration.activation_factor_encoder
    return calibration.activation_factor_decoder


def _cpu_peak_bytes(profile: DeviceProfile, counts: StepCounts) -> float:
    calibration = profile.calibration
    return (
        profile.throughput.baseline_rss_bytes
        + counts.weight_bytes
        + counts.trainable_state_bytes
        + activation_factor(calibration, counts.family) * counts.activation_bytes
        + counts.mapped_activation_bytes
        + calibration.dequant_memory_fraction * counts.heap_dequant_workspace_bytes
        + calibration.memory_overhead_bytes
    )


def _gpu_training_bytes(profile: DeviceProfile, counts: StepCounts) -> float:
    """What training holds on the GPU besides the CUDA context: the CPU path's terms, with
    the dequantize workspace at the compute dtype's width."""
    calibration = profile.calibration
    return (
        counts.weight_bytes
        + counts.trainable_state_bytes
        + activation_factor(calibration, counts.family) * counts.all_activation_bytes
        + calibration.dequant_memory_fraction
        * dequantized_width(profile)
        * counts.dequant_workspace_bytes
        + calibration.memory_overhead_bytes
    )


@dataclass(frozen=True)
class MemoryPeaks:
    """A step's peak memory, split by where it lives (`MemoryKind`)."""

    kind: MemoryKind
    ram_bytes: float
    """Counts against usable RAM: the whole process on the CPU path and on unified memory
    (CUDA context included there); on a discrete GPU the host RSS, i.e. the baseline plus
    the context's host side (driver and CUDA libraries, assumed as large as its device side)."""
    gpu_bytes: float = 0.0
    """Counts against a discrete GPU's memory: CUDA context, weights, trainable state,
    activations, dequantize workspace, allocator overhead. 0 otherwise."""
    cuda_context_bytes: float = 0.0
    """The CUDA context's share of the checked peak (0 on the CPU path), for messages."""


def memory_peaks(profile: DeviceProfile, counts: StepCounts) -> MemoryPeaks:
    """Peak memory of one step, in the memory it is checked against."""
    kind = memory_kind(profile)
    if kind is MemoryKind.RAM:
        return MemoryPeaks(kind, _cpu_peak_bytes(profile, counts))
    baseline = profile.throughput.baseline_rss_bytes
    context = profile.calibration.cuda_context_bytes
    training = _gpu_training_bytes(profile, counts)
    if kind is MemoryKind.UNIFIED:
        return MemoryPeaks(kind, baseline + context + training, 0.0, context)
    return MemoryPeaks(kind, baseline + context, context + training, context)


def peak_bytes_for(profile: DeviceProfile, counts: StepCounts) -> float:
    """The peak that counts against RAM (see `memory_peaks` for a discrete GPU's own)."""
    return memory_peaks(profile, counts).ram_bytes


def _scheme_reason(profile: DeviceProfile, scheme: str) -> str:
    if scheme not in profile.throughput.quant_schemes:
        return (
            f"scheme {scheme} is not usable on {profile.name} "
            f"(usable: {', '.join(profile.throughput.quant_schemes)})"
        )
    return ""


def _ram_where(profile: DeviceProfile, kind: MemoryKind, context_bytes: float) -> str:
    """What the RAM figure covers, for the message: the CPU path says nothing extra."""
    if kind is MemoryKind.UNIFIED:
        return (
            f" in RAM shared with the GPU (unified memory: the CUDA context's "
            f"{context_bytes / GIB:.2f} GiB and everything the GPU holds included)"
        )
    if kind is MemoryKind.GPU:
        return " of host RAM"
    return ""


def unfit_reason(
    profile: DeviceProfile,
    scheme: str,
    peak_bytes: float,
    memory_margin: float = DEFAULT_MEMORY_MARGIN,
    *,
    gpu_peak_bytes: float = 0.0,
) -> str:
    """Why a plan of `scheme` with this peak cannot run on `profile` at all (a scheme the
    device lacks, a discrete GPU's peak `gpu_peak_bytes` above its memory, or `peak_bytes`
    above usable RAM, each with `memory_margin` headroom); empty when it can. The message
    names the memory that is short. Whether it fits a deadline is the scheduler's question,
    not this one."""
    kind = memory_kind(profile)
    context = profile.calibration.cuda_context_bytes if kind is not MemoryKind.RAM else 0.0
    return _scheme_reason(profile, scheme) or _memory_reason(
        profile, MemoryPeaks(kind, peak_bytes, gpu_peak_bytes, context), memory_margin
    )


def _memory_reason(profile: DeviceProfile, peaks: MemoryPeaks, memory_margin: float) -> str:
    if peaks.kind is MemoryKind.GPU:
        usable_gpu = usable_gpu_memory_bytes(profile)
        needed_gpu = peaks.gpu_bytes * (1.0 + memory_margin)
        if needed_gpu > usable_gpu:
            return (
                f"needs {peaks.gpu_bytes / GIB:.2f} GiB of GPU memory at peak "
                f"(+{memory_margin:.0%} margin = {needed_gpu / GIB:.2f} GiB, the CUDA "
                f"context's {peaks.cuda_context_bytes / GIB:.2f} GiB included) but the GPU has "
                f"{usable_gpu / GIB:.2f} GiB (gpu_memory_bytes): a smaller rank, batch or "
                "sequence, or a 4-bit scheme, lowers it"
            )
    usable = profile.usable_ram_bytes
    needed = peaks.ram_bytes * (1.0 + memory_margin)
    if needed > usable:
        where = _ram_where(profile, peaks.kind, peaks.cuda_context_bytes)
        return (
            f"needs {peaks.ram_bytes / GIB:.2f} GiB peak{where} (+{memory_margin:.0%} margin = "
            f"{needed / GIB:.2f} GiB) but only {usable / GIB:.2f} GiB usable "
            f"({profile.hardware.ram_bytes / GIB:.2f} GiB RAM - "
            f"{profile.hardware.os_reserved_bytes / GIB:.2f} GiB OS reserve)"
        )
    return ""


@dataclass(frozen=True)
class ComputeEstimate:
    """Step time, memory and fit of one plan on one device: the part of a prediction that
    does not depend on the link, which the coordinator's plan fitter caches."""

    step_seconds: float
    peaks: MemoryPeaks
    reason: str
    """Why the plan cannot run at all (`unfit_reason`); empty when it can."""
    half_precision: bool


def estimate_compute(
    profile: DeviceProfile,
    counts: StepCounts,
    scheme: str,
    memory_margin: float = DEFAULT_MEMORY_MARGIN,
) -> ComputeEstimate:
    """Price one step of `counts` on `profile` and check its memory where it lives."""
    peaks = memory_peaks(profile, counts)
    reason = _scheme_reason(profile, scheme) or _memory_reason(profile, peaks, memory_margin)
    return ComputeEstimate(
        step_seconds=step_seconds_for(profile, counts),
        peaks=peaks,
        reason=reason,
        half_precision=computes_in_half_precision(profile),
    )


def prediction_from(
    profile: DeviceProfile,
    estimate: ComputeEstimate,
    *,
    step_seconds: float,
    local_steps: int,
    download_seconds: float,
    upload_seconds: float,
) -> Prediction:
    """Assemble a `Prediction`; `step_seconds` may differ from the estimate's (the plan
    fitter scales it by a device's observed slowness)."""
    compute = step_seconds * local_steps
    return Prediction(
        step_seconds=step_seconds,
        peak_bytes=int(estimate.peaks.ram_bytes),
        round_seconds=download_seconds + compute + upload_seconds,
        download_seconds=download_seconds,
        upload_seconds=upload_seconds,
        compute_seconds=compute,
        fits=not estimate.reason,
        reason=estimate.reason,
        usable_bytes=profile.usable_ram_bytes,
        validated=profile.predictions_validated,
        memory_kind=estimate.peaks.kind,
        gpu_peak_bytes=int(estimate.peaks.gpu_bytes),
        usable_gpu_bytes=usable_gpu_memory_bytes(profile),
        half_precision=estimate.half_precision,
    )


def predict(
    profile: DeviceProfile,
    model_shape: ModelShape,
    plan: TrainingPlan,
    *,
    download_bytes: float | None = None,
    upload_bytes: float | None = None,
    memory_margin: float = DEFAULT_MEMORY_MARGIN,
) -> Prediction:
    """Predicted step time, peak memory and round time of `plan` on `profile`.

    round = download (global adapter) + local_steps x step + upload (compressed update), at
    the profile's link rates. A scheme the device cannot run, or a peak above the memory it
    is checked against (`Prediction.memory_kind`) with `memory_margin` headroom, gives
    `fits=False` and a reason a planner can act on.
    """
    counts = count_step(model_shape, plan)
    estimate = estimate_compute(profile, counts, plan.scheme, memory_margin)
    if download_bytes is None:
        download_bytes = adapter_bytes(model_shape, plan.rank, plan.target_modules)
    if upload_bytes is None:
        upload_bytes = adapter_bytes(
            model_shape, plan.rank, plan.target_modules, UPLOAD_BYTES_PER_PARAM
        )
    network = profile.network
    return prediction_from(
        profile,
        estimate,
        step_seconds=estimate.step_seconds,
        local_steps=plan.local_steps,
        download_seconds=transfer_seconds(download_bytes, network.down_mbps, network.rtt_ms),
        upload_seconds=transfer_seconds(upload_bytes, network.up_mbps, network.rtt_ms),
    )
