"""What the agent is doing now, for school IT at the device (`schoolfl agent status`) and
for the demo's view: `<state_dir>/activity.json`.

A busy agent used to be silent (a model loading, 160 s of emulated waiting, an upload) and an
ineligible one said why only inside its MQTT heartbeat. The agent now keeps one small JSON
file current: its eligibility at the last heartbeat, the phase it is in (with the step or the
upload fraction) and the measured parts of its last round.

The file is an ephemeral status, not durable state: it is replaced atomically (temp file in
the same folder, then `os.replace`) so a reader never sees a torn file, but it is not
fsynced; a crash may lose the last update, and the next one rewrites it anyway. Writes are
throttled (`MIN_WRITE_SECONDS`) except on phase changes, so a fast trainer does not write
per step. Standard library only: `agent status` reads it without importing torch.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

ACTIVITY_FILE = "activity.json"
SCHEMA_VERSION = 1
HEARTBEAT_SECONDS = 10.0
"""How often the agent checks its eligibility (and so refreshes the file when idle)."""
HEARTBEAT_REFRESH_SECONDS = 60.0
"""The agent publishes its heartbeat when the verdict changed, else this often. Liveness
does not need more: the retained state is there for a restarted coordinator and the
broker publishes the last will (offline) within 1.5 keepalives of a vanished device. A
district of 5,000 devices beating every 10 s cost an idle coordinator a fifth of a core
(issue 20)."""
STALE_SECONDS = 3 * HEARTBEAT_SECONDS
"""A file not refreshed for this long belongs to an agent that is no longer running."""
MIN_WRITE_SECONDS = 0.5
"""At most ~2 writes a second within one phase; a phase change is written at once."""
DECLINED_SHOWN_SECONDS = 5.0
"""How long the "declined" phase stays on show before the agent is idle again."""


class Phase(enum.StrEnum):
    """What the agent is doing; the values are the file's `phase` strings."""

    IDLE = "idle"
    LOADING_MODEL = "loading model"
    TRAINING = "training"
    WAITING_EMULATED = "waiting (emulated)"
    UPLOADING = "uploading"
    DECLINED = "declined"


_TIMINGS = ("load_seconds", "compute_seconds", "emulated_wait_seconds", "upload_seconds")
"""The measured parts of a round, as `LastRound` names them."""
BUSY_PHASES = frozenset({Phase.LOADING_MODEL, Phase.TRAINING, Phase.WAITING_EMULATED})
"""Phases in which the agent's loop is blocked: no heartbeat, so a silence is expected."""


@dataclass(frozen=True)
class LastRound:
    """The measured parts of the last round: the demo shows real compute apart from the
    emulated wait and the (first round's) model load."""

    task: str
    round: int
    outcome: str
    """"uploaded", or "declined: <reasons>"."""
    load_seconds: float = 0.0
    compute_seconds: float = 0.0
    emulated_wait_seconds: float = 0.0
    upload_seconds: float = 0.0


@dataclass(frozen=True)
class Activity:
    """One snapshot of the file (schema 1; another reader, the demo, relies on its keys)."""

    updated_at: float
    phase: Phase = Phase.IDLE
    task: str | None = None
    round: int | None = None
    step: int | None = None
    total_steps: int | None = None
    upload_fraction: float | None = None
    eligible: bool = False
    ineligible_reasons: tuple[str, ...] = field(default_factory=tuple)
    last_heartbeat_at: float | None = None
    last_round: LastRound | None = None
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.phase, Phase):
            raise ValueError(f"activity phase {self.phase!r} is not one of {list(Phase)}")
        if self.schema != SCHEMA_VERSION:
            raise ValueError(f"activity schema {self.schema!r}; this agent reads {SCHEMA_VERSION}")
        if self.upload_fraction is not None and not 0.0 <= self.upload_fraction <= 1.0:
            raise ValueError(f"upload_fraction {self.upload_fraction!r} is not within 0..1")

    def to_json(self) -> str:
        data: dict[str, Any] = {"schema": self.schema, **asdict(self)}
        data["phase"] = self.phase.value
        data["ineligible_reasons"] = list(self.ineligible_reasons)
        return json.dumps(data, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> Activity:
        """Parse and check one file's text; ValueError names the bad key."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("activity file is not a JSON object")
        last = data.get("last_round")
        return cls(
            schema=_typed(data, "schema", int),
            updated_at=float(_typed(data, "updated_at", (int, float))),
            phase=_phase(data.get("phase")),
            task=_typed(data, "task", str, optional=True),
            round=_typed(data, "round", int, optional=True),
            step=_typed(data, "step", int, optional=True),
            total_steps=_typed(data, "total_steps", int, optional=True),
            upload_fraction=_number(data, "upload_fraction"),
            eligible=_typed(data, "eligible", bool),
            ineligible_reasons=tuple(_reasons(data.get("ineligible_reasons"))),
            last_heartbeat_at=_number(data, "last_heartbeat_at"),
            last_round=None if last is None else _last_round(last),
        )


def _typed(
    data: dict[str, Any], key: str, kind: type | tuple[type, ...], *, optional: bool = False
) -> Any:
    value = data.get(key)
    if value is None and optional:
        return None
    # bool is an int in Python: a `true` where a number belongs is as wrong as a string.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"activity key {key!r}: expected {kind}, got {value!r}")
    return value


def _number(data: dict[str, Any], key: str) -> float | None:
    value = _typed(data, key, (int, float), optional=True)
    return None if value is None else float(value)


def _phase(value: object) -> Phase:
    try:
        return Phase(value)
    except ValueError:
        raise ValueError(f"activity key 'phase': {value!r} is not one of {list(Phase)}") from None


def _reasons(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise ValueError(
            f"activity key 'ineligible_reasons': expected a list of strings, got {value!r}"
        )
    return value


def _last_round(value: object) -> LastRound:
    if not isinstance(value, dict):
        raise ValueError(f"activity key 'last_round': expected an object, got {value!r}")
    return LastRound(
        task=_typed(value, "task", str),
        round=_typed(value, "round", int),
        outcome=_typed(value, "outcome", str),
        **{key: float(_typed(value, key, (int, float))) for key in _TIMINGS},
    )


def activity_path(state_dir: Path) -> Path:
    return Path(state_dir) / ACTIVITY_FILE


def write_activity(state_dir: Path, activity: Activity) -> None:
    """Replace the file atomically, without fsync (see the module docstring). The temp name
    is the one `durable.atomic_files.sweep_leftovers` removes after a kill mid-write."""
    path = activity_path(state_dir)
    descriptor, temp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(activity.to_json())
        os.chmod(temp_name, 0o644)  # mkstemp makes it 0600; status may run as another user
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def read_activity(state_dir: Path) -> Activity | None:
    """The agent's last snapshot, or None when there is none or it cannot be read: a status
    view must show "agent not running", never a traceback."""
    try:
        return Activity.from_json(activity_path(state_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        if not isinstance(error, FileNotFoundError):
            logger.debug("activity file unreadable: %s", error)
        return None


# -- the agent's side ---------------------------------------------------------------------


class Verdict(Protocol):
    """An eligibility verdict (`edge_runtime.eligibility.Eligibility`, kept out of this
    module's imports: it pulls in torch, which `agent status` does not need)."""

    @property
    def eligible(self) -> bool: ...

    @property
    def reasons(self) -> tuple[str, ...]: ...


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _reason_kinds(reasons: Sequence[str]) -> frozenset[str]:
    """Each reason with its numbers blanked: "CPU busy at 93%" and "CPU busy at 95%" are
    the same reason, so a load that wanders does not log at every heartbeat."""
    return frozenset(_NUMBER.sub("#", reason) for reason in reasons)


def verdict_changed(previous: Verdict | None, current: Verdict) -> bool:
    """Eligible or not, or another set of reasons (their numbers aside: "cpu 93%" and
    "cpu 95%" are the same reason)."""
    return (
        previous is None
        or previous.eligible != current.eligible
        or _reason_kinds(previous.reasons) != _reason_kinds(current.reasons)
    )


def eligibility_change(previous: Verdict | None, current: Verdict) -> str | None:
    """The log line for a change of verdict (eligible or not, or another set of reasons),
    or None when nothing changed. `previous` is None at the first heartbeat: the first
    verdict is always said, so school IT learns at start-up why a device will not train."""
    if not verdict_changed(previous, current):
        return None
    if not current.eligible:
        return "device is not eligible to train: " + "; ".join(current.reasons)
    if previous is None:
        return "device is eligible to train"
    return "device is eligible to train again"


class ActivityTracker:
    """The agent's current activity and the file that shows it.

    `now` is wall time (what the file's times are in); `clock` measures the parts of a
    round and paces the writes. A failed write is logged, never raised: the status display
    must not stop training."""

    def __init__(
        self,
        state_dir: Path,
        *,
        now: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        stop: threading.Event | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.stop = stop or threading.Event()
        """Set when the agent is asked to stop: an emulated wait ends at once."""
        self.now = now
        self.clock = clock
        self.current = Activity(updated_at=now())
        self._written_at: float | None = None
        self._dirty = True
        self._phase_since = clock()
        self._round: tuple[str, int] | None = None
        self._timings = dict.fromkeys(_TIMINGS, 0.0)
        self._verdict: Verdict | None = None
        """The last heartbeat's verdict: a change of it is logged, once."""

    # writing

    def _change(self, *, force: bool = False, **changes: Any) -> None:
        phase_changed = "phase" in changes and changes["phase"] is not self.current.phase
        if phase_changed:
            self._phase_since = self.clock()
        self.current = replace(self.current, **changes)
        self._dirty = True
        self.flush_if_due(force=force or phase_changed)

    def flush_if_due(self, *, force: bool = False) -> None:
        """Write what changed when the last write is old enough (the agent's loop calls this
        each tick, so a throttled change is written within `MIN_WRITE_SECONDS`); also ends
        the "declined" phase once it has been on show."""
        if (
            self.current.phase is Phase.DECLINED
            and self.clock() - self._phase_since >= DECLINED_SHOWN_SECONDS
        ):
            self._change(phase=Phase.IDLE, task=None, round=None)
            return
        if not self._dirty:
            return
        elapsed = None if self._written_at is None else self.clock() - self._written_at
        if force or elapsed is None or elapsed >= MIN_WRITE_SECONDS:
            self._write()

    def touch(self) -> None:
        """Refresh `updated_at` while the loop is blocked (the emulated wait), so that a
        long, silent phase still reads as a running agent."""
        self._dirty = True
        self.flush_if_due()

    def _write(self) -> None:
        self.current = replace(self.current, updated_at=self.now())
        try:
            write_activity(self.state_dir, self.current)
        except OSError as error:
            logger.warning("could not write %s: %s", activity_path(self.state_dir), error)
        self._written_at = self.clock()
        self._dirty = False

    # what the agent reports

    def heartbeat(self, verdict: Verdict, at: float) -> None:
        """Record the heartbeat's verdict; log it at INFO when it changed (not per tick)."""
        change = eligibility_change(self._verdict, verdict)
        if change is not None:
            logger.info(change)
        self._verdict = verdict
        self._change(
            eligible=verdict.eligible,
            ineligible_reasons=tuple(verdict.reasons),
            last_heartbeat_at=at,
        )

    def preloading(self, tasks: Sequence[str]) -> None:
        """The agent builds these tasks' models at start, before any assignment (the loop
        keeps heartbeating meanwhile): shown as "loading model" with no round."""
        if self._round is None:
            self._change(phase=Phase.LOADING_MODEL, task=",".join(tasks), round=None)

    def preloaded(self) -> None:
        """The start-up build is done: idle again, unless a round has begun meanwhile (its
        own phases then say what the agent is doing)."""
        if self._round is None and self.current.phase is Phase.LOADING_MODEL:
            self._change(phase=Phase.IDLE, task=None, round=None)

    def begin_round(self, task: str, server_round: int) -> None:
        self._round = (task, server_round)
        self._timings = dict.fromkeys(_TIMINGS, 0.0)
        self._change(task=task, round=server_round)

    @contextmanager
    def part(self, phase: Phase, timing: str, total_steps: int | None = None) -> Iterator[None]:
        """Show `phase` while the block runs and add its seconds to the round's `timing`."""
        if timing not in self._timings:
            raise ValueError(f"unknown round timing {timing!r}; known: {_TIMINGS}")
        self._change(
            phase=phase,
            step=0 if total_steps else None,
            total_steps=total_steps,
            upload_fraction=0.0 if phase is Phase.UPLOADING else None,
        )
        started = self.clock()
        try:
            yield
        finally:
            self._timings[timing] += self.clock() - started

    def wait_out_emulated(self, seconds: float) -> None:
        """Demo emulation: a fast machine waits until the emulated device would be done,
        shown as its own phase and timed apart from the real compute; the file is refreshed
        each second, so a long wait does not read as a dead agent."""
        with self.part(Phase.WAITING_EMULATED, "emulated_wait_seconds"):
            until = self.clock() + seconds
            while (remaining := until - self.clock()) > 0 and not self.stop.is_set():
                self.stop.wait(min(remaining, 1.0))
                self.touch()

    def training_step(self, step: int, total_steps: int) -> None:
        """The trainer's progress callback: `step` of `total_steps` optimizer steps done."""
        self._change(step=step, total_steps=total_steps)

    def upload_progress(self, fraction: float) -> None:
        if self.current.phase is Phase.UPLOADING:
            self._change(upload_fraction=min(max(fraction, 0.0), 1.0))

    def end_round(self, outcome: str) -> None:
        """The round is over: its measured parts become `last_round`; the agent is idle."""
        self._finish(outcome, Phase.IDLE, task=None, round=None)

    def declined(self, task: str, server_round: int, reasons: Sequence[str]) -> None:
        if self._round != (task, server_round):  # declined before anything was measured
            self._round = (task, server_round)
            self._timings = dict.fromkeys(_TIMINGS, 0.0)
        self._finish(
            "declined: " + "; ".join(reasons), Phase.DECLINED, task=task, round=server_round
        )

    def _finish(self, outcome: str, phase: Phase, **changes: Any) -> None:
        last = None
        if self._round is not None:
            task, server_round = self._round
            last = LastRound(task, server_round, outcome, **self._timings)
        self._round = None
        self._change(
            phase=phase,
            step=None,
            total_steps=None,
            upload_fraction=None,
            last_round=last or self.current.last_round,
            force=True,
            **changes,
        )


# -- what `schoolfl agent status` shows ----------------------------------------------------


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def describe_activity(activity: Activity | None, now: float) -> list[str]:
    """Lines for school IT: is the agent running, is the device eligible and why not, what
    is it doing, and what did its last round cost (load, compute, emulated wait, upload)."""
    if activity is None:
        return ["agent: not running (no activity file: it has not run since this version)"]
    heard = max(activity.updated_at, activity.last_heartbeat_at or 0.0)
    heartbeat = (
        "no heartbeat yet"
        if activity.last_heartbeat_at is None
        else f"last heartbeat {_age(now - activity.last_heartbeat_at)}"
    )
    stale = now - heard > STALE_SECONDS
    if not stale:
        lines = [f"agent: running, {heartbeat}"]
    elif activity.phase in BUSY_PHASES:
        lines = [
            f"agent: silent for {now - heard:.0f} s while {activity.phase.value} "
            f"({heartbeat}); still at it, or stopped"
        ]
    else:
        lines = [f"agent: not running ({heartbeat})"]
    said = "at its last heartbeat" if stale else "now"
    if activity.last_heartbeat_at is None:
        pass
    elif activity.eligible:
        lines.append(f"eligible to train ({said}): yes")
    else:
        reasons = "; ".join(activity.ineligible_reasons) or "no reason given"
        lines.append(f"eligible to train ({said}): no: {reasons}")
    if not stale:
        lines.append(f"doing: {_doing(activity)}")
    last = activity.last_round
    if last is not None:
        lines.append(
            f"last round: task {last.task} round {last.round} {last.outcome}; "
            f"model load {last.load_seconds:.1f} s, compute {last.compute_seconds:.1f} s, "
            f"emulated wait {last.emulated_wait_seconds:.1f} s, "
            f"upload {last.upload_seconds:.1f} s"
        )
    return lines


def _doing(activity: Activity) -> str:
    text = activity.phase.value
    if activity.task is not None:
        text += f" task {activity.task}"
        if activity.round is not None:
            text += f" round {activity.round}"
    if activity.phase is Phase.TRAINING and activity.total_steps:
        text += f", step {activity.step or 0}/{activity.total_steps}"
    if activity.phase is Phase.UPLOADING and activity.upload_fraction is not None:
        text += f", {activity.upload_fraction:.0%} sent"
    return text
