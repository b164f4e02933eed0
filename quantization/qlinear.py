"""Frozen weight-only quantized Linear layers (NF4 and int8) for LoRA training on CPUs.

The weight is stored only in its quantized form (buffers, never parameters, so no optimizer or
`requires_grad` can touch it). Each forward dequantizes the weight of this one layer to a
temporary, multiplies, and drops it; the backward pass dequantizes again to get the gradient
for the input (the weight itself never gets a gradient). Peak memory therefore stays at the
quantized footprint plus one layer's full-precision weight.

int8 quantization goes through torchao's affine primitives. NF4 uses torchao's codebook and
packing and produces exactly its codes (a test compares them with `to_nf4`), but searches the
codes 6x faster and keeps exact fp32 block scales. The forward path is our own: torchao's generic
tensor-subclass path dequantizes nibble by nibble with int64 indexing, which measured about a
third slower per training step than fp32 LoRA on CPU. Here one table lookup decodes two
packed bytes (four NF4 codes) at once, and for int8 the per-row scale is applied to the
matmul output instead of to the weight.

Both classes subclass `nn.Linear` so PEFT's default LoRA dispatch wraps them unchanged; the
`weight` attribute is a read-only property that dequantizes (for inspection or merging only).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

NF4_BLOCK_SIZE = 64
"""Elements per NF4 absmax block (QLoRA's choice); a weight's numel must be a multiple."""

NF4_CODEBOOK: tuple[float, ...] = (
    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0,
)  # fmt: skip
"""The 16 NF4 levels, as in torchao's NF4Tensor (a test checks they still agree)."""


class _DequantizedMatmul(torch.autograd.Function):
    """y = x @ W.T + b with W rebuilt from the quantized buffers in forward and backward.

    Saving nothing but a reference to the module keeps activation memory identical to a plain
    frozen Linear (which saves its weight, here the quantized one).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer._matmul(x)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        # grad_out has the forward's compute dtype (autocast runs no longer), so the weight
        # is rebuilt in that dtype too, as in forward.
        return ctx.layer._matmul_transposed(grad_out), None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype this layer multiplies in: autocast's (bf16/fp16 on a GPU, see
    quantization/compute_device.py) when it is on for x's device, else x's own float dtype.
    The dequantized weight is built directly in it, never as an fp32 copy first."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return x.dtype
    return torch.float32


_SHAPE_ONLY_WEIGHTS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "shape_only_weights", default=False
)


@contextlib.contextmanager
def shape_only_weights() -> Iterator[None]:
    """Inside the block a quantized layer's `.weight` has the right shape, dtype and device
    but no values (an expanded zero, no memory).

    PEFT reads `target.weight` about 22 times per layer while it wraps it in LoRA, only for
    its shape, device and dtype. Each read of the real property dequantizes the whole layer:
    wrapping SmolLM2's 210 layers cost 4,620 dequantizations, and most of the 1.1B
    checkpoint's load time. Nothing inside the block may need the weight's values (LoRA's
    default initialisation does not; PiSSA/OLoRA/LoftQ would, and we do not offer them).
    """
    token = _SHAPE_ONLY_WEIGHTS.set(True)
    try:
        yield
    finally:
        _SHAPE_ONLY_WEIGHTS.reset(token)


class QuantizedLinear(nn.Linear):
    """Common part of the frozen quantized linears; subclasses say how to (de)quantize."""

    scheme_name: str = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        # nn.Linear.__init__ would allocate a full-precision weight; that is what we avoid.
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().to(torch.float32), requires_grad=False)

    # -- to be provided by subclasses -------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full-precision weight (out_features, in_features), as a fresh temporary."""
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize(x.dtype)  # (out, in)
        return F.linear(x, w, None)  # (..., out)

    def _matmul_transposed(self, grad_out: torch.Tensor) -> torch.Tensor:
        w = self.dequantize(grad_out.dtype)  # (out, in)
        return grad_out @ w  # (..., in)

    # -- nn.Module --------------------------------------------------------------------------
    @property  # type: ignore[override]
    def weight(self) -> torch.Tensor:
        """Dequantized weight for inspection and merging; costs a full-precision copy.

        Inside `shape_only_weights()` it is a zero-cost stand-in instead (see there)."""
        if _SHAPE_ONLY_WEIGHTS.get():
            device = self._storage().device
            return torch.zeros((), device=device).expand(self.out_features, self.in_features)
        return self.dequantize()

    def _storage(self) -> torch.Tensor:
        """One tensor of the quantized storage (where the layer lives)."""
        return next(self.buffers(recurse=False))

    def reset_parameters(self) -> None:
        """Nothing to reset: the weight is frozen data, not a trainable parameter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(_compute_dtype(x))  # differentiable; a no-op when the dtype already fits
        if torch.is_grad_enabled() and x.requires_grad:
            y = _DequantizedMatmul.apply(x, self)
        else:
            with torch.no_grad():
                y = self._matmul(x)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def quantized_nbytes(self) -> int:
        """Bytes held by this layer's quantized weight (codes + scales + bias)."""
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False)) + (
            0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scheme={self.scheme_name}"
        )


@functools.cache
def _nf4_quad_table(
    codebook: tuple[float, ...], device: torch.device | None = None
) -> torch.Tensor:
    """(65536, 4) table: two packed bytes read as one uint16 -> their four NF4 values.

    Decoding 16 bits per lookup is ~4x faster on CPU than torchao's nibble-by-nibble int64
    indexing. torchao packs the earlier element in the high nibble; a little-endian uint16
    holds the earlier byte in its low 8 bits. One 1 MiB table per device is shared by every
    layer (a per-layer buffer would follow `.to(device)` but cost 1 MiB per layer).
    """
    if sys.byteorder != "little":
        raise RuntimeError("the NF4 decode table assumes a little-endian CPU")
    values = torch.tensor(codebook, dtype=torch.float32)  # (16,)
    word = torch.arange(65536)  # (65536,)
    first, second = word & 0xFF, word >> 8
    nibbles = [first >> 4, first & 0xF, second >> 4, second & 0xF]
    table = torch.stack([values[n] for n in nibbles], dim=1).contiguous()  # (65536, 4)
    return table if device is None else table.to(device)


NF4_QUANTIZE_CHUNK = 2**20
"""Elements quantized per step; bounds the temporaries to a few MiB whatever the layer size."""


@torch.no_grad()
def nf4_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 codes (numel/2,), fp32 absmax scales (numel/64,)) of a weight.

    The codes are exactly torchao's `to_nf4` codes (nearest of its 16 levels after dividing
    each 64-block by its absmax; earlier element in the high nibble), found with a binary
    search over the level midpoints instead of torchao's 16-way distance table, which measured
    6x faster (1.1B weights: ~1.5 min instead of ~8 min on one x86 core) with bounded
    temporaries. The scales are kept exact in fp32 instead of torchao's int8
    double-quantization: 0.5 instead of 0.127 bits per weight, for a slightly lower error.
    """
    flat = weight.detach().reshape(-1)
    codebook = torch.tensor(NF4_CODEBOOK, dtype=torch.float32)  # (16,)
    midpoints = (codebook[1:] + codebook[:-1]) / 2  # (15,)
    packed = torch.empty(flat.numel() // 2, dtype=torch.uint8)
    scales = torch.empty(flat.numel() // NF4_BLOCK_SIZE, dtype=torch.float32)
    for start in range(0, flat.numel(), NF4_QUANTIZE_CHUNK):
        chunk = flat[start : start + NF4_QUANTIZE_CHUNK].to(torch.float32)
        blocks = chunk.view(-1, NF4_BLOCK_SIZE)  # (b, 64)
        absmax = blocks.abs().amax(dim=1)  # (b,)
        first_block = start // NF4_BLOCK_SIZE
        scales[first_block : first_block + absmax.numel()] = absmax
        normalized = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)
        codes = torch.bucketize(normalized, midpoints).to(torch.uint8).view(-1)  # (c,)
        packed[start // 2 : (start + codes.numel()) // 2] = (codes[0::2] << 4) | codes[1::2]
    return packed, scales


class NF4Linear(QuantizedLinear):
    """4-bit NormalFloat weight (QLoRA, torchao's codebook and packing), block size 64.

    Memory: 4 bits per weight + 32 bits per 64 weights = 4.5 bits per weight.
    """

    scheme_name = "nf4"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        packed: torch.Tensor,
        block_scales: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("nf4_packed", packed)  # (out * in / 2,) uint8
        self.register_buffer("nf4_scales", block_scales)  # (out * in / 64,) float32
        if packed.numel() % 2:
            raise ValueError("nf4 packed codes must have an even number of bytes")

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> NF4Linear:
        """Quantize a (out, in) weight: packed NF4 codes + exact fp32 absmax per block."""
        out_features, in_features = weight.shape
        if weight.numel() % NF4_BLOCK_SIZE:
            raise ValueError(
                f"nf4 needs weight.numel() divisible by {NF4_BLOCK_SIZE}, got shape "
                f"{tuple(weight.shape)}; leave this layer unquantized (skip_modules)"
            )
        packed, scales = nf4_quantize(weight)
        return cls(in_features, out_features, packed, scales, bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        table = _nf4_quad_table(NF4_CODEBOOK, self.nf4_packed.device)  # (65536, 4), shared
        words = self.nf4_packed.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)  # (n/4,)
        quads = torch.index_select(table, 0, words)  # (n/4, 4)
        blocks = quads.view(-1, NF4_BLOCK_SIZE)  # (n_blocks, 64)
        blocks.mul_(self.nf4_scales.unsqueeze(1))
        return blocks.view(self.out_features, self.in_features).to(dtype)


class Int8Linear(QuantizedLinear):
    """Symmetric per-output-channel int8 weight (torchao's int8 weight-only layout).

    Memory: 8 bits per weight + one fp32 scale per output row. The scale commutes with the
    matmul, so forward is (x @ Q.T) * s and backward (g * s) @ Q: no scaled weight copy.
    """

    scheme_name = "int8"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("int8_weight", qweight)  # (out, in) int8
        self.register_buffer("int8_scales", scales)  # (out,) float32

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """Per-row symmetric int8 through torchao's affine quantization primitives."""
        from torchao.quantization.quant_primitives import (
            MappingType,
            choose_qparams_affine,
            quantize_affine,
        )

        out_features, in_features = weight.shape
        w = weight.detach().to(torch.float32)
        block = (1, in_features)
        scale, zero_point = choose_qparams_affine(
            w, MappingType.SYMMETRIC, block, torch.int8, eps=1e-12, scale_dtype=torch.float32
        )
        q = quantize_affine(w, block, scale, zero_point, torch.int8)
        return cls(in_features, out_features, q.contiguous(), scale.reshape(-1).float(), bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.int8_weight.to(dtype)  # (out, in)
        return w.mul_(self.int8_scales.to(dtype).unsqueeze(1))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.int8_weight.to(x.dtype), None)  # (..., out)
        return y.mul_(self.int8_scales.to(x.dtype))

    def _matmul_transposed(self, grad_out: torch.Tensor) -> torch.Tensor:
        g = grad_out * self.int8_scales.to(grad_out.dtype)  # (..., out)
        return g @ self.int8_weight.to(grad_out.dtype)  # (..., in)


def quantized_bytes_per_weight(scheme_name: str) -> float:
    """Approximate storage per weight in bytes, for memory planning (cost model)."""
    return {"nf4": 4.5 / 8, "int8": 1.0, "none": 4.0}.get(scheme_name, math.nan)
