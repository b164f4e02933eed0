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

from coordinator.broker_admin import BrokerAdminConfig
from durable.config_tables import build_dataclass, read_toml_file
from edge_runtime.wire import BrokerSettings, UpdateEncoding, check_identifier

SCHEDULERS = ("equity", "oort", "random", "fit-first")
DP_MODES = ("off", "central", "local")


class CoordinatorConfigError(ValueError):
    """coordinator.toml is missing or invalid; the message names file, table and key."""


def _invalid(where: str, key: str, problem: str) -> CoordinatorConfigError:
    return CoordinatorConfigError(f"{where}: {key} {problem}")


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class PrivacyConfig:
    """`[tasks.privacy]`: client-level differential privacy (DP-FedAvg); see
    docs/coordinator.md. All-or-nothing, so a half-configured private task cannot start."""

    mode: str = "off"
    """off, central (the coordinator noises the aggregate) or local (each device noises its
    own update)."""
    clip_norm: float = 0.0
    """L2 bound every update is clipped to, on the device and again on the coordinator (the
    sensitivity the accountant assumes); required (> 0) when mode is not off."""
    noise_multiplier: float = 0.0
    """Gaussian noise standard deviation as a multiple of clip_norm (z); > 0 when mode is
    not off."""
    epsilon_budget: float = 0.0
    """The task's total epsilon; a round that would take the cumulative epsilon past it is
    not opened. Required (> 0) when mode is not off."""
    delta: float = 1e-5
    """The delta at which epsilon is reported and budgeted; keep it well below
    1 / number of devices."""

    def __post_init__(self) -> None:
        where = "[tasks.privacy]"
        if self.mode not in DP_MODES:
            raise _invalid(
                where, "mode", f"must be one of {', '.join(DP_MODES)}, got {self.mode!r}"
            )
        for name in ("clip_norm", "noise_multiplier", "epsilon_budget", "delta"):
            value = getattr(self, name)
            if not _finite_number(value) or value < 0:
                raise _invalid(where, name, f"must be a finite number >= 0, got {value!r}")
        if not 0 < self.delta < 1:
            raise _invalid(where, "delta", f"must be within (0, 1), got {self.delta!r}")
        if self.mode == "off":
            return
        for name, why in (
            ("clip_norm", "the L2 bound every update is clipped to"),
            (
                "noise_multiplier",
                "without noise epsilon is infinite; for clipping alone use mode = 'off' "
                "with the [[tasks]] key max_update_norm",
            ),
            ("epsilon_budget", "the total epsilon the task may spend"),
        ):
            if getattr(self, name) <= 0:
                raise _invalid(
                    where,
                    name,
                    f"must be > 0 when mode is {self.mode!r} ({why}), got {getattr(self, name)!r}",
                )


@dataclass(frozen=True)
class SecureAggregationConfig:
    """`[tasks.secure_aggregation]`: masked rounds (docs/secagg.md)."""

    enabled: bool = False
    """Run rounds with secure aggregation: devices send masked inputs and the coordinator
    learns only their sum. Only devices whose agent can do it are chosen; every device
    trains the task's full rank; the mean is unweighted (the coordinator sees no single
    update to weigh)."""
    clip_bound: float = 1.0
    """Each coordinate of a delta is clipped to [-bound, bound] before it is encoded into
    the ring; the resolution is about bound * 5e-7. Keep it above the largest coordinate a
    delta can have (with DP, [tasks.privacy] clip_norm is such a bound)."""
    step_seconds: float = 30.0
    """The longest the coordinator waits for the devices' answers in each key-exchange step
    and in the unmasking step; it goes on with those that answered (and aborts the round
    when fewer than the threshold did)."""

    def __post_init__(self) -> None:
        where = "[tasks.secure_aggregation]"
        if not isinstance(self.enabled, bool):
            raise _invalid(where, "enabled", f"must be true or false, got {self.enabled!r}")
        for name in ("clip_bound", "step_seconds"):
            value = getattr(self, name)
            if not _finite_number(value) or value <= 0:
                raise _invalid(where, name, f"must be a positive number, got {value!r}")


@dataclass(frozen=True)
class ScheduleConfig:
    """`[tasks.schedule]`: how many devices a round wants, how they are chosen, and how
    far a slow device's plan may be shrunk."""

    strategy: str = "equity"
    """How devices are chosen: equity (utility with an equity floor, plans shrunk to fit),
    oort (utility only, full plans), random (Flower's default: random, full plans) or
    fit-first (random among devices whose plan fits)."""
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
    allowed_ranks: tuple[int, ...] = ()
    """LoRA ranks a slow device may be given instead of the task's `rank` (each <= rank);
    empty: only `rank`."""
    min_local_steps: int = 0
    """Steps below which a plan first tries a smaller rank or sequence; 0: local_steps / 4."""
    min_seq_len: int = 0
    """Shortest sequence a plan may be cut to; 0: seq_len / 2."""
    equity_rounds: int = 3
    """Equity floor: every school with an eligible device takes part at least once in this
    many rounds."""
    exploration: float = 0.2
    """Share of a round's slots given to devices never tried before (Oort's exploration)."""

    def __post_init__(self) -> None:
        where = "[tasks.schedule]"
        if self.strategy not in SCHEDULERS:
            raise _invalid(
                where,
                "strategy",
                f"must be one of {', '.join(SCHEDULERS)}, got {self.strategy!r}",
            )
        for name in ("devices_per_round", "min_updates"):
            value = getattr(self, name)
            if not _whole_number(value) or value < 1:
                raise _invalid(where, name, f"must be a positive integer, got {value!r}")
        if self.min_updates > self.devices_per_round:
            raise _invalid(
                where,
                "min_updates",
                f"({self.min_updates}) exceeds devices_per_round ({self.devices_per_round})",
            )
        value = self.round_deadline_seconds
        if not _finite_number(value) or value <= 0:
            raise _invalid(
                where, "round_deadline_seconds", f"must be a positive number, got {value!r}"
            )
        if not _finite_number(self.gather_seconds) or self.gather_seconds < 0:
            raise _invalid(where, "gather_seconds", f"must be >= 0, got {self.gather_seconds}")
        if not _finite_number(self.over_selection) or not 0 <= self.over_selection <= 2:
            raise _invalid(
                where, "over_selection", f"must be within 0..2, got {self.over_selection}"
            )
        if not isinstance(self.allowed_ranks, tuple) or not all(
            _whole_number(rank) and rank >= 1 for rank in self.allowed_ranks
        ):
            raise _invalid(
                where,
                "allowed_ranks",
                f"must be a list of positive integers, got {self.allowed_ranks!r}",
            )
        for name in ("min_local_steps", "min_seq_len", "equity_rounds"):
            value = getattr(self, name)
            if not _whole_number(value) or value < 0:
                raise _invalid(where, name, f"must be a non-negative integer, got {value!r}")
        if self.equity_rounds < 1:
            raise _invalid(where, "equity_rounds", f"must be >= 1, got {self.equity_rounds}")
        if not _finite_number(self.exploration) or not 0 <= self.exploration <= 1:
            raise _invalid(where, "exploration", f"must be within 0..1, got {self.exploration}")

    @property
    def devices_to_assign(self) -> int:
        """The quota plus the over-selection: how many devices a round assigns at most."""
        return math.ceil(self.devices_per_round * (1.0 + self.over_selection))


MOVED_TASK_KEYS: dict[str, tuple[str, str]] = {
    "dp_mode": ("privacy", "mode"),
    "dp_clip_norm": ("privacy", "clip_norm"),
    "dp_noise_multiplier": ("privacy", "noise_multiplier"),
    "dp_epsilon_budget": ("privacy", "epsilon_budget"),
    "dp_delta": ("privacy", "delta"),
    "secure_aggregation": ("secure_aggregation", "enabled"),
    "secagg_clip_bound": ("secure_aggregation", "clip_bound"),
    "secagg_step_seconds": ("secure_aggregation", "step_seconds"),
    "scheduler": ("schedule", "strategy"),
    **{
        key: ("schedule", key)
        for key in (
            "devices_per_round",
            "min_updates",
            "gather_seconds",
            "over_selection",
            "round_deadline_seconds",
            "allowed_ranks",
            "min_local_steps",
            "min_seq_len",
            "equity_rounds",
            "exploration",
        )
    },
}
"""Flat `[[tasks]]` keys of the old layout -> (sub-table, key): refused with their new place."""


DEFAULT_MEDIAN_NORM_MULTIPLE = 3.0
"""Plain tasks clip each update to 3x the round's median update norm unless told otherwise:
honest updates of one round differ in norm by well under that (their data and step counts
differ), a poisoned or diverged one by orders of magnitude."""


@dataclass(frozen=True)
class TaskConfig:
    """One `[[tasks]]` table: a model the fleet fine-tunes and how rounds run. The optional
    features are sub-tables: [tasks.schedule], [tasks.privacy], [tasks.secure_aggregation]."""

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
    quantize_embeddings: bool = True
    """With a quantizing scheme, keep the frozen token embedding (and an untied LM head) as
    int8 rows too: a quarter of their fp32 memory, logits within ~1%. false = fp32."""
    rank: int = 8
    """LoRA rank of the global adapter."""
    alpha: float = 16.0
    """LoRA alpha (scaling alpha / rank)."""
    learning_rate: float = 2e-3
    """Local AdamW learning rate."""
    rounds: int = 10
    """Rounds to run; the task stops after this many completed rounds."""
    local_steps: int = 20
    """Local optimizer steps a device runs per round (a plan may shrink them to fit)."""
    batch_size: int = 8
    """Examples per local step."""
    seq_len: int = 64
    """Tokens per example (a plan may shorten it to fit)."""
    update_encoding: str = "int8"
    """How devices encode deltas: fp32 (exact) or int8 (a quarter of the bytes)."""
    max_update_norm: float = 0.0
    """Absolute L2 bound on one update; 0 = none (the median bound below still holds)."""
    median_norm_multiple: float | None = None
    """L2 bound on one update at this multiple of the round's median update norm, so one
    device cannot drag the aggregate arbitrarily far; 0 = off. Unset: 3.0 on plain tasks,
    off under DP (its clip_norm is the bound) and secure aggregation (the coordinator never
    sees a single update)."""
    norm_mode: str = "clip"
    """What to do with an update above a bound: clip or reject."""
    eval_file: str = ""
    """Held-out JSONL/CSV the coordinator evaluates each new version on; empty = none."""
    seed: int = 0
    """Seed of the initial adapter (version 0)."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """`[tasks.schedule]`: device choice, quota, quorum, deadlines and plan shrinking."""
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    """`[tasks.privacy]`: differential privacy; off unless configured."""
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    """`[tasks.secure_aggregation]`: masked rounds; off unless enabled."""

    def __post_init__(self) -> None:
        def fail(key: str, problem: str) -> CoordinatorConfigError:
            return _invalid(f"[[tasks]] {self.id!r}", key, problem)

        try:
            check_identifier("id", self.id)
        except ValueError as error:
            raise CoordinatorConfigError(f"[[tasks]]: {error}") from None
        if self.kind not in ("classification", "causal-lm"):
            raise fail("kind", f"must be 'classification' or 'causal-lm', got {self.kind!r}")
        if self.kind == "classification" and len(self.labels) < 2:
            raise fail("labels", "needs at least two class names for a classification task")
        for name in ("rank", "rounds", "local_steps", "batch_size", "seq_len"):
            value = getattr(self, name)
            if not _whole_number(value) or value < 1:
                raise fail(name, f"must be a positive integer, got {value!r}")
        for name in ("alpha", "learning_rate"):
            value = getattr(self, name)
            if not _finite_number(value) or value <= 0:
                raise fail(name, f"must be a positive number, got {value!r}")
        if self.update_encoding not in {e.value for e in UpdateEncoding}:
            raise fail("update_encoding", f"must be fp32 or int8, got {self.update_encoding!r}")
        if self.max_update_norm < 0:
            raise fail("max_update_norm", f"must be >= 0, got {self.max_update_norm}")
        multiple = self.median_norm_multiple
        if multiple is not None and not (_finite_number(multiple) and multiple >= 0):
            raise fail("median_norm_multiple", f"must be a number >= 0, got {multiple!r}")
        if self.norm_mode not in ("clip", "reject"):
            raise fail("norm_mode", f"must be clip or reject, got {self.norm_mode!r}")
        for name, table in (
            ("schedule", ScheduleConfig),
            ("privacy", PrivacyConfig),
            ("secure_aggregation", SecureAggregationConfig),
        ):
            if not isinstance(getattr(self, name), table):
                raise fail(name, f"must be a [tasks.{name}] table ({table.__name__})")
        for rank in self.schedule.allowed_ranks:
            if rank > self.rank:
                raise fail(
                    "[tasks.schedule] allowed_ranks",
                    f"must hold integers in 1..rank ({self.rank}), got {rank!r}",
                )
        self._check_across_tables(fail)

    def _check_across_tables(self, fail: Callable[[str, str], CoordinatorConfigError]) -> None:
        """Secure rounds need one tensor layout for every device and leave the coordinator
        nothing to inspect per update; DP already bounds every update. So the keys that rely
        on either are refused."""
        if self.secure_aggregation.enabled and set(self.schedule.allowed_ranks) - {self.rank}:
            raise fail(
                "[tasks.schedule] allowed_ranks",
                f"must be empty with secure_aggregation: every masked input must have the "
                f"global adapter's layout (rank {self.rank}), "
                f"got {list(self.schedule.allowed_ranks)}",
            )
        if self.secure_aggregation.enabled and self.max_update_norm > 0:
            raise fail(
                "max_update_norm",
                "must be 0 with secure_aggregation: the coordinator never sees a single update "
                "to check its norm; use [tasks.privacy] clip_norm, which devices apply before "
                "masking",
            )
        if (self.median_norm_multiple or 0) > 0 and (
            self.secure_aggregation.enabled or self.privacy.mode != "off"
        ):
            raise fail(
                "median_norm_multiple",
                "must be 0 or unset with secure_aggregation or [tasks.privacy]: the device-side "
                "clip_norm is the bound there",
            )
        if self.privacy.mode != "off" and self.max_update_norm > 0:
            raise fail(
                "max_update_norm",
                f"must be 0 when [tasks.privacy] mode is {self.privacy.mode!r}: its clip_norm "
                "is the bound (two bounds would make the sensitivity ambiguous)",
            )

    @property
    def effective_median_norm_multiple(self) -> float:
        """`median_norm_multiple` with its default resolved (0 = off)."""
        if self.median_norm_multiple is not None:
            return self.median_norm_multiple
        plain = not self.secure_aggregation.enabled and self.privacy.mode == "off"
        return DEFAULT_MEDIAN_NORM_MULTIPLE if plain else 0.0

    @property
    def ladder_ranks(self) -> tuple[int, ...]:
        """The ranks a plan may use, largest (the task's rank) first."""
        return tuple(sorted({self.rank, *self.schedule.allowed_ranks}, reverse=True))

    @property
    def ladder_min_local_steps(self) -> int:
        """The fewest steps a plan keeps before it tries a smaller rank or sequence."""
        return self.schedule.min_local_steps or max(1, self.local_steps // 4)

    @property
    def ladder_min_seq_len(self) -> int:
        """The shortest sequence a plan may be cut to."""
        return self.schedule.min_seq_len or max(1, self.seq_len // 2)


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
    startup_grace_seconds: float = 3.0
    """After (re)starting, how long the daemon waits before opening new rounds, so that the
    retained states of the devices online now reach it first (a round opened earlier would
    leave them out). Open rounds, deadlines and updates carry on meanwhile; 0 = no wait."""

    def __post_init__(self) -> None:
        try:
            check_identifier("fleet", self.fleet)
        except ValueError as error:
            raise CoordinatorConfigError(f"[coordinator] {error}") from None
        if self.startup_grace_seconds < 0:
            raise CoordinatorConfigError("[coordinator] startup_grace_seconds must be >= 0")
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
    ([tasks.privacy] mode central or local) whose epsilon_budget <= max_epsilon and delta <=
    max_delta."""
    max_delta: float = 1e-5
    """Policy: the largest [tasks.privacy] delta the school accepts (checked only when
    max_epsilon > 0)."""
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


@dataclass(frozen=True)
class CoordinatorConfig:
    coordinator: CoordinatorSettings
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    tasks: tuple[TaskConfig, ...] = ()
    schools: tuple[SchoolConfig, ...] = ()
    broker_admin: BrokerAdminConfig | None = None
    """`[broker_admin]`, present when the broker runs the dynamic-security config of
    `broker-config`: revoked devices are then removed from the broker at once
    (coordinator/broker_admin.py)."""

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
            tables = {"coordinator", "broker", "broker_admin", "tasks", "schools"}
            unknown = sorted(set(data) - tables)
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
                    _task_from_table(index, table)
                    for index, table in enumerate(data.get("tasks", []))
                ),
                schools=tuple(
                    build_dataclass(
                        SchoolConfig, table, f"[[schools]] #{index + 1}", CoordinatorConfigError
                    )
                    for index, table in enumerate(data.get("schools", []))
                ),
                broker_admin=(
                    build_dataclass(
                        BrokerAdminConfig,
                        data["broker_admin"],
                        "[broker_admin]",
                        CoordinatorConfigError,
                    )
                    if "broker_admin" in data
                    else None
                ),
            )
        except (CoordinatorConfigError, TypeError, ValueError) as error:
            raise CoordinatorConfigError(f"{source}: {error}") from None

    @classmethod
    def load(cls, path: Path) -> CoordinatorConfig:
        return cls.from_dict(read_toml_file(path, CoordinatorConfigError), str(path))


def _task_from_table(index: int, table: object) -> TaskConfig:
    """One `[[tasks]]` table; a key of the old flat layout is refused with its new place."""
    task_id = table.get("id") if isinstance(table, dict) else None
    where = f"[[tasks]] {task_id!r}" if isinstance(task_id, str) else f"[[tasks]] #{index + 1}"
    for key, value in table.items() if isinstance(table, dict) else ():
        if key in MOVED_TASK_KEYS and not isinstance(value, dict):
            sub_table, new_key = MOVED_TASK_KEYS[key]
            raise CoordinatorConfigError(
                f"{where}: key {key!r} has moved: write `{new_key} = ...` under [tasks.{sub_table}]"
            )
    return build_dataclass(TaskConfig, table, where, CoordinatorConfigError, "tasks")
