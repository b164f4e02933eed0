"""Read profiles with the shared TOML reader; write the small subset profiles use.

Profiles are flat tables of strings, numbers, booleans and lists of scalars, plus one array
of tables (the measured grid). A writer for that subset is a few dozen lines, which keeps a
TOML-writing package out of the edge agent's dependencies.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from device_profiles.errors import ProfileError
from durable.config_tables import read_toml_file


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a profile file; a missing file or a syntax error names the file (and position)."""
    return read_toml_file(path, ProfileError)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ProfileError(f"cannot write non-finite number {value!r} to a profile")
        return repr(float(value))
    if isinstance(value, str):
        escaped = (
            value.replace("\\", "\\\\")
            .replace('"', '\\"')
            .replace("\n", "\\n")
            .replace("\t", "\\t")
        )
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(item) for item in value) + "]"
    raise ProfileError(f"cannot write {type(value).__name__} value {value!r} to TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _write_table(lines: list[str], prefix: str, table: dict[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not _is_table_array(v)}
    for key, value in scalars.items():
        if value is None:
            continue
        lines.append(f"{key} = {_scalar(value)}")
    for key, value in table.items():
        if isinstance(value, dict):
            name = f"{prefix}.{key}" if prefix else key
            lines.append("")
            lines.append(f"[{name}]")
            _write_table(lines, name, value)
    for key, value in table.items():
        if _is_table_array(value):
            name = f"{prefix}.{key}" if prefix else key
            for item in value:
                lines.append("")
                lines.append(f"[[{name}]]")
                _write_table(lines, name, item)


def dumps_toml(data: dict[str, Any], header: str = "") -> str:
    """Render nested dicts as TOML; `None` values are left out (TOML has no null)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    _write_table(lines, "", data)
    return "\n".join(lines).lstrip("\n") + "\n"
