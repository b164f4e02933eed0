"""Named places where a fault-injection test may SIGKILL this very process.

A crash test that kills a daemon from outside can only hit convenient moments (a log line
appeared, some time passed); the worst moments are between two writes, and only the code
knows where those are. So the daemons mark them: `crash_point("update-stored")` right
after a commit, before what follows it. Unarmed (always, in production) a crash point
costs one dictionary lookup.

The entry point arms them from the environment (STYLE.md: only it reads env):
`SCHOOLFL_CRASH_AT="update-stored:2"` kills the process the second time it passes that
point; several may be given, separated by commas, and `name` alone means the first time.
The kill is SIGKILL from the process itself: no handler, no flush, no atexit, exactly as
a power cut or the OOM killer would end it.
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)

CRASH_AT_ENVIRONMENT = "SCHOOLFL_CRASH_AT"
"""The environment variable the `schoolfl` entry point arms crash points from."""

_armed: dict[str, int] = {}
"""Point name -> how many passes are left before the kill."""


def parse_crash_spec(text: str) -> dict[str, int]:
    """`"a:2,b"` -> {"a": 2, "b": 1}; ValueError naming the bad item."""
    armed: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, count = item.partition(":")
        try:
            passes = int(count) if count else 1
        except ValueError:
            raise ValueError(f"{CRASH_AT_ENVIRONMENT}: {item!r} is not NAME or NAME:N") from None
        if not name or passes < 1:
            raise ValueError(f"{CRASH_AT_ENVIRONMENT}: {item!r} is not NAME or NAME:N (N >= 1)")
        armed[name] = passes
    return armed


def arm_crash_points(text: str) -> None:
    """Arm the points of a spec (see the module docstring); an empty spec disarms all."""
    _armed.clear()
    _armed.update(parse_crash_spec(text))
    if _armed:
        logger.warning("fault injection armed: this process will kill itself at %s", _armed)


def crash_point(name: str) -> None:
    """SIGKILL this process if `name` is armed and this is the pass it was armed for."""
    if name not in _armed:
        return
    _armed[name] -= 1
    if _armed[name] > 0:
        return
    logger.warning("crash point %s reached: SIGKILL", name)
    for handler in logging.getLogger().handlers:  # so the test can see where it died
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
