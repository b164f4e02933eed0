"""Run a local Mosquitto broker as a child process.

The integration tests, the benchmarks and `schoolfl demo --mosquitto` need a real broker
on a free loopback port that they can stop and restart (fault tests depend on broker
behaviour across restarts: persistent sessions and QoS 1 redelivery). This module writes a
config file, starts `mosquitto -c`, waits until the port accepts connections, and cleans up.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


class MosquittoError(RuntimeError):
    """The broker binary is missing or the broker did not come up."""


def free_loopback_port() -> int:
    """Ask the kernel for a port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_mosquitto() -> str | None:
    """Path of the `mosquitto` binary; Debian installs it in /usr/sbin, often off PATH."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if Path(candidate).is_file():
            return candidate
    return None


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class MosquittoConfig:
    """What the generated `mosquitto.conf` says."""

    workdir: Path
    """Folder for the config, the persistence file and the log."""
    port: int = 0
    """Loopback port; 0 picks a free one at start."""
    host: str = "127.0.0.1"
    persistence: bool = True
    """Keep sessions and queued QoS 1 messages across a restart, as production does."""
    extra_lines: list[str] = field(default_factory=list)
    """Appended verbatim (ACL, password file, TLS listener...)."""
    allow_anonymous: bool = True
    prepared_config: str | None = None
    """A complete mosquitto.conf to run instead of the rendered one (e.g. the production
    config of `broker-config`, adapted to a loopback port). Its listener must be on `port`
    (set it; 0 is not resolved here) and its persistence in `workdir`, or
    `database_path` will not find the file."""

    def render(self) -> str:
        if self.prepared_config is not None:
            return self.prepared_config
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            f"log_dest file {self.workdir / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            # Adapter updates are chunked well below this; it only guards the broker.
            "message_size_limit 0",
            "max_queued_messages 100000",
            *self.extra_lines,
        ]
        if os.geteuid() == 0:
            # Started as root, Mosquitto drops to the `mosquitto` user, which cannot write
            # persistence or logs in a private temp folder: sessions would silently be lost.
            lines.append("user root")
        return "\n".join(lines) + "\n"


class MosquittoProcess:
    """A Mosquitto broker owned by this process: `start`, `stop`, `restart`, `url`."""

    def __init__(self, config: MosquittoConfig, binary: str | None = None) -> None:
        self.config = config
        self.binary = binary or find_mosquitto()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def port(self) -> int:
        return self.config.port

    @property
    def url(self) -> str:
        return f"mqtt://{self.config.host}:{self.config.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_seconds: float = 10.0) -> None:
        """Start the broker and return once its port accepts TCP connections."""
        if self.binary is None:
            raise MosquittoError(
                "mosquitto not found on PATH or in /usr/sbin; install it "
                "(Debian/Ubuntu: apt-get install -y mosquitto)"
            )
        if self.running:
            return
        self.config.workdir.mkdir(parents=True, exist_ok=True)
        if self.config.port == 0:
            if self.config.prepared_config is not None:
                raise MosquittoError("a prepared config names its own port: set config.port")
            self.config.port = free_loopback_port()
        elif _port_accepts(self.config.host, self.config.port):
            raise MosquittoError(
                f"port {self.config.port} on {self.config.host} is already in use; "
                "choose another port or stop what listens there"
            )
        config_path = self.config.workdir / "mosquitto.conf"
        config_path.write_text(self.config.render())
        self._process = subprocess.Popen(
            [self.binary, "-c", str(config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                stderr = (
                    self._process.stderr.read().decode(errors="replace")
                    if (self._process.stderr)
                    else ""
                )
                raise MosquittoError(
                    f"mosquitto exited with code {self._process.returncode} at start: "
                    f"{stderr.strip()} (log: {self.config.workdir / 'mosquitto.log'})"
                )
            if _port_accepts(self.config.host, self.config.port):
                logger.info("mosquitto listening on %s (pid %s)", self.url, self._process.pid)
                return
            time.sleep(0.02)
        self.stop()
        raise MosquittoError(
            f"mosquitto did not accept connections on {self.url} within {timeout_seconds:.0f} s"
        )

    def stop(self, timeout_seconds: float = 10.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after the timeout). Idempotent."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=timeout_seconds)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=timeout_seconds)
        if self._process.stderr:
            self._process.stderr.close()
        logger.info("mosquitto on %s stopped", self.url)
        self._process = None

    def restart(self) -> None:
        """Stop and start again on the same port, keeping persisted sessions."""
        self.stop()
        self.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process is not None else None

    @property
    def database_path(self) -> Path:
        """Mosquitto's persistence file (`mosquitto.db` in the persistence folder)."""
        return self.config.workdir / "mosquitto.db"

    def save_database(self, timeout_seconds: float = 10.0) -> int:
        """Make the broker write its persistence file now (SIGUSR1) and return its size.

        Why: measuring what a client made the broker store (retained messages, queues)
        without waiting for `autosave_interval`. Waits until the file has been replaced."""
        if self._process is None or not self.running:
            raise MosquittoError("the broker is not running")
        path = self.database_path

        def identity() -> tuple[int, int] | None:
            try:
                stat = path.stat()
            except FileNotFoundError:
                return None
            return stat.st_ino, stat.st_mtime_ns

        before = identity()
        self._process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            after = identity()
            if after is not None and after != before:
                return path.stat().st_size
            time.sleep(0.02)
        raise MosquittoError(f"mosquitto did not write {path} within {timeout_seconds:.0f} s")

    def resident_bytes(self) -> int:
        """The broker process's resident memory (VmRSS), Linux only."""
        if self.pid is None:
            raise MosquittoError("the broker is not running")
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise MosquittoError("no VmRSS line in /proc/<pid>/status")

    def log_text(self) -> str:
        log_path = self.config.workdir / "mosquitto.log"
        return log_path.read_text(errors="replace") if log_path.exists() else ""

    def __enter__(self) -> MosquittoProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
