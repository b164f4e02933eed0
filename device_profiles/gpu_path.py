"""The GPU path of the cost model: which memory a CUDA profile is checked against, and the
step time of a trainer that computes on the GPU.

The trainer moves to a CUDA GPU when torch finds one (the agent's `[agent] device = "auto"`,
quantization/compute_device.py). There a step is not "FLOPs over GPU GFLOPS": matrix
products run at the tensor-core rate under autocast (bf16, or fp16 where the GPU lacks it),
elementwise work streams at the GPU's DRAM bandwidth, quantized layers build their weight in
the compute dtype (half fp32's bytes), and the host dispatches every kernel, a cost per layer
that does not shrink with the model: it is why a small model gains little from a GPU.
Figures here are unvalidated until a GPU measurement is recorded in a profile.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING

from device_profiles.profile import DeviceProfile

if TYPE_CHECKING:
    from device_profiles.step_counts import StepCounts

BYTES_FP32 = 4
BYTES_HALF = 2
HALF_PRECISION_DTYPES = ("bfloat16", "float16")
DEFAULT_GPU_COMPUTE_DTYPE = "bfloat16"
"""What a GPU profile without `gpu_compute_dtype` computes in: the trainer autocasts to bf16
(fp16 where the GPU lacks bf16; both are half precision) on every CUDA device."""


class MemoryKind(enum.Enum):
    """Which memory a plan's peak is checked against."""

    RAM = "ram"
    """CPU training: the process's RSS against usable RAM."""
    UNIFIED = "unified"
    """A GPU that allocates from system RAM (Jetson): baseline RSS, CUDA context and all
    training state against usable RAM."""
    GPU = "gpu"
    """A discrete GPU: the device-side peak against its own memory, host RSS against RAM."""


def trains_on_gpu(profile: DeviceProfile) -> bool:
    """The profile is priced for the GPU path: it names a CUDA GPU with a known fp32 rate."""
    return profile.hardware.accelerator == "cuda" and profile.throughput.gpu_fp32_gflops > 0


def computes_in_half_precision(profile: DeviceProfile) -> bool:
    """The trainer runs matrix products in bf16/fp16 under autocast (GPU path only)."""
    dtype = profile.throughput.gpu_compute_dtype or DEFAULT_GPU_COMPUTE_DTYPE
    return trains_on_gpu(profile) and dtype in HALF_PRECISION_DTYPES


def gpu_matmul_gflops(profile: DeviceProfile) -> float:
    """The rate the GPU path's matrix products run at: the half-precision rate under
    autocast when the profile gives one (even when lower, as on GPUs with slow fp16), else
    the fp32 rate."""
    half = profile.throughput.gpu_half_gflops or 0.0
    if computes_in_half_precision(profile) and half > 0:
        return half
    return profile.throughput.gpu_fp32_gflops


def gpu_bandwidth_gbps(profile: DeviceProfile) -> float:
    """The DRAM bandwidth GPU kernels see; the CPU copy figure when none is given."""
    throughput = profile.throughput
    return throughput.gpu_memory_bandwidth_gbps or throughput.memory_bandwidth_gbps


def memory_kind(profile: DeviceProfile) -> MemoryKind:
    """RAM on the CPU path; on the GPU path, the GPU's own memory when the profile gives its
    size, else unified memory (the GPU allocates from RAM, as a Jetson's does)."""
    if not trains_on_gpu(profile):
        return MemoryKind.RAM
    if profile.hardware.gpu_memory_bytes:
        return MemoryKind.GPU
    return MemoryKind.UNIFIED


def usable_gpu_memory_bytes(profile: DeviceProfile) -> int:
    """A discrete GPU's memory (0 otherwise); the fit's margin covers a display's share."""
    if memory_kind(profile) is not MemoryKind.GPU:
        return 0
    return int(profile.hardware.gpu_memory_bytes or 0)


def dequantized_width(profile: DeviceProfile) -> float:
    """Bytes of a dequantized weight element relative to fp32: quantized layers build the
    weight directly in the compute dtype (quantization/qlinear.py), half width under autocast."""
    return BYTES_HALF / BYTES_FP32 if computes_in_half_precision(profile) else 1.0


def gpu_time_features(profile: DeviceProfile, counts: StepCounts) -> tuple[float, ...]:
    """The GPU step's terms at unit coefficients, in the calibration's column order: matmul
    FLOPs / rate, elementwise bytes / bandwidth, int8 and NF4 dequantized bytes / bandwidth,
    layer executions (layers, or more with micro-batches or recompute), passes.
    `gpu_step_seconds` and the calibration fit both use them, so they agree."""
    rate = gpu_matmul_gflops(profile) * 1e9
    bandwidth = gpu_bandwidth_gbps(profile) * 1e9
    width = dequantized_width(profile)
    return (
        counts.matmul_flops / rate,
        counts.elementwise_bytes / bandwidth,
        width * counts.dequant_bytes_int8 / bandwidth,
        width * counts.dequant_bytes_nf4 / bandwidth,
        float(counts.layer_executions),
        float(counts.passes),
    )


def gpu_step_seconds(profile: DeviceProfile, counts: StepCounts) -> float:
    """One step on the GPU path; no scheme's CPU factor (bitsandbytes is fast on CUDA), and
    kernel launch replaces the CPU path's per-layer framework cost."""
    calibration = profile.calibration
    flops, elementwise, int8, nf4, layers, fixed = gpu_time_features(profile, counts)
    return (
        flops / calibration.flop_efficiency
        + elementwise / calibration.memory_efficiency
        + int8 * calibration.dequant_int8
        + nf4 * calibration.dequant_nf4
        + layers * calibration.gpu_launch_seconds_per_layer
        + fixed * calibration.fixed_seconds
    )


def with_compute_device(
    profile: DeviceProfile,
    *,
    on_gpu: bool,
    compute_dtype: str = DEFAULT_GPU_COMPUTE_DTYPE,
    gpu_memory_bytes: int | None = None,
) -> DeviceProfile:
    """`profile` priced for where the agent actually trains, so the agent's own checks use
    the path the trainer runs: `on_gpu=False` for the CPU (a CPU-only torch on a Jetson, or
    `device = "cpu"`), else the GPU in `compute_dtype` ('bfloat16', 'float16', 'float32'),
    with `gpu_memory_bytes` for a discrete GPU (None or 0: unified memory). The coordinator
    prices the profile the device enrolled with; this is for the device's side only."""
    hardware = dataclasses.replace(
        profile.hardware,
        accelerator="cuda" if on_gpu else "none",
        gpu_memory_bytes=gpu_memory_bytes if on_gpu else profile.hardware.gpu_memory_bytes,
    )
    throughput = dataclasses.replace(
        profile.throughput,
        gpu_compute_dtype=compute_dtype if on_gpu else profile.throughput.gpu_compute_dtype,
    )
    return dataclasses.replace(profile, hardware=hardware, throughput=throughput)
