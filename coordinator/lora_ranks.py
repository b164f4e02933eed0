"""Adapters of different LoRA ranks in one round: the coordinator's names for them.

The functions live in `quantization.lora_ranks` because the agent needs them too (it
truncates the global adapter and scales alpha) and `edge_runtime` may not import the
coordinator (DESIGN.md, dependency direction). Pure torch, no coordinator imports: the
aggregation and the simulator import them from here.
"""

from __future__ import annotations

from quantization.lora_ranks import (
    adapter_rank,
    pad_to_shapes,
    rank_axis,
    scaled_alpha,
    truncate_to_rank,
    truncated_shapes,
)

__all__ = [
    "adapter_rank",
    "pad_to_shapes",
    "rank_axis",
    "scaled_alpha",
    "truncate_to_rank",
    "truncated_shapes",
]
