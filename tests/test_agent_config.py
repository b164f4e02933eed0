"""agent.toml round trip and its error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.agent_config import AgentConfig, AgentConfigError, AgentSettings, check_ca_file
from edge_runtime.eligibility import EligibilityPolicy, TimeWindow
from edge_runtime.wire import BrokerSettings


def _config(tmp_path: Path) -> AgentConfig:
    return AgentConfig(
        agent=AgentSettings(
            fleet="district-7",
            device_id="north-pi-01",
            school="north",
            state_dir=str(tmp_path / "state"),
            data_dir=str(tmp_path / "data"),
            tasks=("subjects",),
        ),
        broker=BrokerSettings(url="mqtt://broker.local:1884", username="north-pi-01"),
        eligibility=EligibilityPolicy(allowed_hours=(TimeWindow.parse("16:00-07:30"),)),
    )


def test_save_load_round_trip(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config.save(tmp_path / "agent.toml")
    assert AgentConfig.load(tmp_path / "agent.toml") == config
    assert config.broker.port == 1884 and config.broker.host == "broker.local"


def test_data_file_lookup(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with pytest.raises(AgentConfigError, match="subjects.jsonl"):
        config.data_file("subjects")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "subjects.csv").write_text("text,label\n")
    assert config.data_file("subjects").name == "subjects.csv"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[agent]\nfleet='f'\n", "missing"),
        (
            "[agent]\nfleet='f'\ndevice_id='d'\nschool='s'\nstate_dir='x'\ndata_dir='y'\ncolour=1\n",
            "[agent]: unknown keys ['colour']",
        ),
        (
            "[agent]\nfleet='f'\ndevice_id='d d'\nschool='s'\nstate_dir='x'\ndata_dir='y'\n",
            "device_id",
        ),
        (
            "[agent]\nfleet='f'\ndevice_id='d'\nschool='s'\nstate_dir='x'\ndata_dir='y'\n"
            "[broker]\nurl='http://x'\n",
            "mqtt://HOST:PORT",
        ),
        (
            "[agent]\nfleet='f'\ndevice_id='d'\nschool='s'\nstate_dir='x'\ndata_dir='y'\n"
            "[eligibility]\nallowed_hours=['9-5']\n",
            "time window",
        ),
        ("[agent\n", "not valid TOML"),
        ("[agents]\n", "unknown tables"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(content)
    with pytest.raises(AgentConfigError) as error:
        AgentConfig.load(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)


def test_missing_file_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError, match="schoolfl agent init"):
        AgentConfig.load(tmp_path / "nope.toml")


def test_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    settings = BrokerSettings(username="dev", password_file=str(secret))
    transport = settings.transport_config(client_id="dev")
    assert transport.password == "s3cret" and transport.username == "dev"
    assert BrokerSettings(url="mqtts://b.example").transport_config("c").tls is not None


AGENT_TABLE = "[agent]\nfleet='f'\ndevice_id='d'\nschool='s'\nstate_dir='x'\ndata_dir='y'\n"


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        (
            "[eligibility]\nmax_cpu_percent='eighty'\n",
            "[eligibility] max_cpu_percent must be a number, got 'eighty'",
        ),
        (
            "[eligibility]\nmin_battery_percent=true\n",
            "[eligibility] min_battery_percent must be a number, got True",
        ),
        (
            "[eligibility]\nmemory_margin_bytes=1.5\n",
            "[eligibility] memory_margin_bytes must be a whole number",
        ),
        (
            "[eligibility]\nrequire_mains='no'\n",
            "[eligibility] require_mains must be true or false",
        ),
        (
            "[eligibility]\nallowed_weekdays='mon'\n",
            "[eligibility] allowed_weekdays must be a list of strings",
        ),
        (
            "[eligibility]\nallowed_hours=['25:00-26:00']\n",
            "[eligibility] allowed_hours: time window",
        ),
        ("[eligibility]\nmax_cpu_percent=0\n", "[eligibility] max_cpu_percent must be within"),
        ("[broker]\nurl=1883\n", "[broker] url must be a string, got 1883"),
        (
            "[broker]\nbandwidth_limit_bytes_per_second='fast'\n",
            "[broker] bandwidth_limit_bytes_per_second must be a number",
        ),
        (
            "[broker]\nreceive_queue_max_messages='many'\n",
            "[broker] receive_queue_max_messages must be a whole number",
        ),
        ("[broker]\ntls_insecure='false'\n", "[broker] tls_insecure must be true or false"),
        (
            "[privacy]\nmin_noise_multiplier='1.1'\n",
            "[privacy] min_noise_multiplier must be a number",
        ),
        (
            "[privacy]\nallowed_tasks='subjects'\n",
            "[privacy] allowed_tasks must be a list of strings",
        ),
        ("eligibility = 3\n", "[eligibility] must be a table"),
    ],
)
def test_wrong_types_name_the_table_and_key(tmp_path: Path, tables: str, message: str) -> None:
    path = tmp_path / "agent.toml"
    # top-level keys must come before the first table header
    path.write_text(
        tables + AGENT_TABLE if tables.startswith("eligibility") else AGENT_TABLE + tables
    )
    with pytest.raises(AgentConfigError) as error:
        AgentConfig.load(path)
    assert str(error.value).startswith(f"{path}: {message}")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("threads", "'4'", "[agent] threads must be a whole number, got '4'"),
        ("emulate_profile", "1", "[agent] emulate_profile must be true or false, got 1"),
        ("tasks", "[1, 2]", "[agent] tasks must be a list of strings, got [1, 2]"),
        ("profile", "4", "[agent] profile must be a string, got 4"),
    ],
)
def test_wrong_types_in_the_agent_table(tmp_path: Path, key: str, value: str, message: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT_TABLE + f"{key} = {value}\n")
    with pytest.raises(AgentConfigError) as error:
        AgentConfig.load(path)
    assert message in str(error.value)


def test_an_empty_optional_broker_key_is_still_allowed(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT_TABLE + "[broker]\nca_file = ''\npassword_file = ''\n")
    assert AgentConfig.load(path).broker.ca_file is None


def test_check_ca_file(tmp_path: Path) -> None:
    from tests.production_broker import write_test_certificates

    ca_path, _, key_path = write_test_certificates(tmp_path)
    assert check_ca_file(ca_path) == ca_path.resolve()
    with pytest.raises(AgentConfigError, match="does not exist"):
        check_ca_file(tmp_path / "missing.pem")
    with pytest.raises(AgentConfigError, match="holds no PEM certificate"):
        check_ca_file(key_path)
    binary = tmp_path / "ca.der"
    binary.write_bytes(b"\x30\x82\x01\xff" + bytes(range(256)))
    with pytest.raises(AgentConfigError, match="openssl x509 -inform der"):
        check_ca_file(binary)
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    with pytest.raises(AgentConfigError, match="does not parse as PEM"):
        check_ca_file(broken)
