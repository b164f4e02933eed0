"""The agent's outbox keeps updates across restarts until acknowledged."""

from __future__ import annotations

from pathlib import Path

from edge_runtime.outbox import Outbox


def test_update_survives_restart_until_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "agent" / "outbox.db"
    outbox = Outbox(path)
    assert outbox.put("fleet/task/1/dev/0", "task", 1, b"\x00frame-1")
    assert not outbox.put("fleet/task/1/dev/0", "task", 1, b"other"), "same id stored twice"
    outbox.mark_sent("fleet/task/1/dev/0")
    outbox.close()

    restarted = Outbox(path)
    pending = restarted.pending()
    assert [p.update_id for p in pending] == ["fleet/task/1/dev/0"]
    assert pending[0].frame == b"\x00frame-1"
    assert pending[0].attempts == 1
    assert restarted.acknowledge("fleet/task/1/dev/0")
    assert not restarted.acknowledge("fleet/task/1/dev/0")
    assert len(restarted) == 0


def test_pending_is_oldest_first(tmp_path: Path) -> None:
    clock = iter([3.0, 1.0, 2.0])
    outbox = Outbox(tmp_path / "outbox.db", now=lambda: next(clock))
    outbox.put("c", "t", 3, b"c")
    outbox.put("a", "t", 1, b"a")
    outbox.put("b", "t", 2, b"b")
    assert [p.update_id for p in outbox.pending()] == ["a", "b", "c"]
