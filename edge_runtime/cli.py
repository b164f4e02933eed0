"""`schoolfl agent ...`: what school IT runs on each device."""

from __future__ import annotations

import click


@click.group("agent")
def agent_group() -> None:
    """Install, enroll and run the edge agent on a school device.

    The agent fine-tunes LoRA adapters on local data that never leaves the device and
    reports adapter updates to the coordinator over MQTT.
    """
