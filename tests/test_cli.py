"""The console script exists and every command group answers --help."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from schoolfl import __version__
from schoolfl.cli import cli


@pytest.mark.parametrize("group", ["agent", "coordinator", "profile", "demo"])
def test_every_group_has_help(group: str) -> None:
    result = CliRunner().invoke(cli, [group, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: cli " + group in result.output or f"{group} [OPTIONS]" in result.output


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_console_script_runs_as_module() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "schoolfl", "--help"], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    for group in ("agent", "coordinator", "profile", "demo"):
        assert group in completed.stdout
