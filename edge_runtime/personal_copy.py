"""The device's own copy of each task's global adapter, which `schoolfl agent predict` loads.

It lives apart from the daemon because it is an on-disk format with a reader elsewhere
(the command line), not a step of the round protocol.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from durable.atomic_files import atomic_write_text
from edge_runtime.trainer import LocalTrainer
from edge_runtime.wire import TaskAssignment
from quantization.adapters import save_adapter


def save_personal_copy(
    adapters_dir: Path,
    assignment: TaskAssignment,
    trainer: LocalTrainer,
    start_state: dict[str, torch.Tensor],
) -> None:
    """Keep the global adapter the device trained from, for `schoolfl agent predict`.

    A device of a smaller rank keeps the first components it trained from, with its
    scaled alpha (the metadata records both): its rank-r model holds no more."""
    trainer.load_global(start_state)
    save_adapter(trainer.model, adapters_dir / assignment.task)
    atomic_write_text(
        adapters_dir / f"{assignment.task}.json",
        json.dumps(
            {
                "spec": {  # what `agent predict` rebuilds the model from; no DP policy
                    "kind": assignment.spec.kind,
                    "base_model": assignment.spec.base_model,
                    "labels": list(assignment.spec.labels),
                    "adapter_alpha": trainer.spec.adapter.alpha,
                },
                "scheme": assignment.plan.scheme,
                "rank": assignment.plan.rank,
                "version": assignment.model_version,
            },
            sort_keys=True,
        ),
    )
