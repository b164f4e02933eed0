"""FedAvg numerics and refusal of bad updates (no broker needed)."""

from __future__ import annotations

import math

import pytest
import torch

from coordinator.aggregation import (
    ClientUpdate,
    FedAvg,
    NormBound,
    NormBoundMode,
    apply_delta,
    update_problem,
    weighted_mean,
)
from quantization.adapter_deltas import clip_update
from quantization.adapter_deltas import update_l2_norm as l2_norm


def _reference() -> dict[str, torch.Tensor]:
    return {"layer.lora_A": torch.zeros(4, 8), "layer.lora_B": torch.zeros(8, 4)}


def _update(device: str, value: float, samples: int) -> ClientUpdate:
    return ClientUpdate(
        device_id=device,
        delta={name: torch.full(t.shape, value) for name, t in _reference().items()},
        num_samples=samples,
        num_steps=5,
    )


def test_weighted_mean_weights_by_samples() -> None:
    result = FedAvg().aggregate([_update("a", 1.0, 10), _update("b", 4.0, 30)], _reference())
    expected = (1.0 * 10 + 4.0 * 30) / 40
    assert torch.allclose(result.delta["layer.lora_A"], torch.full((4, 8), expected))
    assert result.accepted_devices == ("a", "b")
    assert result.total_samples == 40


def test_weighted_mean_of_one_update_is_that_update() -> None:
    delta = {"w": torch.randn(3, 5)}
    assert torch.equal(weighted_mean([delta], [7])["w"], delta["w"])


@pytest.mark.parametrize(
    ("bad_delta", "reason"),
    [
        ({"layer.lora_A": torch.zeros(4, 8)}, "missing"),
        (
            {**_reference(), "other": torch.zeros(1)},
            "unexpected",
        ),
        ({"layer.lora_A": torch.zeros(4, 9), "layer.lora_B": torch.zeros(8, 4)}, "shape"),
        (
            {
                "layer.lora_A": torch.zeros(4, 8, dtype=torch.int32),
                "layer.lora_B": torch.zeros(8, 4),
            },
            "dtype",
        ),
        (
            {"layer.lora_A": torch.full((4, 8), math.nan), "layer.lora_B": torch.zeros(8, 4)},
            "NaN or Inf",
        ),
        (
            {"layer.lora_A": torch.full((4, 8), math.inf), "layer.lora_B": torch.zeros(8, 4)},
            "NaN or Inf",
        ),
    ],
)
def test_bad_updates_are_refused_and_never_reach_the_mean(
    bad_delta: dict[str, torch.Tensor], reason: str
) -> None:
    assert reason in (update_problem(bad_delta, _reference()) or "")
    bad = ClientUpdate("bad", bad_delta, num_samples=1000, num_steps=1)
    result = FedAvg().aggregate([_update("good", 2.0, 10), bad], _reference())
    assert result.accepted_devices == ("good",)
    assert reason in result.rejected_devices["bad"]
    assert torch.allclose(result.delta["layer.lora_B"], torch.full((8, 4), 2.0))


def test_duplicate_device_counts_once() -> None:
    result = FedAvg().aggregate([_update("a", 1.0, 10), _update("a", 9.0, 10)], _reference())
    assert result.accepted_devices == ("a",)
    assert "more than one" in result.rejected_devices["a"]
    assert torch.allclose(result.delta["layer.lora_A"], torch.ones(4, 8))


def test_norm_bound_clips_outlier_to_bound() -> None:
    bound = 1.0
    outlier = {"w": torch.full((10,), 5.0)}
    clipped, did_clip = clip_update(outlier, bound), l2_norm(outlier) > bound
    assert did_clip
    assert l2_norm(clipped) == pytest.approx(bound, rel=1e-6)
    result = FedAvg(NormBound(bound)).aggregate([_update("big", 100.0, 1)], _reference())
    assert result.clipped_devices == ("big",)
    assert l2_norm(result.delta) == pytest.approx(bound, rel=1e-5)


def test_norm_bound_reject_mode_refuses_outlier() -> None:
    aggregator = FedAvg(NormBound(1.0, NormBoundMode.REJECT))
    result = aggregator.aggregate(
        [_update("big", 100.0, 1), _update("small", 0.01, 1)], _reference()
    )
    assert result.accepted_devices == ("small",)
    assert "exceeds bound" in result.rejected_devices["big"]


def test_all_refused_leaves_result_empty() -> None:
    bad = ClientUpdate("x", {"nope": torch.zeros(1)}, num_samples=1, num_steps=1)
    result = FedAvg().aggregate([bad], _reference())
    assert result.is_empty
    assert result.delta == {}


def test_apply_delta_refuses_non_finite_merge() -> None:
    state = {"w": torch.full((2,), 3e38)}
    with pytest.raises(ValueError, match="not finite"):
        apply_delta(state, {"w": torch.full((2,), 3e38)})


def test_client_update_validates_samples() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        ClientUpdate("a", {}, num_samples=0, num_steps=1)
