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

import functools
import math
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
bitsandbytes is fast, does not get the factor (the GPU path below)."""
SCHEME_CPU_STEP_FACTOR: dict[str, float] = {"none": 1.0, "int8": 1.0, "nf4": 1.0}
SCHEME_CPU_STEP_FACTOR.update(BNB_CPU_STEP_FACTOR)
RECOMPUTE_DISPATCH_SHARE = 1.0 / 3.0
"""Per-layer framework cost gradient checkpointing adds, as a share of forward + backward
(assumed: the recomputed forward dispatches the forward's kernels again)."""
LOSS_CHUNK_POSITIONS = 128
"""Positions whose logits exist at once in the trainer's causal-LM loss: the value of
`quantization.causal_lm_loss.DEFAULT_CHUNK_POSITIONS` (a test keeps them equal; this package
does not import torch)."""
INT8_ROW_SCALE_BYTES = 4
"""fp32 scale per row of an int8 vocabulary matrix (`quantization.embeddings`)."""
AGENT_MMAP_THRESHOLD_BYTES = 1024 * 1024
"""glibc's mmap threshold as the agent fixes it for training (quantization/allocator.py's
`TRAINING_MMAP_THRESHOLD_BYTES`; a test keeps the two equal): what separates dequantized
copies the heap keeps from those returned to the OS."""

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
    """Tensors saved for backward plus the largest transient (logits, dequantized weight),
    when they are small enough to come from glibc's heap on the CPU (0 otherwise)."""
    dequant_workspace_bytes: float
    """fp32 size of the block weights when the scheme dequantizes (0 otherwise): a GPU's
    caching allocator keeps a share of the per-layer dequantized copies resident."""
    family: str
    mapped_activation_bytes: float = 0.0
    """The same activations when one pass's (tokens, hidden) fp32 tensor reaches the agent's
    mmap threshold: each is then its own mapping and the CPU path counts them as they are
    (no heap slack factor); a GPU applies its factor to both."""
    heap_dequant_workspace_bytes: float = 0.0
    """The CPU path's counterpart: only the block weights whose fp32 copy is below the
    agent's mmap threshold (`AGENT_MMAP_THRESHOLD_BYTES`) come from glibc's heap, which keeps
    a share of them resident; larger copies are mappings returned to the OS when freed."""
    cpu_step_factor: float = 1.0
    """Multiplies the whole CPU step: SCHEME_CPU_STEP_FACTOR of the plan's scheme."""
    passes: int = 1
    """Forward/backward passes per optimizer step (`TrainingPlan.passes_per_step`): each
    pass pays the fixed per-pass cost and dispatches every layer again."""
    recomputes_forward: bool = False
    """Gradient checkpointing: every block runs its forward a second time in backward."""

    @property
    def layer_executions(self) -> float:
        """What the per-layer cost multiplies: layers x passes, and a third more with
        gradient checkpointing (ASSUMED: one extra forward dispatch per layer, a forward
        being about a third of forward + backward's kernels; not measured)."""
        if self.passes == 1 and not self.recomputes_forward:
            return self.layers
        share = RECOMPUTE_DISPATCH_SHARE if self.recomputes_forward else 0.0
        return self.layers * self.passes * (1.0 + share)

    @property
    def all_activation_bytes(self) -> float:
        """Heap-served and mapped activations together (what a GPU allocator holds)."""
        return self.activation_bytes + self.mapped_activation_bytes


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
def activations_are_mapped(model_shape: ModelShape, plan: TrainingPlan) -> bool:
    """Whether the CPU path counts a decoder's activations as they are, without heap slack.

    Under the agent's allocator a tensor of 1 MiB or more is its own mapping, returned to the
    OS when freed: once one pass's (tokens, hidden) fp32 activation is that large, the block
    activations are resident as counted (measured: SmolLM2 at 4 x 128, the 1.1B LLaMA shape).
    Below it they come from glibc's heap, whose slack the fitted factor covers (every point
    of the calibration grid is there). So the predicted peak drops where a pass crosses the
    threshold, as the measured one does. Encoders keep the factor everywhere (the safe side):
    no encoder point beyond the threshold has been measured.
    """
    if model_shape.family != "decoder":
        return False
    pass_tokens = plan.examples_per_pass * plan.seq_len
    return BYTES_FP32 * pass_tokens * model_shape.hidden >= AGENT_MMAP_THRESHOLD_BYTES


def count_step(model_shape: ModelShape, plan: TrainingPlan) -> StepCounts:
    """FLOP and byte counts of one LoRA training step of `plan` on `model_shape`.

    The plan's memory levers change the counts as the trainer contract runs them: gradient
    checkpointing recomputes every block's forward in backward (one more forward of the
    blocks: half again a frozen linear's FLOPs, which need no weight gradient, a third
    again of attention's and LoRA's; one more touch of the blocks' activations, one more
    pass over their weights and their dequantization; the LM head is not recomputed)
    and keeps only each block's input hidden states plus one block's activations; micro-
    batches keep the FLOPs, size activations by the micro-batch and stream (and dequantize)
    the weights once per pass."""
    tokens = plan.batch_size * plan.seq_len
    pass_tokens = plan.examples_per_pass * plan.seq_len
    passes = plan.passes_per_step
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
    per_token = _activation_elements_per_token(model_shape, plan)
    block_elementwise = per_token * layers * tokens
    elementwise = block_elementwise
    head_activation = 0.0
    if model_shape.family == "decoder":
        # LM head forward + input gradient; logits, log-softmax and its gradient in fp32, for
        # one chunk of positions at a time (the trainer's chunked loss), plus the gathered
        # hidden states and their gradient for every position.
        flops += 4.0 * model_shape.hidden * model_shape.vocab * tokens
        chunk = min(pass_tokens, LOSS_CHUNK_POSITIONS)
        head_activation = 3.0 * model_shape.vocab * chunk + 2.0 * model_shape.hidden * pass_tokens
        elementwise += 3.0 * model_shape.vocab * tokens
    if plan.gradient_checkpointing:
        # The recomputed forward of every block: frozen linears, attention, LoRA A and B.
        flops += (
            2.0 * block_params * tokens
            + 4.0 * plan.batch_size * plan.seq_len**2 * model_shape.hidden * layers
            + 2.0 * lora_params * layers * tokens
        )

    mapped = activations_are_mapped(model_shape, plan)
    storage = SCHEME_STORAGE[plan.scheme]
    quantized_weight_bytes = sum(storage.weight_bytes(i, o) for i, o in shapes.values()) * layers
    weight_bytes = quantized_weight_bytes + BYTES_FP32 * model_shape.other_parameters()
    if storage.dequantizes:
        # A quantizing scheme stores the frozen vocabulary matrices (token embedding, an untied
        # LM head) as int8 rows too: the task default (`quantize_embeddings`), assumed here
        # because a plan does not say; a task that opts out is under-predicted by 3 bytes per
        # vocabulary weight.
        vocabulary_rows = model_shape.vocab * model_shape.vocabulary_matrices()
        weight_bytes -= (BYTES_FP32 - 1) * vocabulary_rows * model_shape.hidden
        weight_bytes += INT8_ROW_SCALE_BYTES * vocabulary_rows
    streamed_weight_bytes = quantized_weight_bytes
    if model_shape.family == "decoder":
        streamed_weight_bytes += BYTES_FP32 * model_shape.hidden * model_shape.vocab
    # Dequantizing kernels materialize each weight in fp32 in forward and again in backward,
    # once per pass, and once more per pass for a recomputed forward.
    dequant = 2.0 * BYTES_FP32 * block_params if storage.dequantizes else 0.0
    if plan.gradient_checkpointing:
        dequant *= 1.5
    dequant *= passes
    is_nf4 = plan.scheme in ("nf4", "bnb-nf4")
    transient = BYTES_FP32 * model_shape.largest_linear_parameters() if storage.dequantizes else 0

    adapter_params = adapter_parameter_count(model_shape, plan.rank, plan.target_modules)
    trainable_state = BYTES_FP32 * adapter_params * (2 + plan.optimizer_states)
    saved_per_token = per_token * layers
    if plan.gradient_checkpointing:
        # Each block's input hidden state, plus the block being recomputed in backward.
        saved_per_token = model_shape.hidden * layers + per_token
    saved = BYTES_FP32 * (saved_per_token * pass_tokens + head_activation)
    mapped_bytes = 0.0
    if model_shape.family == "decoder":
        # What the agent's allocator serves as mappings (each tensor >= 1 MiB), resident as
        # counted: one loss chunk's logits, the dequantized weight, and the block activations
        # once a pass's (tokens, hidden) tensor is that large (`activations_are_mapped`).
        logits = BYTES_FP32 * 3.0 * model_shape.vocab * min(pass_tokens, LOSS_CHUNK_POSITIONS)
        if logits / 3.0 >= AGENT_MMAP_THRESHOLD_BYTES:
            mapped_bytes += logits
        if transient >= AGENT_MMAP_THRESHOLD_BYTES:
            mapped_bytes += transient
        if mapped:
            mapped_bytes = saved + transient
    # Activations touched ~3 times (forward, backward, gradient), a 4th for a recomputed
    # forward, plus the stored weights streamed from memory in forward and in backward of
    # every pass (what bounds small-batch steps); the LM head's weight is not recomputed.
    elementwise_bytes = BYTES_FP32 * 3.0 * elementwise + 2.0 * streamed_weight_bytes * passes
    if plan.gradient_checkpointing:
        elementwise_bytes += BYTES_FP32 * block_elementwise + passes * quantized_weight_bytes
    return StepCounts(
        matmul_flops=flops,
        elementwise_bytes=elementwise_bytes,
        dequant_bytes_int8=0.0 if is_nf4 else dequant,
        dequant_bytes_nf4=dequant if is_nf4 else 0.0,
        layers=layers,
        weight_bytes=weight_bytes,
        adapter_parameters=adapter_params,
        trainable_state_bytes=trainable_state,
        activation_bytes=saved + transient - mapped_bytes,
        mapped_activation_bytes=mapped_bytes,
        dequant_workspace_bytes=BYTES_FP32 * block_params if storage.dequantizes else 0.0,
        heap_dequant_workspace_bytes=(
            BYTES_FP32 * model_shape.block_linear_parameters_below(AGENT_MMAP_THRESHOLD_BYTES)
            if storage.dequantizes
            else 0.0
        ),
        family=model_shape.family,
        cpu_step_factor=SCHEME_CPU_STEP_FACTOR[plan.scheme],
        passes=passes,
        recomputes_forward=plan.gradient_checkpointing,
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


def transfer_seconds(size_bytes: float, mbps: float, rtt_ms: float) -> float:
    """Link time plus one request/acknowledge round trip."""
    return size_bytes * 8.0 / (mbps * 1e6) + 2.0 * rtt_ms / 1000.0


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
            f"{context_bytes / 1e9:.2f} GB and everything the GPU holds included)"
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
                f"needs {peaks.gpu_bytes / 1e9:.2f} GB of GPU memory at peak "
                f"(+{memory_margin:.0%} margin = {needed_gpu / 1e9:.2f} GB, the CUDA "
                f"context's {peaks.cuda_context_bytes / 1e9:.2f} GB included) but the GPU has "
                f"{usable_gpu / 1e9:.2f} GB (gpu_memory_bytes): a smaller rank, batch or "
                "sequence, or a 4-bit scheme, lowers it"
            )
    usable = profile.usable_ram_bytes
    needed = peaks.ram_bytes * (1.0 + memory_margin)
    if needed > usable:
        where = _ram_where(profile, peaks.kind, peaks.cuda_context_bytes)
        return (
            f"needs {peaks.ram_bytes / 1e9:.2f} GB peak{where} (+{memory_margin:.0%} margin = "
            f"{needed / 1e9:.2f} GB) but only {usable / 1e9:.2f} GB usable "
            f"({profile.hardware.ram_bytes / 1e9:.2f} GB RAM - "
            f"{profile.hardware.os_reserved_bytes / 1e9:.2f} GB OS reserve)"
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
