"""agent.toml round trip and its error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.agent_config import AgentConfig, AgentConfigError, AgentSettings
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
