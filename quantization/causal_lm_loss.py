"""Causal-LM loss without full-size logits: the LM head and cross-entropy run per chunk.

`model(**batch).loss` materialises fp32 logits for every position (SmolLM2-135M at batch
4 x 128: 4 * 128 * 49,152 * 4 B = 100 MB), keeps a log-softmax of the same size for backward
and, in backward, a logits gradient of the same size again: several hundred MB of a 4 GB
Raspberry Pi's peak, for a tensor that is reduced to one number.

Here the decoder body runs once to give hidden states (B, T, H); the positions that have a
label are gathered (padding costs no head compute), and the head + cross-entropy run on
chunks of `chunk_size` positions, so at most one chunk's logits (and their gradient) exist
at any time. How a chunk reaches backward depends on the head:

- a frozen head (the agent's case: LoRA on the decoder's projections, the head quantized
  or not) has no weight gradient, so each chunk's hidden-state gradient is computed right
  away in forward (`_FrozenHeadChunk`) and kept, (c, H) per chunk; backward only scales it.
  The head runs forward and input-gradient once per chunk, as in HF's loss: no extra head
  work, which an int8 head would also pay in dequantization;
- a head with trainable parameters (LoRA on `lm_head`, or a head in `modules_to_save`) runs
  each chunk under `torch.utils.checkpoint`: forward keeps the chunk's summed loss only,
  backward recomputes the chunk's logits for the weight gradient. That costs one more head
  forward per step (~7% of SmolLM2's step FLOPs).

Either way the result is HF's loss (same next-token shift, same `ignore_index`, mean over
labelled tokens), up to float summation order.

Works with LoRA anywhere in the model (the decoder's projections, or `lm_head` itself, whose
wrapper is called like the plain head) and under `torch.autocast` (checkpoint replays the
autocast state; logits are upcast to fp32 before the softmax, as HF does).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that carries no loss (padding), as in HF's `ForCausalLMLoss`."""

DEFAULT_CHUNK_POSITIONS = 128
"""Positions per head chunk. At SmolLM2's 49,152-token vocabulary one chunk's fp32 logits are
24 MiB (about 75 MiB with the softmax and the gradient), against 300+ MB for the whole
4 x 128 batch. 128 rows still make the (128 x H) @ (H x V) product a large, BLAS-efficient
matmul, so smaller chunks would save little memory for more per-chunk overhead, and larger
ones grow the transient linearly for no speed-up."""


class ChunkedLossError(ValueError):
    """The batch or the model does not fit the chunked loss (message says what to change)."""


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module, object]:
    """(decoder body, LM head, config) of a (PEFT-wrapped) transformers causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(base, "base_model_prefix", "model")
    body = getattr(base, prefix, None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(body, nn.Module) or not isinstance(head, nn.Module):
        raise ChunkedLossError(
            f"{type(base).__name__} has no decoder body `{prefix}` and output head; expected "
            "a transformers *ForCausalLM model (optionally PEFT-wrapped)"
        )
    config = base.config
    for option in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, option, None) not in (None, 1, 1.0):
            raise ChunkedLossError(
                f"{type(base).__name__} transforms its logits ({option}="
                f"{getattr(config, option)!r}); the chunked loss applies the head only. Use "
                "model(**batch).loss for this model"
            )
    return body, head, config


def _chunk_loss_sum(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk: h (c, H), targets (c,) -> scalar fp32."""
    logits = head(h).float()  # (c, V)
    return F.cross_entropy(logits, targets, reduction="sum")


class _FrozenHeadChunk(torch.autograd.Function):
    """Summed cross-entropy of one chunk through a frozen head, with the chunk's hidden-state
    gradient computed in forward: the logits and their gradient live only inside this call,
    and backward scales the stored (c, H) gradient instead of recomputing the head."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, h: torch.Tensor, targets: torch.Tensor, head: nn.Module
    ) -> torch.Tensor:
        with torch.enable_grad():
            x = h.detach().requires_grad_(True)
            loss = _chunk_loss_sum(head, x, targets)
            (grad,) = torch.autograd.grad(loss, x)
        ctx.save_for_backward(grad)
        return loss.detach()

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None


def chunked_causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_POSITIONS,
    num_items_in_batch: int | torch.Tensor | None = None,
    **model_kwargs: object,
) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM on a batch, chunked over positions.

    Parameters
    ----------
    model:
        A transformers *ForCausalLM model or a PEFT model wrapping one.
    input_ids, attention_mask, labels:
        As for `model(**batch)` (see `causal_lm_batch`); labels default to `input_ids`, and
        positions labelled `IGNORE_INDEX` (-100) carry no loss. Shapes (B, T).
    chunk_size:
        Positions whose logits exist at once (default `DEFAULT_CHUNK_POSITIONS`).
    num_items_in_batch:
        Divide by this many labelled tokens instead of this batch's own count: with
        micro-batches, pass the whole batch's count so the summed gradients equal one big
        batch's (as HF's argument of the same name).
    model_kwargs:
        Further arguments for the decoder body (e.g. position_ids).

    Returns the scalar loss, equal to `model(**batch).loss` within float tolerance.
    """
    if chunk_size < 1:
        raise ChunkedLossError(
            f"chunk_size must be a positive number of positions, got {chunk_size}"
        )
    body, head, _ = _parts(model)
    labels = input_ids if labels is None else labels
    outputs = body(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs
    )
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    B, T, H = hidden.shape
    shifted = F.pad(labels.to(hidden.device), (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T)
    shifted = shifted.reshape(-1)  # (B*T,)
    positions = (shifted != IGNORE_INDEX).nonzero().squeeze(1)  # (N,)
    if positions.numel() == 0:
        raise ChunkedLossError(
            "no position of the batch has a label (all -100 after the next-token shift); "
            "expected at least one sequence with two or more real tokens"
        )
    h = hidden.reshape(B * T, H).index_select(0, positions)  # (N, H)
    targets = shifted.index_select(0, positions)  # (N,)
    head_trains = any(p.requires_grad for p in head.parameters())
    grad_needed = torch.is_grad_enabled() and (h.requires_grad or head_trains)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_size):
        h_chunk = h[start : start + chunk_size]  # (c, H)
        t_chunk = targets[start : start + chunk_size]  # (c,)
        if grad_needed and head_trains:
            part = checkpoint(_chunk_loss_sum, head, h_chunk, t_chunk, use_reentrant=False)
        elif grad_needed:
            part = _FrozenHeadChunk.apply(h_chunk, t_chunk, head)
        else:
            part = _chunk_loss_sum(head, h_chunk, t_chunk)
        total = total + part
    count = positions.numel() if num_items_in_batch is None else num_items_in_batch
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count
