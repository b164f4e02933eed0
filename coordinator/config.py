"""`coordinator.toml`: the fleet, the broker, and the tasks the fleet trains.

Only the entry point reads the file; the daemon receives a validated `CoordinatorConfig`.
Every key is documented where it is declared and in docs/coordinator.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from durable.config_tables import build_dataclass, read_toml_file
from edge_runtime.wire import BrokerSettings, UpdateEncoding, check_identifier

SCHEDULERS = ("equity", "oort", "random", "fit-first")
DP_MODES = ("off", "central", "local")


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
    scheduler: str = "equity"
    """How devices are chosen: equity (utility with an equity floor, plans shrunk to fit),
    oort (utility only, full plans), random (Flower's default: random, full plans) or
    fit-first (random among devices whose plan fits)."""
    allowed_ranks: tuple[int, ...] = ()
    """LoRA ranks a slow device may be given instead of `rank` (each <= rank); empty: only
    `rank`."""
    min_local_steps: int = 0
    """Steps below which a plan first tries a smaller rank or sequence; 0: local_steps / 4."""
    min_seq_len: int = 0
    """Shortest sequence a plan may be cut to; 0: seq_len / 2."""
    equity_rounds: int = 3
    """Equity floor: every school with an eligible device takes part at least once in this
    many rounds."""
    exploration: float = 0.2
    """Share of a round's slots given to devices never tried before (Oort's exploration)."""
    dp_mode: str = "off"
    """Client-level differential privacy (DP-FedAvg): off, central (the coordinator noises
    the aggregate) or local (each device noises its own update). See docs/coordinator.md."""
    dp_clip_norm: float = 0.0
    """DP: L2 bound every update is clipped to, on the device and again on the coordinator
    (the sensitivity the accountant assumes); required (> 0) when dp_mode is not off."""
    dp_noise_multiplier: float = 0.0
    """DP: Gaussian noise standard deviation as a multiple of dp_clip_norm (z); > 0 when
    dp_mode is not off."""
    dp_epsilon_budget: float = 0.0
    """DP: the task's total epsilon; a round that would take the cumulative epsilon past it
    is not opened. Required (> 0) when dp_mode is not off."""
    dp_delta: float = 1e-5
    """DP: the delta at which epsilon is reported and budgeted; keep it well below
    1 / number of devices."""
    secure_aggregation: bool = False
    """Run rounds with secure aggregation (docs/secagg.md): devices send masked inputs and
    the coordinator learns only their sum. Only devices whose agent can do it are chosen;
    every device trains the task's full rank; the mean is unweighted (the coordinator sees
    no single update to weigh)."""
    secagg_clip_bound: float = 1.0
    """Secure aggregation: each coordinate of a delta is clipped to [-bound, bound] before
    it is encoded into the ring; the resolution is about bound * 5e-7. Keep it above the
    largest coordinate a delta can have (with DP, dp_clip_norm is such a bound)."""
    secagg_step_seconds: float = 30.0
    """Secure aggregation: the longest the coordinator waits for the devices' answers in
    each key-exchange step and in the unmasking step; it goes on with those that answered
    (and aborts the round when fewer than the threshold did)."""

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
        if self.scheduler not in SCHEDULERS:
            raise fail(
                "scheduler", f"must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}"
            )
        for rank in self.allowed_ranks:
            if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= self.rank:
                raise fail(
                    "allowed_ranks", f"must hold integers in 1..rank ({self.rank}), got {rank!r}"
                )
        for name in ("min_local_steps", "min_seq_len", "equity_rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise fail(name, f"must be a non-negative integer, got {value!r}")
        if self.equity_rounds < 1:
            raise fail("equity_rounds", f"must be >= 1, got {self.equity_rounds}")
        if not 0 <= self.exploration <= 1:
            raise fail("exploration", f"must be within 0..1, got {self.exploration}")
        self._check_privacy(fail)
        self._check_secure_aggregation(fail)

    def _check_secure_aggregation(self, fail: Callable[[str, str], CoordinatorConfigError]) -> None:
        """Secure rounds need one tensor layout for every device and leave the coordinator
        nothing to inspect per update, so the keys that rely on either are refused."""
        if not isinstance(self.secure_aggregation, bool):
            raise fail(
                "secure_aggregation", f"must be true or false, got {self.secure_aggregation!r}"
            )
        for name in ("secagg_clip_bound", "secagg_step_seconds"):
            value = getattr(self, name)
            if not (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
                and value > 0
            ):
                raise fail(name, f"must be a positive number, got {value!r}")
        if not self.secure_aggregation:
            return
        if set(self.allowed_ranks) - {self.rank}:
            raise fail(
                "allowed_ranks",
                f"must be empty with secure_aggregation: every masked input must have the "
                f"global adapter's layout (rank {self.rank}), got {list(self.allowed_ranks)}",
            )
        if self.max_update_norm > 0:
            raise fail(
                "max_update_norm",
                "must be 0 with secure_aggregation: the coordinator never sees a single update "
                "to check its norm; use dp_clip_norm, which devices apply before masking",
            )

    def _check_privacy(self, fail: Callable[[str, str], CoordinatorConfigError]) -> None:
        """The dp_* keys: all-or-nothing, so a half-configured private task cannot start."""
        if self.dp_mode not in DP_MODES:
            raise fail("dp_mode", f"must be one of {', '.join(DP_MODES)}, got {self.dp_mode!r}")
        for name in ("dp_clip_norm", "dp_noise_multiplier", "dp_epsilon_budget", "dp_delta"):
            value = getattr(self, name)
            if not (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
                and value >= 0
            ):
                raise fail(name, f"must be a finite number >= 0, got {value!r}")
        if not 0 < self.dp_delta < 1:
            raise fail("dp_delta", f"must be within (0, 1), got {self.dp_delta!r}")
        if self.dp_mode == "off":
            return
        for name, why in (
            ("dp_clip_norm", "the L2 bound every update is clipped to"),
            (
                "dp_noise_multiplier",
                "without noise epsilon is infinite; for clipping alone "
                "use dp_mode = 'off' with max_update_norm",
            ),
            ("dp_epsilon_budget", "the total epsilon the task may spend"),
        ):
            if getattr(self, name) <= 0:
                raise fail(
                    name,
                    f"must be > 0 when dp_mode is {self.dp_mode!r} ({why}), "
                    f"got {getattr(self, name)!r}",
                )
        if self.max_update_norm > 0:
            raise fail(
                "max_update_norm",
                f"must be 0 when dp_mode is {self.dp_mode!r}: dp_clip_norm is the bound "
                "(two bounds would make the sensitivity ambiguous)",
            )

    @property
    def ladder_ranks(self) -> tuple[int, ...]:
        """The ranks a plan may use, largest (the task's rank) first."""
        return tuple(sorted({self.rank, *self.allowed_ranks}, reverse=True))

    @property
    def ladder_min_local_steps(self) -> int:
        return self.min_local_steps or max(1, self.local_steps // 4)

    @property
    def ladder_min_seq_len(self) -> int:
        return self.min_seq_len or max(1, self.seq_len // 2)


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
class SchoolConfig:
    """One `[[schools]]` table: a school's internet link, shared by its devices, and its
    privacy policy. Every key but `id` is optional, and each default means "no restriction",
    so a school listed only for its link (or only for its policy) keeps the other as is."""

    id: str
    """The school name devices enrol with."""
    down_mbps: float = 0.0
    """The school's downlink, shared by every device of it that trains in a round; 0 =
    unknown (only the devices' own links limit them)."""
    up_mbps: float = 0.0
    """The school's uplink, shared likewise; 0 = unknown."""
    max_epsilon: float = 0.0
    """Policy: 0 = no DP required. Above 0, the school's devices join only tasks with DP on
    (dp_mode central or local) whose dp_epsilon_budget <= max_epsilon and dp_delta <=
    max_delta."""
    max_delta: float = 1e-5
    """Policy: the largest dp_delta the school accepts (checked only when max_epsilon > 0)."""
    require_secure_aggregation: bool = False
    """Policy: the school's devices join only tasks that run with secure aggregation."""
    min_devices_per_aggregate: int = 0
    """Policy: a round that includes this school's devices must aggregate at least this
    many devices in all (its devices hide in a crowd); 0 = no minimum."""
    allowed_tasks: tuple[str, ...] = ()
    """Policy: task ids the school's devices may join; empty = every task."""

    def __post_init__(self) -> None:
        def fail(key: str, problem: str) -> CoordinatorConfigError:
            return CoordinatorConfigError(f"[[schools]] {self.id!r}: {key} {problem}")

        try:
            check_identifier("id", self.id)
        except ValueError as error:
            raise CoordinatorConfigError(f"[[schools]]: {error}") from None
        for name in ("down_mbps", "up_mbps", "max_epsilon"):
            value = getattr(self, name)
            if not _finite_number(value) or value < 0:
                raise fail(name, f"must be a finite number >= 0 (0 = none), got {value!r}")
        if not (_finite_number(self.max_delta) and 0 < self.max_delta < 1):
            raise fail("max_delta", f"must be within (0, 1), got {self.max_delta!r}")
        if not isinstance(self.require_secure_aggregation, bool):
            raise fail(
                "require_secure_aggregation",
                f"must be true or false, got {self.require_secure_aggregation!r}",
            )
        value = self.min_devices_per_aggregate
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise fail(
                "min_devices_per_aggregate", f"must be an integer >= 0 (0 = none), got {value!r}"
            )
        if not isinstance(self.allowed_tasks, tuple) or not all(
            isinstance(task_id, str) for task_id in self.allowed_tasks
        ):
            raise fail("allowed_tasks", f"must be a list of task ids, got {self.allowed_tasks!r}")

    @property
    def link_known(self) -> bool:
        """Both link figures given: only then does the scheduler share a school link."""
        return self.down_mbps > 0 and self.up_mbps > 0


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class CoordinatorConfig:
    coordinator: CoordinatorSettings
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    tasks: tuple[TaskConfig, ...] = ()
    schools: tuple[SchoolConfig, ...] = ()

    def __post_init__(self) -> None:
        ids = [task.id for task in self.tasks]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise CoordinatorConfigError(f"task ids must be unique; repeated: {duplicates}")
        for school in self.schools:
            unknown = sorted(set(school.allowed_tasks) - set(ids))
            if unknown:
                raise CoordinatorConfigError(
                    f"[[schools]] {school.id!r}: allowed_tasks names unknown tasks {unknown}; "
                    f"configured tasks: {ids}"
                )

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
            unknown = sorted(set(data) - {"coordinator", "broker", "tasks", "schools"})
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
                schools=tuple(
                    build_dataclass(
                        SchoolConfig, table, f"[[schools]] #{index + 1}", CoordinatorConfigError
                    )
                    for index, table in enumerate(data.get("schools", []))
                ),
            )
        except (CoordinatorConfigError, TypeError, ValueError) as error:
            raise CoordinatorConfigError(f"{source}: {error}") from None

    @classmethod
    def load(cls, path: Path) -> CoordinatorConfig:
        return cls.from_dict(read_toml_file(path, CoordinatorConfigError), str(path))
