"""The `schoolfl` console script: one click group per user of the system.

School IT uses `agent`, coordinator operators `coordinator`, planners `profile`, and a new
user starts with `demo`; `models` fetches base model files. Each group lives next to the code
it drives; this file only assembles them, so that `schoolfl --help` stays cheap (no torch
import) on a Raspberry Pi.
"""

from __future__ import annotations

import logging
import os

import click

from coordinator.cli import coordinator_group
from device_profiles.cli import profile_group
from durable.crash_points import CRASH_AT_ENVIRONMENT, arm_crash_points
from edge_runtime.cli import agent_group
from quantization.cli import models_group
from schoolfl import __version__
from schoolfl.demo import demo_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="schoolfl")
@click.option("-v", "--verbose", count=True, help="More log output (-v INFO, -vv DEBUG).")
def cli(verbose: int) -> None:
    """Federated fine-tuning of LoRA adapters on quantized models for school devices."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    crash_spec = os.environ.get(CRASH_AT_ENVIRONMENT, "")
    if crash_spec:  # fault-injection tests only (durable/crash_points.py)
        try:
            arm_crash_points(crash_spec)
        except ValueError as error:
            raise click.UsageError(str(error)) from None


cli.add_command(agent_group)
cli.add_command(coordinator_group)
cli.add_command(profile_group)
cli.add_command(demo_command)
cli.add_command(models_group)


def main() -> None:
    cli()
