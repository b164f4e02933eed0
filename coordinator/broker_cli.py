"""`schoolfl coordinator broker-config` and `add-device`: the broker's users and roles.

Why a module of its own: the broker setup (docs/coordinator.md, "broker-config") is one
flow with its own options; coordinator/cli.py registers these commands. `revoke` stays with
the other store operations there and uses `broker_admin_client` from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from coordinator.broker_admin import BrokerAdminClient
    from coordinator.config import CoordinatorConfig
    from coordinator.store import DeviceRecord

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=Path("coordinator.toml"),
    show_default=True,
    help="The coordinator's configuration file.",
)
"""The same option as the other coordinator commands'."""


@click.command("broker-config")
@click.option("--fleet", required=True, help="Fleet name (the second topic level).")
@click.option(
    "--device",
    "device_ids",
    multiple=True,
    help="A device id (repeatable); it becomes the device's MQTT username. Devices can "
    "also be added later with `add-device`.",
)
@click.option(
    "--devices-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A text file with one device id per line (# starts a comment).",
)
@click.option(
    "--output",
    "output_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for mosquitto.conf, dynamic-security.json and credentials.json.",
)
@click.option("--coordinator-user", default="coordinator", show_default=True)
@click.option(
    "--admin-user",
    default="schoolfl-admin",
    show_default=True,
    help="Broker user of `add-device` and `revoke` ([broker_admin] in coordinator.toml).",
)
@click.option("--port", default=8883, show_default=True, help="Listener port.")
@click.option("--tls-cert", default="/etc/mosquitto/certs/server.crt", show_default=True)
@click.option("--tls-key", default="/etc/mosquitto/certs/server.key", show_default=True)
@click.option("--tls-ca", default=None, help="CA file for client certificates (optional).")
@click.option("--no-tls", is_flag=True, help="Plain TCP listener (lab use only).")
@click.option("--persistence-location", default="/var/lib/mosquitto/", show_default=True)
@click.option(
    "--install-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where dynamic-security.json will live on the broker host, in a folder the "
    "mosquitto user can write (default: --output).",
)
@click.option(
    "--dynsec-plugin",
    default=None,
    help="Path of mosquitto_dynamic_security.so on the broker host (default: found here).",
)
@click.option(
    "--max-queued-bytes",
    type=int,
    default=None,
    show_default="64 MiB",
    help="Bytes the broker queues per client while it is away.",
)
@click.option(
    "--max-queued-messages",
    type=int,
    default=None,
    show_default="10000",
    help="Messages the broker queues per client while it is away.",
)
@click.option(
    "--session-expiration",
    default=None,
    show_default="14d",
    help="Drop the session of a client away for longer (a number and h, d, w, m or y).",
)
@click.option(
    "--keep-passwords",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="An earlier credentials.json whose passwords are kept (no device needs a new one).",
)
def broker_config_command(
    fleet: str,
    device_ids: tuple[str, ...],
    devices_file: Path | None,
    output_dir: Path,
    coordinator_user: str,
    admin_user: str,
    port: int,
    tls_cert: str,
    tls_key: str,
    tls_ca: str | None,
    no_tls: bool,
    persistence_location: str,
    install_dir: Path | None,
    dynsec_plugin: str | None,
    max_queued_bytes: int | None,
    max_queued_messages: int | None,
    session_expiration: str | None,
    keep_passwords: Path | None,
) -> None:
    """Write a Mosquitto config with dynamic security: coordinator, admin and device users."""
    from coordinator.broker_config import (
        BrokerConfigError,
        BrokerConfigRequest,
        load_credentials,
        write_broker_config,
    )
    from coordinator.broker_install import install_steps, own_in_place

    ids = list(device_ids)
    if devices_file is not None:
        for line in devices_file.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                ids.append(line)
    limits = {
        key: value
        for key, value in (
            ("max_queued_bytes", max_queued_bytes),
            ("max_queued_messages", max_queued_messages),
            ("session_expiration", session_expiration),
        )
        if value is not None
    }
    request = BrokerConfigRequest(
        fleet=fleet,
        device_ids=tuple(ids),
        output_dir=output_dir,
        coordinator_user=coordinator_user,
        admin_user=admin_user,
        port=port,
        tls_certfile=None if no_tls else tls_cert,
        tls_keyfile=None if no_tls else tls_key,
        tls_cafile=None if no_tls else tls_ca,
        persistence_location=persistence_location,
        install_dir=install_dir,
        dynsec_plugin=dynsec_plugin,
        **limits,  # type: ignore[arg-type]
    )
    try:
        kept = load_credentials(keep_passwords) if keep_passwords is not None else None
        files = write_broker_config(request, kept)
    except BrokerConfigError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"wrote {files.config_path}")
    click.echo(
        f"wrote {files.dynamic_security_path} ({coordinator_user}, {admin_user} and "
        f"{len(ids)} device(s)); install it once, the broker keeps it up to date"
    )
    click.echo(
        f"wrote {files.credentials_path} (mode 0600): put the {coordinator_user} and "
        f"{admin_user} passwords in the coordinator's password files, hand each device its "
        "own, then delete this file"
    )
    if not ids:
        click.echo("no devices yet: add each with `schoolfl coordinator add-device DEVICE`")
    if own_in_place(request, files):
        click.echo(
            f"gave {files.dynamic_security_path} to the mosquitto user (mode 0600): the "
            "broker reads and rewrites it after dropping root"
        )
    click.echo(
        "on the broker host (Debian/Ubuntu's mosquitto starts as root, then runs as user "
        "mosquitto, which must read these files), as root:"
    )
    for step in install_steps(request, files):
        click.echo(f"  {step.command()}")
    click.echo("  systemctl restart mosquitto")


def broker_admin_client(config: CoordinatorConfig) -> BrokerAdminClient:
    """The command line's admin connection; a usage error without [broker_admin]."""
    from coordinator.broker_admin import BrokerAdminClient

    if config.broker_admin is None:
        raise click.ClickException(
            "coordinator.toml has no [broker_admin] table: set username and password_file "
            "of the admin user `schoolfl coordinator broker-config` created"
        )
    return BrokerAdminClient(config.broker, config.broker_admin)


def _device_record(config: CoordinatorConfig, device_id: str) -> DeviceRecord | None:
    """The store's record of DEVICE_ID, None without one (or before the first `serve`)."""
    from coordinator.store import CoordinatorStore

    path = config.state_dir / "coordinator.db"
    if not path.exists():
        return None
    store = CoordinatorStore(path)
    try:
        return store.device(device_id)
    finally:
        store.close()


@click.command("add-device")
@CONFIG_OPTION
@click.argument("device_id")
@click.option(
    "--password-file",
    "password_out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the device's broker password to this file (mode 0600) instead of printing it.",
)
@click.option(
    "--new-password",
    is_flag=True,
    help="DEVICE_ID already has a broker client: give it a new password instead.",
)
def add_device_command(
    config_path: Path, device_id: str, password_out: Path | None, new_password: bool
) -> None:
    """Give DEVICE_ID a broker client at once (its own topics only) and its password."""
    from coordinator.broker_admin import BrokerAdminError
    from coordinator.broker_config import new_password as random_password
    from coordinator.cli import _load_config, _when
    from durable.atomic_files import atomic_write_text
    from edge_runtime.wire import TransportError, check_identifier

    config = _load_config(config_path)
    try:
        check_identifier("device_id", device_id)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    client = broker_admin_client(config)
    record = _device_record(config, device_id)
    if record is not None and record.revoked:
        raise click.ClickException(
            f"{device_id} was revoked ({_when(record.revoked_at)}) and stays off the broker "
            "(the coordinator removes it again); enroll the replacement under a new device id"
        )
    password = random_password()
    try:
        if new_password:
            client.set_password(device_id, password)
        else:
            client.add_device(config.coordinator.fleet, device_id, password)
    except (BrokerAdminError, TransportError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    done = "new broker password for" if new_password else "broker client created for"
    if password_out is not None:
        atomic_write_text(password_out, password + "\n", 0o600)
        click.echo(f"{done} {device_id}; its password is in {password_out} (mode 0600)")
    else:
        click.echo(f"{done} {device_id}; its broker password: {password}")
    if not new_password:
        click.echo(
            "next: `schoolfl coordinator enroll-token --school SCHOOL`, and give school IT "
            "both (the password goes in the agent's [broker] password_file)"
        )
