"""One daemon per state folder: an exclusive `flock` on `<folder>/.lock`, held while the
daemon lives and released by the kernel when its process ends, however it ends (a SIGKILL
leaves no stale lock to clean up).

Two coordinators on one folder would write the same store and, sharing one MQTT client id,
kick each other off the broker every second; the second one is refused at start instead.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


class StateLockedError(RuntimeError):
    """Another live process holds the state folder."""


def lock_state_folder(folder: Path, owner: str) -> IO[str]:
    """Hold `folder`'s lock (create the folder when needed); keep the returned handle open
    for as long as the lock is wanted, and close it to release."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = (folder / ".lock").open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise StateLockedError(
            f"{folder} is in use by another {owner} (pid {holder}); stop that one first, or "
            "give this one a state folder of its own"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")  # only for the message above; the flock is the lock
    handle.flush()
    return handle
