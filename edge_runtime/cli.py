"""`schoolfl agent ...`: what school IT runs on each device.

Every command takes `--config agent.toml` (default: ./agent.toml). See docs/agent.md.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import sys
from pathlib import Path

import click

from edge_runtime.agent_config import AgentConfig, AgentConfigError, AgentSettings, check_ca_file
from edge_runtime.systemd_unit import (
    DEFAULT_UNIT_PATH,
    ServicePaths,
    exposure_score,
    gpu_present,
    render_unit,
    sandbox_warnings,
    setup_commands,
    verify_unit,
)
from edge_runtime.wire import BrokerSettings

logger = logging.getLogger(__name__)

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=Path("agent.toml"),
    show_default=True,
    help="The agent's configuration file.",
)


def _load(config_path: Path) -> AgentConfig:
    try:
        return AgentConfig.load(config_path)
    except AgentConfigError as error:
        raise click.ClickException(str(error)) from None


def init_tls_settings(
    broker_url: str, ca_file: Path | None, tls_insecure: bool
) -> dict[str, object]:
    """The [broker] TLS keys `agent init` writes; the CA is checked now, not at first
    connect, so a wrong file is named while school IT is still at the keyboard."""
    if (ca_file is not None or tls_insecure) and not broker_url.startswith("mqtts://"):
        raise AgentConfigError(
            f"--ca-file and --tls-insecure need an mqtts:// broker URL, got {broker_url!r}"
        )
    settings: dict[str, object] = {"tls_insecure": tls_insecure}
    if ca_file is not None:
        settings["ca_file"] = str(check_ca_file(ca_file))
    return settings


@click.group("agent")
def agent_group() -> None:
    """Install, enroll and run the edge agent on a school device.

    The agent fine-tunes LoRA adapters on local data that never leaves the device and
    reports adapter updates to the coordinator over MQTT.
    """


@agent_group.command("init")
@CONFIG_OPTION
@click.option("--fleet", required=True, help="The coordinator's fleet name.")
@click.option("--device-id", required=True, help="Unique id of this device (also its broker user).")
@click.option("--school", required=True, help="The school this device belongs to.")
@click.option(
    "--broker",
    "broker_url",
    default="mqtt://127.0.0.1:1883",
    show_default=True,
    help="Broker URL: mqtt://HOST:PORT or mqtts://HOST:PORT.",
)
@click.option("--username", default=None, help="Broker username (usually the device id).")
@click.option("--password-file", default=None, help="File holding the broker password.")
@click.option(
    "--ca-file",
    type=click.Path(path_type=Path),
    default=None,
    help="PEM CA that signed the broker's certificate (a private CA); needs an mqtts:// URL.",
)
@click.option(
    "--tls-insecure",
    is_flag=True,
    help="Skip the TLS hostname check (a lab broker whose certificate names another host).",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=Path("schoolfl-agent"),
    show_default=True,
    help="Keys, outbox and adapters.",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=Path("schoolfl-data"),
    show_default=True,
    help="Local training data: <task>.jsonl/.csv/.txt.",
)
@click.option(
    "--profile",
    default="laptop-mid-16gb",
    show_default=True,
    help="Reference profile name (schoolfl profile list) or a measured profile file.",
)
@click.option(
    "--threads",
    default=0,
    show_default=True,
    help="Training threads; 0 = torch's default (all cores).",
)
@click.option(
    "--device",
    "compute_device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to train: a CUDA GPU when torch finds one (auto), the CPU, or the GPU only.",
)
@click.option("--task", "tasks", multiple=True, help="A task this device may join (repeatable).")
@click.option("--force", is_flag=True, help="Overwrite an existing config file.")
def init_command(
    config_path: Path,
    fleet: str,
    device_id: str,
    school: str,
    broker_url: str,
    username: str | None,
    password_file: str | None,
    ca_file: Path | None,
    tls_insecure: bool,
    state_dir: Path,
    data_dir: Path,
    profile: str,
    threads: int,
    compute_device: str,
    tasks: tuple[str, ...],
    force: bool,
) -> None:
    """Write agent.toml and create this device's Ed25519 key."""
    from device_profiles.profile import find_profile
    from edge_runtime.wire import generate_private_key, public_key_hex, save_private_key

    if config_path.exists() and not force:
        raise click.ClickException(f"{config_path} exists; pass --force to overwrite it")
    try:
        find_profile(profile)
        tls_settings = init_tls_settings(broker_url, ca_file, tls_insecure)
        config = AgentConfig(
            agent=AgentSettings(
                fleet=fleet,
                device_id=device_id,
                school=school,
                state_dir=str(state_dir.resolve()),
                data_dir=str(data_dir.resolve()),
                profile=profile,
                threads=threads,
                tasks=tasks,
                device=compute_device,
            ),
            broker=BrokerSettings(
                url=broker_url, username=username, password_file=password_file, **tls_settings
            ),
        )
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    config.save(config_path)
    if config.key_path.exists():
        click.echo(f"kept the existing device key {config.key_path}")
    else:
        key = generate_private_key()
        save_private_key(key, config.key_path)
        click.echo(f"created device key {config.key_path} (public {public_key_hex(key)[:16]}...)")
    Path(config.agent.data_dir).mkdir(parents=True, exist_ok=True)
    click.echo(f"wrote {config_path}; next: schoolfl agent enroll --config {config_path} --token T")


@agent_group.command("enroll")
@CONFIG_OPTION
@click.option(
    "--token", required=True, help="One-time token from `schoolfl coordinator enroll-token`."
)
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for the answer.")
def enroll_command(config_path: Path, token: str, timeout: float) -> None:
    """Register this device's key with the coordinator."""
    from edge_runtime.enrollment import EnrollmentError, enroll_device
    from edge_runtime.wire import TransportError

    config = _load(config_path)
    try:
        enrollment = enroll_device(config, token, timeout)
    except (EnrollmentError, TransportError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(
        f"enrolled {enrollment.device_id} in fleet {enrollment.fleet}; "
        f"coordinator key {enrollment.coordinator_public_key[:16]}..."
    )


@agent_group.command("run")
@CONFIG_OPTION
def run_command(config_path: Path) -> None:
    """Run the agent in the foreground until SIGTERM or Ctrl-C."""
    from durable.daemon_logging import use_info_logging
    from durable.state_lock import StateLockedError
    from edge_runtime.agent import AgentDaemon
    from edge_runtime.enrollment_record import AgentError
    from edge_runtime.wire import TransportError

    config = _load(config_path)
    use_info_logging()
    try:
        daemon = AgentDaemon(config)
    except (AgentError, ValueError, StateLockedError) as error:
        raise click.ClickException(str(error)) from None

    def request_stop(signum: int, frame: object) -> None:
        daemon.stop_requested.set()  # only set a flag; the loop acts on it

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        daemon.start()
    except TransportError as error:
        raise click.ClickException(str(error)) from None
    try:
        daemon.run()
    finally:
        daemon.stop()


@agent_group.command("status")
@CONFIG_OPTION
def status_command(config_path: Path) -> None:
    """Show enrollment, eligibility, what the agent is doing, the outbox and the last rounds."""
    import time

    from edge_runtime.activity import describe_activity, read_activity
    from edge_runtime.enrollment_record import ENROLLMENT_FILE
    from edge_runtime.outbox import Outbox, RoundHistory

    config = _load(config_path)
    click.echo(
        f"device {config.agent.device_id} (school {config.agent.school}, "
        f"fleet {config.agent.fleet}), broker {config.broker.url}"
    )
    enrollment_path = config.state_dir / ENROLLMENT_FILE
    click.echo("enrolled: " + ("yes" if enrollment_path.is_file() else "no (run agent enroll)"))
    for line in describe_activity(read_activity(config.state_dir), time.time()):
        click.echo(line)
    if not config.outbox_path.exists():
        click.echo("no rounds yet")
        return
    outbox = Outbox(config.outbox_path)
    history = RoundHistory(config.outbox_path)
    pending = outbox.pending()
    click.echo(f"outbox: {len(pending)} update(s) waiting for acknowledgement")
    for item in pending:
        click.echo(f"  {item.update_id} ({len(item.frame)} bytes, sent {item.attempts}x)")
    click.echo("last rounds:")
    for entry in history.latest():
        click.echo(f"  {entry.task_id} round {entry.round_number}: {entry.outcome} {entry.detail}")
    outbox.close()
    history.close()


def _service_paths(config: AgentConfig, config_path: Path) -> ServicePaths:
    command = shutil.which("schoolfl")
    executable = command or f"{sys.executable} -m schoolfl"
    broker = config.broker
    return ServicePaths(
        executable=executable,
        config=config_path.resolve(),
        state_dir=config.state_dir.resolve(),
        data_dir=Path(config.agent.data_dir).expanduser().resolve(),
        environment=Path(sys.prefix),
        password_file=Path(broker.password_file).resolve() if broker.password_file else None,
        ca_file=Path(broker.ca_file).resolve() if broker.ca_file else None,
    )


def _asks_first(path: Path) -> bool:
    resolved = path.resolve()
    return resolved == Path("/etc") or Path("/etc") in resolved.parents


@agent_group.command("install-service")
@CONFIG_OPTION
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the unit to FILE instead of printing it (a path under /etc asks first).",
)
@click.option(
    "--install",
    is_flag=True,
    help=f"Write the unit to {DEFAULT_UNIT_PATH} (asks first; --yes does not).",
)
@click.option("--yes", is_flag=True, help="Write under /etc without asking.")
@click.option(
    "--gpu/--no-gpu",
    default=None,
    help="Let the service open the CUDA GPU's device files. Default: when [agent] device is "
    "cuda, or auto on a machine with /dev/nvidiactl or /dev/nvmap.",
)
def install_service_command(
    config_path: Path, output: Path | None, install: bool, yes: bool, gpu: bool | None
) -> None:
    """Print a hardened systemd unit that runs the agent at boot as the user schoolfl.

    Nothing is written unless --output or --install says where; under /etc it asks first.
    The unit goes to stdout, warnings and the setup commands to stderr."""
    from durable.atomic_files import atomic_write_text

    config = _load(config_path)
    if install:
        if output is not None and output != DEFAULT_UNIT_PATH:
            raise click.ClickException("give --install or --output FILE, not both")
        output = DEFAULT_UNIT_PATH
    paths = _service_paths(config, config_path)
    if gpu is None:
        device = config.agent.device
        gpu = device == "cuda" or (device == "auto" and gpu_present())
    docs = Path(__file__).resolve().parents[1] / "docs" / "agent.md"
    unit = render_unit(config.agent.device_id, paths, gpu, docs)
    for warning in sandbox_warnings(paths):
        click.echo(f"warning: {warning}", err=True)
    unit_path = output or DEFAULT_UNIT_PATH
    if output is None:
        click.echo(unit, nl=False)
        click.echo(
            f"# not written; save it with --output FILE, or --install ({DEFAULT_UNIT_PATH})",
            err=True,
        )
    else:
        if _asks_first(output) and not yes:
            click.confirm(f"write {output}?", default=False, abort=True, err=True)
        atomic_write_text(output, unit)
        output.chmod(0o644)
        click.echo(f"wrote {output}", err=True)
        problems = verify_unit(output)
        if problems is not None:
            click.echo("systemd-analyze verify: " + (problems or "ok"), err=True)
        score = exposure_score(output)
        if score is not None:
            click.echo(f"systemd-analyze security exposure: {score:.1f}", err=True)
    click.echo("then, as root:", err=True)
    for command in setup_commands(unit_path, paths, gpu):
        click.echo(f"  {command}", err=True)


@agent_group.command("predict")
@CONFIG_OPTION
@click.option("--task", "task_id", required=True, help="Which task's model to use.")
@click.argument("texts", nargs=-1, required=True)
def predict_command(config_path: Path, task_id: str, texts: tuple[str, ...]) -> None:
    """Run this device's copy of a task's model on TEXTS."""
    import torch

    from edge_runtime.assignment_models import task_model_spec
    from edge_runtime.wire import TaskSpec
    from quantization.adapters import load_adapter
    from quantization.task_model import build_task_model

    config = _load(config_path)
    meta_path = config.state_dir / "adapters" / f"{task_id}.json"
    if not meta_path.is_file():
        raise click.ClickException(
            f"no model for task {task_id!r} on this device yet (it has not trained a round)"
        )
    meta = json.loads(meta_path.read_text())
    spec = task_model_spec(
        task_id,
        TaskSpec(**{**meta["spec"], "labels": tuple(meta["spec"]["labels"])}),
        meta["scheme"],
        meta["rank"],
    )
    model, tokenizer = build_task_model(spec)
    load_adapter(model, config.state_dir / "adapters" / task_id)
    model.eval()
    with torch.no_grad():
        if spec.kind == "classification":
            batch = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
            probabilities = model(**batch).logits.softmax(-1)
            for text, row in zip(texts, probabilities, strict=True):
                best = int(row.argmax())
                click.echo(f"{spec.labels[best]}\t{float(row[best]):.2f}\t{text}")
        else:
            for text in texts:
                batch = tokenizer(text, return_tensors="pt")
                output = model.generate(**batch, max_new_tokens=48, do_sample=False)
                click.echo(
                    tokenizer.decode(
                        output[0][batch["input_ids"].shape[1] :], skip_special_tokens=True
                    )
                )
