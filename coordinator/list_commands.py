"""`schoolfl coordinator devices|rounds|status|privacy-report`: the operator's list commands.

Each prints the view `coordinator.fleet_views` builds: as text, or with `--json` as one
JSON object (stable keys, documented in docs/coordinator.md) for scripts. The text never
shortens a value, so `... | grep` finds whole names; on a terminal a digest is shortened
to its first 12 characters, in a pipe it is printed whole.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from coordinator.fleet_views import (
    devices_view,
    privacy_report_view,
    rounds_view,
    status_view,
)

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=Path("coordinator.toml"),
    show_default=True,
    help="The coordinator's configuration file.",
)
JSON_OPTION = click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object (keys documented in docs/coordinator.md) instead of text.",
)


def _echo_json(view: dict[str, Any]) -> None:
    click.echo(json.dumps(view, indent=2, sort_keys=True))


def _on_terminal() -> bool:
    return sys.stdout.isatty()


def _digest(sha256: str) -> str:
    return sha256[:12] if _on_terminal() else sha256


def _age(seconds: float | None) -> str:
    """'12 s ago', '5 min ago', '3 h ago', 'never'."""
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def _when(timestamp: float | None) -> str:
    from coordinator.cli import _when as when

    return when(timestamp)


def _eligibility(device: dict[str, Any]) -> str:
    if device["eligible"] is None:
        return "eligibility unknown"
    if device["eligible"]:
        return "eligible"
    return "not eligible: " + ("; ".join(device["ineligible_reasons"]) or "no reason given")


@click.command("devices")
@CONFIG_OPTION
@JSON_OPTION
def devices_command(config_path: Path, as_json: bool) -> None:
    """List enrolled devices: school, profile, machine, state, online or not, eligibility
    and its reasons, last heartbeat, and per task whether its latest round chose the
    device or why not."""
    from coordinator.cli import _load_config, _open_store

    config = _load_config(config_path)
    store = _open_store(config_path)
    view = devices_view(config, store, time.time())
    store.close()
    if as_json:
        _echo_json(view)
        return
    if not view["devices"]:
        click.echo(
            "no devices enrolled yet; issue a token with `schoolfl coordinator enroll-token`"
        )
    for device in view["devices"]:
        # The machine the agent reported; "?" for agents that predate the field.
        machine = device["machine"] or "?"
        if device["architecture_mismatch"]:
            machine += f" (profile says {device['profile_architecture']}!)"
        state = (
            f"revoked {_when(device['revoked_at'])}" if device["state"] == "revoked" else "active"
        )
        click.echo(
            f"{device['device_id']:24} {device['school']:16} {device['profile']:20} "
            f"{machine:8} enrolled {_when(device['enrolled_at'])}  {state}  "
            f"{'online' if device['online'] else 'offline'}  {_eligibility(device)}  "
            f"heartbeat {_age(device['last_heartbeat_age_seconds'])}"
        )
        for entry in device["rounds"]:
            outcome = "chosen" if entry["chosen"] else "not chosen"
            why = f": {entry['reason']}" if entry["reason"] else ""
            click.echo(
                f"  task {entry['task_id']} round {entry['round_number']} "
                f"({entry['round_state']}): {outcome}{why}"
            )


@click.command("rounds")
@CONFIG_OPTION
@click.option("--task", "task_id", default=None, help="Only this task.")
@JSON_OPTION
def rounds_command(config_path: Path, task_id: str | None, as_json: bool) -> None:
    """List rounds with their state, updates, reason and metrics."""
    from coordinator.cli import _load_config, _open_store

    config = _load_config(config_path)
    store = _open_store(config_path)
    view = rounds_view(config, store, task_id)
    store.close()
    if as_json:
        _echo_json(view)
        return
    if not view["rounds"]:
        click.echo("no rounds yet")
    for entry in view["rounds"]:
        aggregated = entry["aggregated"]
        counts = f"updates={entry['updates']}"
        if aggregated is not None and aggregated != entry["updates"]:
            counts += f" aggregated={aggregated}"
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(entry["metrics"].items()))
        click.echo(
            f"{entry['task_id']} round {entry['round_number']}: {entry['state']:9} "
            f"{counts} {entry['reason'] or ''} {metrics}".rstrip()
        )
    for stopped in view["stopped"]:
        click.echo(f"{stopped['task_id']} stopped: {stopped['reason']}")


@click.command("status")
@CONFIG_OPTION
@JSON_OPTION
def status_command(config_path: Path, as_json: bool) -> None:
    """Tasks, their current versions and open rounds, devices online and eligible (with
    the reasons of those that are not), who each round left out and why, refused
    messages."""
    from coordinator.cli import _load_config, _open_store

    config = _load_config(config_path)
    store = _open_store(config_path)
    view = status_view(config, store, time.time())
    store.close()
    if as_json:
        _echo_json(view)
        return
    counts = view["devices"]
    click.echo(
        f"fleet {view['fleet']}, broker {view['broker']}, {counts['enrolled']} device(s) enrolled"
    )
    reasons = ", ".join(f"{reason} x{n}" for reason, n in counts["ineligible_reasons"].items())
    click.echo(
        f"devices: {counts['online']} online, {counts['eligible']} eligible, "
        f"{counts['ineligible']} ineligible{f' ({reasons})' if reasons else ''}, "
        f"{counts['offline']} offline, {counts['revoked']} revoked"
    )
    for task in view["tasks"]:
        adapter = task["adapter"]
        version = f"v{adapter['version']} {_digest(adapter['sha256'])}" if adapter else "none"
        click.echo(
            f"task {task['task_id']}: {task['rounds_completed']}/{task['rounds_configured']} "
            f"rounds completed, adapter {version}, open rounds {task['open_rounds'] or 'none'}"
        )
        privacy = task["privacy"]
        if privacy is not None:
            click.echo(
                f"  privacy ({privacy['mode']} DP): epsilon {privacy['epsilon']:.4g} of budget "
                f"{privacy['epsilon_budget']:g} at delta {privacy['delta']:g}"
            )
        if task["stopped"]:
            click.echo(f"  stopped: {task['stopped']}")
        for entry in task["rounds"]:
            left_out = entry["left_out"]
            click.echo(
                f"  round {entry['round_number']} ({entry['state']}): "
                f"{len(left_out)} device(s) left out" + (":" if left_out else "")
            )
            for device_id, reason in left_out.items():
                click.echo(f"    {device_id}: {reason}")
    refused = view["refused_messages"]
    click.echo("refused messages: " + (", ".join(f"{k}={v}" for k, v in refused.items()) or "none"))
    for entry in view["latest_refusals"]:  # per device and category, latest first
        click.echo(
            f"  {_when(entry['last_at'])} {entry['device_id'] or '?'} {entry['category']} "
            f"x{entry['count']}: {entry['last_reason']}"
        )


@click.command("privacy-report")
@CONFIG_OPTION
@click.argument("task_id")
@JSON_OPTION
def privacy_report_command(config_path: Path, task_id: str, as_json: bool) -> None:
    """Per completed round of TASK_ID: participants, clipping bound, noise multiplier,
    cumulative (epsilon, delta), secure aggregation on/off."""
    from coordinator.cli import _load_config, _open_store

    config = _load_config(config_path)
    try:
        task = config.task(task_id)
    except KeyError as error:
        raise click.ClickException(str(error.args[0])) from None
    if task.privacy.mode == "off":
        raise click.ClickException(
            f"task {task_id!r} has [tasks.privacy] mode = 'off': no privacy accounting; set "
            "mode, clip_norm, noise_multiplier and epsilon_budget in its [tasks.privacy] table"
        )
    store = _open_store(config_path)
    view = privacy_report_view(task, store)
    store.close()
    if as_json:
        _echo_json(view)
        return
    click.echo(
        f"task {task_id}: {task.privacy.mode} DP, budget epsilon "
        f"{task.privacy.epsilon_budget:g} at delta {task.privacy.delta:g}"
    )
    if not view["rounds"]:
        click.echo("no completed rounds yet: epsilon 0")
    else:
        click.echo(
            f"{'round':>5} {'devices':>7} {'eligible':>8} {'q':>6} {'clip':>8} {'noise z':>7} "
            f"{'epsilon':>9} {'delta':>8} secure-agg"
        )
    for entry in view["rounds"]:
        click.echo(
            f"{entry['round_number']:>5} {entry['participants']:>7} "
            f"{entry['eligible_devices']:>8} {entry['sampling_probability']:>6.3f} "
            f"{entry['clip_norm']:>8.4g} {entry['noise_multiplier']:>7.4g} "
            f"{entry['epsilon']:>9.4f} {entry['delta']:>8.1e} "
            f"{'on' if entry['secure_aggregation'] else 'off'}"
        )
    if view["stopped"]:
        click.echo(f"stopped: {view['stopped']}")
