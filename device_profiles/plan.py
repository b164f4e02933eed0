"""Training plans and the storage cost of each quantization scheme.

The scheme names are the values of `quantization.schemes.Scheme`; they are repeated here as
plain strings so that the cost model (called thousands of times per round by the scheduler,
and by `schoolfl profile plan` on a planner's laptop) never imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from device_profiles.errors import ProfileError
from device_profiles.shapes import LINEAR_ROLES


@dataclass(frozen=True)
class SchemeStorage:
    """How a scheme stores a block linear weight of shape (out, in)."""

    bits_per_weight: float
    """Bits per weight element, packed."""
    bytes_per_row: float
    """Per-output-row metadata (int8: one fp32 scale per row)."""
    bytes_per_block: float
    """Per-block metadata (NF4: scale per 64 weights, double-quantized)."""
    block_size: int
    dequantizes: bool
    """True when a forward/backward pass materializes a full-precision copy of the weight."""

    def weight_bytes(self, in_features: int, out_features: int) -> float:
        elements = in_features * out_features
        blocks = elements / self.block_size if self.block_size else 0.0
        return (
            elements * self.bits_per_weight / 8
            + out_features * self.bytes_per_row
            + blocks * self.bytes_per_block
        )


SCHEME_STORAGE: dict[str, SchemeStorage] = {
    "none": SchemeStorage(32, 0.0, 0.0, 0, dequantizes=False),
    # Our int8 weight-only (`quantization.qlinear.Int8Linear`): int8 data + one fp32 scale
    # per output row.
    "int8": SchemeStorage(8, 4.0, 0.0, 0, dequantizes=True),
    # Our NF4 (`quantization.qlinear.NF4Linear`): 4-bit codes and an exact fp32 absmax per
    # 64-block (`nf4_scales`, float32), not torchao's int8-quantized scalers: 4 bytes a block.
    "nf4": SchemeStorage(4, 0.0, 4.0, 64, dequantizes=True),
    # bitsandbytes NF4 as `quantization.bnb_backend` builds it (`Params4bit` defaults:
    # blocksize 64, compress_statistics=True): a uint8 absmax per 64-block, double-quantized
    # with one fp32 scale per 256 of them.
    "bnb-nf4": SchemeStorage(4, 0.0, 1.0 + 4.0 / 256, 64, dequantizes=True),
    # bitsandbytes LLM.int8 row-wise: int8 data + one fp32 scale per output row.
    "bnb-int8": SchemeStorage(8, 4.0, 0.0, 0, dequantizes=True),
}
KNOWN_SCHEMES: tuple[str, ...] = tuple(SCHEME_STORAGE)

DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q", "v")
"""LoRA on the query and value projections: the LoRA paper's default and PEFT's for BERT/Llama."""
TASK_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "encoder": ("q", "k", "v"),
    "decoder": ("q", "k", "v", "o", "gate", "up", "down"),
}
"""The roles a task's adapter targets, per model family: what the coordinator's task plan
gives every device (`coordinator.scheduler`'s ENCODER_/DECODER_TARGET_ROLES, which match
`quantization.adapters`' defaults; a test keeps them equal), so what the planner prices."""


PLAN_INTEGER_LIMITS: dict[str, int] = {
    "rank": 1024,
    "batch_size": 65536,
    "seq_len": 1_000_000,
    "local_steps": 1_000_000,
}
"""The largest value of each integer plan field (the smallest is 1), as the wire allows."""

WIRE_REQUIRED = {"wire_required": True}
"""Field metadata: the wire's decoder refuses a plan that leaves this field out, although
Python code may rely on its default (see `edge_runtime.wire.schema.from_json_fields`)."""
OMIT_IF_DEFAULT = {"omit_if_default": True}
"""Field metadata: the wire's encoder leaves this field out while it holds its default, so a
plan that does not use a newer field encodes as it did before the field existed and an older
agent still accepts it; a plan that uses it is refused by that agent's decoder as an unknown
field ("newer peer?"), never silently run without it."""


def check_scheme(value: object, where: str) -> str:
    """Return the scheme name or raise naming the field, the value and the known schemes."""
    text = str(value).strip().lower() if isinstance(value, str) else value
    if text not in SCHEME_STORAGE:
        raise ProfileError(f"{where} is {value!r:.80}; expected one of {', '.join(KNOWN_SCHEMES)}")
    return str(text)


@dataclass(frozen=True)
class TrainingPlan:
    """What the scheduler asks one device to do in one round.

    The one plan form: the scheduler builds it, the cost model prices it, `TaskAssignment`
    carries it (its JSON fields are these names) and the device's trainer runs it. The bounds
    below are the wire's: a plan decoded from an assignment is checked here, and the wire's
    decoder turns a `ProfileError` into a `SchemaError` naming the field."""

    scheme: str = "none"
    """Quantization of the frozen base (a `quantization.schemes.Scheme` value)."""
    rank: int = field(default=8, metadata=WIRE_REQUIRED)
    """LoRA rank r (1..1024)."""
    batch_size: int = field(default=8, metadata=WIRE_REQUIRED)
    """Examples per optimizer step (1..65536)."""
    seq_len: int = field(default=128, metadata=WIRE_REQUIRED)
    """Tokens per example (1..1,000,000)."""
    local_steps: int = field(default=10, metadata=WIRE_REQUIRED)
    """Optimizer steps this device runs in the round (1..1,000,000)."""
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    """Block linears that get a LoRA adapter, by generic role (q k v o gate up down)."""
    optimizer_states: int = 2
    """Extra fp32 tensors per trainable parameter the optimizer keeps (AdamW: 2; 0..16)."""
    learning_rate: float = 2e-3
    """The device's AdamW learning rate, in (0, 10]; 2e-3 suits LoRA on small models (the
    coordinator sends its task's `learning_rate`)."""
    gradient_checkpointing: bool = field(default=False, metadata=OMIT_IF_DEFAULT)
    """Recompute each block's activations in backward instead of keeping them: the first
    memory lever the plan fitter pulls (saved activations shrink to one block's plus the
    per-block hidden states; the step costs about one more forward). False by default: the
    plan of a device with room keeps every activation and trains fastest."""
    micro_batch_size: int = field(default=0, metadata=OMIT_IF_DEFAULT)
    """Examples per forward/backward pass when the batch is split and gradients accumulated
    over `batch_size // micro_batch_size` passes before one optimizer step (the second
    lever: activations scale with this instead of `batch_size`). 0 by default: the whole
    batch in one pass. Otherwise 1..batch_size and a divisor of `batch_size`, so every pass
    has the same size and the accumulated gradient is the full batch's mean."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", check_scheme(self.scheme, "TrainingPlan.scheme"))
        for field_name, highest in PLAN_INTEGER_LIMITS.items():
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= highest:
                raise ProfileError(
                    f"TrainingPlan.{field_name} is {value!r}; expected an integer in 1..{highest}"
                )
        states = self.optimizer_states
        if not isinstance(states, int) or isinstance(states, bool) or not 0 <= states <= 16:
            raise ProfileError(
                f"TrainingPlan.optimizer_states is {states!r}; expected an integer in 0..16"
            )
        rate = self.learning_rate
        if (
            not isinstance(rate, (int, float))
            or isinstance(rate, bool)
            or not (math.isfinite(rate) and 0.0 < rate <= 10.0)
        ):
            raise ProfileError(
                f"TrainingPlan.learning_rate is {rate!r}; expected a number in (0, 10]"
            )
        if not isinstance(self.gradient_checkpointing, bool):
            raise ProfileError(
                f"TrainingPlan.gradient_checkpointing is {self.gradient_checkpointing!r:.80}; "
                "expected true or false"
            )
        self._check_micro_batch_size()
        targets = tuple(self.target_modules)
        unknown = [role for role in targets if role not in LINEAR_ROLES]
        if not targets or unknown or len(set(targets)) != len(targets):
            raise ProfileError(
                f"TrainingPlan.target_modules is {targets[: len(LINEAR_ROLES) + 1]!r}; expected "
                f"a non-empty subset of {', '.join(LINEAR_ROLES)}, each role once"
            )
        object.__setattr__(self, "target_modules", targets)

    def _check_micro_batch_size(self) -> None:
        micro = self.micro_batch_size
        is_integer = isinstance(micro, int) and not isinstance(micro, bool)
        if not is_integer or not 0 <= micro <= self.batch_size:
            raise ProfileError(
                f"TrainingPlan.micro_batch_size is {micro!r:.80}; expected 0 (the whole batch "
                f"at once) or an integer in 1..batch_size ({self.batch_size})"
            )
        if micro and self.batch_size % micro:
            raise ProfileError(
                f"TrainingPlan.micro_batch_size is {micro}, which does not divide "
                f"TrainingPlan.batch_size {self.batch_size}; expected a divisor of the batch "
                "(every pass the same size), or 0 for no gradient accumulation"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def examples_per_pass(self) -> int:
        """Examples in one forward/backward pass: the micro-batch, or the whole batch."""
        return self.micro_batch_size or self.batch_size

    @property
    def passes_per_step(self) -> int:
        """Forward/backward passes per optimizer step (gradient accumulation when > 1)."""
        return self.batch_size // self.examples_per_pass
