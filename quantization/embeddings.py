"""Frozen int8 token embeddings and LM heads: the vocabulary matrix at a quarter of its size.

A small decoder's vocabulary matrix is a large share of its weights (SmolLM2-135M: 49,152 x
576 = 28 M of 135 M parameters, 113 MB in fp32) and the Linear-only quantization of the loader
leaves it in fp32. Here it is stored as int8 rows with one fp32 scale per row (symmetric, the
same torchao primitives as `Int8Linear`, so the lookup error of each element is at most half
its row's scale):

- `Int8Embedding` dequantizes only the rows a batch looks up;
- `Int8LMHead` multiplies by the same rows, a block of the vocabulary at a time, so the
  transient full-precision weight is one block (a few MiB), never the whole matrix. A tied
  head reads the embedding's buffers (one int8 storage, no fp32 copy, tying kept by
  construction); an untied frozen head owns its buffers.

`quantize_embeddings(model)` swaps both into a loaded model in place. `build_task_model` gets
the same modules from the loader instead (`load_quantized(..., int8_vocabulary=True)`, which
quantizes each matrix as it streams in, so its full-precision copy is never resident), for
quantizing schemes unless the task opts out (`TaskModelSpec.quantize_embeddings`).
A trained head (classification `score` / `classifier`, or an `lm_head` a task lists in
`modules_to_save`) is never touched: only frozen matrices are quantized.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from quantization.qlinear import Int8Linear, QuantizedLinear

logger = logging.getLogger(__name__)

QUANTIZE_ROWS_PER_STEP = 4096
"""Rows quantized at once: per-row scales make row blocks independent (exact), and the
temporaries stay at a few MiB instead of several copies of a 113 MB matrix."""

HEAD_BLOCK_ROWS = 4096
"""Vocabulary rows dequantized per step of the LM head's matmul. At hidden size 576 a block is
9 MiB in fp32 (vs 113 MB for SmolLM2's whole matrix); blocks of thousands of rows keep the
matmul as efficient as one large one."""


@torch.no_grad()
def int8_quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes (rows, cols), fp32 scales (rows,)) of a 2-D weight, per-row symmetric.

    The codes and scales are exactly `Int8Linear.from_weight`'s (torchao's primitives),
    computed a block of rows at a time.
    """
    rows, cols = weight.shape
    codes = torch.empty((rows, cols), dtype=torch.int8, device=weight.device)
    scales = torch.empty(rows, dtype=torch.float32, device=weight.device)
    for start in range(0, rows, QUANTIZE_ROWS_PER_STEP):
        stop = min(rows, start + QUANTIZE_ROWS_PER_STEP)
        block = Int8Linear.from_weight(weight[start:stop])
        codes[start:stop] = block.int8_weight
        scales[start:stop] = block.int8_scales
    return codes, scales


class Int8Embedding(nn.Module):
    """Frozen embedding table stored as int8 rows + one fp32 scale per row.

    Buffers, not parameters: nothing can train it, and PEFT's tied-weight checks (which look
    at the input embedding's parameters) see no parameter to tie. The lookup returns fp32
    like the original table (embeddings are not autocast ops).
    """

    def __init__(
        self, codes: torch.Tensor, scales: torch.Tensor, padding_idx: int | None = None
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.padding_idx = padding_idx
        self.register_buffer("int8_weight", codes)  # (vocab, dim) int8
        self.register_buffer("int8_scales", scales)  # (vocab,) float32

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        codes, scales = int8_quantize_rows(embedding.weight)
        return cls(codes, scales, embedding.padding_idx)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized table, for inspection only: costs a full fp32 copy."""
        return self.dequantize()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.int8_weight.to(dtype).mul_(self.int8_scales.to(dtype).unsqueeze(1))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)  # (n,)
        rows = self.int8_weight.index_select(0, flat).to(torch.float32)  # (n, dim)
        rows.mul_(self.int8_scales.index_select(0, flat).unsqueeze(1))  # (n, dim)
        return rows.view(*input_ids.shape, self.embedding_dim)  # (..., dim)

    def quantized_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme=int8"


class Int8LMHead(QuantizedLinear):
    """Frozen int8 output projection (vocab, hidden), computed one vocabulary block at a time.

    `tied_to` makes it read an `Int8Embedding`'s buffers instead of owning any: the tied
    matrix exists once, and `state_dict` holds it once (under the embedding's name), as a
    tied fp32 model's does. The reference is kept outside the module tree, so the embedding
    is not a second submodule; it moves with the model because the model owns it.
    """

    scheme_name = "int8"

    def __init__(
        self,
        codes: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
        *,
        tied_to: Int8Embedding | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        if (tied_to is not None) == (codes is not None and scales is not None):
            raise ValueError("Int8LMHead needs either codes and scales or tied_to, not both")
        shape = tuple(tied_to.int8_weight.shape if tied_to is not None else codes.shape)  # type: ignore[union-attr]
        super().__init__(shape[1], shape[0], bias)
        self._tied_to = tied_to
        if tied_to is None:
            self.register_buffer("int8_weight", codes)  # (vocab, hidden) int8
            self.register_buffer("int8_scales", scales)  # (vocab,) float32

    def __setattr__(self, name: str, value: object) -> None:
        if name == "_tied_to":  # a plain attribute, never a registered submodule
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8LMHead:
        codes, scales = int8_quantize_rows(linear.weight)
        return cls(codes, scales, bias=None if linear.bias is None else linear.bias.detach())

    @property
    def is_tied(self) -> bool:
        return self._tied_to is not None

    def _codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        owner = self._tied_to if self._tied_to is not None else self
        return owner.int8_weight, owner.int8_scales

    def _storage(self) -> torch.Tensor:
        return self._codes()[0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes, scales = self._codes()
        return codes.to(dtype).mul_(scales.to(dtype).unsqueeze(1))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        codes, scales = self._codes()
        y = x.new_empty((*x.shape[:-1], self.out_features))  # (..., vocab)
        for start in range(0, self.out_features, HEAD_BLOCK_ROWS):
            block = slice(start, start + HEAD_BLOCK_ROWS)
            w = codes[block].to(x.dtype)  # (block, hidden)
            y[..., block] = F.linear(x, w).mul_(scales[block].to(x.dtype))  # (..., block)
        return y

    def _matmul_transposed(self, grad_out: torch.Tensor) -> torch.Tensor:
        codes, scales = self._codes()
        grad_in = grad_out.new_zeros((*grad_out.shape[:-1], self.in_features))  # (..., hidden)
        for start in range(0, self.out_features, HEAD_BLOCK_ROWS):
            block = slice(start, start + HEAD_BLOCK_ROWS)
            g = grad_out[..., block] * scales[block].to(grad_out.dtype)  # (..., block)
            grad_in.add_(g @ codes[block].to(grad_out.dtype))  # (..., hidden)
        return grad_in

    def extra_repr(self) -> str:
        return super().extra_repr() + (", tied" if self.is_tied else "")


def _is_frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def quantize_embeddings(model: nn.Module) -> nn.Module:
    """Swap a loaded model's frozen input embedding (and its frozen LM head) for int8, in place.

    Call it on the base before `attach_adapter`: the adapter's tensor names are built from
    module paths, which do not change. A tied head becomes an `Int8LMHead` reading the new
    embedding's storage; an untied frozen `nn.Linear` head gets its own int8 rows; a head
    that requires grad, or is not a plain `nn.Linear`, is left as it is. Models without
    `get_input_embeddings` (or with a non-`nn.Embedding` one) are returned unchanged.
    Returns `model` for chaining.
    """
    if not hasattr(model, "get_input_embeddings"):
        return model
    embedding = model.get_input_embeddings()
    if type(embedding) is not nn.Embedding or not _is_frozen(embedding):
        logger.info("input embedding %s left as it is", type(embedding).__name__)
        return model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and getattr(head, "weight", None) is embedding.weight
    before = embedding.weight.numel() * embedding.weight.element_size()
    quantized = Int8Embedding.from_embedding(embedding)
    model.set_input_embeddings(quantized)
    if tied and type(head) is nn.Linear and head.bias is None:
        model.set_output_embeddings(Int8LMHead(tied_to=quantized))
    elif tied:  # the old head still holds the fp32 table; keep it in step with the embedding
        raise ValueError(
            f"cannot quantize an embedding tied to a {type(head).__name__} head; expected a "
            "bias-free nn.Linear. Opt out of quantized embeddings for this task"
        )
    elif head is not None and type(head) is nn.Linear and _is_frozen(head):
        model.set_output_embeddings(Int8LMHead.from_linear(head))
        before += head.weight.numel() * head.weight.element_size()
    after = sum(
        m.quantized_nbytes()
        for m in (quantized, model.get_output_embeddings())
        if isinstance(m, (Int8Embedding, QuantizedLinear))
    )
    logger.info(
        "embeddings quantized to int8 (%s, head %s): %.1f MB -> %.1f MB",
        type(model).__name__,
        "tied" if tied else type(model.get_output_embeddings()).__name__,
        before / 1e6,
        after / 1e6,
    )
    return model


__all__ = [
    "Int8Embedding",
    "Int8LMHead",
    "int8_quantize_rows",
    "quantize_embeddings",
]
