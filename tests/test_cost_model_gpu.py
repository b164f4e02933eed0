"""Issue 18: the cost model's GPU path and the memory it is checked against.

Pure arithmetic on profiles (no GPU needed): the GPU term is more than FLOPs over GPU
GFLOPS (half-precision rate, GPU bandwidth, kernel launch per layer, the CUDA context), a
Jetson's unified memory puts the CUDA context into the RAM check, a discrete GPU's peak is
checked against its own memory, and CPU profiles are priced exactly as before.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from coordinator.plan_fitting import LadderLimits, PlanFitter
from device_profiles.calibration import Observation, fit_calibration
from device_profiles.cost_model import MemoryKind, activation_factor, estimate_compute, predict
from device_profiles.errors import ProfileValidationError
from device_profiles.gpu_path import with_compute_device
from device_profiles.plan import KNOWN_SCHEMES, TrainingPlan
from device_profiles.profile import (
    DeviceProfile,
    find_profile,
    load_reference_profiles,
    profile_from_toml_text,
    profile_toml_text,
)
from device_profiles.shapes import KNOWN_SHAPES, ModelShape
from device_profiles.step_counts import SCHEME_CPU_STEP_FACTOR, StepCounts, count_step

SMOLLM = KNOWN_SHAPES["smollm2-135m"]
MINILM = KNOWN_SHAPES["minilm-l6"]


@pytest.fixture(scope="module")
def orin() -> DeviceProfile:
    return find_profile("jetson-orin-nano-8gb")


def _with(profile: DeviceProfile, **sections: dict[str, object]) -> DeviceProfile:
    """`profile` with some fields of its sections replaced, e.g. hardware={"ram_bytes": 1}."""
    changes = {
        name: dataclasses.replace(getattr(profile, name), **values)
        for name, values in sections.items()
    }
    return dataclasses.replace(profile, **changes)


def _cpu_twin(profile: DeviceProfile) -> DeviceProfile:
    return _with(profile, hardware={"accelerator": "none"})


def _laptop_with_gpu(vram_bytes: int = 4 * 10**9) -> DeviceProfile:
    """A mid laptop with a discrete 4 GB CUDA GPU (RTX 3050 Laptop-like figures)."""
    laptop = find_profile("laptop-mid-16gb")
    cited = "assumption: a test GPU"
    return _with(
        laptop,
        hardware={
            "accelerator": "cuda",
            "accelerator_model": "test GPU",
            "gpu_memory_bytes": vram_bytes,
            "sources": {**laptop.hardware.sources, "gpu_memory_bytes": cited},
        },
        throughput={
            "gpu_fp32_gflops": 9000.0,
            "gpu_half_gflops": 36000.0,
            "gpu_memory_bandwidth_gbps": 192.0,
            "gpu_compute_dtype": "bfloat16",
            "sources": {
                **laptop.throughput.sources,
                "gpu_half_gflops": cited,
                "gpu_memory_bandwidth_gbps": cited,
            },
        },
    )


def _old_step_seconds(profile: DeviceProfile, counts: StepCounts) -> float:
    """The CPU formula as it stood before issue 18, copied verbatim."""
    calibration = profile.calibration
    throughput = profile.throughput
    bandwidth = throughput.memory_bandwidth_gbps * 1e9
    factor = counts.cpu_step_factor
    return factor * (
        counts.matmul_flops / (throughput.cpu_fp32_gflops * 1e9 * calibration.flop_efficiency)
        + counts.elementwise_bytes / (bandwidth * calibration.memory_efficiency)
        + counts.dequant_bytes_int8 * calibration.dequant_int8 / bandwidth
        + counts.dequant_bytes_nf4 * calibration.dequant_nf4 / bandwidth
        + calibration.per_layer_seconds * counts.layers
        + calibration.fixed_seconds
    )


def _old_peak_bytes(profile: DeviceProfile, counts: StepCounts) -> float:
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


def test_cpu_profiles_are_priced_exactly_as_before() -> None:
    cpu_profiles = [p for p in load_reference_profiles() if p.hardware.accelerator == "none"]
    assert len(cpu_profiles) == 5
    for profile in cpu_profiles:
        for shape in (MINILM, SMOLLM, KNOWN_SHAPES["llama-1.1b"]):
            for scheme in KNOWN_SCHEMES:
                plan = TrainingPlan(scheme=scheme, batch_size=4, seq_len=128)
                counts = count_step(shape, plan)
                prediction = predict(profile, shape, plan)
                assert prediction.step_seconds == _old_step_seconds(profile, counts)
                assert prediction.peak_bytes == int(_old_peak_bytes(profile, counts))
                assert prediction.memory_kind is MemoryKind.RAM
                assert prediction.gpu_peak_bytes == 0 and not prediction.half_precision
                assert prediction.free_memory_peak_bytes == prediction.peak_bytes


def test_orin_is_priced_for_the_gpu_path_on_unified_memory(orin: DeviceProfile) -> None:
    prediction = predict(orin, SMOLLM, TrainingPlan(scheme="nf4"))
    assert orin.hardware.accelerator == "cuda"
    assert prediction.memory_kind is MemoryKind.UNIFIED
    assert prediction.half_precision and prediction.gpu_peak_bytes == 0
    assert "NOT validated" in orin.notes and prediction.validated is False
    for name in ("gpu_half_gflops", "gpu_memory_bandwidth_gbps"):
        assert orin.throughput.sources[name]
    for name in ("gpu_launch_seconds_per_layer", "cuda_context_bytes"):
        assert orin.calibration.sources[name].startswith("assumption")


@pytest.mark.parametrize("shape", [SMOLLM, KNOWN_SHAPES["llama-1.1b"]], ids=lambda s: s.name)
def test_gpu_path_is_faster_than_the_cpu_path_when_compute_bound(
    orin: DeviceProfile, shape: ModelShape
) -> None:
    plan = TrainingPlan(scheme="none", batch_size=8, seq_len=256)
    gpu = predict(orin, shape, plan).step_seconds
    cpu = predict(_cpu_twin(orin), shape, plan).step_seconds
    assert gpu * 10 < cpu


def test_half_precision_uses_the_half_rate(orin: DeviceProfile) -> None:
    plan = TrainingPlan(scheme="none", batch_size=8, seq_len=256)
    counts = count_step(SMOLLM, plan)
    half = predict(orin, SMOLLM, plan)
    full = predict(_with(orin, throughput={"gpu_compute_dtype": "float32"}), SMOLLM, plan)
    assert half.half_precision and not full.half_precision
    throughput, efficiency = orin.throughput, orin.calibration.flop_efficiency
    assert throughput.gpu_half_gflops is not None
    expected = (counts.matmul_flops / (efficiency * 1e9)) * (
        1 / throughput.gpu_fp32_gflops - 1 / throughput.gpu_half_gflops
    )
    assert full.step_seconds - half.step_seconds == pytest.approx(expected, rel=1e-9)
    no_half_rate = _with(orin, throughput={"gpu_half_gflops": None})
    assert predict(no_half_rate, SMOLLM, plan).step_seconds == pytest.approx(full.step_seconds)


def test_half_precision_halves_the_dequantized_weight_bytes(orin: DeviceProfile) -> None:
    plan = TrainingPlan(scheme="nf4", batch_size=1, seq_len=32)
    fp32 = _with(orin, throughput={"gpu_compute_dtype": "float32", "gpu_half_gflops": None})
    assert estimate_compute(orin, count_step(SMOLLM, plan), "nf4").peaks.ram_bytes < (
        estimate_compute(fp32, count_step(SMOLLM, plan), "nf4").peaks.ram_bytes
    )


@pytest.mark.parametrize("shape", [MINILM, SMOLLM], ids=lambda s: s.name)
def test_launch_overhead_scales_with_layers(orin: DeviceProfile, shape: ModelShape) -> None:
    plan = TrainingPlan(scheme="nf4", batch_size=1, seq_len=32)
    launch = orin.calibration.gpu_launch_seconds_per_layer
    without = _with(orin, calibration={"gpu_launch_seconds_per_layer": 0.0})
    for layers in (shape.layers, 2 * shape.layers):
        deeper = dataclasses.replace(shape, layers=layers)
        with_launch = predict(orin, deeper, plan).step_seconds
        assert with_launch - predict(without, deeper, plan).step_seconds == pytest.approx(
            launch * layers
        )
    # A small model is launch-bound: kernel dispatch is a large share of its GPU step.
    assert launch * MINILM.layers > 0.3 * predict(orin, MINILM, plan).step_seconds


def test_unified_memory_puts_the_cuda_context_into_the_ram_check(orin: DeviceProfile) -> None:
    plan = TrainingPlan(scheme="none", batch_size=2, seq_len=64)
    context = orin.calibration.cuda_context_bytes
    gpu = predict(orin, SMOLLM, plan)
    cpu = predict(_cpu_twin(orin), SMOLLM, plan)
    # The GPU applies its activation factor also to what the CPU's allocator serves as
    # mappings (counted as they are on the CPU path): the loss chunk's logits here.
    mapped = count_step(SMOLLM, plan).mapped_activation_bytes
    factor = activation_factor(orin.calibration, "decoder")
    assert gpu.peak_bytes - cpu.peak_bytes == pytest.approx(context + (factor - 1) * mapped, abs=2)
    # RAM that holds the plan on the CPU but not once the CUDA context is added.
    usable = int(cpu.peak_bytes * 1.15) + int(context / 2)
    tight = _with(orin, hardware={"ram_bytes": orin.hardware.os_reserved_bytes + usable})
    assert predict(_cpu_twin(tight), SMOLLM, plan).fits
    refused = predict(tight, SMOLLM, plan)
    assert not refused.fits
    assert "RAM shared with the GPU" in refused.reason and "CUDA context" in refused.reason


def test_discrete_gpu_refuses_a_plan_above_its_memory() -> None:
    laptop = _laptop_with_gpu()
    big = TrainingPlan(scheme="none", batch_size=8, seq_len=512)
    refused = predict(laptop, KNOWN_SHAPES["llama-1.1b"], big)
    assert refused.memory_kind is MemoryKind.GPU
    assert not refused.fits and "GPU memory" in refused.reason
    assert "gpu_memory_bytes" in refused.reason and "3.73 GiB" in refused.reason  # 4e9 bytes
    assert refused.gpu_peak_bytes * 1.15 > laptop.hardware.gpu_memory_bytes
    assert refused.usable_gpu_bytes == 4 * 10**9
    assert refused.free_memory_peak_bytes == refused.gpu_peak_bytes
    # The host keeps the baseline and the context's host side only: it fits 16 GB easily.
    context = laptop.calibration.cuda_context_bytes
    assert refused.peak_bytes == int(laptop.throughput.baseline_rss_bytes + context)
    small = predict(laptop, MINILM, TrainingPlan(scheme="nf4", batch_size=8, seq_len=128))
    assert small.fits, small.reason
    assert small.gpu_peak_bytes > context


def test_discrete_gpu_still_checks_host_ram() -> None:
    laptop = _laptop_with_gpu()
    tiny_ram = _with(laptop, hardware={"ram_bytes": laptop.hardware.os_reserved_bytes + 10**8})
    refused = predict(tiny_ram, MINILM, TrainingPlan(scheme="nf4"))
    assert not refused.fits and "of host RAM" in refused.reason


def test_plan_fitter_uses_the_memory_the_cost_model_checked() -> None:
    laptop = _laptop_with_gpu(vram_bytes=2 * 10**9)
    plan = TrainingPlan(scheme="nf4", batch_size=8, seq_len=512, local_steps=10)
    limits = LadderLimits(allowed_ranks=(8,), min_local_steps=1, min_seq_len=32)
    fitter = PlanFitter(SMOLLM, plan, limits, deadline_seconds=3600.0)
    first = predict(laptop, SMOLLM, plan)
    assert not first.fits and "GPU memory" in first.reason
    fitted = fitter.fit(laptop)
    assert not isinstance(fitted, str), fitted
    shrunk, prediction = fitted
    # The memory levers come first (gradient checkpointing, micro-batches), then the
    # shorter sequence of the ladder.
    assert shrunk.gradient_checkpointing and prediction.fits
    assert prediction == predict(laptop, SMOLLM, shrunk, download_bytes=fitter.download_bytes)
    # A device's free-memory reading is compared with its GPU peak, not its host RSS.
    gpu_peak = prediction.gpu_peak_bytes
    assert gpu_peak != prediction.peak_bytes
    assert not isinstance(fitter.fit(laptop, free_memory_bytes=gpu_peak + 2**20), str)
    too_little = fitter.fit(laptop, free_memory_bytes=gpu_peak // 4)
    assert isinstance(too_little, str) and "GPU memory free right now" in too_little


def test_calibration_fits_launch_on_the_gpu_path(orin: DeviceProfile) -> None:
    observations = []
    for shape in (MINILM, SMOLLM):
        for scheme in ("none", "nf4", "int8"):
            for batch, seq in ((1, 32), (4, 128), (8, 256)):
                plan = TrainingPlan(scheme=scheme, batch_size=batch, seq_len=seq)
                prediction = predict(orin, shape, plan)
                observations.append(
                    Observation(shape, plan, prediction.step_seconds, prediction.peak_bytes)
                )
    calibration = fit_calibration(orin, observations, source="test fit")
    assert "gpu_launch_seconds_per_layer" in calibration.sources
    assert "per_layer_seconds" not in calibration.sources
    fitted = dataclasses.replace(orin, calibration=calibration)
    for observation in observations:
        step = predict(fitted, observation.model_shape, observation.plan).step_seconds
        assert step == pytest.approx(observation.step_seconds, rel=0.15)


def test_no_cpu_step_factor_on_the_gpu_path() -> None:
    laptop = _laptop_with_gpu(vram_bytes=24 * 10**9)
    bnb = predict(laptop, SMOLLM, TrainingPlan(scheme="bnb-nf4")).step_seconds
    ours = predict(laptop, SMOLLM, TrainingPlan(scheme="nf4")).step_seconds
    assert SCHEME_CPU_STEP_FACTOR["bnb-nf4"] > 10
    assert bnb == pytest.approx(ours, rel=0.01)


def test_gpu_fields_round_trip_and_validate(tmp_path: Path, orin: DeviceProfile) -> None:
    path = tmp_path / "orin.toml"
    orin.save(path)
    assert DeviceProfile.load(path) == orin
    text = profile_toml_text(_laptop_with_gpu())
    assert profile_from_toml_text(text).hardware.gpu_memory_bytes == 4 * 10**9
    with pytest.raises(ProfileValidationError, match="hardware.gpu_vram is not a known field"):
        profile_from_toml_text(text.replace("[hardware]\n", "[hardware]\ngpu_vram = 1\n"))
    with pytest.raises(ProfileValidationError, match="gpu_compute_dtype is 'fp8'"):
        profile_from_toml_text(text.replace('"bfloat16"', '"fp8"'))
    no_rate = text.replace("gpu_fp32_gflops = 9000.0", "gpu_fp32_gflops = 0.0")
    with pytest.raises(ProfileValidationError, match="accelerator is 'cuda'"):
        profile_from_toml_text(no_rate)


def test_profiles_without_gpu_calibration_keys_get_the_defaults() -> None:
    text = profile_toml_text(find_profile("laptop-low-4gb"))
    lines = [
        line
        for line in text.splitlines()
        if not line.startswith(("gpu_launch_seconds_per_layer", "cuda_context_bytes"))
    ]
    loaded = profile_from_toml_text("\n".join(lines) + "\n")
    assert loaded.calibration.cuda_context_bytes == 400e6
    assert loaded.calibration.gpu_launch_seconds_per_layer == 0.001


def test_with_compute_device_prices_where_the_agent_trains(orin: DeviceProfile) -> None:
    plan = TrainingPlan(scheme="nf4")
    on_cpu = with_compute_device(orin, on_gpu=False)
    assert predict(on_cpu, SMOLLM, plan) == predict(_cpu_twin(orin), SMOLLM, plan)
    fp32 = predict(with_compute_device(orin, on_gpu=True, compute_dtype="float32"), SMOLLM, plan)
    assert not fp32.half_precision and fp32.memory_kind is MemoryKind.UNIFIED
    laptop = with_compute_device(
        _cpu_twin(_laptop_with_gpu()), on_gpu=True, gpu_memory_bytes=6 * 10**9
    )
    assert predict(laptop, SMOLLM, plan).usable_gpu_bytes == 6 * 10**9
