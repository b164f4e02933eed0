"""One round's local work on the device, apart from the daemon's message handling: where
training starts, the steps before the deadline, and the emulated wait of the demo.

Kept out of `edge_runtime.agent` so the daemon stays about the protocol (its loop, the
outbox, the replies) and this stays about the round's compute.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from edge_runtime.activity import ActivityTracker, Phase
from edge_runtime.trainer import LocalTrainer, TrainingResult
from edge_runtime.wire import TaskAssignment

logger = logging.getLogger(__name__)

UPLOAD_MARGIN_SECONDS = 2.0
"""Training stops this long before the deadline to leave time for the upload."""


@dataclass(frozen=True)
class TrainingStart:
    """What an assignment that passed the device's checks trains from."""

    start_state: dict[str, torch.Tensor]
    """The global adapter, cut to the plan's rank."""
    global_rank: int
    seconds_left: float
    """Until the deadline, less the upload margin."""


def train_locally(
    assignment: TaskAssignment,
    trainer: LocalTrainer,
    start: TrainingStart,
    activity: ActivityTracker,
    *,
    emulate_profile: bool = False,
) -> TrainingResult:
    """One round of local steps before the deadline; under profile emulation (the demo)
    the round then lasts as long as the emulated device would take."""
    plan = assignment.plan
    if plan.rank < start.global_rank:
        logger.info(
            "task %s round %d: training rank %d of the global rank %d (alpha %.4g)",
            assignment.task,
            assignment.server_round,
            plan.rank,
            start.global_rank,
            trainer.spec.adapter.alpha,
        )
    started = time.monotonic()
    with activity.part(Phase.TRAINING, "compute_seconds", plan.local_steps):
        result = trainer.train_round(
            start.start_state,
            plan,
            deadline=trainer.clock() + start.seconds_left,
            round_seed=assignment.server_round,
            on_step=activity.training_step,
        )
    predicted = assignment.predicted_round_seconds
    if emulate_profile and predicted:
        elapsed = time.monotonic() - started
        activity.wait_out_emulated(min(predicted, start.seconds_left) - elapsed)
    return result
