"""`schoolfl coordinator ...`: what coordinator operators run."""

from __future__ import annotations

import click


@click.group("coordinator")
def coordinator_group() -> None:
    """Run the coordinator daemon, enroll and revoke devices, watch rounds, export models."""
