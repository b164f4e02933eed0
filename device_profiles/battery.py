"""The battery reading both the agent's eligibility check and `schoolfl profile bench` take.

psutil raises FileNotFoundError instead of returning None where /sys/class/power_supply is
missing (containers, chroots, some kernels: giampaolo/psutil#2067). An unreadable sensor is
"unknown" with the reason, never a crash: under systemd's Restart=on-failure a crash at
start would be a restart loop.
"""

from __future__ import annotations

import logging
from typing import Any

import psutil

logger = logging.getLogger(__name__)

_warned: set[str] = set()


def read_battery() -> tuple[Any, str]:
    """psutil's battery reading (None: no battery, on mains) and, where the sensor cannot be
    read, why (then the reading is None and the power source is unknown)."""
    if not hasattr(psutil, "sensors_battery"):
        return None, ""  # this platform has no battery API: no battery
    try:
        return psutil.sensors_battery(), ""
    except OSError as error:
        reason = f"battery sensor unreadable: {error}"
        if reason not in _warned:  # once per process: heartbeats read it on every tick
            _warned.add(reason)
            logger.warning("%s; power source reported as unknown", reason)
        return None, reason
