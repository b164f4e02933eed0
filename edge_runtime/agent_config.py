"""`agent.toml`: everything school IT sets for one device, validated with clear messages.

`schoolfl agent init` writes it; `schoolfl agent run` reads it. Unknown keys are errors
that name the key (a typo in `min_battery_percent` must not silently keep the default).
"""

from __future__ import annotations

import ssl
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from device_profiles.toml_io import dumps_toml
from durable.atomic_files import atomic_write_text
from durable.config_tables import build_dataclass, read_toml_file
from edge_runtime.eligibility import EligibilityPolicy
from edge_runtime.privacy_policy import PrivacyPolicy
from edge_runtime.wire import BrokerSettings, check_identifier
from quantization.compute_device import DEVICE_SETTINGS


class AgentConfigError(ValueError):
    """agent.toml is missing, unreadable or invalid; the message names file and key."""


DATA_SUFFIXES = (".jsonl", ".csv", ".txt")

_TOML_KINDS: dict[type, str] = {
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    str: "a string",
}


def _matches(kind: type, value: object) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_problem(hint: object, value: object) -> str | None:
    """What `value` (as TOML parsed it) should have been for a field typed `hint`; None
    when it fits. Types TOML cannot spell (a TimeWindow) are left to the table's own
    parser, which turns their strings into objects."""
    arguments = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in arguments:
        if value == "":  # the documented way to leave an optional key empty
            return None
        (hint,) = [argument for argument in arguments if argument is not type(None)]
        arguments = typing.get_args(hint)
    if hint in _TOML_KINDS:
        return None if _matches(hint, value) else _TOML_KINDS[hint]  # type: ignore[arg-type]
    if typing.get_origin(hint) is tuple:
        element = arguments[0] if arguments else object
        if not isinstance(value, (list, tuple)):
            kind = _TOML_KINDS.get(element, "values")
            return f"a list of {kind.removeprefix('a ')}s" if element in _TOML_KINDS else "a list"
        if element in _TOML_KINDS and not all(_matches(element, item) for item in value):
            return f"a list of {_TOML_KINDS[element].removeprefix('a ')}s"
    return None


def check_table_types(cls: type, table: dict[str, object], where: str) -> None:
    """Every known key of a TOML table has the type its dataclass field declares.

    Run before the dataclass is built, so `max_cpu_percent = "eighty"` is reported with
    its table and key instead of as the TypeError a comparison in `__post_init__` raises.
    Unknown keys are left to the table's own check, which lists the known ones."""
    hints = typing.get_type_hints(cls)
    for item in fields(cls):
        if item.name not in table:
            continue
        value = table[item.name]
        expected = _type_problem(hints[item.name], value)
        if expected is not None:
            raise AgentConfigError(f"{where} {item.name} must be {expected}, got {value!r}")


def check_ca_file(path: Path) -> Path:
    """The absolute path of a readable PEM CA bundle, or an error saying what is wrong with
    it: checked when written into agent.toml, not at the first TLS handshake."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise AgentConfigError(f"CA file {resolved} does not exist")
    try:
        text = resolved.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as error:
        raise AgentConfigError(
            f"CA file {resolved} is not a PEM certificate ({error}); a binary (DER) file "
            "converts with: openssl x509 -inform der -in FILE -out ca.pem"
        ) from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise AgentConfigError(
            f"CA file {resolved} holds no PEM certificate (no '-----BEGIN CERTIFICATE-----' "
            "line); pass the CA certificate, not a key or a certificate request"
        )
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(resolved))
    except ssl.SSLError as error:
        raise AgentConfigError(f"CA file {resolved} does not parse as PEM: {error}") from None
    return resolved


@dataclass(frozen=True)
class AgentSettings:
    """The `[agent]` table."""

    fleet: str
    """The coordinator's fleet name (topic namespace)."""
    device_id: str
    """Unique per device; also its broker username."""
    school: str
    """Devices of one school share its network link and its privacy policy."""
    state_dir: str
    """Keys, outbox, adapters and logs live here (keep it on persistent storage)."""
    data_dir: str
    """Local training data: one file per task, named <task>.jsonl / .csv / .txt."""
    profile: str = "laptop-mid-16gb"
    """A reference profile name (schoolfl profile list) or a measured profile TOML path."""
    threads: int = 0
    """CPU threads for training; 0 = torch's default (all cores)."""
    tasks: tuple[str, ...] = ()
    """Tasks this device may join; empty = any the coordinator assigns."""
    emulate_profile: bool = False
    """Demo only: stretch compute to the profile's predicted step time."""
    device: str = "auto"
    """Where to train: "auto" (a CUDA GPU when torch finds one, else the CPU), "cpu", or
    "cuda" (refuses to start without a usable GPU)."""

    def __post_init__(self) -> None:
        if self.device not in DEVICE_SETTINGS:
            raise AgentConfigError(
                f"[agent] device must be one of {', '.join(DEVICE_SETTINGS)}, got {self.device!r}"
            )
        for name in ("fleet", "device_id", "school"):
            try:
                check_identifier(name, getattr(self, name))
            except ValueError as error:
                raise AgentConfigError(f"[agent] {error}") from None
        if self.threads < 0:
            raise AgentConfigError(f"[agent] threads must be >= 0, got {self.threads}")


_TABLE_CLASSES: dict[str, type] = {
    "agent": AgentSettings,
    "broker": BrokerSettings,
    "eligibility": EligibilityPolicy,
    "privacy": PrivacyPolicy,
}


@dataclass(frozen=True)
class AgentConfig:
    agent: AgentSettings
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    eligibility: EligibilityPolicy = field(default_factory=EligibilityPolicy)
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    """The school's privacy policy, enforced on this device; the default allows any task."""

    @property
    def state_dir(self) -> Path:
        return Path(self.agent.state_dir).expanduser()

    @property
    def key_path(self) -> Path:
        return self.state_dir / "device_key.pem"

    @property
    def outbox_path(self) -> Path:
        return self.state_dir / "outbox.db"

    def data_file(self, task_id: str) -> Path:
        """The local data file for a task; a clear error lists what was looked for."""
        folder = Path(self.agent.data_dir).expanduser()
        for suffix in DATA_SUFFIXES:
            candidate = folder / f"{task_id}{suffix}"
            if candidate.is_file():
                return candidate
        names = ", ".join(f"{task_id}{s}" for s in DATA_SUFFIXES)
        raise AgentConfigError(
            f"no local data for task {task_id!r}: put one of {names} in {folder}"
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "agent.toml") -> AgentConfig:
        unknown = sorted(set(data) - {"agent", "broker", "eligibility", "privacy"})
        if unknown:
            raise AgentConfigError(f"{source}: unknown tables {unknown}")
        if "agent" not in data:
            raise AgentConfigError(f"{source}: missing the [agent] table")
        try:
            for name, table_class in _TABLE_CLASSES.items():
                table = data.get(name, {})
                if not isinstance(table, dict):
                    raise AgentConfigError(f"[{name}] must be a table, got {table!r}")
                check_table_types(table_class, table, f"[{name}]")
            return cls(
                agent=build_dataclass(AgentSettings, data["agent"], "[agent]", AgentConfigError),
                broker=BrokerSettings.from_table(dict(data.get("broker", {}))),
                eligibility=EligibilityPolicy.from_table(dict(data.get("eligibility", {}))),
                privacy=PrivacyPolicy.from_table(dict(data.get("privacy", {}))),
            )
        except AgentConfigError as error:
            raise AgentConfigError(f"{source}: {error}") from None
        except (TypeError, ValueError) as error:
            raise AgentConfigError(f"{source}: {error}") from None

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        hint = "create it with `schoolfl agent init`"
        return cls.from_dict(read_toml_file(path, AgentConfigError, hint), str(path))

    def to_dict(self) -> dict[str, Any]:
        policy = self.eligibility
        tables: dict[str, Any] = {
            "agent": {
                name: (list(value) if isinstance(value, tuple) else value)
                for name, value in vars(self.agent).items()
            },
            "broker": {k: v for k, v in vars(self.broker).items() if v is not None},
            "eligibility": {
                "require_mains": policy.require_mains,
                "min_battery_percent": policy.min_battery_percent,
                "max_cpu_percent": policy.max_cpu_percent,
                "memory_margin_bytes": policy.memory_margin_bytes,
                "max_temperature_celsius": policy.max_temperature_celsius,
                "allowed_hours": [f"{w.start:%H:%M}-{w.end:%H:%M}" for w in policy.allowed_hours],
                "allowed_weekdays": list(policy.allowed_weekdays),
            },
        }
        if self.privacy != PrivacyPolicy():  # written only when set, like an optional table
            tables["privacy"] = self.privacy.to_table()
        return tables

    def save(self, path: Path) -> None:
        header = "schoolfl agent configuration; every key is documented in docs/agent.md"
        atomic_write_text(Path(path), dumps_toml(self.to_dict(), header=header))
