"""What an operator sees of each device (issue 21): the heartbeat facts the daemon keeps,
why a device sat a round out, and the list commands in text and --json.

The daemon tests drive a real coordinator over a real Mosquitto on an injected clock; the
devices speak the real protocol (signed DeviceState frames on their own topics)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import queue
import re
import sqlite3
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from coordinator.device_status import HeartbeatFacts, HeartbeatRecorder
from coordinator.mosquitto import MosquittoProcess
from coordinator.round_opening import DeviceSelection
from coordinator.scheduler import DeviceCandidate
from coordinator.store import CoordinatorStore, PrivacyRound, RoundState, StoredUpdate
from coordinator.store_schema import SCHEMA
from device_profiles.profile import find_profile
from edge_runtime.wire import DeviceChannel, DeviceState, PowerSource, public_key_hex
from schoolfl.cli import cli
from tests.daemon_helpers import ScriptedDevice

FLEET = "seefleet"
BUSY = "CPU load 93% is above max_cpu_load 50%"
LONG_SCHOOL = "the-very-long-named-north-district-secondary-school"

DAEMON_TOML = """
[coordinator]
fleet = "{fleet}"
state_dir = "{state}"
startup_grace_seconds = 3.0

[broker]
url = "{url}"

[[tasks]]
id = "t"
kind = "classification"
base_model = "{model}"
labels = ["a", "b"]
scheme = "none"
rank = 2

[tasks.schedule]
devices_per_round = 3
min_updates = 2
over_selection = 0.0
gather_seconds = 0.0
round_deadline_seconds = 600.0
"""


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def _state(device: ScriptedDevice, *, eligible: bool, reasons: tuple[str, ...] = ()) -> bytes:
    state = DeviceState(
        fleet=FLEET,
        device_id=device.device_id,
        sequence=time.time_ns() // 1000,
        online=True,
        eligible=eligible,
        cpu_load=0.93 if reasons else 0.1,
        free_memory_bytes=6 * 2**30,
        power_source=PowerSource.BATTERY,
        profile_digest=hashlib.sha256(device.profile_text.encode()).hexdigest(),
        ineligible_reasons=reasons,
        battery_percent=81.0,
    )
    return device.frame(state)


def _pump(daemon: CoordinatorDaemon, done, what: str) -> None:  # noqa: ANN001
    """Handle the broker's messages on this thread until `done()` (with a deadline)."""
    assert daemon.transport is not None
    deadline = time.monotonic() + 30
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        try:
            daemon.handle(daemon.transport.received.get(timeout=0.2))
        except queue.Empty:
            continue
        finally:
            daemon.heartbeats.flush()  # what the daemon's tick does


@pytest.fixture
def fleet(tmp_path: Path, mosquitto: MosquittoProcess, tiny_bert_folder: Path):  # noqa: ANN201
    config_path = tmp_path / "coordinator.toml"
    config_path.write_text(
        DAEMON_TOML.format(
            fleet=FLEET, state=tmp_path / "coord", url=mosquitto.url, model=tiny_bert_folder
        )
    )
    clock = Clock()
    daemon = CoordinatorDaemon(CoordinatorConfig.load(config_path), now=clock)
    daemon.start()
    devices = {}
    for device_id in ("busy-pi", "lap-1", "lap-2", "old-lap", "never-seen"):
        device = ScriptedDevice(FLEET, device_id, "127.0.0.1", mosquitto.port)
        token = f"token-{device_id}-0123456789abcdef"
        school = LONG_SCHOOL if device_id == "busy-pi" else "south"
        daemon.store.add_enrollment_token(token, school, 600)
        daemon.store.redeem_enrollment_token(
            token, device_id, bytes.fromhex(public_key_hex(device.key)), device.profile_text
        )
        devices[device_id] = device
    yield daemon, devices, config_path, clock
    for device in devices.values():
        device.close()
    daemon.stop()


@pytest.mark.integration
def test_heartbeats_are_kept_and_every_left_out_device_says_why(fleet) -> None:  # noqa: ANN001
    daemon, devices, config_path, clock = fleet
    busy = devices["busy-pi"]
    busy.publish(DeviceChannel.STATE, _state(busy, eligible=False, reasons=(BUSY,)))
    for device_id in ("lap-1", "lap-2", "old-lap"):
        devices[device_id].publish(DeviceChannel.STATE, _state(devices[device_id], eligible=True))
    _pump(
        daemon,
        lambda: len(daemon.store.device_status.heartbeats()) == 4,
        "four recorded heartbeats",
    )
    stored = daemon.store.device_status.heartbeats()["busy-pi"]
    assert (stored.eligible, stored.ineligible_reasons) == (False, (BUSY,))
    assert (stored.power_source, stored.battery_percent, stored.cpu_load) == ("battery", 81.0, 0.93)
    assert stored.received_at == clock.now

    clock.now += 4.0  # past the startup grace
    for device_id, live in list(daemon.liveness.items()):  # fresh at the new time
        daemon.liveness[device_id] = type(live)(live.state, clock.now)
    assert daemon.store.revoke_device("old-lap")
    daemon.tick()
    [record] = daemon.store.open_rounds()
    assert set(daemon.store.assignments("t", record.round_number)) == {"lap-1", "lap-2"}
    left_out = daemon.store.device_status.left_out("t", record.round_number)
    assert left_out == {
        "busy-pi": f"not eligible: {BUSY}",
        "old-lap": "revoked",
        "never-seen": "offline (no heartbeat since the coordinator started)",
    }, left_out

    # `coordinator devices`: facts, heartbeat age, and the round's choice, whole in a pipe.
    code, output = _cli("coordinator", "devices", "--config", str(config_path))
    assert code == 0, output
    [busy_line] = [line for line in output.splitlines() if line.startswith("busy-pi")]
    assert LONG_SCHOOL in busy_line and f"online  not eligible: {BUSY}" in busy_line
    assert re.search(r"heartbeat \d+ s ago$", busy_line), busy_line
    assert f"  task t round 1 (open): not chosen: not eligible: {BUSY}" in output
    assert "  task t round 1 (open): chosen" in output
    [never_line] = [line for line in output.splitlines() if line.startswith("never-seen")]
    assert "offline" in never_line and "heartbeat never" in never_line

    code, output = _cli("coordinator", "devices", "--config", str(config_path), "--json")
    assert code == 0, output
    by_id = {d["device_id"]: d for d in json.loads(output)["devices"]}
    assert by_id["busy-pi"]["school"] == LONG_SCHOOL
    assert by_id["busy-pi"]["eligible"] is False and by_id["busy-pi"]["online"] is True
    assert by_id["busy-pi"]["ineligible_reasons"] == [BUSY]
    assert by_id["busy-pi"]["free_memory_bytes"] == 6 * 2**30
    assert by_id["busy-pi"]["last_heartbeat_at"] == stored.received_at
    assert by_id["busy-pi"]["rounds"] == [
        {
            "task_id": "t",
            "round_number": 1,
            "round_state": "open",
            "chosen": False,
            "reason": f"not eligible: {BUSY}",
        }
    ]
    assert by_id["lap-1"]["rounds"][0]["chosen"] is True
    assert by_id["old-lap"]["state"] == "revoked"
    assert by_id["never-seen"]["last_heartbeat_age_seconds"] is None

    # `coordinator status`: a devices line with counted reasons, the round's left-out.
    code, output = _cli("coordinator", "status", "--config", str(config_path))
    assert code == 0, output
    assert f"devices: 3 online, 2 eligible, 1 ineligible ({BUSY} x1), 1 offline, 1 revoked" in (
        output
    )
    assert "  round 1 (open): 3 device(s) left out:" in output
    assert "    old-lap: revoked" in output
    code, output = _cli("coordinator", "status", "--config", str(config_path), "--json")
    assert code == 0, output
    view = json.loads(output)
    assert view["devices"]["ineligible_reasons"] == {BUSY: 1}
    assert view["devices"]["eligible"] == 2
    [task] = view["tasks"]
    assert task["open_rounds"] == [1] and task["rounds"][0]["left_out"] == left_out
    assert len(task["adapter"]["sha256"]) == 64  # whole when not on a terminal


def _facts(received_at: float, *, eligible: bool = True, cpu_load: float = 0.1) -> HeartbeatFacts:
    reasons = () if eligible else (BUSY,)
    return HeartbeatFacts(
        "dev", True, eligible, reasons, cpu_load, 2**30, "mains", None, received_at
    )


def test_a_heartbeat_is_written_when_it_is_news_or_a_minute_old(tmp_path: Path) -> None:
    """Agents beat every ~10 s: an unchanged heartbeat is not written again within a
    minute (a large fleet would otherwise write on every beat); a change is written at once."""
    store = CoordinatorStore(tmp_path / "coordinator.db")
    recorder = HeartbeatRecorder(store.device_status)
    assert recorder.note(_facts(1000.0))
    assert "dev" not in store.device_status.heartbeats()  # queued until the tick's flush
    assert recorder.flush() == 1
    assert not recorder.note(_facts(1010.0, cpu_load=0.4))  # only the load moved
    assert recorder.flush() == 0
    assert store.device_status.heartbeats()["dev"].received_at == 1000.0
    assert recorder.note(_facts(1020.0, eligible=False))  # news: written at the next flush
    assert recorder.flush() == 1
    assert store.device_status.heartbeats()["dev"].ineligible_reasons == (BUSY,)
    assert not recorder.note(_facts(1070.0, eligible=False))
    assert recorder.note(_facts(1080.5, eligible=False, cpu_load=0.9))  # a minute on
    assert recorder.note(_facts(1081.0, eligible=False, cpu_load=0.8))  # newest one wins
    assert recorder.flush() == 1
    assert store.device_status.heartbeats()["dev"].cpu_load == 0.8
    store.close()


def test_queued_heartbeats_of_many_devices_are_written_in_one_transaction(
    tmp_path: Path,
) -> None:
    store = CoordinatorStore(tmp_path / "coordinator.db")
    recorder = HeartbeatRecorder(store.device_status)
    for index in range(300):
        facts = _facts(1000.0 + index / 100)
        assert recorder.note(dataclasses.replace(facts, device_id=f"dev-{index:03d}"))
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    assert recorder.flush() == 300
    store._db.set_trace_callback(None)
    assert sum(s.startswith("INSERT OR REPLACE INTO device_heartbeats") for s in statements) == 300
    assert sum(s.strip().upper() in ("COMMIT", "BEGIN", "BEGIN IMMEDIATE") for s in statements) <= 2
    assert len(store.device_status.heartbeats()) == 300
    store.close()


def test_a_store_from_before_the_device_tables_opens_and_gets_them(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.db"
    old_schema = SCHEMA[: SCHEMA.index("CREATE TABLE IF NOT EXISTS device_heartbeats")]
    db = sqlite3.connect(path)
    db.executescript(old_schema)
    db.execute("INSERT INTO meta(key, value) VALUES ('schema_version', '1')")
    db.commit()
    db.close()
    store = CoordinatorStore(path)
    store.device_status.record_heartbeat(_facts(5.0))
    store.device_status.record_left_out("t", 1, {"dev": "offline"})
    assert store.device_status.heartbeats()["dev"].received_at == 5.0
    assert store.device_status.left_out("t", 1) == {"dev": "offline"}
    store.close()


PLAIN_TOML = """
[coordinator]
fleet = "f"
state_dir = "{state}"

[[tasks]]
id = "private"
kind = "classification"
base_model = "minilm-l6"
labels = ["a", "b"]

[tasks.privacy]
mode = "central"
clip_norm = 0.5
noise_multiplier = 1.1
epsilon_budget = 3.0
"""


def test_rounds_prints_one_updates_figure_and_every_list_has_json(tmp_path: Path) -> None:
    config_path = tmp_path / "coordinator.toml"
    config_path.write_text(PLAIN_TOML.format(state=tmp_path / "state"))
    store = CoordinatorStore(tmp_path / "state" / "coordinator.db")
    entry = PrivacyRound("private", 1, 10, 2, 0.2, 0.5, 1.1, 0.75, 1e-5)
    store.open_round("private", 1, 0, 1e12, {"a": "{}", "b": "{}"}, privacy=entry)
    for device in ("a", "b"):
        store.record_update(
            StoredUpdate(f"u-{device}", "private", 1, device, 8, 4, {"loss": 0.5}, b"x")
        )
    store.device_status.record_left_out("private", 1, {"c": "offline"})
    store.close_round(
        "private",
        1,
        RoundState.COMPLETED,
        "quota reached",
        metrics={"updates": 2.0, "samples": 16.0, "train_loss": 0.5},
        privacy=entry,
    )
    store.close()

    code, output = _cli("coordinator", "rounds", "--config", str(config_path))
    assert code == 0, output
    [line] = output.splitlines()
    assert line.count("updates=") == 1 and "updates=2" in line and "train_loss=0.5" in line

    code, output = _cli("coordinator", "rounds", "--config", str(config_path), "--json")
    assert code == 0, output
    [round_view] = json.loads(output)["rounds"]
    assert (round_view["updates"], round_view["aggregated"]) == (2, 2)
    assert round_view["metrics"] == {"samples": 16.0, "train_loss": 0.5}
    assert round_view["assigned"] == ["a", "b"] and round_view["left_out"] == {"c": "offline"}
    assert round_view["state"] == "completed" and round_view["reason"] == "quota reached"

    code, output = _cli(
        "coordinator", "privacy-report", "private", "--config", str(config_path), "--json"
    )
    assert code == 0, output
    report = json.loads(output)
    assert report["epsilon_budget"] == 3.0 and report["stopped"] is None
    [ledger] = report["rounds"]
    assert (ledger["participants"], ledger["eligible_devices"], ledger["epsilon"]) == (
        2,
        10,
        0.75,
    )


SELECTION_TOML = """
[coordinator]
fleet = "f"
state_dir = "{state}"

[[tasks]]
id = "t"
kind = "classification"
base_model = "minilm-l6"
labels = ["a", "b"]

[tasks.schedule]
strategy = "fit-first"
devices_per_round = 1
min_updates = 1
over_selection = 0.0
gather_seconds = 0.0
"""


def test_the_selection_says_whether_the_plan_did_not_fit_or_others_were_chosen(
    tmp_path: Path,
) -> None:
    config_path = tmp_path / "coordinator.toml"
    config_path.write_text(SELECTION_TOML.format(state=tmp_path / "state"))
    config = CoordinatorConfig.load(config_path)
    store = CoordinatorStore(tmp_path / "coordinator.db")
    laptop = find_profile("laptop-mid-16gb")
    candidates = [
        DeviceCandidate("lap-1", "south", laptop),
        DeviceCandidate("lap-2", "south", laptop),
        DeviceCandidate("starved", "south", laptop, free_memory_bytes=2**20),
    ]
    selection = DeviceSelection(config, store, None)
    task = config.task("t")
    free = selection.eligible(task, candidates)
    assert free is not None
    [chosen] = selection.choose(task, free, 1) or []
    other = ({"lap-1", "lap-2"} - {chosen.device_id}).pop()
    left_out = selection.left_out["t"]
    assert left_out[other] == "not selected by the scheduler (fit-first: enough devices)"
    assert left_out["starved"].startswith("plan does not fit: "), left_out["starved"]
    store.close()
