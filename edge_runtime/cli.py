"""`schoolfl agent ...`: what school IT runs on each device.

Every command takes `--config agent.toml` (default: ./agent.toml). See docs/agent.md.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import click

from edge_runtime.agent_config import AgentConfig, AgentConfigError, AgentSettings
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
            broker=BrokerSettings(url=broker_url, username=username, password_file=password_file),
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
    """Show enrollment, the outbox and the last rounds of this device."""
    from edge_runtime.enrollment_record import ENROLLMENT_FILE
    from edge_runtime.outbox import Outbox, RoundHistory

    config = _load(config_path)
    click.echo(
        f"device {config.agent.device_id} (school {config.agent.school}, "
        f"fleet {config.agent.fleet}), broker {config.broker.url}"
    )
    enrollment_path = config.state_dir / ENROLLMENT_FILE
    click.echo("enrolled: " + ("yes" if enrollment_path.is_file() else "no (run agent enroll)"))
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


SYSTEMD_UNIT = """[Unit]
Description=schoolfl edge agent ({device_id})
Documentation=file://{docs}
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={executable} agent run --config {config}
Restart=on-failure
RestartSec=10
Nice=10
IOSchedulingClass=idle
WorkingDirectory={state_dir}
ReadWritePaths={state_dir}
NoNewPrivileges=true
ProtectSystem=full
PrivateTmp=true

[Install]
WantedBy=multi-user.target
"""


@agent_group.command("install-service")
@CONFIG_OPTION
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=Path("/etc/systemd/system/schoolfl-agent.service"),
    show_default=True,
    help="Where to write the unit file.",
)
def install_service_command(config_path: Path, output: Path) -> None:
    """Write a systemd unit that runs the agent at boot (checked with systemd-analyze)."""
    from durable.atomic_files import atomic_write_text

    config = _load(config_path)
    executable = shutil.which("schoolfl") or f"{sys.executable} -m schoolfl"
    unit = SYSTEMD_UNIT.format(
        device_id=config.agent.device_id,
        docs=Path(__file__).resolve().parents[1] / "docs" / "agent.md",
        executable=executable,
        config=config_path.resolve(),
        state_dir=config.state_dir,
    )
    atomic_write_text(output, unit)
    click.echo(f"wrote {output}")
    analyzer = shutil.which("systemd-analyze")
    if analyzer:
        result = subprocess.run([analyzer, "verify", str(output)], capture_output=True, text=True)
        problems = (result.stdout + result.stderr).strip()
        click.echo("systemd-analyze verify: " + ("ok" if result.returncode == 0 else problems))
    click.echo(f"enable it with: systemctl daemon-reload && systemctl enable --now {output.name}")


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
