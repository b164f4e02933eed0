"""`schoolfl demo --dp-epsilon`: the noise multiplier it picks and the config it writes.

Fast: only the accountant and config files, no broker, no training (the end-to-end DP
demo is benchmarks/bench_privacy.py --demo).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig, TaskConfig
from coordinator.privacy import DpPolicy, epsilon_for_rounds
from edge_runtime.wire import PrivacyMode
from schoolfl.demo import DemoFleet, DemoSettings
from schoolfl.demo_privacy import DP_DELTA, DemoPrivacy, demo_privacy, noise_for_epsilon


@pytest.mark.parametrize(("target", "q", "rounds"), [(8.0, 1.0, 10), (3.0, 1.0, 10), (8.0, 1.0, 3)])
def test_noise_is_the_smallest_within_the_budget(target: float, q: float, rounds: int) -> None:
    z = noise_for_epsilon(target, q, rounds)
    spent = epsilon_for_rounds(PrivacyMode.CENTRAL, [(q, z)] * rounds, DP_DELTA)
    assert spent <= target
    # 2% less noise (the search's tolerance is 1%) would overspend: z is the smallest.
    less = epsilon_for_rounds(PrivacyMode.CENTRAL, [(q, z / 1.02)] * rounds, DP_DELTA)
    assert less > target


def test_a_smaller_budget_needs_more_noise() -> None:
    # q = 1 only: the Poisson-sampled accountant takes seconds per search at q < 1.
    assert noise_for_epsilon(3.0, 1.0, 10) > noise_for_epsilon(8.0, 1.0, 10)
    # Fewer rounds compose less: the same budget needs less noise.
    assert noise_for_epsilon(8.0, 1.0, 3) < noise_for_epsilon(8.0, 1.0, 10)


def test_an_impossible_budget_is_refused() -> None:
    with pytest.raises(ValueError):
        noise_for_epsilon(0.0, 1.0, 10)
    with pytest.raises(ValueError, match="above"):
        noise_for_epsilon(1e-4, 1.0, 10)


def test_the_demo_has_no_amplification() -> None:
    """Every device is in every round: q = 1, so z is that of the plain Gaussian mechanism."""
    privacy = demo_privacy(8.0, 0.5, rounds=10, devices_per_round=6, devices=6)
    assert privacy.noise_multiplier == noise_for_epsilon(8.0, 1.0, 10)
    assert (privacy.epsilon_budget, privacy.clip_norm, privacy.delta) == (8.0, 0.5, DP_DELTA)


def _written_task(
    tmp_path: Path, rounds: int, privacy: DemoPrivacy | None, secure: bool = False
) -> TaskConfig:
    """The task table `schoolfl demo` writes into its coordinator.toml."""
    settings = DemoSettings(
        devices=2,
        rounds=rounds,
        state_dir=tmp_path,
        plot_path=tmp_path / "demo.png",
        local_steps=2,
        held_out=16,
        per_device=20,
        deadline_seconds=60.0,
        privacy=privacy,
        secure_aggregation=secure,
    )
    DemoFleet(settings, "mqtt://127.0.0.1:1883").write_configs()
    return CoordinatorConfig.load(tmp_path / "coordinator.toml").tasks[0]


def test_the_coordinator_config_carries_the_policy(tmp_path: Path) -> None:
    privacy = demo_privacy(3.0, 0.75, rounds=10, devices_per_round=2, devices=2)
    task = _written_task(tmp_path, rounds=10, privacy=privacy)
    assert DpPolicy.of(task) == DpPolicy(
        PrivacyMode.CENTRAL, 0.75, privacy.noise_multiplier, 3.0, DP_DELTA
    )
    # The budget the coordinator checks before each round lets all 10 rounds run.
    assert (
        epsilon_for_rounds(
            PrivacyMode.CENTRAL,
            [(1.0, task.privacy.noise_multiplier)] * task.rounds,
            task.privacy.delta,
        )
        <= task.privacy.epsilon_budget
    )


def test_no_dp_by_default(tmp_path: Path) -> None:
    assert _written_task(tmp_path, rounds=1, privacy=None).privacy.mode == "off"


def test_secure_aggregation_flag_reaches_the_task(tmp_path: Path) -> None:
    task = _written_task(tmp_path, rounds=2, privacy=None, secure=True)
    assert task.secure_aggregation.enabled and task.secure_aggregation.clip_bound == 8.0
    plain = _written_task(tmp_path / "plain", rounds=2, privacy=None)
    assert not plain.secure_aggregation.enabled
