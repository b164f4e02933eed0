"""The error every coordinator.toml check raises, and the value tests they share.

Why a module of its own: the `[coordinator]`, `[[tasks]]`, task sub-tables, `[[schools]]`
and `[broker]` checks live in several modules (coordinator/config.py,
coordinator/task_tables.py, coordinator/serving_checks.py) and must word their messages
alike: the table, the key, what was expected and what arrived.
"""

from __future__ import annotations

import math


class CoordinatorConfigError(ValueError):
    """coordinator.toml is missing or invalid; the message names file, table and key."""


def invalid(where: str, key: str, problem: str) -> CoordinatorConfigError:
    """`<table> <key> <problem>`: the one shape of a key's error."""
    return CoordinatorConfigError(f"{where}: {key} {problem}")


def is_finite_number(value: object) -> bool:
    """An int or float (TOML's numbers), finite; `true` is not a number here."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_whole_number(value: object) -> bool:
    """A TOML integer (`true` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_seconds(where: str, key: str, value: object, allow_zero: bool = False) -> None:
    """A duration: a finite number of seconds, > 0 (or >= 0 with `allow_zero`)."""
    if is_finite_number(value) and (value >= 0 if allow_zero else value > 0):  # type: ignore[operator]
        return
    bound = ">= 0" if allow_zero else "> 0"
    raise invalid(where, key, f"must be a number of seconds {bound}, got {value!r}")


def check_text(where: str, key: str, value: object, allow_empty: bool = False) -> None:
    """A TOML string (non-empty unless `allow_empty`)."""
    if isinstance(value, str) and (allow_empty or value.strip()):
        return
    expected = "a string" if allow_empty else "a non-empty string"
    raise invalid(where, key, f"must be {expected}, got {value!r}")


def check_flag(where: str, key: str, value: object) -> None:
    """A TOML boolean."""
    if not isinstance(value, bool):
        raise invalid(where, key, f"must be true or false, got {value!r}")
