"""`schoolfl profile ...` commands, the reduced bench, and the broker probe on real Mosquitto."""

from __future__ import annotations

import json
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


def test_list_piped_prints_whole_names_in_gib() -> None:
    """CliRunner's stdout is not a terminal, as in `schoolfl profile list | grep pi`: rich
    would cut names to the width ("rasp…"); rows are tab-separated whole values."""
    result = CliRunner(env={"COLUMNS": "40"}).invoke(cli, ["profile", "list"])
    assert result.exit_code == 0, result.output
    rows = {line.split("\t")[0]: line.split("\t") for line in result.output.splitlines()}
    assert "…" not in result.output
    pi = rows["raspberry-pi-4-4gb"]
    header = rows["name"]
    assert pi[header.index("RAM")] == "4.00 GiB"  # sold as "4 GB": 4 GiB
    assert pi[header.index("usable RAM")] == "3.38 GiB"


def test_list_json_holds_the_profiles_figures() -> None:
    code, output = _run("list", "--json")
    assert code == 0, output
    entries = {entry["name"]: entry for entry in json.loads(output)}
    assert set(entries) == {path.stem for path in reference_profile_paths()}
    pi = entries["raspberry-pi-4-4gb"]
    reference = DeviceProfile.load(
        next(path for path in reference_profile_paths() if path.stem == "raspberry-pi-4-4gb")
    )
    assert pi["ram_bytes"] == reference.hardware.ram_bytes == 4 * 2**30
    assert pi["usable_ram_bytes"] == reference.usable_ram_bytes
    assert pi["cpu_fp32_gflops"] == reference.throughput.cpu_fp32_gflops
    assert pi["quant_schemes"] == list(reference.throughput.quant_schemes)
    assert (pi["down_mbps"], pi["up_mbps"]) == (20.0, 6.0)


def test_show_json_is_the_profile_document() -> None:
    code, output = _run("show", "raspberry-pi-4-4gb", "--json")
    assert code == 0, output
    document = json.loads(output)
    assert document["name"] == "raspberry-pi-4-4gb"
    assert document["hardware"]["ram_bytes"] == 4 * 2**30
    assert "sci-pi.org.uk" in document["throughput"]["memory_bandwidth_gbps_source"]
    assert document["derived"]["validated"] is False
    code, output = _run("show", "raspberry-pi-4-4gb")
    assert "hardware.ram_bytes\t4294967296 (4.00 GiB)\t" in output


def _plan_json(*args: str) -> dict:
    code, output = _run("plan", "--json", *args)
    assert code == 0, output
    return json.loads(output)


def test_plan_prices_bandwidth_at_the_link_and_the_school_share() -> None:
    document = _plan_json(
        "--model",
        "smollm2-135m",
        "--profile",
        "raspberry-pi-4-4gb",
        "--schemes",
        "nf4",
        "--batches",
        "1",
        "--seqs",
        "128",
        "--school-link-mbps",
        "60/12",
        "--devices-sharing",
        "4",
    )
    from device_profiles.shapes import KNOWN_SHAPES
    from device_profiles.transfer import UPLOAD_BYTES_PER_PARAM, adapter_bytes, transfer_seconds

    assert document["school_link"] == {"down_mbps": 60.0, "up_mbps": 12.0, "devices_sharing": 4}
    (row,) = document["profiles"][0]["plans"]
    roles = tuple(document["target_modules"])
    assert roles == ("q", "k", "v", "o", "gate", "up", "down")
    shape = KNOWN_SHAPES["smollm2-135m"]
    up = adapter_bytes(shape, 8, roles, UPLOAD_BYTES_PER_PARAM)
    assert row["download_bytes"] == adapter_bytes(shape, 8, roles) == 4 * (up - 8192) + 8192
    assert row["upload_bytes"] == up
    assert row["upload_seconds"] == pytest.approx(transfer_seconds(up, 6.0, 30.0))
    # 12 Mbit/s shared by 4: 3 Mbit/s each, slower than the Pi's own 6.
    assert row["school_upload_seconds"] == pytest.approx(transfer_seconds(up, 3.0, 30.0))
    # 60 / 4 = 15 Mbit/s down, slower than its own 20.
    assert row["school_download_seconds"] == pytest.approx(
        transfer_seconds(row["download_bytes"], 15.0, 30.0)
    )
    code, output = _run(
        "plan",
        "--model",
        "smollm2-135m",
        "--profile",
        "raspberry-pi-4-4gb",
        "--schemes",
        "nf4",
        "--batches",
        "1",
        "--seqs",
        "128",
    )
    header, pi_row = [line.split("\t") for line in output.splitlines() if "\t" in line][:2]
    assert pi_row[header.index("up MB")] == f"{up / 1e6:.2f}"
    assert "shared by 30 devices" in output


def test_plan_says_an_unusable_scheme_once() -> None:
    code, output = _run("plan", "--model", "llama-1.1b", "--profile", "raspberry-pi-4-4gb")
    assert code == 0, output
    rows = [line.split("\t") for line in output.splitlines() if not line.startswith("#")]
    assert {row[0] for row in rows[1:]} == {"none", "int8", "nf4"}
    notes = [line for line in output.splitlines() if "is not usable" in line]
    assert len(notes) == 2 and all("6 grid plans left out" in note for note in notes)


def _by_point(document: dict) -> dict[tuple[str, int, int], dict]:
    plans = document["profiles"][0]["plans"]
    return {(plan["scheme"], plan["batch_size"], plan["seq_len"]): plan for plan in plans}


def test_the_pi_trains_the_1_1b_with_a_lever_named() -> None:
    """RESULTS.md: the 1.1B trains on the Pi 4 (2.80 GiB at nf4 4 x 128). The planner prices
    what the trainer runs: plans that fit only with gradient checkpointing say so."""
    document = _plan_json("--model", "llama-1.1b", "--profile", "raspberry-pi-4-4gb")
    plans = _by_point(document)
    plain = plans[("nf4", 4, 128)]
    assert plain["fits"] and plain["levers"] == "" and 2.5 * 2**30 < plain["peak_bytes"] < 3 * 2**30
    levered = plans[("nf4", 8, 128)]
    assert levered["fits"] and levered["gradient_checkpointing"]
    assert levered["levers"] == "gradient checkpointing"
    assert not plans[("none", 1, 128)]["fits"]
    assert "even with gradient checkpointing" in plans[("none", 1, 128)]["reason"]
    without = _plan_json("--model", "llama-1.1b", "--profile", "raspberry-pi-4-4gb", "--no-levers")
    assert not _by_point(without)[("nf4", 8, 128)]["fits"]
    code, output = _run("plan", "--model", "llama-1.1b", "--profile", "raspberry-pi-4-4gb")
    assert "fits with gradient checkpointing" in output


def test_the_planners_targets_are_the_coordinators() -> None:
    from coordinator.scheduler import DECODER_TARGET_ROLES, ENCODER_TARGET_ROLES
    from device_profiles.plan import TASK_TARGET_MODULES

    assert TASK_TARGET_MODULES == {"encoder": ENCODER_TARGET_ROLES, "decoder": DECODER_TARGET_ROLES}


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
    assert "does not fit" in pi_part and "GiB usable" in pi_part
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
