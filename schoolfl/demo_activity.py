"""What each emulated device is doing, read from the agent's `<state_dir>/activity.json`.

The agent rewrites that file (schema 1, edge_runtime/activity.py) whenever its phase
changes: loading the model, training step i/n, the emulated wait, uploading x%. The demo
reads it here, tolerating a file that is missing (the agent has not started yet), corrupt
or of another schema (the last good reading stays on screen), so the live view never has a
silent stretch and never crashes on a device's file. Each device's `last_round` also splits
its round time into model loading, real compute, emulated wait and upload; `RoundTimings`
keeps them per round, because the file only holds the latest.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.activity import HEARTBEAT_SECONDS

logger = logging.getLogger(__name__)

ACTIVITY_FILE = "activity.json"
ACTIVITY_SCHEMA = 1
TIMING_KEYS = ("load_seconds", "compute_seconds", "emulated_wait_seconds", "upload_seconds")
"""`last_round` figures, in the order a round spends them."""


@dataclass(frozen=True)
class DeviceActivity:
    """One reading of a device's activity file: the fields the view shows."""

    phase: str
    updated_at: float
    task: str | None = None
    round_number: int | None = None
    step: int | None = None
    total_steps: int | None = None
    upload_fraction: float | None = None
    eligible: bool = True
    ineligible_reasons: tuple[str, ...] = ()
    last_heartbeat_at: float | None = None
    last_round: dict[str, object] | None = None


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_activity(text: str) -> DeviceActivity | None:
    """The reading in `text`, or None if it is not a schema-1 activity document (a write
    in progress or another agent version: the caller keeps its last good reading)."""
    try:
        document = json.loads(text)
    except ValueError:
        return None
    if not isinstance(document, dict) or document.get("schema") != ACTIVITY_SCHEMA:
        return None
    phase, updated_at = document.get("phase"), _number(document.get("updated_at"))
    if not isinstance(phase, str) or updated_at is None:
        return None
    reasons = document.get("ineligible_reasons")
    last_round = document.get("last_round")
    task = document.get("task")
    return DeviceActivity(
        phase=phase,
        updated_at=updated_at,
        task=task if isinstance(task, str) else None,
        round_number=_integer(document.get("round")),
        step=_integer(document.get("step")),
        total_steps=_integer(document.get("total_steps")),
        upload_fraction=_number(document.get("upload_fraction")),
        eligible=document.get("eligible") is not False,
        ineligible_reasons=tuple(str(r) for r in reasons) if isinstance(reasons, list) else (),
        last_heartbeat_at=_number(document.get("last_heartbeat_at")),
        last_round=last_round if isinstance(last_round, dict) else None,
    )


def read_activity_file(state_dir: Path) -> DeviceActivity | None:
    """The device's current reading, or None when there is none (yet) or it is unreadable."""
    try:
        text = (state_dir / ACTIVITY_FILE).read_text()
    except OSError:
        return None
    return parse_activity(text)


def activity_text(activity: DeviceActivity | None, now: float) -> str:
    """'training step 3/8 (round 2)', 'uploading 45 % (round 2)', 'declined: cpu busy' ..."""
    if activity is None:
        return "starting (the agent has not reported yet)"
    round_note = f" (round {activity.round_number})" if activity.round_number is not None else ""
    reasons = ", ".join(activity.ineligible_reasons)
    if activity.phase == "declined":
        text = f"declined: {reasons or 'no reason given'}"
    elif activity.phase == "training" and activity.step is not None and activity.total_steps:
        text = f"training step {activity.step}/{activity.total_steps}{round_note}"
    elif activity.phase == "uploading" and activity.upload_fraction is not None:
        text = f"uploading {activity.upload_fraction:.0%}{round_note}"
    elif activity.phase == "waiting (emulated)":
        text = f"waiting out the profile's round time (emulated){round_note}"
    else:
        text = f"{activity.phase}{round_note}"
    if not activity.eligible and reasons and activity.phase != "declined":
        # before its first heartbeat an agent is not eligible yet, without a reason
        text += f"; not eligible: {reasons}"
    age = now - activity.updated_at
    # an idle agent reports once per heartbeat: only silence beyond two of them is news
    return text if age < 2 * HEARTBEAT_SECONDS else f"{text}; {age:.0f} s since its last report"


def split_text(last_round: dict[str, object] | None) -> str:
    """'load 140.2 + compute 3.1 + emulated wait 12.5 + upload 0.4 s' for a finished round."""
    if not last_round:
        return ""
    load, compute, wait, upload = (_number(last_round.get(key)) or 0.0 for key in TIMING_KEYS)
    return (
        f"load {load:.1f} + compute {compute:.1f} + emulated wait {wait:.1f} + "
        f"upload {upload:.1f} s"
    )


@dataclass
class RoundTimings:
    """Each device's `last_round` split, kept per (round, device) as the demo polls."""

    by_round: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)

    def record(self, device_id: str, activity: DeviceActivity | None, task_id: str) -> None:
        last = activity.last_round if activity else None
        if not last or last.get("task") != task_id:
            return
        round_number = _integer(last.get("round"))
        if round_number is None:
            return
        split = {key: _number(last.get(key)) or 0.0 for key in TIMING_KEYS}
        self.by_round.setdefault(round_number, {})[device_id] = split

    def slowest(self, round_number: int) -> dict[str, float] | None:
        """The split of the device that spent longest in the round: the one whose time the
        round waited for, so its parts explain the round's time."""
        splits = self.by_round.get(round_number)
        if not splits:
            return None
        return max(splits.values(), key=lambda split: sum(split.values()))


@dataclass
class FleetActivity:
    """The demo's view of every device: the last good reading of each activity file."""

    state_dirs: dict[str, Path]
    """device id -> the agent's state dir (where it writes activity.json)."""
    task_id: str
    readings: dict[str, DeviceActivity | None] = field(default_factory=dict)
    timings: RoundTimings = field(default_factory=RoundTimings)

    def poll(self) -> dict[str, DeviceActivity | None]:
        """Read every file once; an unreadable one keeps the device's previous reading."""
        for device_id, state_dir in self.state_dirs.items():
            reading = read_activity_file(state_dir)
            if reading is not None:
                self.readings[device_id] = reading
                self.timings.record(device_id, reading, self.task_id)
            else:
                self.readings.setdefault(device_id, None)
        return self.readings

    def lines(self, now: float | None = None) -> list[tuple[str, str, str]]:
        """(device, what it does now, its last round's split) for each device, in order."""
        moment = time.time() if now is None else now
        return [
            (
                device_id,
                activity_text(self.readings.get(device_id), moment),
                split_text(
                    self.readings[device_id].last_round  # type: ignore[union-attr]
                    if self.readings.get(device_id)
                    else None
                ),
            )
            for device_id in self.state_dirs
        ]
