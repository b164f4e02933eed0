"""`schoolfl coordinator ...`: what coordinator operators run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from coordinator.config import TaskConfig
    from coordinator.store import AdapterVersion, PrivacyStop


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

    from coordinator.daemon import CoordinatorDaemon
    from durable.daemon_logging import use_info_logging
    from durable.state_lock import StateLockedError
    from edge_runtime.wire import TransportError

    config = _load_config(config_path)
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


@coordinator_group.command("devices")
@CONFIG_OPTION
def devices_command(config_path: Path) -> None:
    """List enrolled devices: school, profile, enrollment and revocation."""
    from device_profiles.architecture import architectures_disagree
    from device_profiles.profile import profile_from_toml_text

    store = _open_store(config_path)
    devices = store.devices()
    if not devices:
        click.echo(
            "no devices enrolled yet; issue a token with `schoolfl coordinator enroll-token`"
        )
    for device in devices:
        profile = profile_from_toml_text(device.profile_toml)
        state = f"revoked {_when(device.revoked_at)}" if device.revoked else "active"
        # The machine the agent reported; "?" for agents that predate the field.
        machine = device.machine or "?"
        if architectures_disagree(profile.hardware.architecture, device.machine):
            machine += f" (profile says {profile.hardware.architecture}!)"
        click.echo(
            f"{device.device_id:24} {device.school:16} {profile.name:20} {machine:8} "
            f"enrolled {_when(device.enrolled_at)}  {state}"
        )
    store.close()


@coordinator_group.command("rounds")
@CONFIG_OPTION
@click.option("--task", "task_id", default=None, help="Only this task.")
def rounds_command(config_path: Path, task_id: str | None) -> None:
    """List rounds with their state, updates, reason and metrics."""
    store = _open_store(config_path)
    records = store.rounds(task_id)
    if not records:
        click.echo("no rounds yet")
    for record in records:
        updates = len(store.updates(record.task_id, record.round_number))
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(record.metrics.items()))
        click.echo(
            f"{record.task_id} round {record.round_number}: {record.state.value:9} "
            f"updates={updates} {record.reason or ''} {metrics}".rstrip()
        )
    for task in _load_config(config_path).tasks:
        stop = store.privacy_stop(task.id)
        if (task_id is None or task.id == task_id) and _stop_holds(task, stop):
            click.echo(f"{task.id} stopped: {stop.reason}")  # type: ignore[union-attr]
    store.close()


def _stop_holds(task: TaskConfig, stop: PrivacyStop | None) -> bool:
    from coordinator.privacy import stop_holds

    return stop_holds(task, stop)


@coordinator_group.command("status")
@CONFIG_OPTION
def status_command(config_path: Path) -> None:
    """Tasks, their current versions and open rounds, and refused messages."""
    from coordinator.store import RoundState

    config = _load_config(config_path)
    store = _open_store(config_path)
    click.echo(
        f"fleet {config.coordinator.fleet}, broker {config.broker.url}, "
        f"{len(store.devices())} device(s) enrolled"
    )
    for task in config.tasks:
        rounds = store.rounds(task.id)
        completed = sum(1 for r in rounds if r.state is RoundState.COMPLETED)
        latest = store.latest_adapter_version(task.id)
        version = f"v{latest.version} {latest.sha256[:12]}" if latest else "none"
        open_rounds = [r.round_number for r in rounds if r.state is RoundState.OPEN]
        click.echo(
            f"task {task.id}: {completed}/{task.rounds} rounds completed, adapter "
            f"{version}, open rounds {open_rounds or 'none'}"
        )
        if task.privacy.mode != "off":
            ledger = store.privacy_rounds(task.id)
            spent = ledger[-1].epsilon if ledger else 0.0
            click.echo(
                f"  privacy ({task.privacy.mode} DP): epsilon {spent:.4g} of budget "
                f"{task.privacy.epsilon_budget:g} at delta {task.privacy.delta:g}"
            )
            stop = store.privacy_stop(task.id)
            if _stop_holds(task, stop):
                click.echo(f"  stopped: {stop.reason}")  # type: ignore[union-attr]
    counts = store.rejection_counts()
    click.echo("refused messages: " + (", ".join(f"{k}={v}" for k, v in counts.items()) or "none"))
    for refused in store.refusals(5):  # per device and category, latest first
        click.echo(
            f"  {_when(refused.last_at)} {refused.device_id or '?'} {refused.category} "
            f"x{refused.count}: {refused.last_reason}"
        )
    store.close()


@coordinator_group.command("privacy-report")
@CONFIG_OPTION
@click.argument("task_id")
def privacy_report_command(config_path: Path, task_id: str) -> None:
    """Per completed round of TASK_ID: participants, clipping bound, noise multiplier,
    cumulative (epsilon, delta), secure aggregation on/off."""
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
    ledger = store.privacy_rounds(task_id)
    stop = store.privacy_stop(task_id)
    store.close()
    click.echo(
        f"task {task_id}: {task.privacy.mode} DP, budget epsilon "
        f"{task.privacy.epsilon_budget:g} at delta {task.privacy.delta:g}"
    )
    if not ledger:
        click.echo("no completed rounds yet: epsilon 0")
    else:
        click.echo(
            f"{'round':>5} {'devices':>7} {'eligible':>8} {'q':>6} {'clip':>8} {'noise z':>7} "
            f"{'epsilon':>9} {'delta':>8} secure-agg"
        )
    for entry in ledger:
        click.echo(
            f"{entry.round_number:>5} {entry.participants:>7} {entry.eligible_devices:>8} "
            f"{entry.sampling_probability:>6.3f} {entry.clip_norm:>8.4g} "
            f"{entry.noise_multiplier:>7.4g} {entry.epsilon:>9.4f} {entry.delta:>8.1e} "
            f"{'on' if entry.secure_aggregation else 'off'}"
        )
    if _stop_holds(task, stop):
        click.echo(f"stopped: {stop.reason}")  # type: ignore[union-attr]


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


def _register_broker_commands() -> None:
    """`broker-config` and `add-device` live in coordinator/broker_cli.py."""
    from coordinator.broker_cli import add_device_command, broker_config_command

    coordinator_group.add_command(broker_config_command)
    coordinator_group.add_command(add_device_command)


_register_simulate()
_register_broker_commands()
