"""Which model a device builds for an assignment and which adapter it starts from.

Pure functions of the assignment and the downloaded global adapter, shared by the agent
daemon and `schoolfl agent predict`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from edge_runtime.wire import TaskSpec
from quantization.adapters import AdapterConfig
from quantization.lora_ranks import adapter_rank, scaled_alpha, truncate_to_rank
from quantization.task_model import TaskModelSpec


def task_model_spec(
    task_id: str, spec: TaskSpec, scheme: str, rank: int, global_rank: int | None = None
) -> TaskModelSpec:
    """The model a device builds for a task at LoRA rank `rank`.

    With `global_rank` (the global adapter's rank), a smaller `rank` gets the alpha under
    which the first `rank` components of the global adapter compute what they compute in
    the global adapter (`scaled_alpha`); without it, alpha is the spec's as it stands.
    """
    alpha = (
        spec.adapter_alpha
        if global_rank is None
        else scaled_alpha(spec.adapter_alpha, global_rank, rank)
    )
    return TaskModelSpec(
        task_id=task_id,
        kind=spec.kind,
        base_model=spec.base_model,
        scheme=scheme,
        adapter=AdapterConfig(rank=rank, alpha=alpha),
        labels=tuple(spec.labels),
        quantize_embeddings=spec.quantize_embeddings,
    )


def start_state_for_rank(
    global_state: Mapping[str, torch.Tensor], rank: int
) -> tuple[dict[str, torch.Tensor], int]:
    """(the adapter a device with plan rank `rank` trains from, the global adapter's rank).

    A plan of the global rank starts from the global adapter itself; a smaller rank starts
    from its first `rank` components, so the delta it sends lies in the global factors' basis
    and the coordinator can pad it (coordinator.aggregation). The global rank is read from
    the downloaded adapter because the wire `TaskSpec` does not carry it. ValueError when
    `rank` exceeds it: such an assignment is declined.
    """
    global_rank = adapter_rank(global_state)
    if rank > global_rank:
        raise ValueError(
            f"the plan's adapter rank {rank} exceeds the global adapter's rank {global_rank}"
        )
    if rank == global_rank:
        return dict(global_state), global_rank
    return truncate_to_rank(global_state, rank), global_rank
