"""`schoolfl demo --dp-epsilon`: central client-level DP settings for the demo task.

The noise multiplier is the smallest that keeps the coordinator's own RDP accountant within
the budget over the demo's rounds; the clip norm defaults to the median update norm the
demo measured without DP. Also the summary lines the demo prints about it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

DP_DELTA = 1e-5
"""The demo's DP delta: the coordinator's default, well below 1 / (number of devices)."""

DEFAULT_DP_CLIP_NORM = 4.5
"""--dp-clip-norm's default: the median L2 norm (4.48) of a classify device's first-round
update without DP (benchmarks/RESULTS.md, privacy benchmark), so clipping keeps about half
of the updates whole and the noise is not scaled to a bound far above real updates."""


@dataclass(frozen=True)
class DemoPrivacy:
    """Central client-level DP for the demo task: the `[tasks.privacy]` table the
    coordinator gets."""

    epsilon_budget: float
    clip_norm: float
    noise_multiplier: float
    delta: float = DP_DELTA

    def toml_lines(self) -> str:
        """The task's [tasks.privacy] table (coordinator/config.py PrivacyConfig)."""
        return (
            f'\n[tasks.privacy]\nmode = "central"\nclip_norm = {self.clip_norm!r}\n'
            f"noise_multiplier = {self.noise_multiplier!r}\n"
            f"epsilon_budget = {self.epsilon_budget!r}\ndelta = {self.delta!r}\n"
        )


def noise_for_epsilon(
    target: float, sampling_probability: float, rounds: int, delta: float = DP_DELTA
) -> float:
    """Smallest noise multiplier z (to 1%) whose central-DP epsilon after `rounds` rounds at
    `sampling_probability` stays within `target`, by the coordinator's own RDP accountant.

    Smallest, because every extra unit of z is noise on the model; within, because the
    coordinator refuses to open a round that would take epsilon past the budget, and the
    demo should run all of its rounds. Geometric bisection: epsilon falls monotonically in z.
    """
    from coordinator.privacy import epsilon_for_rounds
    from edge_runtime.wire import PrivacyMode

    if target <= 0 or rounds < 1:
        raise ValueError(f"need a positive epsilon and >= 1 round, got {target}, {rounds}")

    def epsilon(z: float) -> float:
        return epsilon_for_rounds(PrivacyMode.CENTRAL, [(sampling_probability, z)] * rounds, delta)

    low, high = 0.1, 50.0
    if epsilon(high) > target:
        raise ValueError(
            f"epsilon {target:g} after {rounds} rounds needs a noise multiplier above {high:g}"
        )
    if epsilon(low) <= target:
        return low
    while high / low > 1.01:
        middle = (low * high) ** 0.5
        low, high = (low, middle) if epsilon(middle) <= target else (middle, high)
    return high


def demo_privacy(
    epsilon: float, clip_norm: float, rounds: int, devices_per_round: int, devices: int
) -> DemoPrivacy:
    """The DP settings for a demo of `rounds` rounds that spends at most `epsilon`.

    q = devices per round / devices is the largest sampling probability the coordinator
    can record (fewer eligible devices or updates only lower the epsilon a round costs):
    in the demo every device is in every round, q = 1, so there is no amplification by
    sampling and z is that of the plain Gaussian mechanism composed `rounds` times.
    """
    q = min(1.0, devices_per_round / devices)
    return DemoPrivacy(epsilon, clip_norm, noise_for_epsilon(epsilon, q, rounds))


def update_norms(state_dir: Path, task_id: str, round_number: int = 1) -> list[float]:
    """L2 norms of the updates the coordinator stored for one round of a finished demo.

    The median of a non-private first round is the clip norm DP-FedAvg papers start from;
    the coordinator keeps every update body, so it is read back, not estimated.
    """
    from coordinator.assignments import stored_plan, update_shapes
    from coordinator.store import CoordinatorStore
    from coordinator.task_models import AdapterBody
    from edge_runtime.wire import decode_update
    from quantization.adapter_deltas import update_l2_norm

    store = CoordinatorStore(state_dir / "coordinator" / "coordinator.db")
    try:
        first = store.adapter_versions(task_id)[0]
        reference = AdapterBody(
            Path(first.folder).with_suffix(".body").read_bytes(), first.sha256
        ).state()
        plans = store.assignments(task_id, round_number)
        norms = []
        for update in store.updates(task_id, round_number):
            rank = stored_plan(plans[update.device_id]).rank
            norms.append(update_l2_norm(decode_update(update.body, update_shapes(reference, rank))))
    finally:
        store.close()
    return norms


def median_update_norm(state_dir: Path, task_id: str, round_number: int = 1) -> float:
    """Median of `update_norms` (ValueError when the round stored no update)."""
    norms = update_norms(state_dir, task_id, round_number)
    if not norms:
        raise ValueError(f"round {round_number} of {task_id} stored no update")
    return statistics.median(norms)


def privacy_summary(privacy: DemoPrivacy | None, ledger: list[object]) -> dict[str, object]:
    """The summary's DP part: the settings, and the epsilon the coordinator's privacy ledger
    recorded after the last completed round (what `schoolfl coordinator privacy-report`
    shows), so the figure is the coordinator's own accounting, not the demo's plan."""
    if privacy is None:
        return {"mode": "off"}
    return {
        "mode": "central",
        "epsilon_budget": privacy.epsilon_budget,
        "clip_norm": privacy.clip_norm,
        "noise_multiplier": privacy.noise_multiplier,
        "delta": privacy.delta,
        "epsilon_spent": ledger[-1].epsilon if ledger else 0.0,  # type: ignore[attr-defined]
        "ledger_rounds": len(ledger),
        "participants": [entry.participants for entry in ledger],  # type: ignore[attr-defined]
    }


def privacy_line(privacy: dict[str, object]) -> str:
    return (
        f"central DP: epsilon {privacy['epsilon_spent']:.3f} spent of {privacy['epsilon_budget']:g}"
        f" at delta {privacy['delta']:g} over {privacy['ledger_rounds']} rounds "
        f"(noise multiplier {privacy['noise_multiplier']:.3f}, clip norm "
        f"{privacy['clip_norm']:.4g})"
    )
