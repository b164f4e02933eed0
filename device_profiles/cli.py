"""`schoolfl profile ...`: what planners run to know which hardware can train what."""

from __future__ import annotations

import click


@click.group("profile")
def profile_group() -> None:
    """Benchmark devices, inspect profiles and plan which models fit which hardware."""
