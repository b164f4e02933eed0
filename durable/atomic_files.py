"""Atomic file writes: the one implementation every package uses (DESIGN invariant 3).

Temp file in the same folder, written and fsynced, renamed over the target, then the
folder fsynced: a crash at any instant leaves the old file or the new one, never a torn
one. Standard library only, so any package (the agent on a Raspberry Pi included) may
import it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

_TEMP_FILE = re.compile(r"^\.(.+)\.[^.]+\.tmp$")
"""`atomic_write_bytes`'s temp files: `.<name>.<random>.tmp`."""
_TEMP_FOLDER = re.compile(r"^\.(.+)\.tmp-[^/]+$")
"""`quantization.adapters.save_adapter`'s folder being written: `.<name>.tmp-<random>`."""
_OLD_FOLDER = re.compile(r"^\.(.+)\.old-\d+$")
"""`save_adapter`'s previous folder while the new one is renamed in: `.<name>.old-<pid>`."""


def fsync_directory(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically. The temp file gets `mode` before any byte is
    written, so a private key (mode 0o600) is never readable by others, even briefly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def sweep_leftovers(folder: Path) -> list[Path]:
    """Clean what a process killed mid-write left below `folder`; call it only while no
    other process writes there (a daemon holding its state lock, at start).

    Temp files and half-written adapter folders are removed (the write they belonged to
    never completed, so the previous state is the last good one). An adapter folder that
    was moved aside to make room for its replacement is put back when the replacement never
    arrived (a kill between save_adapter's two renames), else removed. Returns what it
    removed or restored."""
    swept: list[Path] = []
    for path in sorted(Path(folder).rglob(".*"), reverse=True):  # deepest first
        name = path.name
        if path.is_file() and _TEMP_FILE.match(name):
            path.unlink()
        elif path.is_dir() and _TEMP_FOLDER.match(name):
            shutil.rmtree(path)
        elif path.is_dir() and (match := _OLD_FOLDER.match(name)):
            original = path.with_name(match.group(1))
            if original.exists():
                shutil.rmtree(path)
            else:
                os.replace(path, original)
                fsync_directory(path.parent)
                logger.warning("restored %s, moved aside by a write that never finished", original)
        else:
            continue
        swept.append(path)
    if swept:
        logger.info("removed or restored %d leftover(s) of interrupted writes", len(swept))
    return swept
