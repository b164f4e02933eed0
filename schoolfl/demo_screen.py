"""The demo's live screen: what the demo is doing, then the rounds and every device.

Apart from `schoolfl.demo`, which starts and stops processes, because this only reads:
the coordinator's store for the rounds and each agent's activity file for the devices.
"""

from __future__ import annotations

import subprocess
import threading
from typing import TYPE_CHECKING

from schoolfl.demo_activity import FleetActivity
from schoolfl.demo_view import render_view, round_rows

if TYPE_CHECKING:
    from rich.console import Console

    from coordinator.store import CoordinatorStore
    from schoolfl.demo_tasks import DemoTask

REFRESH_SECONDS = 0.5


def watch_rounds(
    console: Console,
    store: CoordinatorStore,
    task: DemoTask,
    before: float | None,
    activity: FleetActivity,
    coordinator: subprocess.Popen[bytes],
    stop: threading.Event,
) -> list[dict[str, object]]:
    """Show the rounds and the devices live until the coordinator exits or the demo is
    stopped, then once more, so the last round's final state is on screen. Returns the last
    rows, with each round's time split as the devices reported it."""
    from rich.live import Live

    activity.poll()
    with Live(
        render_view([], before, task, activity), console=console, refresh_per_second=2
    ) as live:
        while coordinator.poll() is None and not stop.is_set():
            activity.poll()
            rows = round_rows(store, task, activity.timings)
            live.update(render_view(rows, before, task, activity))
            stop.wait(REFRESH_SECONDS)
        activity.poll()
        rows = round_rows(store, task, activity.timings)
        live.update(render_view(rows, before, task, activity))
    return rows
