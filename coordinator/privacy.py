"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018) and its accountant.

What is protected: the participation of one *device* (all of its examples at once) in the
published global adapters: "client-level" DP under add/remove-one-device adjacency. What
bounds one device's influence: its update is clipped to L2 norm `clip_norm` on the device
and again here (a device is not trusted to have done it), and the mean is unweighted (a
sample-weighted mean would let a device with many samples move the model further, and the
sample counts themselves are data). Where the noise goes:

- central: the coordinator adds N(0, (z * C / n)^2) to each coordinate of the mean of n
  clipped updates (the Gaussian mechanism on the sum, sensitivity C, noise z * C, divided
  by n). The coordinator sees the clipped, un-noised updates: it is trusted.
- local: each device adds N(0, (z * C)^2) to its own clipped update before upload
  (`edge_runtime.local_privacy`); the coordinator only clips and averages.

The accountant is Google's maintained `dp-accounting` package (RDP accountant, Mironov
2017; Mironov, Talwar, Zhang 2019), not our own arithmetic. Each completed round is
composed as one event:

- central: PoissonSampledDpEvent(q, GaussianDpEvent(z)) with q = devices aggregated /
  eligible devices the round was drawn from: privacy amplification by sampling, the
  accounting DP-FedAvg itself uses. Honest caveat: the analysis assumes each device is in a
  round independently with probability q; our schedulers choose by utility, speed and the
  equity floor, not by coin flips, so the amplification is an approximation that favours
  the system. Set the scheduler to `random` for the closest match, or read the epsilon
  with q = 1 (no amplification) as the conservative figure: `epsilon_for_rounds` gives it.
- local: GaussianDpEvent(z) per round, no amplification: the coordinator sees each noised
  update, so sampling hides nothing from it.

Integer RDP orders are used because the library computes those exactly; fractional orders
make its series fail to converge at small q and log warnings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from coordinator.aggregation import (
    FedAvg,
    NormBound,
    NormBoundMode,
    ScreenedUpdates,
    TensorMap,
    weighted_mean,
)
from coordinator.config import TaskConfig
from coordinator.store import CoordinatorStore, PrivacyRound, PrivacyStop
from edge_runtime.wire import DevicePrivacy, PrivacyMode
from quantization.adapter_deltas import add_gaussian_noise, secure_generator
from quantization.lora_ranks import pad_to_shapes

if TYPE_CHECKING:
    import dp_accounting

logger = logging.getLogger(__name__)

RDP_ORDERS: tuple[int, ...] = (*range(2, 65), 80, 96, 128, 256, 512, 1024)
"""Rényi orders the accountant optimises over."""


@dataclass(frozen=True)
class DpPolicy:
    """A task's client-level DP settings (its `[tasks.privacy]` table)."""

    mode: PrivacyMode
    clip_norm: float
    noise_multiplier: float
    epsilon_budget: float
    delta: float

    @classmethod
    def of(cls, task: TaskConfig) -> DpPolicy | None:
        """The task's policy; None when [tasks.privacy] mode is off (validated by
        PrivacyConfig)."""
        privacy = task.privacy
        if privacy.mode == "off":
            return None
        return cls(
            PrivacyMode(privacy.mode),
            privacy.clip_norm,
            privacy.noise_multiplier,
            privacy.epsilon_budget,
            privacy.delta,
        )

    def device_instructions(self) -> DevicePrivacy:
        """What devices are told (inside the wire TaskSpec)."""
        return DevicePrivacy(self.mode, self.clip_norm, self.noise_multiplier)

    @property
    def central_noise(self) -> bool:
        return self.mode is PrivacyMode.CENTRAL


# ---------------------------------------------------------------------------------------
# Numerics


def central_noise_std(noise_multiplier: float, clip_norm: float, participants: int) -> float:
    """Per-coordinate standard deviation of the noise on the mean of `participants` updates."""
    if participants < 1:
        raise ValueError(f"participants must be >= 1, got {participants}")
    return noise_multiplier * clip_norm / participants


def round_event(
    mode: PrivacyMode, sampling_probability: float, noise_multiplier: float
) -> dp_accounting.DpEvent:
    """One round's mechanism as the accountant sees it (see the module docstring)."""
    import dp_accounting  # here: with scipy it is 72 MB a coordinator without DP never needs

    if not 0 < sampling_probability <= 1:
        raise ValueError(f"sampling probability must be in (0, 1], got {sampling_probability}")
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if mode is PrivacyMode.LOCAL or sampling_probability >= 1:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(sampling_probability, gaussian)


def epsilon_for_rounds(
    mode: PrivacyMode, rounds: Sequence[tuple[float, float]], delta: float
) -> float:
    """Cumulative epsilon at `delta` after rounds given as (sampling probability, noise
    multiplier) pairs, by the RDP accountant; 0 for no rounds, inf without noise."""
    if not rounds:
        return 0.0
    from dp_accounting import rdp  # see round_event

    accountant = rdp.RdpAccountant(list(RDP_ORDERS))
    for sampling_probability, noise_multiplier in rounds:
        accountant.compose(round_event(mode, sampling_probability, noise_multiplier))
    return float(accountant.get_epsilon(delta))


def next_round_privacy(
    policy: DpPolicy,
    ledger: Sequence[PrivacyRound],
    task_id: str,
    round_number: int,
    participants: int,
    eligible_devices: int,
    secure_aggregation: bool = False,
) -> PrivacyRound:
    """The ledger row of one more round after the completed rounds of `ledger`: its
    sampling probability and the task's cumulative epsilon once it is done. Used with the
    planned assignments before a round opens (the budget check) and with the updates
    actually aggregated when it completes (the figure recorded)."""
    q = sampling_probability(participants, eligible_devices)
    rounds = [(entry.sampling_probability, entry.noise_multiplier) for entry in ledger]
    epsilon = epsilon_for_rounds(policy.mode, [*rounds, (q, policy.noise_multiplier)], policy.delta)
    return PrivacyRound(
        task_id,
        round_number,
        eligible_devices,
        participants,
        q,
        policy.clip_norm,
        policy.noise_multiplier,
        epsilon,
        policy.delta,
        secure_aggregation=secure_aggregation,
    )


def sampling_probability(participants: int, eligible_devices: int) -> float:
    """q = devices aggregated / devices the round was drawn from, capped at 1."""
    if participants < 1 or eligible_devices < 1:
        raise ValueError(
            f"need >= 1 participant and eligible device, got {participants}, {eligible_devices}"
        )
    return min(1.0, participants / eligible_devices)


# ---------------------------------------------------------------------------------------
# Strategy


class DpFedAvg(FedAvg):
    """DP-FedAvg: clip every update to `clip_norm`, take the unweighted mean, and under
    central DP add Gaussian noise of standard deviation z * C / n to every coordinate.

    The screening is FedAvg's, with the norm bound set to clip at `clip_norm`
    (`screen_updates`); only the combining step differs.

    Updates of a smaller LoRA rank are zero padded to the global rank and averaged over all
    n updates (not per rank component as FedAvg does): a per-component mean would divide a
    component by fewer than n updates, raising its sensitivity above C / n. The padded
    update has the same norm, so the bound holds; the price is that high components learn
    more slowly when few devices train them.
    """

    def __init__(self, policy: DpPolicy, generator: torch.Generator | None = None) -> None:
        super().__init__(NormBound(policy.clip_norm, NormBoundMode.CLIP))
        self.policy = policy
        self.generator = generator
        """Noise source; None draws a fresh OS-seeded one per aggregate (tests fix it)."""

    def combine(self, screened: ScreenedUpdates, reference: TensorMap) -> dict[str, torch.Tensor]:
        shapes = {name: tuple(tensor.shape) for name, tensor in reference.items()}
        deltas = [
            pad_to_shapes(delta, shapes) if update.rank is not None else delta
            for update, delta in zip(screened.accepted, screened.deltas, strict=True)
        ]
        mean = weighted_mean(deltas, [1.0] * len(deltas))
        if self.policy.central_noise and self.policy.noise_multiplier > 0:
            std = central_noise_std(
                self.policy.noise_multiplier, self.policy.clip_norm, len(deltas)
            )
            mean = add_gaussian_noise(mean, std, self.generator or secure_generator())
        if screened.clipped:
            logger.info(
                "DP clipping: %d of %d updates scaled to the bound %.4g",
                len(screened.clipped),
                len(screened.accepted),
                self.policy.clip_norm,
            )
        return mean


def budget_refusal(task_id: str, round_number: int, epsilon: float, policy: DpPolicy) -> str:
    """The operator-facing reason a round was not opened."""
    shown = "inf" if math.isinf(epsilon) else f"{epsilon:.4g}"
    return (
        f"task {task_id}: round {round_number} would spend epsilon {shown} > budget "
        f"{policy.epsilon_budget:g} (delta {policy.delta:g}); no more rounds"
    )


def stop_holds(task: TaskConfig, stop: PrivacyStop | None) -> bool:
    """A recorded budget stop still applies: the task has DP on and the epsilon the refused
    round needed exceeds the *configured* budget (raising the budget lets the task go on)."""
    privacy = task.privacy
    return privacy.mode != "off" and stop is not None and stop.epsilon > privacy.epsilon_budget


# ---------------------------------------------------------------------------------------
# The ledger of one task's rounds


def plan_round_privacy(
    store: CoordinatorStore,
    task: TaskConfig,
    round_number: int,
    participants: int,
    eligible_devices: int,
    now: float,
) -> PrivacyRound | None:
    """The planned ledger row of a DP task's round about to open, or None when one more
    round would exceed the budget: the stop is then recorded (the task counts as finished
    from then on, so this is logged once)."""
    policy = DpPolicy.of(task)
    if policy is None:
        raise ValueError(f"task {task.id} has [tasks.privacy] mode = 'off': no privacy ledger")
    planned = next_round_privacy(
        policy,
        store.privacy_rounds(task.id),
        task.id,
        round_number,
        participants,
        eligible_devices,
        secure_aggregation=task.secure_aggregation.enabled,
    )
    if planned.epsilon <= policy.epsilon_budget:
        store.clear_privacy_stop(task.id)
        return planned
    reason = budget_refusal(task.id, round_number, planned.epsilon, policy)
    logger.warning("%s", reason)
    store.set_privacy_stop(
        PrivacyStop(
            task.id,
            round_number,
            planned.epsilon,
            policy.epsilon_budget,
            policy.delta,
            reason,
            now,
        )
    )
    return None


def spent_round_privacy(
    store: CoordinatorStore, task: TaskConfig, round_number: int, participants: int
) -> PrivacyRound | None:
    """The final ledger row of a DP round: actual participants, cumulative epsilon."""
    policy = DpPolicy.of(task)
    planned = store.privacy_round(task.id, round_number)
    if policy is None or planned is None:
        return None
    return next_round_privacy(
        policy,
        store.privacy_rounds(task.id),
        task.id,
        round_number,
        participants,
        planned.eligible_devices,
        secure_aggregation=task.secure_aggregation.enabled,
    )


def make_aggregator(task: TaskConfig) -> FedAvg:
    """The aggregator a task's settings call for: DP-FedAvg when DP is on, otherwise FedAvg
    with the absolute and the median norm bound (the latter on by default)."""
    policy = DpPolicy.of(task)
    if policy is not None:
        return DpFedAvg(policy)
    multiple = task.effective_median_norm_multiple
    if task.max_update_norm > 0 or multiple > 0:
        return FedAvg(NormBound(task.max_update_norm, NormBoundMode(task.norm_mode), multiple))
    return FedAvg()
