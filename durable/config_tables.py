"""Building config dataclasses from TOML tables, with messages that name the key.

Shared by agent.toml and coordinator.toml so both reject typos the same way.
"""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")


def build_dataclass(cls: type[T], table: object, where: str, error: type[Exception]) -> T:
    """`cls(**table)` after checking for unknown and missing keys; lists become tuples."""
    if not isinstance(table, dict):
        raise error(f"{where} must be a table")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - names)
    if unknown:
        raise error(f"{where}: unknown keys {unknown}; known keys: {sorted(names)}")
    missing = sorted(
        f.name
        for f in fields(cls)  # type: ignore[arg-type]
        if f.default is MISSING and f.default_factory is MISSING and f.name not in table
    )
    if missing:
        raise error(f"{where}: missing keys {missing}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    return cls(**values)


def read_toml_file(path: Path, error: type[Exception], missing_hint: str = "") -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error becomes `error` naming the file."""
    try:
        with Path(path).open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise error(f"{path} does not exist{'; ' + missing_hint if missing_hint else ''}") from None
    except tomllib.TOMLDecodeError as problem:
        raise error(f"{path} is not valid TOML: {problem}") from None
