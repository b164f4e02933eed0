"""`schoolfl demo`: the whole system on one machine (issue 8 builds it)."""

from __future__ import annotations

import click


@click.command("demo")
def demo_command() -> None:
    """Run a broker, the coordinator and several emulated school devices on this machine.

    Not built yet: this command only explains itself until the demo lands.
    """
    raise click.ClickException(
        "the demo is not built yet in this version; see README.md for what works today"
    )
