"""The coordinator's SQLite store: idempotent updates, enrollment, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from coordinator.store import (
    AdapterVersion,
    CoordinatorStore,
    RoundState,
    StoredUpdate,
    StoreError,
    UpdateOutcome,
)


class FakeClock:
    """Injected clock (STYLE 11): tests move time instead of sleeping."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _update(update_id: str, device: str = "dev-a", round_number: int = 1) -> StoredUpdate:
    return StoredUpdate(update_id, "task", round_number, device, 10, 5, {"loss": 0.5}, b"body")


def test_update_recorded_once_by_id_and_by_device(tmp_path: Path) -> None:
    store = CoordinatorStore(tmp_path / "state.db")
    store.open_round("task", 1, base_version=0, deadline=2_000.0, plans_json={"dev-a": "{}"})
    assert store.record_update(_update("u1")) is UpdateOutcome.STORED
    assert store.record_update(_update("u1")) is UpdateOutcome.DUPLICATE
    assert store.record_update(_update("u1-attempt2")) is UpdateOutcome.ALREADY_REPORTED
    assert [u.update_id for u in store.updates("task", 1)] == ["u1"]
    assert store.updates("task", 1)[0].metrics == {"loss": 0.5}


def test_enrollment_token_is_one_time_and_expires(tmp_path: Path) -> None:
    clock = FakeClock()
    store = CoordinatorStore(tmp_path / "state.db", now=clock)
    store.add_enrollment_token("secret-1", school="north", valid_seconds=60)
    device = store.redeem_enrollment_token("secret-1", "dev-a", b"k" * 32, "{}")
    assert device.school == "north"
    with pytest.raises(ValueError, match="already used"):
        store.redeem_enrollment_token("secret-1", "dev-b", b"j" * 32, "{}")
    store.add_enrollment_token("secret-2", school="north", valid_seconds=60)
    clock.now += 61
    with pytest.raises(ValueError, match="expired"):
        store.redeem_enrollment_token("secret-2", "dev-c", b"j" * 32, "{}")
    with pytest.raises(ValueError, match="unknown"):
        store.redeem_enrollment_token("never-issued", "dev-d", b"j" * 32, "{}")
    # The raw token is not in the database file, only its hash.
    store.close()
    assert b"secret-1" not in (tmp_path / "state.db").read_bytes()


def test_revoke(tmp_path: Path) -> None:
    store = CoordinatorStore(tmp_path / "state.db")
    store.add_enrollment_token("t", school="s", valid_seconds=60)
    store.redeem_enrollment_token("t", "dev-a", b"k" * 32, "{}")
    assert store.revoke_device("dev-a")
    assert not store.revoke_device("dev-a")
    assert not store.revoke_device("unknown")
    record = store.device("dev-a")
    assert record is not None and record.revoked


def test_round_lifecycle_and_versions_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = CoordinatorStore(path)
    store.open_round("task", 1, 0, 2_000.0, {"dev-a": '{"rank": 8}', "dev-b": "{}"})
    assert store.busy_devices() == {"dev-a", "dev-b"}
    version = AdapterVersion("task", 1, 1, "ab" * 32, str(tmp_path / "v1"), 1.0)
    store.close_round("task", 1, RoundState.COMPLETED, "quota met", version)
    with pytest.raises(ValueError, match="not open"):
        store.close_round("task", 1, RoundState.FAILED, "again")
    store.close()

    reopened = CoordinatorStore(path)
    record = reopened.round("task", 1)
    assert record is not None and record.state is RoundState.COMPLETED
    assert record.reason == "quota met"
    assert reopened.latest_adapter_version("task") == version
    assert reopened.busy_devices() == set()
    assert reopened.assignments("task", 1)["dev-a"] == '{"rank": 8}'


def test_wrong_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    CoordinatorStore(path).close()
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="schema version 999"):
        CoordinatorStore(path)


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from coordinator.store import CoordinatorStore, StoredUpdate
    store = CoordinatorStore(Path(sys.argv[1]))
    store.open_round("task", 1, 0, 1e12, {})
    print("ready", flush=True)
    index = 0
    while True:
        store.record_update(
            StoredUpdate(f"u{index}", "task", 1, f"dev-{index}", 1, 1, {}, b"x" * 4096)
        )
        index += 1
        print(index, flush=True)
    """
)


@pytest.mark.integration
def test_sigkill_mid_write_leaves_a_consistent_store(tmp_path: Path) -> None:
    """A process killed with SIGKILL while writing leaves only whole, committed updates."""
    path = tmp_path / "state.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "ready"
    # Let it commit some transactions (it prints a count after each), then kill it.
    committed = 0
    while committed < 20:
        line = writer.stdout.readline()
        assert line, "writer exited early"
        committed = int(line)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)

    reopened = CoordinatorStore(path)
    updates = reopened.updates("task", 1)
    assert updates, "the writer committed nothing before it was killed"
    assert all(u.body == b"x" * 4096 for u in updates)
    assert len({u.device_id for u in updates}) == len(updates)
