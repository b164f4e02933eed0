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
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from device_profiles.plan import DEFAULT_TARGET_MODULES, SCHEME_STORAGE, TrainingPlan
from device_profiles.profile import Calibration, DeviceProfile
from device_profiles.shapes import ModelShape

BYTES_FP32 = 4
DOWNLOAD_BYTES_PER_PARAM = 4.0
"""The global adapter travels as fp32 safetensors."""
UPLOAD_BYTES_PER_PARAM = 1.0
"""Updates travel int8 per-row quantized (DESIGN.md: compressed before upload)."""
SAFETENSORS_OVERHEAD_BYTES = 8192
"""JSON header, message header and chunk framing, per transfer."""
BNB_CPU_STEP_FACTOR: dict[str, float] = {"bnb-nf4": 11.1, "bnb-int8": 11.1}
"""Step time of a bitsandbytes scheme on the CPU / that of our scheme of the same storage.
benchmarks/RESULTS.md, training benchmark run 1 (2026-11-27, bitsandbytes 0.50.2, 2 threads):
SmolLM2-135M lora-bnb-nf4 46.160 s vs lora-nf4 4.146 s (11.1x), lora-bnb-int8 44.553 s vs
lora-int8 4.006 s (11.1x). MiniLM-L6 in the same run: bnb-nf4 4.093 s vs nf4 0.584 s (7.0x);
its bnb-int8 0.592 s is 1.36x LoRA fp32 (its int8 row, 7.1 s, was a contention outlier). The
decoder figure is used: it is the larger model and the one school tasks train. A measured
profile's calibration divides it out (see `calibration._time_features`); CUDA, where
bitsandbytes is fast, is not priced here because the trainer runs on the CPU."""
SCHEME_CPU_STEP_FACTOR: dict[str, float] = {"none": 1.0, "int8": 1.0, "nf4": 1.0}
SCHEME_CPU_STEP_FACTOR.update(BNB_CPU_STEP_FACTOR)
DEFAULT_MEMORY_MARGIN = 0.15
"""A plan fits when peak x (1 + margin) <= RAM - OS reserve: the OS, page cache and other
processes move by more than a few percent during a round."""


@dataclass(frozen=True)
class StepCounts:
    """Work and memory of one training step, independent of the device."""

    matmul_flops: float
    elementwise_bytes: float
    dequant_bytes_int8: float
    """fp32 bytes materialized by dequantizing int8 weights per step (forward + backward)."""
    dequant_bytes_nf4: float
    layers: int
    weight_bytes: float
    """Frozen base at the scheme's storage, plus full-precision embeddings, norms, heads."""
    adapter_parameters: int
    trainable_state_bytes: float
    """Adapter weights + gradients + optimizer state, fp32."""
    activation_bytes: float
    """Tensors saved for backward plus the largest transient (logits, dequantized weight)."""
    dequant_workspace_bytes: float
    """fp32 size of the block weights when the scheme dequantizes (0 otherwise): the
    allocator keeps a share of the per-layer dequantized copies resident while training."""
    family: str
    cpu_step_factor: float = 1.0
    """Multiplies the whole CPU step: SCHEME_CPU_STEP_FACTOR of the plan's scheme."""


def adapter_parameter_count(
    model_shape: ModelShape, rank: int, target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
) -> int:
    """LoRA A and B of every targeted block linear, plus an encoder's classification head."""
    shapes = model_shape.linear_shapes()
    per_block = sum(
        (shapes[role][0] + shapes[role][1]) * rank for role in target_modules if role in shapes
    )
    head = 0
    if model_shape.family == "encoder":
        head = model_shape.hidden * model_shape.num_labels + model_shape.num_labels
    return per_block * model_shape.layers + head


def adapter_bytes(
    model_shape: ModelShape,
    rank: int,
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES,
    bytes_per_param: float = DOWNLOAD_BYTES_PER_PARAM,
) -> int:
    """Size of one adapter transfer: parameters at `bytes_per_param` plus framing.

    Use the default (fp32) for the global adapter a device downloads and
    `UPLOAD_BYTES_PER_PARAM` for the int8-compressed update it uploads.
    """
    parameters = adapter_parameter_count(model_shape, rank, target_modules)
    return int(math.ceil(parameters * bytes_per_param)) + SAFETENSORS_OVERHEAD_BYTES


def _activation_elements_per_token(model_shape: ModelShape, plan: TrainingPlan) -> float:
    """fp32 elements saved for backward per token per layer (SDPA attention: no S^2 term)."""
    hidden, inter = model_shape.hidden, model_shape.intermediate
    kv = model_shape.kv_heads * model_shape.head_dim
    shapes = model_shape.linear_shapes()
    # LoRA A needs its input for its weight gradient: one copy per distinct input width
    # (q, k, v share theirs), plus each adapter's rank-sized hidden output.
    inputs = {shapes[role][0] for role in plan.target_modules if role in shapes}
    lora = sum(inputs) + plan.rank * len(plan.target_modules)
    if model_shape.family == "encoder":
        # q k v out of attention, two LayerNorm inputs, GELU input, dropout masks.
        return 6.5 * hidden + 1.0 * inter + lora
    # RMSNorm inputs, q k v after RoPE, attention out, gate/up/SiLU products.
    return 4.0 * hidden + 2.0 * kv + 4.0 * inter + lora


@functools.lru_cache(maxsize=65536)
def count_step(model_shape: ModelShape, plan: TrainingPlan) -> StepCounts:
    """FLOP and byte counts of one LoRA training step of `plan` on `model_shape`."""
    tokens = plan.batch_size * plan.seq_len
    layers = model_shape.layers
    shapes = model_shape.linear_shapes()
    block_params = model_shape.block_linear_parameters()

    # Frozen linears: forward 2 FLOP/weight/token, backward input-gradient 2 more.
    flops = 4.0 * block_params * tokens
    # Attention scores and weighted sum: 4 S^2 d per sequence per layer forward, 2x backward.
    flops += 12.0 * plan.batch_size * plan.seq_len**2 * model_shape.hidden * layers
    # LoRA A and B: forward, input gradient and weight gradient.
    lora_params = sum(
        (shapes[r][0] + shapes[r][1]) * plan.rank for r in plan.target_modules if r in shapes
    )
    flops += 6.0 * lora_params * layers * tokens
    elementwise = _activation_elements_per_token(model_shape, plan) * layers * tokens
    head_activation = 0.0
    if model_shape.family == "decoder":
        # LM head forward + input gradient; logits, log-softmax and its gradient in fp32.
        flops += 4.0 * model_shape.hidden * model_shape.vocab * tokens
        head_activation = 3.0 * model_shape.vocab * tokens
        elementwise += head_activation

    storage = SCHEME_STORAGE[plan.scheme]
    quantized_weight_bytes = sum(storage.weight_bytes(i, o) for i, o in shapes.values()) * layers
    weight_bytes = quantized_weight_bytes + BYTES_FP32 * model_shape.other_parameters()
    streamed_weight_bytes = quantized_weight_bytes
    if model_shape.family == "decoder":
        streamed_weight_bytes += BYTES_FP32 * model_shape.hidden * model_shape.vocab
    # Dequantizing kernels materialize each weight in fp32 in forward and again in backward.
    dequant = 2.0 * BYTES_FP32 * block_params if storage.dequantizes else 0.0
    is_nf4 = plan.scheme in ("nf4", "bnb-nf4")
    transient = BYTES_FP32 * model_shape.largest_linear_parameters() if storage.dequantizes else 0

    adapter_params = adapter_parameter_count(model_shape, plan.rank, plan.target_modules)
    trainable_state = BYTES_FP32 * adapter_params * (2 + plan.optimizer_states)
    saved = BYTES_FP32 * (
        _activation_elements_per_token(model_shape, plan) * layers * tokens + head_activation
    )
    return StepCounts(
        matmul_flops=flops,
        # Activations touched ~3 times (forward, backward, gradient) plus the stored weights
        # streamed from memory in forward and in backward (what bounds small-batch steps).
        elementwise_bytes=BYTES_FP32 * 3.0 * elementwise + 2.0 * streamed_weight_bytes,
        dequant_bytes_int8=0.0 if is_nf4 else dequant,
        dequant_bytes_nf4=dequant if is_nf4 else 0.0,
        layers=layers,
        weight_bytes=weight_bytes,
        adapter_parameters=adapter_params,
        trainable_state_bytes=trainable_state,
        activation_bytes=saved + transient,
        dequant_workspace_bytes=BYTES_FP32 * block_params if storage.dequantizes else 0.0,
        family=model_shape.family,
        cpu_step_factor=SCHEME_CPU_STEP_FACTOR[plan.scheme],
    )


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
    validated: bool = False
    """True only when the profile records measurements from the device: otherwise the
    figures are unvalidated estimates (published rates and an x86 fit)."""


def step_seconds_for(profile: DeviceProfile, counts: StepCounts) -> float:
    """Apply a profile's rates and calibration to the counts of one step."""
    calibration = profile.calibration
    throughput = profile.throughput
    on_gpu = profile.hardware.accelerator == "cuda" and throughput.gpu_fp32_gflops > 0
    gflops = throughput.gpu_fp32_gflops if on_gpu else throughput.cpu_fp32_gflops
    bandwidth = throughput.memory_bandwidth_gbps * 1e9
    factor = 1.0 if on_gpu else counts.cpu_step_factor
    return factor * (
        counts.matmul_flops / (gflops * 1e9 * calibration.flop_efficiency)
        + counts.elementwise_bytes / (bandwidth * calibration.memory_efficiency)
        + counts.dequant_bytes_int8 * calibration.dequant_int8 / bandwidth
        + counts.dequant_bytes_nf4 * calibration.dequant_nf4 / bandwidth
        + calibration.per_layer_seconds * counts.layers
        + calibration.fixed_seconds
    )


def activation_factor(calibration: Calibration, family: str) -> float:
    """Measured / counted activation bytes; the counts are rough per family, so each family
    has its own factor (the allocator's slack also differs with tensor sizes)."""
    if family == "encoder":
        return calibration.activation_factor_encoder
    return calibration.activation_factor_decoder


def peak_bytes_for(profile: DeviceProfile, counts: StepCounts) -> float:
    calibration = profile.calibration
    return (
        profile.throughput.baseline_rss_bytes
        + counts.weight_bytes
        + counts.trainable_state_bytes
        + activation_factor(calibration, counts.family) * counts.activation_bytes
        + calibration.dequant_memory_fraction * counts.dequant_workspace_bytes
        + calibration.memory_overhead_bytes
    )


def transfer_seconds(size_bytes: float, mbps: float, rtt_ms: float) -> float:
    """Link time plus one request/acknowledge round trip."""
    return size_bytes * 8.0 / (mbps * 1e6) + 2.0 * rtt_ms / 1000.0


def unfit_reason(
    profile: DeviceProfile,
    scheme: str,
    peak_bytes: float,
    memory_margin: float = DEFAULT_MEMORY_MARGIN,
) -> str:
    """Why a plan of `scheme` with this peak cannot run on `profile` at all (a scheme the
    device lacks, or a peak above usable RAM with `memory_margin` headroom); empty when it
    can. Whether it fits a deadline is the scheduler's question, not this one."""
    if scheme not in profile.throughput.quant_schemes:
        return (
            f"scheme {scheme} is not usable on {profile.name} "
            f"(usable: {', '.join(profile.throughput.quant_schemes)})"
        )
    usable = profile.usable_ram_bytes
    needed = peak_bytes * (1.0 + memory_margin)
    if needed > usable:
        return (
            f"needs {peak_bytes / 1e9:.2f} GB peak (+{memory_margin:.0%} margin = "
            f"{needed / 1e9:.2f} GB) but only {usable / 1e9:.2f} GB usable "
            f"({profile.hardware.ram_bytes / 1e9:.2f} GB RAM - "
            f"{profile.hardware.os_reserved_bytes / 1e9:.2f} GB OS reserve)"
        )
    return ""


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
    the profile's link rates. A scheme the device cannot run, or a peak above usable RAM with
    `memory_margin` headroom, gives `fits=False` and a reason a planner can act on.
    """
    counts = count_step(model_shape, plan)
    step = step_seconds_for(profile, counts)
    peak = peak_bytes_for(profile, counts)
    if download_bytes is None:
        download_bytes = adapter_bytes(model_shape, plan.rank, plan.target_modules)
    if upload_bytes is None:
        upload_bytes = adapter_bytes(
            model_shape, plan.rank, plan.target_modules, UPLOAD_BYTES_PER_PARAM
        )
    network = profile.network
    download = transfer_seconds(download_bytes, network.down_mbps, network.rtt_ms)
    upload = transfer_seconds(upload_bytes, network.up_mbps, network.rtt_ms)
    compute = step * plan.local_steps
    reason = unfit_reason(profile, plan.scheme, peak, memory_margin)
    return Prediction(
        step_seconds=step,
        peak_bytes=int(peak),
        round_seconds=download + compute + upload,
        download_seconds=download,
        upload_seconds=upload,
        compute_seconds=compute,
        fits=not reason,
        reason=reason,
        usable_bytes=profile.usable_ram_bytes,
        validated=profile.predictions_validated,
    )
