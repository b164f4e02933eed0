"""The end of a secure round on the coordinator: unmask the survivors' sum from the stored
answers, record every device caught revealing wrong shares, and turn the sum into a mean.

A device that answers the unmask request with wrong share values is outvoted by the other
answers (`edge_runtime.secagg.reconstruction`); here it becomes a rejection, counted, logged
and stored like any refused message, under the category its fault names
(`secagg-bad-share`, or `secagg-bad-secret` for a device whose own shares rebuild something
other than what it committed to). The round completes when the honest answers suffice and
aborts otherwise, with a reason that names the devices involved; either way the liars
proven are recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from coordinator.config import TaskConfig
from coordinator.privacy import DpPolicy, central_noise_std
from coordinator.secure.replay import RoundReplay
from coordinator.secure.store import SecurePhase, SecureRoundState
from coordinator.store import CoordinatorStore
from edge_runtime.secagg import ReconstructionAbort, SecAggResult, ShareRejection
from quantization.adapter_deltas import add_gaussian_noise, secure_generator

logger = logging.getLogger(__name__)

RejectHook = Callable[[str | None, str, str], None]
"""(device id, category, reason) -> None: count, log and store one refusal (the daemon's
`CoordinatorDaemon.reject`, which also feeds its in-memory counters)."""


def store_rejections(store: CoordinatorStore) -> RejectHook:
    """The hook used without a daemon: log the refusal and store its row."""

    def reject(device_id: str | None, category: str, reason: str) -> None:
        logger.warning("refused %s (%s): %s", device_id or "?", category, reason)
        store.record_rejection(device_id, category, reason)

    return reject


@dataclass(frozen=True)
class SecureOutcome:
    """A secure round that ended: the survivors' sum, or None with the reason it aborted."""

    task_id: str
    round_number: int
    result: SecAggResult | None
    reason: str


def _record(rejections: Sequence[ShareRejection], reject: RejectHook) -> None:
    for rejection in rejections:
        reject(rejection.device_id, rejection.fault.value, rejection.reason)


def unmask_round(
    replay: RoundReplay, task: TaskConfig, state: SecureRoundState, reject: RejectHook
) -> SecureOutcome:
    """Aggregate the stored unmask answers. Raises SecAggAbort (below t, or a secret that
    cannot be verified), after recording the liars it proved."""
    server = replay.server(task, state, SecurePhase.UNMASKING)
    try:
        result = server.aggregate(replay.responses(state))
    except ReconstructionAbort as abort:
        _record(abort.rejections, reject)
        raise
    _record(result.rejections, reject)
    summary = (
        f"summed {result.num_inputs} masked inputs, {len(result.dropped)} dropped after sharing"
    )
    if result.rejections:
        liars = sorted({rejection.device_id for rejection in result.rejections})
        summary += (
            f"; {len(liars)} device(s) revealed wrong shares and were outvoted: {', '.join(liars)}"
        )
    return SecureOutcome(task.id, state.round_number, result, summary)


def secure_mean(result: SecAggResult, task: TaskConfig) -> dict[str, torch.Tensor]:
    """Unweighted mean of the survivors' deltas; under central DP with Gaussian noise of
    standard deviation z * C / n, as DpFedAvg adds it. The coordinator cannot clip what it
    cannot see: devices clip before masking."""
    count = result.num_inputs
    mean = {name: tensor / count for name, tensor in result.total.items()}
    policy = DpPolicy.of(task)
    if policy is not None and policy.central_noise and policy.noise_multiplier > 0:
        std = central_noise_std(policy.noise_multiplier, policy.clip_norm, count)
        mean = add_gaussian_noise(mean, std, secure_generator())
    return mean
