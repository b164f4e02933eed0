"""`coordinator.toml`: the fleet, the broker, and the tasks the fleet trains.

Only the entry point reads the file; the daemon receives a validated `CoordinatorConfig`.
Every key is documented where it is declared and in docs/coordinator.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.broker_settings import BrokerSettings
from edge_runtime.config_tables import build_dataclass, read_toml_file
from edge_runtime.messages import UpdateEncoding, check_identifier


class CoordinatorConfigError(ValueError):
    """coordinator.toml is missing or invalid; the message names file, table and key."""


@dataclass(frozen=True)
class TaskConfig:
    """One `[[tasks]]` table: a model the fleet fine-tunes and how rounds run."""

    id: str
    """Task id (topic level; letters, digits, _ . -)."""
    kind: str
    """'classification' or 'causal-lm'."""
    base_model: str
    """minilm-l6, smollm2-135m, or a path to a model folder / GGUF file."""
    labels: tuple[str, ...] = ()
    """Class names, in head order (classification only)."""
    scheme: str = "nf4"
    """Quantization of the frozen base on devices (nf4, int8, none, bnb-nf4, bnb-int8)."""
    rank: int = 8
    """LoRA rank of the global adapter."""
    alpha: float = 16.0
    """LoRA alpha (scaling alpha / rank)."""
    learning_rate: float = 2e-3
    """Local AdamW learning rate."""
    rounds: int = 10
    """Rounds to run; the task stops after this many completed rounds."""
    devices_per_round: int = 3
    """Updates wanted per round (the quota): the round aggregates as soon as it has them."""
    min_updates: int = 2
    """Quorum: at the deadline, fewer updates than this fail the round."""
    gather_seconds: float = 30.0
    """How long a task waits for devices_per_round eligible devices before it opens a round
    with fewer (but never fewer than min_updates)."""
    over_selection: float = 0.25
    """Extra devices assigned, as a fraction of the quota, to absorb drop-outs."""
    round_deadline_seconds: float = 300.0
    """Seconds from assignment until the round closes."""
    local_steps: int = 20
    batch_size: int = 8
    seq_len: int = 64
    update_encoding: str = "int8"
    """How devices encode deltas: fp32 (exact) or int8 (a quarter of the bytes)."""
    max_update_norm: float = 0.0
    """L2 bound on one update; 0 disables it."""
    norm_mode: str = "clip"
    """What to do with an update above the bound: clip or reject."""
    eval_file: str = ""
    """Held-out JSONL/CSV the coordinator evaluates each new version on; empty = none."""
    seed: int = 0
    """Seed of the initial adapter (version 0)."""

    def __post_init__(self) -> None:
        def fail(key: str, problem: str) -> CoordinatorConfigError:
            return CoordinatorConfigError(f"[[tasks]] {self.id!r}: {key} {problem}")

        try:
            check_identifier("id", self.id)
        except ValueError as error:
            raise CoordinatorConfigError(f"[[tasks]]: {error}") from None
        if self.kind not in ("classification", "causal-lm"):
            raise fail("kind", f"must be 'classification' or 'causal-lm', got {self.kind!r}")
        if self.kind == "classification" and len(self.labels) < 2:
            raise fail("labels", "needs at least two class names for a classification task")
        for name in (
            "rank",
            "rounds",
            "devices_per_round",
            "min_updates",
            "local_steps",
            "batch_size",
            "seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise fail(name, f"must be a positive integer, got {value!r}")
        if self.min_updates > self.devices_per_round:
            raise fail(
                "min_updates",
                f"({self.min_updates}) exceeds devices_per_round ({self.devices_per_round})",
            )
        for name in ("alpha", "learning_rate", "round_deadline_seconds"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise fail(name, f"must be a positive number, got {value!r}")
        if self.gather_seconds < 0:
            raise fail("gather_seconds", f"must be >= 0, got {self.gather_seconds}")
        if not 0 <= self.over_selection <= 2:
            raise fail("over_selection", f"must be within 0..2, got {self.over_selection}")
        if self.update_encoding not in {e.value for e in UpdateEncoding}:
            raise fail("update_encoding", f"must be fp32 or int8, got {self.update_encoding!r}")
        if self.max_update_norm < 0:
            raise fail("max_update_norm", f"must be >= 0, got {self.max_update_norm}")
        if self.norm_mode not in ("clip", "reject"):
            raise fail("norm_mode", f"must be clip or reject, got {self.norm_mode!r}")


@dataclass(frozen=True)
class CoordinatorSettings:
    """The `[coordinator]` table."""

    fleet: str
    """Fleet name: the topic namespace every device of this coordinator uses."""
    state_dir: str
    """SQLite store, coordinator key and adapter versions live here."""
    tick_seconds: float = 0.2
    """How often the daemon checks deadlines and opens rounds."""
    heartbeat_seconds: float = 10.0
    """How often the coordinator republishes its status."""
    device_timeout_seconds: float = 60.0
    """A device whose last heartbeat is older than this counts as offline."""
    token_valid_seconds: float = 7 * 24 * 3600.0
    """Lifetime of an enrollment token."""

    def __post_init__(self) -> None:
        try:
            check_identifier("fleet", self.fleet)
        except ValueError as error:
            raise CoordinatorConfigError(f"[coordinator] {error}") from None
        for name in (
            "tick_seconds",
            "heartbeat_seconds",
            "device_timeout_seconds",
            "token_valid_seconds",
        ):
            if getattr(self, name) <= 0:
                raise CoordinatorConfigError(f"[coordinator] {name} must be > 0")


@dataclass(frozen=True)
class CoordinatorConfig:
    coordinator: CoordinatorSettings
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    tasks: tuple[TaskConfig, ...] = ()

    def __post_init__(self) -> None:
        ids = [task.id for task in self.tasks]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise CoordinatorConfigError(f"task ids must be unique; repeated: {duplicates}")

    @property
    def state_dir(self) -> Path:
        return Path(self.coordinator.state_dir).expanduser()

    def task(self, task_id: str) -> TaskConfig:
        for task in self.tasks:
            if task.id == task_id:
                return task
        raise KeyError(f"no task {task_id!r}; configured: {[t.id for t in self.tasks]}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "coordinator.toml") -> CoordinatorConfig:
        try:
            unknown = sorted(set(data) - {"coordinator", "broker", "tasks"})
            if unknown:
                raise CoordinatorConfigError(f"unknown tables {unknown}")
            if "coordinator" not in data:
                raise CoordinatorConfigError("missing the [coordinator] table")
            return cls(
                coordinator=build_dataclass(
                    CoordinatorSettings,
                    data["coordinator"],
                    "[coordinator]",
                    CoordinatorConfigError,
                ),
                broker=BrokerSettings.from_table(dict(data.get("broker", {}))),
                tasks=tuple(
                    build_dataclass(
                        TaskConfig, table, f"[[tasks]] #{index + 1}", CoordinatorConfigError
                    )
                    for index, table in enumerate(data.get("tasks", []))
                ),
            )
        except (CoordinatorConfigError, TypeError, ValueError) as error:
            raise CoordinatorConfigError(f"{source}: {error}") from None

    @classmethod
    def load(cls, path: Path) -> CoordinatorConfig:
        return cls.from_dict(read_toml_file(path, CoordinatorConfigError), str(path))
