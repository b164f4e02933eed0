"""May this device train right now? Power, load, memory, temperature and school hours.

School devices belong to pupils and teachers first: the agent trains only when it would
not disturb a lesson or drain a battery. An ineligible device declines the assignment and
says why, so the coordinator can schedule around it (DESIGN.md, round lifecycle step 2).
Readings come from psutil; tests pass readings in directly (a battery and a thermal sensor
cannot be conjured on a CI machine).

The CPU load is read without waiting: a `CpuLoadMeter` primed at agent start measures the
load of *other* work since a recent sample (psutil's `cpu_percent(interval=0.2)` used to
block every round for 0.2 s, and counted the agent's own training as someone else's use).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

from device_profiles.battery import read_battery
from quantization.compute_device import CPU, ComputeDevice, free_memory_bytes, gpu_temperature

logger = logging.getLogger(__name__)

_WINDOW = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class TimeWindow:
    """A daily window such as 16:00-23:59; a window whose end is before its start wraps
    past midnight (22:00-06:00)."""

    start: dt.time
    end: dt.time

    @classmethod
    def parse(cls, text: str) -> TimeWindow:
        match = _WINDOW.match(text.strip())
        if not match:
            raise ValueError(f"time window {text!r} is not of the form HH:MM-HH:MM")
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
            raise ValueError(f"time window {text!r} has an hour > 23 or a minute > 59")
        return cls(dt.time(h1, m1), dt.time(h2, m2))

    def contains(self, moment: dt.time) -> bool:
        if self.start <= self.end:
            return self.start <= moment <= self.end
        return moment >= self.start or moment <= self.end


@dataclass(frozen=True)
class EligibilityPolicy:
    """The `[eligibility]` table of agent.toml. Defaults suit a shared school laptop."""

    require_mains: bool = False
    """Train only on mains power, whatever the battery says."""
    min_battery_percent: float = 50.0
    """On battery, train only above this charge."""
    max_cpu_percent: float = 60.0
    """Skip when other work keeps the CPU busier than this (someone is using the device)."""
    memory_margin_bytes: int = 256 * 1024 * 1024
    """Free memory required on top of the plan's predicted peak."""
    max_temperature_celsius: float = 80.0
    """Skip when the hottest sensor reads above this (where sensors exist)."""
    allowed_hours: tuple[TimeWindow, ...] = ()
    """Daily windows when training may run, local time; empty means any time."""
    allowed_weekdays: tuple[str, ...] = WEEKDAYS
    """Days when training may run (mon..sun)."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_battery_percent <= 100:
            raise ValueError(
                f"min_battery_percent must be within 0..100, got {self.min_battery_percent}"
            )
        if not 0 < self.max_cpu_percent <= 100:
            raise ValueError(f"max_cpu_percent must be within (0, 100], got {self.max_cpu_percent}")
        if self.memory_margin_bytes < 0:
            raise ValueError(f"memory_margin_bytes must be >= 0, got {self.memory_margin_bytes}")
        unknown = [day for day in self.allowed_weekdays if day not in WEEKDAYS]
        if unknown:
            raise ValueError(f"allowed_weekdays has {unknown}; use names from {list(WEEKDAYS)}")

    @classmethod
    def from_table(cls, table: dict[str, object]) -> EligibilityPolicy:
        """Build from a parsed TOML table; unknown keys are an error naming them."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"unknown keys in [eligibility]: {unknown}; known: {sorted(known)}")
        values = dict(table)
        if "allowed_hours" in values:
            hours = values["allowed_hours"]
            if not isinstance(hours, list):
                raise ValueError("allowed_hours must be a list like ['16:00-23:59']")
            try:
                values["allowed_hours"] = tuple(TimeWindow.parse(str(h)) for h in hours)
            except ValueError as error:
                raise ValueError(f"[eligibility] allowed_hours: {error}") from None
        if "allowed_weekdays" in values:
            days = values["allowed_weekdays"]
            if not isinstance(days, list):
                raise ValueError("allowed_weekdays must be a list like ['mon', 'tue']")
            values["allowed_weekdays"] = tuple(str(d).lower() for d in days)
        try:
            return cls(**values)  # type: ignore[arg-type]
        except ValueError as error:  # __post_init__ names the key; add the table
            raise ValueError(f"[eligibility] {error}") from None


@dataclass(frozen=True)
class DeviceReadings:
    """What the device reports about itself right now."""

    on_mains: bool
    battery_percent: float | None
    """None when the device has no battery (desktop, Raspberry Pi on a supply)."""
    cpu_percent: float
    available_memory_bytes: int
    temperature_celsius: float | None
    """Hottest sensor; None where the platform exposes none."""
    local_time: dt.datetime
    gpu_free_memory_bytes: int | None = None
    """Free memory of a discrete training GPU; None on the CPU and on a Jetson, whose GPU
    allocates from `available_memory_bytes` (quantization/compute_device.py)."""
    gpu_temperature_celsius: float | None = None
    gpu_temperature_source: str = ""
    """Where the GPU reading came from, or why there is none (only when training on a GPU)."""
    power_unknown_reason: str = ""
    """Why the power source is unknown (the battery sensor could not be read); empty when it
    was read. Eligibility then treats the device as on mains: nothing says it is on battery."""


@dataclass(frozen=True)
class Eligibility:
    eligible: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)
    """Why not, one phrase per failed check; empty when eligible."""


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative CPU seconds, all cores together, at one moment."""

    total: float
    busy: float
    """Total less idle and I/O wait: what psutil's `cpu_percent` counts as busy."""
    own: float
    """This process's user + system seconds (every thread): the agent's own work."""


def read_cpu_times(process: psutil.Process | None = None) -> CpuTimes:
    """Cumulative CPU times from psutil (one read of /proc/stat and one of /proc/self/stat
    on Linux: tens of microseconds, no waiting)."""
    times = psutil.cpu_times()
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    busy = total - times.idle - getattr(times, "iowait", 0.0)
    own = (process or psutil.Process()).cpu_times()
    return CpuTimes(total=total, busy=busy, own=own.user + own.system)


MIN_CPU_WINDOW_SECONDS = 0.5
"""A load is measured over at least this long: over a few milliseconds the counters tick
in whole jiffies and read as 0% or 100%."""


class CpuLoadMeter:
    """The CPU load of other work over the last moments, read without blocking.

    `prime()` at agent start takes the first sample; each `sample()` (the agent's loop
    calls it every tick, cheap) and each `percent()` adds one. `percent()` measures from
    the newest sample at least `min_window_seconds` old, so the load is recent; the agent's
    own CPU time is left out (after a round of training the device is not "busy" with its
    own work). A window of milliseconds would read as a bogus 0% or 100%, so every reading
    spans at least one window: a sample that old is always kept as the baseline, and the
    very first reading, right after priming, waits out the rest of one window (once per
    process, at start; never on a round's critical path). Thread-safe: heartbeats and
    assignment checks share it.
    """

    def __init__(
        self,
        *,
        min_window_seconds: float = MIN_CPU_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], None] = time.sleep,
        times: Callable[[], CpuTimes] | None = None,
    ) -> None:
        self.min_window_seconds = min_window_seconds
        self._clock = clock
        self._wait = wait
        process = psutil.Process()
        self._times = times or (lambda: read_cpu_times(process))
        self._samples: deque[tuple[float, CpuTimes]] = deque()
        self._lock = threading.Lock()

    def prime(self) -> None:
        """Take the first sample (agent start), so the first reading has a baseline."""
        self.sample()

    def sample(self) -> None:
        """Record the counters now; samples closer than a quarter window are skipped and
        those no reading can use any more are dropped, so memory stays a few entries."""
        with self._lock:
            self._add(self._clock())

    def _add(self, at: float) -> tuple[float, CpuTimes]:
        if self._samples and at - self._samples[-1][0] < self.min_window_seconds / 4:
            return self._samples[-1]
        entry = (at, self._times())
        self._samples.append(entry)
        while len(self._samples) > 2 and at - self._samples[1][0] >= self.min_window_seconds:
            self._samples.popleft()  # the next one is old enough to be the baseline
        return entry

    def percent(self) -> float:
        """Percent of all cores busy with other work since the newest sample at least one
        window old, in 0..100."""
        with self._lock:
            now = self._clock()
            if not self._samples:  # never primed: prime now, then wait one window
                self._add(now)
            baseline_at, baseline = self._samples[0]
            if now - baseline_at < self.min_window_seconds:  # only right after priming
                self._wait(self.min_window_seconds - (now - baseline_at))
                now = self._clock()
            current_times = self._times()
            self._samples.append((now, current_times))
            for at, times in reversed(self._samples):  # the newest baseline old enough
                if now - at >= self.min_window_seconds:
                    baseline_at, baseline = at, times
                    break
            total = current_times.total - baseline.total
            others = (current_times.busy - baseline.busy) - (current_times.own - baseline.own)
            percent = 0.0 if total <= 0 else min(max(100.0 * others / total, 0.0), 100.0)
            while len(self._samples) > 2 and now - self._samples[1][0] >= self.min_window_seconds:
                self._samples.popleft()
            return percent


def read_device(
    cpu_sample_seconds: float = 0.5,
    compute: ComputeDevice = CPU,
    cpu_meter: CpuLoadMeter | None = None,
) -> DeviceReadings:
    """Take readings with psutil (and, when `compute` is a GPU, its memory and temperature).

    With `cpu_meter` (the agent's), the CPU load is the meter's non-blocking reading and
    `cpu_sample_seconds` is ignored; without one, psutil samples it over
    `cpu_sample_seconds` (0 = since psutil's previous call, without waiting)."""
    battery, power_unknown_reason = read_battery()
    temperatures: list[float] = []
    if hasattr(psutil, "sensors_temperatures"):
        try:
            for entries in psutil.sensors_temperatures().values():
                temperatures.extend(e.current for e in entries if e.current is not None)
        except OSError as error:  # unreadable sensors are "no sensors", not a failure
            logger.debug("temperature sensors unreadable: %s", error)
    return DeviceReadings(
        on_mains=True if battery is None else bool(battery.power_plugged),
        battery_percent=None if battery is None else float(battery.percent),
        cpu_percent=(
            cpu_meter.percent()
            if cpu_meter is not None
            else float(psutil.cpu_percent(interval=cpu_sample_seconds))
        ),
        available_memory_bytes=int(psutil.virtual_memory().available),
        temperature_celsius=max(temperatures) if temperatures else None,
        local_time=dt.datetime.now(),
        power_unknown_reason=power_unknown_reason,
        **_gpu_readings(compute),
    )


def _gpu_readings(compute: ComputeDevice) -> dict[str, Any]:
    if not compute.is_cuda:
        return {}
    reading = gpu_temperature()
    return {
        "gpu_free_memory_bytes": None if compute.unified_memory else free_memory_bytes(compute),
        "gpu_temperature_celsius": reading.celsius,
        "gpu_temperature_source": reading.source,
    }


def check_eligibility(
    policy: EligibilityPolicy,
    readings: DeviceReadings,
    required_memory_bytes: int = 0,
    required_gpu_memory_bytes: int = 0,
) -> Eligibility:
    """Apply every check and collect all the reasons, not just the first.

    `required_gpu_memory_bytes` is checked against a discrete GPU's free memory; on a
    Jetson the GPU's share is part of `required_memory_bytes` (one RAM for both)."""
    reasons: list[str] = []
    if policy.require_mains and not readings.on_mains:
        reasons.append("on battery and the policy requires mains power")
    elif (
        not readings.on_mains
        and readings.battery_percent is not None
        and readings.battery_percent < policy.min_battery_percent
    ):
        reasons.append(
            f"battery at {readings.battery_percent:.0f}% is below {policy.min_battery_percent:.0f}%"
        )
    if readings.cpu_percent > policy.max_cpu_percent:
        reasons.append(
            f"CPU busy at {readings.cpu_percent:.0f}% (limit {policy.max_cpu_percent:.0f}%)"
        )
    needed = required_memory_bytes + policy.memory_margin_bytes
    if readings.available_memory_bytes < needed:
        reasons.append(
            f"free memory {readings.available_memory_bytes / 2**20:.0f} MiB is below the "
            f"{needed / 2**20:.0f} MiB the plan needs with margin"
        )
    gpu_needed = required_gpu_memory_bytes + policy.memory_margin_bytes
    if readings.gpu_free_memory_bytes is not None and readings.gpu_free_memory_bytes < gpu_needed:
        reasons.append(
            f"free GPU memory {readings.gpu_free_memory_bytes / 2**20:.0f} MiB is below the "
            f"{gpu_needed / 2**20:.0f} MiB the plan needs on the GPU with margin"
        )
    if (
        readings.gpu_temperature_celsius is not None
        and readings.gpu_temperature_celsius > policy.max_temperature_celsius
    ):
        reasons.append(
            f"GPU temperature {readings.gpu_temperature_celsius:.0f} C is above "
            f"{policy.max_temperature_celsius:.0f} C"
        )
    if (
        readings.temperature_celsius is not None
        and readings.temperature_celsius > policy.max_temperature_celsius
    ):
        reasons.append(
            f"temperature {readings.temperature_celsius:.0f} C is above "
            f"{policy.max_temperature_celsius:.0f} C"
        )
    weekday = WEEKDAYS[readings.local_time.weekday()]
    if weekday not in policy.allowed_weekdays:
        reasons.append(f"{weekday} is not an allowed training day")
    if policy.allowed_hours and not _within(policy.allowed_hours, readings.local_time.time()):
        windows = ", ".join(f"{w.start:%H:%M}-{w.end:%H:%M}" for w in policy.allowed_hours)
        reasons.append(f"{readings.local_time:%H:%M} is outside the allowed hours ({windows})")
    return Eligibility(eligible=not reasons, reasons=tuple(reasons))


def _within(windows: Sequence[TimeWindow], moment: dt.time) -> bool:
    return any(window.contains(moment) for window in windows)
