"""The systemd unit that runs the agent at boot: a dedicated user and a sandbox that fits a
training process.

Why a static `User=schoolfl` rather than `DynamicUser=yes`: the agent's key, outbox and
adapters must survive restarts (StateDirectory= keeps them either way), but school IT also
hands the agent files it did not create: the broker password file (mode 0600), the data
folder, on a Jetson the GPU's device files through the `video` group. A static user is one
they can `chown` those to and add to a group; a dynamic UID changes from boot to boot and
can be given neither.

Left out of the sandbox, and why:
- MemoryDenyWriteExecute=: PyTorch's CPU kernels (oneDNN) and triton generate machine code
  at run time in writable, executable pages; with it, they fail.
- ProcSubset=pid: eligibility reads /proc/stat and /proc/meminfo (CPU load, free memory).
- PrivateNetwork= / IPAddressDeny=: the agent must reach the broker.
- SystemCallFilter=~@resources: oneDNN and OpenMP set memory policy and CPU affinity.
- PrivateDevices= and PrivateUsers= when a GPU is configured: CUDA needs /dev/nvidia* (a
  Jetson /dev/nvmap, /dev/nvhost-*), opened through the `video`/`render` groups, which a
  private user namespace does not map.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SERVICE_USER = "schoolfl"
STATE_ROOT = Path("/var/lib/schoolfl")
"""StateDirectory=schoolfl: systemd creates it, owned by the service user, mode 0700."""
DEFAULT_UNIT_PATH = Path("/etc/systemd/system/schoolfl-agent.service")
MAX_EXPOSURE = 4.5
"""`systemd-analyze security` exposure the generated unit stays under (0 = locked down)."""
HIDDEN_ROOTS = {
    Path("/tmp"): "PrivateTmp=yes gives the service its own empty /tmp",
    Path("/var/tmp"): "PrivateTmp=yes gives the service its own empty /var/tmp",
    Path("/home"): "ProtectHome=yes hides /home from the service",
    Path("/root"): "ProtectHome=yes hides /root from the service",
    Path("/run/user"): "ProtectHome=yes hides /run/user from the service",
}
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvmap")
"""Either exists where a CUDA GPU (discrete or Jetson) is present."""

_SANDBOX = """\
UMask=0077
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
PrivateMounts=yes
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM
"""

_CPU_DEVICES = """\
PrivateDevices=yes
PrivateUsers=yes
"""

_GPU_DEVICES = """\
# CUDA: a discrete GPU's /dev/nvidia*, a Jetson's /dev/nvmap and /dev/nvhost-*.
DevicePolicy=closed
DeviceAllow=char-nvidia* rw
DeviceAllow=char-nvhost* rw
DeviceAllow=char-nvmap rw
DeviceAllow=char-nvgpu* rw
SupplementaryGroups=video render
"""

UNIT_TEMPLATE = """\
[Unit]
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
User={user}
Group={user}
StateDirectory=schoolfl
StateDirectoryMode=0700
CacheDirectory=schoolfl
WorkingDirectory={state_root}
# Model downloads and compiled-kernel caches go where the sandbox lets the agent write.
Environment=HOME={state_root}
Environment=HF_HOME={state_root}/huggingface
Environment=XDG_CACHE_HOME=/var/cache/schoolfl
{read_write_paths}{sandbox}{devices}
[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True)
class ServicePaths:
    """What the unit points at; each is checked against what the sandbox hides."""

    executable: str
    """The `schoolfl` command (or `python -m schoolfl`) as ExecStart runs it."""
    config: Path
    state_dir: Path
    data_dir: Path
    environment: Path
    """The Python environment (virtualenv) the executable lives in."""
    password_file: Path | None = None
    ca_file: Path | None = None


def _is_under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def render_unit(device_id: str, paths: ServicePaths, gpu: bool, docs: Path) -> str:
    """The unit text. A state_dir outside /var/lib/schoolfl stays writable through
    ReadWritePaths= (ProtectSystem=strict makes the rest of the file system read-only)."""
    state_dir = Path(paths.state_dir)
    read_write = "" if _is_under(state_dir, STATE_ROOT) else f"ReadWritePaths={state_dir}\n"
    return UNIT_TEMPLATE.format(
        device_id=device_id,
        docs=docs,
        executable=paths.executable,
        config=paths.config,
        user=SERVICE_USER,
        state_root=STATE_ROOT,
        read_write_paths=read_write,
        sandbox=_SANDBOX,
        devices=_GPU_DEVICES if gpu else _CPU_DEVICES,
    )


def sandbox_warnings(paths: ServicePaths) -> list[str]:
    """One line per path the service would not see, or not be able to write."""
    named = {  # what, where it is, where it belongs instead
        "the config": (paths.config, "/etc/schoolfl/agent.toml"),
        "state_dir": (paths.state_dir, f"{STATE_ROOT}/agent"),
        "data_dir": (paths.data_dir, f"{STATE_ROOT}/data"),
        "the Python environment": (paths.environment, "/opt/schoolfl"),
        "the broker password_file": (paths.password_file, "/etc/schoolfl/broker-password"),
        "the broker ca_file": (paths.ca_file, "/etc/schoolfl/ca.pem"),
    }
    warnings = []
    for what, (path, better) in named.items():
        if path is None:
            continue
        for root, reason in HIDDEN_ROOTS.items():
            if _is_under(Path(path), root):
                warnings.append(
                    f"{what} {path} is under {root}: {reason}, so the agent will not find "
                    f"it; move it to {better}"
                )
                break
    if not _is_under(Path(paths.state_dir), STATE_ROOT) and not any(
        "state_dir" in warning for warning in warnings
    ):
        warnings.append(
            f"state_dir {paths.state_dir} is outside {STATE_ROOT}: the unit makes it writable "
            f"with ReadWritePaths=, but {STATE_ROOT}/agent is where systemd keeps it owned by "
            f"the {SERVICE_USER} user (schoolfl agent init --state-dir {STATE_ROOT}/agent)"
        )
    return warnings


def setup_commands(unit_path: Path, paths: ServicePaths, gpu: bool) -> list[str]:
    """The shell commands that make the unit work: the user, file ownership, enabling."""
    commands = [
        f"useradd --system --home-dir {STATE_ROOT} --no-create-home "
        f"--shell /usr/sbin/nologin {SERVICE_USER}",
    ]
    if gpu:
        commands.append(f"usermod -aG video,render {SERVICE_USER}")
    owned = [p for p in (paths.state_dir, paths.data_dir) if not _is_under(Path(p), STATE_ROOT)]
    if _is_under(Path(paths.state_dir), STATE_ROOT) or _is_under(Path(paths.data_dir), STATE_ROOT):
        owned.insert(0, STATE_ROOT)
    commands.append(f"chown -R {SERVICE_USER}:{SERVICE_USER} " + " ".join(map(str, owned)))
    if paths.password_file is not None:
        commands.append(f"chown {SERVICE_USER} {paths.password_file}")
    commands.append(f"chgrp {SERVICE_USER} {paths.config} && chmod 0640 {paths.config}")
    commands.append(f"systemctl daemon-reload && systemctl enable --now {unit_path.name}")
    commands.append(f"journalctl -u {unit_path.name} -f   # follow the agent's log")
    return commands


def gpu_present() -> bool:
    return any(Path(device).exists() for device in GPU_DEVICE_FILES)


_EXPOSURE = re.compile(r"Overall exposure level for \S+: ([0-9]+(?:\.[0-9]+)?)")


def exposure_score(unit_path: Path) -> float | None:
    """`systemd-analyze security --offline=yes` of a unit file; None where that tool is
    absent or too old for offline analysis (systemd < 250)."""
    analyzer = shutil.which("systemd-analyze")
    if analyzer is None:
        return None
    result = subprocess.run(
        [analyzer, "security", "--offline=yes", "--no-pager", str(unit_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = _EXPOSURE.search(result.stdout + result.stderr)
    return float(match.group(1)) if match else None


def verify_unit(unit_path: Path) -> str | None:
    """`systemd-analyze verify`'s complaints ("" when clean); None without the tool."""
    analyzer = shutil.which("systemd-analyze")
    if analyzer is None:
        return None
    result = subprocess.run(
        [analyzer, "verify", str(unit_path)], capture_output=True, text=True, check=False
    )
    return "" if result.returncode == 0 else (result.stdout + result.stderr).strip()
