"""Fault injection: a crash point kills its own process with SIGKILL on the armed pass."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from durable.crash_points import CRASH_AT_ENVIRONMENT, parse_crash_spec


def test_specs_parse_and_bad_ones_are_named() -> None:
    assert parse_crash_spec("") == {}
    assert parse_crash_spec("update-stored:2, round-opened") == {
        "update-stored": 2,
        "round-opened": 1,
    }
    for bad in ("x:0", "x:two", ":3"):
        with pytest.raises(ValueError, match=CRASH_AT_ENVIRONMENT):
            parse_crash_spec(bad)


def test_an_armed_point_kills_on_its_pass_and_not_before() -> None:
    script = (
        "from durable.crash_points import arm_crash_points, crash_point\n"
        "arm_crash_points('here:3')\n"
        "for i in range(5):\n"
        "    print(i, flush=True)\n"
        "    crash_point('elsewhere')\n"
        "    crash_point('here')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split() == ["0", "1", "2"]


def test_the_entry_point_refuses_a_bad_spec() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "schoolfl", "profile", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, CRASH_AT_ENVIRONMENT: "update-stored:soon"},
    )
    assert done.returncode == 2
    assert "update-stored:soon" in done.stderr
