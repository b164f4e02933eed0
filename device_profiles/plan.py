"""Training plans and the storage cost of each quantization scheme.

The scheme names are the values of `quantization.schemes.Scheme`; they are repeated here as
plain strings so that the cost model (called thousands of times per round by the scheduler,
and by `schoolfl profile plan` on a planner's laptop) never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    # torchao int8 weight-only: int8 data + one scale per output row.
    "int8": SchemeStorage(8, 4.0, 0.0, 0, dequantizes=True),
    # torchao NF4: 4-bit codes, a scaler per 64-block quantized to int8 plus one fp32 per 256.
    "nf4": SchemeStorage(4, 0.0, 1.0 + 4.0 / 4, 64, dequantizes=True),
    # bitsandbytes NF4 (double quant) and LLM.int8 row-wise: the same storage arithmetic.
    "bnb-nf4": SchemeStorage(4, 0.0, 1.0 + 4.0 / 4, 64, dequantizes=True),
    "bnb-int8": SchemeStorage(8, 4.0, 0.0, 0, dequantizes=True),
}
KNOWN_SCHEMES: tuple[str, ...] = tuple(SCHEME_STORAGE)

DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q", "v")
"""LoRA on the query and value projections: the LoRA paper's default and PEFT's for BERT/Llama."""


def check_scheme(value: object, where: str) -> str:
    """Return the scheme name or raise naming the field, the value and the known schemes."""
    text = str(value).strip().lower() if isinstance(value, str) else value
    if text not in SCHEME_STORAGE:
        raise ProfileError(f"{where} is {value!r}; expected one of {', '.join(KNOWN_SCHEMES)}")
    return str(text)


@dataclass(frozen=True)
class TrainingPlan:
    """What the scheduler asks one device to do in one round."""

    scheme: str = "none"
    """Quantization of the frozen base (a `quantization.schemes.Scheme` value)."""
    rank: int = 8
    """LoRA rank r."""
    batch_size: int = 8
    seq_len: int = 128
    local_steps: int = 10
    """Optimizer steps this device runs in the round."""
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    """Block linears that get a LoRA adapter, by generic role (q k v o gate up down)."""
    optimizer_states: int = 2
    """Extra fp32 tensors per trainable parameter the optimizer keeps (AdamW: 2)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", check_scheme(self.scheme, "TrainingPlan.scheme"))
        for field_name in ("rank", "batch_size", "seq_len", "local_steps"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ProfileError(
                    f"TrainingPlan.{field_name} is {value!r}; expected an integer >= 1"
                )
        if self.optimizer_states < 0:
            raise ProfileError(
                f"TrainingPlan.optimizer_states is {self.optimizer_states!r}; expected >= 0"
            )
        targets = tuple(self.target_modules)
        unknown = [role for role in targets if role not in LINEAR_ROLES]
        if not targets or unknown:
            raise ProfileError(
                f"TrainingPlan.target_modules is {targets!r}; expected a non-empty subset of "
                f"{', '.join(LINEAR_ROLES)}"
            )
        object.__setattr__(self, "target_modules", targets)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len
