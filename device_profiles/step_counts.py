"""Counting one LoRA training step: (model shape, plan) -> FLOPs, bytes moved and memory held.

Nothing here depends on a device: the counts are what `cost_model` prices with a profile's
rates and calibration, and what `calibration` fits those against. Counts come from the shapes
and the plan, not from lookup tables, so they extrapolate to shapes nobody measured; the
memory levers of a plan (gradient checkpointing, micro-batches) change them as the trainer
runs them. Plain arithmetic (no torch): the scheduler counts for every device of every round.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from device_profiles.plan import DEFAULT_TARGET_MODULES, SCHEME_STORAGE, TrainingPlan
from device_profiles.shapes import ModelShape

BYTES_FP32 = 4
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
