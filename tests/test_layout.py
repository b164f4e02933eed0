"""The dependency rule of DESIGN.md ("Layout"), checked on every module's imports (AST).

- `durable` imports nothing of the project;
- `quantization` and `device_profiles` import only `durable` (and themselves);
- `edge_runtime.wire` imports only `durable`, `quantization`, `device_profiles` and itself;
  `edge_runtime.secagg` those and `edge_runtime.wire`;
- the agent (the rest of `edge_runtime`) those four;
- `coordinator` those three and, from the agent side, only `edge_runtime.wire` and
  `edge_runtime.secagg`;
- nothing imports `schoolfl` (the command line and the demo), and nothing outside a door
  package (`edge_runtime.wire`, `edge_runtime.secagg`) imports one of its submodules.

Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

from durable.config_tables import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("durable", "quantization", "device_profiles", "edge_runtime", "coordinator", "schoolfl")
DOORS = ("edge_runtime.wire", "edge_runtime.secagg")
LOWER = ("durable", "quantization", "device_profiles")

ALLOWED: dict[str, tuple[str, ...]] = {
    "durable": ("durable",),
    "quantization": ("durable", "quantization"),
    "device_profiles": ("durable", "device_profiles"),
    "edge_runtime.wire": (*LOWER, "edge_runtime.wire"),
    "edge_runtime.secagg": (*LOWER, "edge_runtime.wire", "edge_runtime.secagg"),
    "edge_runtime": (*LOWER, "edge_runtime"),
    "coordinator": (*LOWER, "coordinator", "edge_runtime.wire", "edge_runtime.secagg"),
    "schoolfl": PACKAGES,
}


def _room(module: str) -> str:
    """The most specific key of ALLOWED that `module` lives in."""
    for room in sorted(ALLOWED, key=len, reverse=True):
        if module == room or module.startswith(room + "."):
            return room
    raise AssertionError(f"{module} is in no room of the layout")


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of a project package in `path`."""
    module = _module_name(path)
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".")
                keep = len(package) - node.level + (1 if path.name == "__init__.py" else 0)
                base = ".".join(package[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            # `from package import submodule` imports the submodule
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
    return [(line, name) for line, name in found if name.split(".")[0] in PACKAGES]


def _existing(module: str) -> bool:
    path = ROOT / Path(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _violations(path: Path) -> list[str]:
    module = _module_name(path)
    room = _room(module)
    problems = []
    for line, imported in _project_imports(path):
        if not _existing(imported):
            continue  # a name, not a module (`from x import name`)
        where = f"{path.relative_to(ROOT)}:{line} imports {imported}"
        if not any(_inside(imported, allowed) for allowed in ALLOWED[room]):
            problems.append(f"{where}: {room} may import only {', '.join(ALLOWED[room])}")
        for door in DOORS:
            if _inside(imported, door) and imported != door and not _inside(module, door):
                problems.append(f"{where}: import {door} itself (its public door)")
        if _inside(imported, "schoolfl") and room != "schoolfl":
            problems.append(f"{where}: nothing below the command line imports schoolfl")
    return problems


MODULES = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_every_package_module_is_checked() -> None:
    names = {_module_name(path) for path in MODULES}
    assert {"durable.atomic_files", "edge_runtime.wire", "coordinator.secure.rounds"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_dependency_rule(path: Path) -> None:
    assert _violations(path) == []


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: an agent module importing the coordinator is flagged."""
    sample = ROOT / "edge_runtime" / "_layout_probe.py"
    sample.write_text(
        "from coordinator.store import CoordinatorStore\n"
        "from edge_runtime.wire.frames import encode_frame\n"
    )
    try:
        problems = _violations(sample)
    finally:
        sample.unlink()
    assert len(problems) == 2
    assert "edge_runtime may import only" in problems[0]
    assert "its public door" in problems[1]


def test_every_package_is_installed() -> None:
    """A room missing from pyproject's package list works in an editable checkout and is
    absent from a real install (a Raspberry Pi's `pip install`)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    missing = [p for p in PACKAGES if not any(fnmatch.fnmatch(p, pattern) for pattern in include)]
    assert missing == []
