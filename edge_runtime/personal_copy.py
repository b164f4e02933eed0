"""The device's own copy of each task's global adapter, which `schoolfl agent predict` loads.

It lives apart from the daemon because it is an on-disk format with a reader elsewhere
(the command line), not a step of the round protocol. The agent writes it after the round's
update is handed to the broker, from the state it trained from: the model is not touched
(loading the global adapter back into it and `save_pretrained`, with PEFT's model card
rendered from its template, cost more than the rest of a round's fixed work).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from durable.atomic_files import atomic_write_text
from edge_runtime.trainer import LocalTrainer
from edge_runtime.wire import TaskAssignment
from quantization.peft_folder import peft_config_dict, with_rank_and_alpha, write_peft_folder


def save_personal_copy(
    adapters_dir: Path,
    assignment: TaskAssignment,
    trainer: LocalTrainer,
    start_state: dict[str, torch.Tensor],
) -> None:
    """Keep the global adapter the device trained from, for `schoolfl agent predict`.

    A device of a smaller rank keeps the first components it trained from, with its
    scaled alpha (the metadata records both): its rank-r model holds no more. Written
    from `start_state` with the trainer's LoRA config (a valid PEFT folder that
    `PeftModel.from_pretrained` and `agent predict` load), not from the model, which holds
    the trained adapter by now."""
    config = with_rank_and_alpha(
        peft_config_dict(trainer.model), assignment.plan.rank, trainer.spec.adapter.alpha
    )
    write_peft_folder(adapters_dir / assignment.task, start_state, config)
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
