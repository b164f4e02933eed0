"""Fresh install of each extra: wall time and venv size, and README command 1 end to end.

A new user's first contact is `pip install`, so its cost is measured the way they pay it: a
clean clone, a new venv, pip's cache off (a fresh machine has none), torch pinned first as
the README says, then `pip install -e '.[EXTRA]'`. Packages come from whatever indexes pip
is configured with here (on the project's build machine, local mirrors of PyPI: the figures
then measure unpacking, resolving and byte-compiling, not the download).

With `--demo`, the last target is README command 1 as written (install `.[all]`, then
`schoolfl demo` in a fresh folder), timed as one.

    python benchmarks/bench_install.py --output bench-out/install.md
    python benchmarks/bench_install.py --extras coordinator,all --demo
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EXTRAS = ("none", "coordinator", "bnb", "models", "onnx", "test", "all")
TORCH = "torch==2.13.0"


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Seconds the command took; its output goes to the log file, a failure stops the run."""
    started = time.monotonic()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}")
    return time.monotonic() - started


def _size_mib(path: Path) -> float:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return total / 2**20


def _fresh_clone(workdir: Path) -> Path:
    clone = workdir / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    return clone


def measure_extra(extra: str, workdir: Path, demo: bool) -> dict[str, float | str]:
    """One target in its own clone and venv, so no build artefact is shared between them."""
    target = workdir / extra
    target.mkdir()
    clone = _fresh_clone(target)
    env = {**os.environ, "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("VIRTUAL_ENV", None)
    venv_seconds = _run([sys.executable, "-m", "venv", ".venv"], clone, env)
    python = str(clone / ".venv" / "bin" / "python")
    torch_seconds = _run([python, "-m", "pip", "install", "-q", TORCH], clone, env)
    spec = "." if extra == "none" else f".[{extra}]"
    project_seconds = _run([python, "-m", "pip", "install", "-q", "-e", spec], clone, env)
    row: dict[str, float | str] = {
        "extra": extra,
        "venv_s": venv_seconds,
        "torch_s": torch_seconds,
        "project_s": project_seconds,
        "install_s": venv_seconds + torch_seconds + project_seconds,
        "venv_mib": _size_mib(clone / ".venv"),
    }
    if demo:
        demo_dir = target / "demo-run"
        demo_dir.mkdir()
        schoolfl = str(clone / ".venv" / "bin" / "schoolfl")
        row["demo_s"] = _run([schoolfl, "demo"], demo_dir, env)
    return row


def render(rows: list[dict[str, float | str]]) -> str:
    lines = [
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, pip cache off",
        "",
        "| extra | venv s | torch s | project s | install s | venv MiB | demo s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        demo = f"{row['demo_s']:.0f}" if "demo_s" in row else "-"
        lines.append(
            f"| {row['extra']} | {row['venv_s']:.1f} | {row['torch_s']:.1f} | "
            f"{row['project_s']:.1f} | {row['install_s']:.1f} | {row['venv_mib']:.0f} | {demo} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", default=",".join(DEFAULT_EXTRAS))
    parser.add_argument("--demo", action="store_true", help="also run the demo after 'all'")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="schoolfl-install-"))
    try:
        for extra in extras:
            print(f"installing {extra} ...", flush=True)
            rows.append(measure_extra(extra, workdir, demo=args.demo and extra == "all"))
            print(render(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = render(rows)
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report + "\n")


if __name__ == "__main__":
    main()
