"""Building config dataclasses from TOML tables, with messages that name the key.

Shared by agent.toml and coordinator.toml so both reject typos the same way.
"""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")


def build_dataclass(
    cls: type[T], table: object, where: str, error: type[Exception], name: str = ""
) -> T:
    """`cls(**table)` after checking for unknown and missing keys; lists become tuples.

    A field whose `default_factory` is itself a dataclass is a sub-table, `[name.field]` in
    TOML (`name` is this table's dotted TOML name): it is checked the same way, and the
    errors its own validation raises are prefixed with `where`, so they name both tables.
    """
    return cls(**_checked_values(cls, table, where, error, name))


def _checked_values(
    cls: type, table: object, where: str, error: type[Exception], name: str
) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise error(f"{where} must be a table")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise error(f"{where}: unknown keys {unknown}; known keys: {sorted(names)}")
    missing = sorted(
        f.name
        for f in fields(cls)
        if f.default is MISSING and f.default_factory is MISSING and f.name not in table
    )
    if missing:
        raise error(f"{where}: missing keys {missing}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    for f in fields(cls):
        sub_cls = f.default_factory
        if f.name in values and isinstance(sub_cls, type) and is_dataclass(sub_cls):
            sub_name = f"{name}.{f.name}" if name else f.name
            sub_where = f"{where} [{sub_name}]"
            sub_values = _checked_values(sub_cls, values[f.name], sub_where, error, sub_name)
            try:
                values[f.name] = sub_cls(**sub_values)
            except error as problem:
                raise error(f"{where} {problem}") from None
    return values


def read_toml_file(path: Path, error: type[Exception], missing_hint: str = "") -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error becomes `error` naming the file."""
    try:
        with Path(path).open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise error(f"{path} does not exist{'; ' + missing_hint if missing_hint else ''}") from None
    except tomllib.TOMLDecodeError as problem:
        raise error(f"{path} is not valid TOML: {problem}") from None
