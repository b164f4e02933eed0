"""Putting `broker-config`'s output in place on a Debian/Ubuntu broker host.

Why: Debian's mosquitto service starts as root and drops to the `mosquitto` user before it
loads the dynamic-security plugin and the TLS certificate and key. A root-owned 0600 file
is then unreadable: the plugin logs "Error loading Dynamic security plugin config: File is
not readable" and the broker runs with no users at all (everyone refused), and a root-only
key stops the TLS listener ("Unable to load server certificate"). So each file the broker
reads or rewrites gets an owner and a mode the `mosquitto` user can use, and nothing more:
- dynamic-security.json: mosquitto:mosquitto 0600 (the broker rewrites it on every change,
  and it holds password hashes), in a folder the broker owns (/var/lib/mosquitto);
- the persistence folder: mosquitto:mosquitto 0700;
- the TLS certificate and key: root:mosquitto 0640 (readable by the broker, writable only
  by root);
- mosquitto.conf: root:root 0644, where the service reads it.

`install_steps` lists them; the command prints each as a shell line, and `InstallStep.apply`
does the same here (as root), e.g. for a broker run straight from the output folder.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
from dataclasses import dataclass
from pathlib import Path

from coordinator.broker_config import DYNAMIC_SECURITY_FILE, BrokerConfigFiles, BrokerConfigRequest
from durable.atomic_files import atomic_write_bytes

BROKER_USER = "mosquitto"
"""The user Debian's mosquitto drops to (its `user` option's default)."""
DEBIAN_CONFIG_PATH = Path("/etc/mosquitto/mosquitto.conf")
"""What Debian's mosquitto.service runs: `/usr/sbin/mosquitto -c /etc/mosquitto/mosquitto.conf`."""


@dataclass(frozen=True)
class InstallStep:
    """One file or folder on the broker host: where it goes, whose it is, its mode."""

    destination: Path
    owner: str
    group: str
    mode: int
    source: Path | None = None
    """Copied to `destination`; None: `destination` is already there (owner and mode only)."""
    directory: bool = False
    keep_existing: bool = False
    """Never overwrite: the broker keeps this file up to date once it runs."""

    def command(self) -> str:
        """The step as one shell line for the operator."""
        owner = f"-o {shlex.quote(self.owner)} -g {shlex.quote(self.group)} -m {self.mode:04o}"
        destination = shlex.quote(str(self.destination))
        if self.directory:
            return f"install -d {owner} {destination}"
        if self.source is None:
            return (
                f"chown {shlex.quote(self.owner)}:{shlex.quote(self.group)} {destination} && "
                f"chmod {self.mode:04o} {destination}"
            )
        line = f"install {owner} {shlex.quote(str(self.source))} {destination}"
        return f"[ -e {destination} ] || {line}" if self.keep_existing else line

    def apply(self) -> None:
        """Do the step here (needs root for the owners)."""
        uid = pwd.getpwnam(self.owner).pw_uid
        gid = grp.getgrnam(self.group).gr_gid
        if self.directory:
            self.destination.mkdir(parents=True, exist_ok=True)
        elif self.source is not None and not (self.keep_existing and self.destination.exists()):
            if self.source.resolve() != self.destination.resolve():
                atomic_write_bytes(self.destination, self.source.read_bytes(), self.mode)
        os.chown(self.destination, uid, gid)
        os.chmod(self.destination, self.mode)


def own_in_place(request: BrokerConfigRequest, files: BrokerConfigFiles) -> bool:
    """For a broker run straight from the output folder (no `install_dir`), as root on a
    host with the broker user: give it dynamic-security.json now. True when done."""
    if request.install_dir is not None or os.geteuid() != 0 or not broker_user_exists():
        return False
    InstallStep(files.dynamic_security_path, BROKER_USER, BROKER_USER, 0o600).apply()
    return True


def broker_user_exists() -> bool:
    """This host has the `mosquitto` user (the Debian package creates it)."""
    try:
        pwd.getpwnam(BROKER_USER)
    except KeyError:
        return False
    return True


def install_steps(request: BrokerConfigRequest, files: BrokerConfigFiles) -> list[InstallStep]:
    """What to run on the broker host, in order, for Debian's mosquitto service."""
    broker = BROKER_USER
    output = Path(request.output_dir).resolve()
    install_dir = Path(request.install_dir) if request.install_dir else output
    steps: list[InstallStep] = []
    folders = [Path(request.persistence_location)]
    if install_dir != output:
        folders.insert(0, install_dir)
    for folder in dict.fromkeys(folders):
        steps.append(InstallStep(folder, broker, broker, 0o700, directory=True))
    steps.append(
        InstallStep(
            install_dir / DYNAMIC_SECURITY_FILE,
            broker,
            broker,
            0o600,
            source=None if install_dir == output else files.dynamic_security_path.resolve(),
            keep_existing=True,
        )
    )
    for tls_file in (request.tls_certfile, request.tls_keyfile, request.tls_cafile):
        if tls_file is not None:
            steps.append(InstallStep(Path(tls_file), "root", broker, 0o640))
    steps.append(
        InstallStep(DEBIAN_CONFIG_PATH, "root", "root", 0o644, source=files.config_path.resolve())
    )
    return steps
