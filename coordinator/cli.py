"""`schoolfl coordinator ...`: what coordinator operators run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from coordinator.config import TaskConfig
    from coordinator.store import AdapterVersion


@click.group("coordinator")
def coordinator_group() -> None:
    """Run the coordinator daemon, enroll and revoke devices, watch rounds, export models."""


# -- the daemon and its operations ---------------------------------------------------------

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=Path("coordinator.toml"),
    show_default=True,
    help="The coordinator's configuration file.",
)


def _load_config(config_path: Path):  # noqa: ANN202 - CoordinatorConfig, imported lazily
    from coordinator.config import CoordinatorConfig, CoordinatorConfigError

    try:
        return CoordinatorConfig.load(config_path)
    except CoordinatorConfigError as error:
        raise click.ClickException(str(error)) from None


def _open_store(config_path: Path):  # noqa: ANN202 - CoordinatorStore
    from coordinator.store import CoordinatorStore

    config = _load_config(config_path)
    path = config.state_dir / "coordinator.db"
    if not path.exists():
        raise click.ClickException(
            f"no coordinator state at {path}; start `schoolfl coordinator serve` first"
        )
    return CoordinatorStore(path)


def _when(timestamp: float | None) -> str:
    import datetime as dt

    if timestamp is None:
        return "-"
    return dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


@coordinator_group.command("serve")
@CONFIG_OPTION
@click.option(
    "--exit-when-done",
    is_flag=True,
    help="Stop once every task has completed its configured rounds.",
)
def serve_command(config_path: Path, exit_when_done: bool) -> None:
    """Run the coordinator daemon in the foreground until SIGTERM or Ctrl-C."""
    import signal

    from coordinator.config import CoordinatorConfig, CoordinatorConfigError
    from coordinator.daemon import CoordinatorDaemon
    from durable.daemon_logging import use_info_logging
    from durable.state_lock import StateLockedError
    from edge_runtime.wire import TransportError

    try:  # every key, file and password checked before anything is built or connected
        config = CoordinatorConfig.load(config_path, serving=True)
    except CoordinatorConfigError as error:
        raise click.ClickException(str(error)) from None
    use_info_logging()
    try:
        daemon = CoordinatorDaemon(config)
    except StateLockedError as error:
        raise click.ClickException(str(error)) from None

    def request_stop(signum: int, frame: object) -> None:
        daemon.stop_requested.set()  # only a flag: the loop stops at its next turn

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        daemon.start()
    except TransportError as error:
        raise click.ClickException(str(error)) from None
    try:
        daemon.run(exit_when_done=exit_when_done)
    finally:
        daemon.stop()


@coordinator_group.command("enroll-token")
@CONFIG_OPTION
@click.option("--school", required=True, help="The school the enrolled device belongs to.")
@click.option(
    "--valid-hours",
    default=None,
    type=float,
    help="Token lifetime (default: token_valid_seconds from the config).",
)
def enroll_token_command(config_path: Path, school: str, valid_hours: float | None) -> None:
    """Print a one-time enrollment token for one device of SCHOOL."""
    import math
    import secrets

    from coordinator.store import CoordinatorStore
    from edge_runtime.wire import check_identifier

    config = _load_config(config_path)
    try:
        check_identifier("school", school)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    if valid_hours is not None and not (math.isfinite(valid_hours) and valid_hours > 0):
        raise click.BadParameter(
            f"must be a positive number of hours, got {valid_hours:g} (leave it out for "
            f"the config's token_valid_seconds, {config.coordinator.token_valid_seconds:g} s)",
            param_hint="--valid-hours",
        )
    store = CoordinatorStore(config.state_dir / "coordinator.db")
    seconds = (
        valid_hours * 3600 if valid_hours is not None else config.coordinator.token_valid_seconds
    )
    token = secrets.token_urlsafe(24)
    store.add_enrollment_token(token, school, seconds)
    store.close()
    click.echo(token)


@coordinator_group.command("revoke")
@CONFIG_OPTION
@click.argument("device_id")
def revoke_command(config_path: Path, device_id: str) -> None:
    """Revoke DEVICE_ID: its messages are refused from now on and, with [broker_admin], it
    is removed from the broker at once (disconnected; it cannot reconnect)."""
    from coordinator.broker_admin import BrokerAdminError
    from coordinator.broker_cli import broker_admin_client
    from coordinator.store import CoordinatorStore
    from edge_runtime.wire import TransportError

    config = _load_config(config_path)
    path = config.state_dir / "coordinator.db"
    if config.broker_admin is None:
        store = _open_store(config_path)
        revoked = store.revoke_device(device_id)
        store.close()
        if not revoked:
            raise click.ClickException(f"no active device {device_id!r}")
        click.echo(
            f"revoked {device_id}; this coordinator does not manage the broker (no "
            "[broker_admin] table): remove the device's broker credentials yourself"
        )
        return
    revoked, record = False, None
    if path.exists():
        store = CoordinatorStore(path)
        revoked = store.revoke_device(device_id)
        record = store.device(device_id)
        store.close()
    try:
        had_client = broker_admin_client(config).remove_device(device_id)
    except (BrokerAdminError, TransportError, ValueError) as error:
        if not revoked:
            raise click.ClickException(
                f"no active device {device_id!r}, and the broker did not answer: {error}"
            ) from None
        click.echo(
            f"revoked {device_id}; the broker did not answer ({error}): the coordinator "
            "removes the device from the broker as soon as it can reach it",
            err=True,
        )
        return
    if not revoked and not had_client:
        raise click.ClickException(f"no active device {device_id!r} and no broker client of it")
    state = "revoked" if revoked else "already revoked" if record else "not enrolled"
    broker = (
        "removed from the broker: disconnected, it cannot reconnect"
        if had_client
        else "it had no broker client"
    )
    click.echo(f"{device_id}: {state}; {broker}")


@coordinator_group.command("export")
@CONFIG_OPTION
@click.option("--task", "task_id", default=None, help="Task to export (default: the only one).")
@click.option(
    "--version",
    "version_number",
    type=int,
    default=None,
    help="Adapter version number (default: the latest).",
)
@click.option(
    "--onnx",
    is_flag=True,
    help="Write an ONNX int8 model for classroom inference instead of the PEFT adapter "
    "(classification tasks; needs the onnx extra).",
)
@click.argument("destination", type=click.Path(path_type=Path))
def export_command(
    config_path: Path,
    task_id: str | None,
    version_number: int | None,
    onnx: bool,
    destination: Path,
) -> None:
    """Copy a global adapter version to DESTINATION as a PEFT adapter folder.

    With --onnx, merge it into the fp32 base instead and write DESTINATION with
    model.onnx, model.int8.onnx, the tokenizer, labels.json, predict.py and
    export_report.json (held-out accuracy of PyTorch vs ONNX int8 and their agreement).
    """
    import shutil

    config = _load_config(config_path)
    if task_id is None:
        if len(config.tasks) != 1:
            raise click.ClickException(f"choose a task with --task: {[t.id for t in config.tasks]}")
        task_id = config.tasks[0].id
    try:
        task = config.task(task_id)
    except KeyError as error:
        raise click.ClickException(str(error.args[0])) from None
    if onnx and task.kind != "classification":
        raise click.ClickException(
            f"only classification tasks are exported to ONNX; task {task_id!r} is "
            f"{task.kind!r} (export its PEFT adapter folder without --onnx)"
        )
    store = _open_store(config_path)
    versions = store.adapter_versions(task_id)
    store.close()
    if not versions:
        raise click.ClickException(f"task {task_id!r} has no adapter versions yet")
    chosen = (
        versions[-1]
        if version_number is None
        else next((v for v in versions if v.version == version_number), None)
    )
    if chosen is None:
        raise click.ClickException(
            f"no version {version_number} of {task_id!r}; have {[v.version for v in versions]}"
        )
    if destination.exists():
        raise click.ClickException(f"{destination} exists; choose a new folder")
    if not onnx:
        shutil.copytree(chosen.folder, destination)
        click.echo(f"exported {task_id} v{chosen.version} ({chosen.sha256[:12]}) to {destination}")
        return
    _export_onnx(task, chosen, destination)


def _export_onnx(task: TaskConfig, version: AdapterVersion, destination: Path) -> None:
    """The --onnx branch: merge, export, quantize, score; print the report."""
    from quantization.export.onnx_report import PREDICT_FILE, REPORT_FILE, missing_onnx_packages

    missing = missing_onnx_packages()
    if missing:
        raise click.ClickException(
            f"--onnx needs {', '.join(missing)}; install them with: pip install 'schoolfl[onnx]'"
        )
    from coordinator.task_models import onnx_export_spec
    from quantization.export.onnx_export import OnnxExportError, OnnxExportRequest, export_onnx

    click.echo(
        f"exporting {task.id} v{version.version} ({version.sha256[:12]}) to ONNX; "
        "this loads the fp32 base and takes a minute..."
    )
    try:
        report = export_onnx(
            OnnxExportRequest(
                spec=onnx_export_spec(task),
                adapter_folder=Path(version.folder),
                destination=destination,
                version=version.version,
                adapter_sha256=version.sha256,
            )
        )
    except OnnxExportError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {destination} with {report.exporter} in {report.seconds:.0f} s:")
    for line in report.summary_lines():
        click.echo(f"  {line}")
    click.echo(f"  report: {destination / REPORT_FILE}")
    click.echo(f'  try it: python {destination / PREDICT_FILE} "How do plants make food?"')


def _register_simulate() -> None:
    """`simulate` lives in its own module: it pulls in the simulator only when run."""
    from coordinator.simulation.cli import simulate_command

    coordinator_group.add_command(simulate_command)


def _register_list_commands() -> None:
    """`devices`, `rounds`, `status` and `privacy-report` (text or --json) live in
    coordinator/list_commands.py."""
    from coordinator.list_commands import (
        devices_command,
        privacy_report_command,
        rounds_command,
        status_command,
    )

    for command in (devices_command, rounds_command, status_command, privacy_report_command):
        coordinator_group.add_command(command)


def _register_broker_commands() -> None:
    """`broker-config` and `add-device` live in coordinator/broker_cli.py."""
    from coordinator.broker_cli import add_device_command, broker_config_command

    coordinator_group.add_command(broker_config_command)
    coordinator_group.add_command(add_device_command)


_register_simulate()
_register_list_commands()
_register_broker_commands()
