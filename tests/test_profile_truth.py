"""Issue 17: reference profiles and cost model that tell the truth.

Every cited file exists, the storage budget of each scheme is what the quantized layer holds,
bitsandbytes is priced as measured on the CPU, and predictions not checked on a device say so.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from device_profiles.cost_model import predict
from device_profiles.errors import ProfileValidationError
from device_profiles.plan import SCHEME_STORAGE, TrainingPlan
from device_profiles.profile import (
    DeviceProfile,
    Measurement,
    find_profile,
    load_reference_profiles,
    profile_from_toml_text,
    profile_toml_text,
    reference_profile_paths,
)
from device_profiles.shapes import KNOWN_SHAPES
from device_profiles.step_counts import BNB_CPU_STEP_FACTOR, count_step
from schoolfl.cli import cli

REPO_ROOT = Path(__file__).resolve().parents[1]
CITED_REPO_PATH = re.compile(r"\b((?:benchmarks|docs|quantization|device_profiles)/[\w./-]+\w)")


def _cited_repo_paths(text: str) -> set[str]:
    return set(CITED_REPO_PATH.findall(text))


@pytest.mark.parametrize("path", reference_profile_paths(), ids=lambda p: p.stem)
def test_every_file_a_reference_profile_cites_exists(path: Path) -> None:
    text = path.read_text()
    assert "results_costmodel" not in text
    missing = sorted(p for p in _cited_repo_paths(text) if not (REPO_ROOT / p).exists())
    assert missing == [], f"{path.name} cites files that do not exist: {missing}"


def test_cited_results_sections_exist() -> None:
    """A citation of benchmarks/RESULTS.md names a section; that section is there."""
    results = (REPO_ROOT / "benchmarks" / "RESULTS.md").read_text()
    for path in reference_profile_paths():
        for section in re.findall(r"benchmarks/RESULTS\.md, '([^']+)'", path.read_text()):
            assert f"## {section}" in results, f"{path.name}: no section {section!r}"


def test_baseline_rss_is_the_recorded_measurement() -> None:
    results = (REPO_ROOT / "benchmarks" / "RESULTS.md").read_text()
    for profile in load_reference_profiles():
        assert f"{profile.throughput.baseline_rss_bytes:,}" in results, profile.name


@pytest.mark.quantization
@pytest.mark.parametrize(("scheme", "shape"), [("nf4", (96, 64)), ("int8", (48, 80))])
def test_storage_budget_matches_a_quantized_layer(scheme: str, shape: tuple[int, int]) -> None:
    torch = pytest.importorskip("torch")
    from quantization.qlinear import Int8Linear, NF4Linear

    out_features, in_features = shape
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
    layer = (NF4Linear if scheme == "nf4" else Int8Linear).from_weight(weight)
    budget = SCHEME_STORAGE[scheme].weight_bytes(in_features, out_features)
    assert budget == layer.quantized_nbytes()


@pytest.mark.parametrize(("bnb", "ours"), [("bnb-nf4", "nf4"), ("bnb-int8", "int8")])
def test_bitsandbytes_is_priced_as_measured_on_the_cpu(bnb: str, ours: str) -> None:
    laptop = find_profile("laptop-mid-16gb")
    shape = KNOWN_SHAPES["smollm2-135m"]
    bnb_step = predict(laptop, shape, TrainingPlan(scheme=bnb)).step_seconds
    our_step = predict(laptop, shape, TrainingPlan(scheme=ours)).step_seconds
    # benchmarks/RESULTS.md, training run 1: 46.160 / 4.146 and 44.553 / 4.006 on SmolLM2.
    assert bnb_step / our_step == pytest.approx(BNB_CPU_STEP_FACTOR[bnb], rel=0.05)
    assert bnb_step / our_step > 5


def test_calibration_divides_the_bitsandbytes_factor_out() -> None:
    from device_profiles.calibration import Observation, fit_calibration

    laptop = find_profile("laptop-mid-16gb")
    shape = KNOWN_SHAPES["minilm-l6"]
    observations = []
    for scheme in ("none", "nf4", "bnb-nf4", "int8", "bnb-int8"):
        for batch in (1, 4):
            plan = TrainingPlan(scheme=scheme, batch_size=batch, seq_len=64)
            prediction = predict(laptop, shape, plan)
            observations.append(
                Observation(shape, plan, prediction.step_seconds, prediction.peak_bytes)
            )
    fitted = dataclasses.replace(laptop, calibration=fit_calibration(laptop, observations))
    plan = TrainingPlan(scheme="bnb-nf4", batch_size=2, seq_len=64)
    assert predict(fitted, shape, plan).step_seconds == pytest.approx(
        predict(laptop, shape, plan).step_seconds, rel=0.1
    )
    assert count_step(shape, plan).cpu_step_factor == BNB_CPU_STEP_FACTOR["bnb-nf4"]


def test_reference_predictions_are_unvalidated_and_say_so() -> None:
    shape, plan = KNOWN_SHAPES["minilm-l6"], TrainingPlan(scheme="nf4")
    for profile in load_reference_profiles():
        assert not profile.predictions_validated
        assert "not validated" in profile.validation_note
        assert "NOT validated" in profile.notes, profile.name
        assert predict(profile, shape, plan).validated is False
    measured = dataclasses.replace(
        find_profile("laptop-low-4gb"),
        kind="measured",
        measured_at="2026-12-01T00:00:00+00:00",
        measurements=(Measurement("minilm-l6", "nf4", 8, 2, 64, 0.25, 600_000_000),),
    )
    assert measured.predictions_validated and measured.validation_note == ""
    assert predict(measured, shape, plan).validated is True


def test_cli_show_and_plan_mark_unvalidated_and_unsupported() -> None:
    runner = CliRunner()
    shown = runner.invoke(cli, ["profile", "show", "raspberry-pi-4-4gb"], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "unvalidated" in shown.output and "1.8" in shown.output
    nano = runner.invoke(cli, ["profile", "show", "jetson-nano-4gb"], terminal_width=200)
    assert "UNSUPPORTED" in nano.output and "Python >= 3.10" in nano.output
    planned = runner.invoke(
        cli,
        [
            "profile",
            "plan",
            "--model",
            "minilm-l6",
            "--profile",
            "jetson-nano-4gb",
            "--schemes",
            "nf4",
            "--batches",
            "1",
            "--seqs",
            "128",
        ],
        terminal_width=200,
    )
    assert planned.exit_code == 0, planned.output
    assert "predictions unvalidated" in planned.output
    assert "(unvalidated)" in planned.output and "UNSUPPORTED" in planned.output


def test_jetsons_cpu_figures_are_copy_bandwidth_and_the_orin_trains_on_its_gpu() -> None:
    """The CPU path was fitted to a copy figure; the GPU path uses the DRAM peak (issue 18:
    the trainer computes on CUDA when torch finds it, so the Orin is priced for its GPU)."""
    for profile in load_reference_profiles():
        expected = "cuda" if profile.name == "jetson-orin-nano-8gb" else "none"
        assert profile.hardware.accelerator == expected, profile.name
    nano, orin = find_profile("jetson-nano-4gb"), find_profile("jetson-orin-nano-8gb")
    assert 3.0 <= nano.throughput.memory_bandwidth_gbps <= 3.7
    assert 6.3 <= orin.throughput.memory_bandwidth_gbps <= 6.7
    assert orin.throughput.gpu_memory_bandwidth_gbps == 68.0
    assert "GPU" in orin.description and "CUDA" in orin.notes and "unified" in orin.notes
    assert not orin.hardware.gpu_memory_bytes and not nano.hardware.gpu_memory_bytes
    assert nano.support == "unsupported" and "Python >= 3.10" in nano.support_note


def test_pi4_says_which_board_and_cooling_it_models() -> None:
    pi4 = find_profile("raspberry-pi-4-4gb")
    assert pi4.hardware.clock_ghz == 1.8
    assert pi4.hardware.sources["clock_ghz"]
    assert "throttl" in pi4.hardware.thermal
    assert "1.5 GHz" in pi4.notes and "Lite" in pi4.notes


def test_new_fields_round_trip_through_tmp_path(tmp_path: Path) -> None:
    original = find_profile("jetson-nano-4gb")
    path = tmp_path / "nano.toml"
    original.save(path)
    assert DeviceProfile.load(path) == original
    pi4 = find_profile("raspberry-pi-4-4gb")
    assert profile_from_toml_text(profile_toml_text(pi4)) == pi4


def test_validation_refuses_unknown_top_level_key_and_bare_unsupported() -> None:
    text = profile_toml_text(find_profile("laptop-low-4gb"))
    with pytest.raises(ProfileValidationError, match="colour is not a known top-level key"):
        profile_from_toml_text('colour = "red"\n' + text)
    with pytest.raises(ProfileValidationError, match="support_note is missing"):
        profile_from_toml_text('support = "unsupported"\n' + text)
    with pytest.raises(ProfileValidationError, match="support is 'maybe'"):
        profile_from_toml_text('support = "maybe"\n' + text)
