"""deploy/arm64/memory_check.py's points and predictions, on x86 without torch.

Why: the script runs only inside the emulated arm64 root (minutes, as root); this keeps its
point list and its pricing importable and sane in the fast suite, so a change to the cost
model or the plan types that would break the release check shows up here first.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from device_profiles.bench import PointResult
from device_profiles.cost_model import predict
from device_profiles.profile import find_profile

SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "arm64" / "memory_check.py"
BASELINE = 600_000_000
"""An emulated-looking baseline (above x86's 410.6 MB): only differences from it matter."""


@pytest.fixture(scope="module")
def memory_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("arm64_memory_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_points_cover_every_cpu_scheme_at_two_sizes(memory_check: ModuleType) -> None:
    points = memory_check.memory_points()
    assert {point.plan.scheme for point in points} == {"nf4", "int8", "none"}
    assert len({memory_check.point_label(point) for point in points}) == len(points) == 6
    for point in points:
        assert point.plan.batch_size * point.plan.seq_len <= 256  # bounded emulated time


def test_profile_keeps_the_calibration_and_replaces_only_the_baseline(
    memory_check: ModuleType,
) -> None:
    reference = find_profile(memory_check.PROFILE_NAME)
    profile = memory_check.profile_with_baseline(BASELINE)
    assert profile.throughput.baseline_rss_bytes == BASELINE
    assert profile.calibration == reference.calibration
    assert "memory_check" in profile.throughput.sources["baseline_rss_bytes"]


def test_predictions_sit_above_the_baseline_and_grow_with_the_work(
    memory_check: ModuleType,
) -> None:
    profile = memory_check.profile_with_baseline(BASELINE)
    points = memory_check.memory_points()
    peaks = {
        memory_check.point_label(p): memory_check.predicted_peak_bytes(profile, p) for p in points
    }
    for point in points:
        label = memory_check.point_label(point)
        assert peaks[label] == predict(profile, point.model_shape, point.plan).peak_bytes
        # Weights alone (MiniLM-L6 embeddings stay fp32: ~47 MB) lie above the baseline.
        assert peaks[label] > BASELINE + 40e6
    for scheme in ("nf4", "int8", "none"):
        assert peaks[f"minilm-l6 {scheme} r8 b4 s64"] > peaks[f"minilm-l6 {scheme} r4 b2 s16"]


def test_rows_report_signed_error_and_failures(memory_check: ModuleType) -> None:
    over = memory_check.CheckRow("a", 500_000_000, 560_000_000, 3.0)
    under = memory_check.CheckRow("b", 500_000_000, 390_000_000, 3.0)
    assert over.relative_error == pytest.approx(0.12)
    assert over.within_target and not under.within_target
    point = memory_check.memory_points()[0]
    failed = memory_check._row(
        point,
        PointResult(point, error="timed out"),
        memory_check.profile_with_baseline(BASELINE),
        1.0,
    )
    assert failed.error == "timed out" and not failed.within_target
    table = memory_check.format_table([over, failed], BASELINE)
    assert "| a | 500 | 560 | +12.0% |" in table
    assert "failed: timed out" in table
