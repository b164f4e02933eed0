"""Adapters of different LoRA ranks: truncate the global adapter, pad a smaller update.

A slow or poorly connected device gets a plan with a smaller rank r than the task's global
rank R (DESIGN.md, scheduling: slow devices get smaller ranks rather than exclusion). The
scheme is zero padding ("rank-sliced" averaging, as in HeteroLoRA): the device trains the
first r components of the global adapter (lora_A rows 0..r-1, lora_B columns 0..r-1) and
sends a rank-r delta; the coordinator pads it with zeros back to rank R and averages each
component over the devices that trained it.

Why the device must also change alpha: PEFT scales a LoRA update by alpha / r, so a rank-r
model with the global alpha would scale the same factors by alpha / r instead of alpha / R.
With alpha_r = alpha * r / R (`scaled_alpha`) the truncated adapter computes exactly what the
global adapter computes with components r..R-1 set to zero, and its gradients are those of
the global adapter's first r components.

Both daemons need these functions (the agent truncates, the coordinator pads), so they live
here, below both in the dependency order. Pure
torch, no PEFT: a tensor's role is read from its PEFT state-dict name.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

A_FACTOR_NAMES = frozenset({"lora_A", "lora_embedding_A"})
"""Name parts of LoRA down-projections: [r, in] (or [r, num_embeddings]); rank on axis 0."""
B_FACTOR_NAMES = frozenset({"lora_B", "lora_embedding_B"})
"""Name parts of LoRA up-projections: [out, r] (or [dim, r]); rank on axis 1."""


def rank_axis(name: str) -> int | None:
    """The axis of the state-dict tensor `name` that indexes LoRA rank, or None.

    0 for lora_A / lora_embedding_A, 1 for lora_B / lora_embedding_B, None for everything
    else: the classification head and other `modules_to_save`, DoRA magnitudes, and LoRA
    biases (`lora_B.bias` is [out], it has no rank axis).
    """
    parts = name.split(".")
    if parts[-1] == "bias":
        return None
    for part in parts:
        if part in A_FACTOR_NAMES:
            return 0
        if part in B_FACTOR_NAMES:
            return 1
    return None


def _rank_of_shapes(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The one rank every LoRA factor in `shapes` agrees on (ValueError otherwise)."""
    ranks: dict[str, int] = {}
    for name, shape in shapes.items():
        axis = rank_axis(name)
        if axis is None:
            continue
        if len(shape) <= axis:
            raise ValueError(
                f"LoRA tensor {name!r} has shape {tuple(shape)}: expected its rank on axis "
                f"{axis}; is it really a LoRA factor?"
            )
        ranks[name] = int(shape[axis])
    if not ranks:
        raise ValueError(
            "no LoRA factors (names with lora_A / lora_B) in the adapter state, so it has no "
            f"rank; got {sorted(shapes)[:4]}"
        )
    distinct = sorted(set(ranks.values()))
    if len(distinct) > 1:
        examples = {}
        for name, rank in ranks.items():
            examples.setdefault(rank, name)
        described = ", ".join(f"{examples[r]!r} has rank {r}" for r in distinct)
        raise ValueError(f"LoRA factors disagree on rank: {described}")
    return distinct[0]


def adapter_rank(state: Mapping[str, torch.Tensor]) -> int:
    """The LoRA rank of an adapter state (ValueError if none, or if factors disagree)."""
    return _rank_of_shapes({name: tuple(tensor.shape) for name, tensor in state.items()})


def _check_rank(rank: int, full_rank: int, what: str) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= full_rank:
        raise ValueError(f"rank must be an int in 1..{full_rank} ({what}), got {rank!r}")


def truncate_to_rank(state: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The first `rank` components of `state` (lora_A rows, lora_B columns), as new
    contiguous tensors; tensors without a rank axis are copied unchanged."""
    _check_rank(rank, adapter_rank(state), "the state's rank")
    result: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        axis = rank_axis(name)
        kept = tensor if axis is None else tensor.narrow(axis, 0, rank)
        result[name] = kept.clone(memory_format=torch.contiguous_format)
    return result


def truncated_shapes(
    shapes: Mapping[str, tuple[int, ...]], rank: int
) -> dict[str, tuple[int, ...]]:
    """The shapes of a rank-`rank` update of an adapter with these (full-rank) shapes:
    what the coordinator decodes and validates a smaller-rank device's update against."""
    _check_rank(rank, _rank_of_shapes(shapes), "the global adapter's rank")
    result: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        axis = rank_axis(name)
        truncated = list(shape)
        if axis is not None:
            truncated[axis] = rank
        result[name] = tuple(truncated)
    return result


def pad_to_shapes(
    delta: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Zero-pad a smaller-rank delta to the full shapes (components r..R-1 become zero).

    Only the rank axis may be shorter; any other difference is a ValueError, as are missing
    or unexpected names. Tensors already at their full shape are returned as they are.
    """
    missing = sorted(set(shapes) - set(delta))
    unexpected = sorted(set(delta) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"cannot pad: missing tensors {missing[:3]}, unexpected {unexpected[:3]}")
    result: dict[str, torch.Tensor] = {}
    for name, full_shape in shapes.items():
        tensor = delta[name]
        shape = tuple(tensor.shape)
        if shape == tuple(full_shape):
            result[name] = tensor
            continue
        axis = rank_axis(name)
        fits = (
            axis is not None
            and len(shape) == len(full_shape)
            and all(shape[i] == full_shape[i] for i in range(len(shape)) if i != axis)
            and shape[axis] < full_shape[axis]
        )
        if not fits:
            raise ValueError(
                f"cannot pad tensor {name!r} of shape {shape} to {tuple(full_shape)}: only "
                "the rank axis of a LoRA factor may be smaller"
            )
        padded = torch.zeros(full_shape, dtype=tensor.dtype)
        padded.narrow(axis, 0, shape[axis]).copy_(tensor)  # type: ignore[arg-type]
        result[name] = padded
    return result


def scaled_alpha(global_alpha: float, global_rank: int, rank: int) -> float:
    """The LoRA alpha of a rank-`rank` model whose truncated adapter computes exactly what
    the first `rank` components of the global (rank `global_rank`, alpha `global_alpha`)
    adapter compute: PEFT scales by alpha / r, so alpha_r = alpha * r / R keeps alpha_r / r
    equal to alpha / R. Returns `global_alpha` itself at full rank (no rounding).
    (With `use_rslora`, PEFT scales by alpha / sqrt(r) instead; schoolfl does not use it.)"""
    if global_rank < 1:
        raise ValueError(f"global_rank must be >= 1, got {global_rank!r}")
    _check_rank(rank, global_rank, "the global adapter's rank")
    if not global_alpha > 0:
        raise ValueError(f"global_alpha must be > 0, got {global_alpha!r}")
    if rank == global_rank:
        return float(global_alpha)
    return float(global_alpha) * rank / global_rank
