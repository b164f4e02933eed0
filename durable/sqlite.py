"""The one way a daemon opens its SQLite file (DESIGN invariant 3: every durable change is a
transaction, and a crash at any instant leaves the last committed state readable).

- WAL journal: readers (`schoolfl coordinator status` beside a running daemon) never block
  the writer, and a crash mid-transaction leaves the previous commit intact.
- synchronous=FULL: a commit is on disk before `execute` returns, so an update that was
  acknowledged is never lost on power loss (a school laptop's battery runs out).
- foreign_keys=ON: rows that point at rows must find them.
- Autocommit mode (`isolation_level=None`): each caller states its own transactions with
  BEGIN IMMEDIATE ... COMMIT, instead of Python's implicit ones.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_database(path: Path, schema: str) -> sqlite3.Connection:
    """Open (creating the folder and file when needed) and apply `schema` (idempotent DDL)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    db.executescript(schema)
    return db
