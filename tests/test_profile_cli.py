"""`schoolfl profile ...` commands, the reduced bench, and the broker probe on real Mosquitto."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from coordinator.mosquitto import MosquittoProcess, free_loopback_port
from device_profiles.broker_probe import measure_broker, parse_broker_url
from device_profiles.errors import BenchError
from device_profiles.profile import DeviceProfile, reference_profile_paths
from schoolfl.cli import cli


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner(env={"COLUMNS": "250"}).invoke(cli, ["profile", *args])
    return result.exit_code, result.output


def test_list_shows_every_reference_profile() -> None:
    code, output = _run("list")
    assert code == 0, output
    for path in reference_profile_paths():
        assert path.stem in output


def test_show_prints_fields_with_sources() -> None:
    code, output = _run("show", "raspberry-pi-4-4gb")
    assert code == 0, output
    assert "throughput.memory_bandwidth_gbps" in output and "sci-pi.org.uk" in output
    code, output = _run("show", "no-such-device")
    assert code != 0 and "reference profiles:" in output


def test_validate_exit_codes_and_messages(tmp_path: Path) -> None:
    good = reference_profile_paths()[0]
    code, output = _run("validate", str(good))
    assert code == 0 and f"ok {good}" in output
    bad = tmp_path / "bad.toml"
    bad.write_text(
        good.read_text()
        .replace("down_mbps = 20.0", "down_mbps = -20.0")
        .replace('"nf4"]', '"nf5"]')
    )
    code, output = _run("validate", str(good), str(bad))
    assert code == 1
    assert "network.down_mbps is -20.0; expected a number > 0" in output
    assert "unknown scheme(s) 'nf5'" in output


def test_plan_reports_fit_and_does_not_fit() -> None:
    code, output = _run(
        "plan",
        "--model",
        "llama-1.1b",
        "--steps",
        "5",
        "--profile",
        "raspberry-pi-4-4gb",
        "--profile",
        "laptop-mid-16gb",
        "--schemes",
        "none,nf4",
        "--batches",
        "1",
        "--seqs",
        "128",
    )
    assert code == 0, output
    pi_part, laptop_part = output.split("laptop-mid-16gb (")
    assert "does not fit" in pi_part and "GB usable" in pi_part
    assert "fits" in laptop_part
    code, output = _run("plan", "--model", "no-such-model")
    assert code != 0 and "known shapes" in output


@pytest.mark.integration
def test_reduced_bench_writes_valid_measured_profile(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    out, plot = tmp_path / "me.toml", tmp_path / "grid.png"
    code, output = _run(
        "bench",
        "--models",
        "tiny-encoder",
        "--schemes",
        "none,nf4",
        "--ranks",
        "4",
        "--batches",
        "1",
        "--seqs",
        "16",
        "--steps",
        "2",
        "--threads",
        "1",
        "--out",
        str(out),
        "--plot",
        str(plot),
        "--broker",
        mosquitto.url,
        "--name",
        "ci-machine",
    )
    assert code == 0, output
    profile = DeviceProfile.load(out)
    assert profile.kind == "measured" and profile.name == "ci-machine"
    assert {row.scheme for row in profile.measurements} == {"none", "nf4"}
    for row in profile.measurements:
        assert 0 < row.step_seconds < 30
        # A fresh process holding torch + transformers + peft is hundreds of MB.
        assert profile.throughput.baseline_rss_bytes <= row.peak_rss_bytes < 4e9
    assert profile.throughput.cpu_fp32_gflops > 0.1
    assert profile.network.rtt_ms > 0 and mosquitto.url in profile.network.sources["rtt_ms"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_broker_probe_measures_and_fails_cleanly(mosquitto: MosquittoProcess) -> None:
    measured = measure_broker(mosquitto.url, rtt_samples=5, payload_bytes=512 * 1024)
    assert 0 < measured.rtt_ms < 1000
    assert measured.throughput_mbps > 1
    with pytest.raises(BenchError, match="cannot connect"):
        measure_broker(f"mqtt://127.0.0.1:{free_loopback_port()}", timeout_seconds=3)
    with pytest.raises(BenchError, match="not mqtt://"):
        parse_broker_url("http://example.org")
