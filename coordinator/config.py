"""`coordinator.toml`: the fleet, the broker, and the tasks the fleet trains.

Only the entry point reads the file; the daemon receives a validated `CoordinatorConfig`.
Every key is documented where it is declared and in docs/coordinator.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from coordinator.broker_admin import BrokerAdminConfig
from coordinator.config_values import (
    CoordinatorConfigError,
    check_flag,
    check_seconds,
    check_text,
    invalid,
    is_finite_number,
    is_whole_number,
)
from coordinator.task_tables import (
    DP_MODES,
    SCHEDULERS,
    PrivacyConfig,
    ScheduleConfig,
    SecureAggregationConfig,
)
from durable.config_tables import build_dataclass, read_toml_file
from edge_runtime.wire import BrokerSettings, UpdateEncoding, check_identifier
from quantization.schemes import Scheme

__all__ = [
    "DP_MODES",
    "MOVED_TASK_KEYS",
    "SCHEDULERS",
    "CoordinatorConfig",
    "CoordinatorConfigError",
    "CoordinatorSettings",
    "PrivacyConfig",
    "ScheduleConfig",
    "SchoolConfig",
    "SecureAggregationConfig",
    "TaskConfig",
]

SCHEME_NAMES = tuple(scheme.value for scheme in Scheme)
"""The quantization schemes a task may name (quantization/schemes.py is the one list)."""

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
            return invalid(f"[[tasks]] {self.id!r}", key, problem)

        try:
            check_identifier("id", self.id)
        except ValueError as error:
            raise CoordinatorConfigError(f"[[tasks]]: {error}") from None
        if self.kind not in ("classification", "causal-lm"):
            raise fail("kind", f"must be 'classification' or 'causal-lm', got {self.kind!r}")
        self._check_labels(fail)
        check_text(f"[[tasks]] {self.id!r}", "base_model", self.base_model)
        if self.scheme not in SCHEME_NAMES:
            raise fail("scheme", f"must be one of {', '.join(SCHEME_NAMES)}, got {self.scheme!r}")
        check_flag(f"[[tasks]] {self.id!r}", "quantize_embeddings", self.quantize_embeddings)
        check_text(f"[[tasks]] {self.id!r}", "eval_file", self.eval_file, allow_empty=True)
        if not is_whole_number(self.seed) or self.seed < 0:
            raise fail("seed", f"must be an integer >= 0, got {self.seed!r}")
        for name in ("rank", "rounds", "local_steps", "batch_size", "seq_len"):
            value = getattr(self, name)
            if not is_whole_number(value) or value < 1:
                raise fail(name, f"must be a positive integer, got {value!r}")
        for name in ("alpha", "learning_rate"):
            value = getattr(self, name)
            if not is_finite_number(value) or value <= 0:
                raise fail(name, f"must be a positive number, got {value!r}")
        if self.update_encoding not in {e.value for e in UpdateEncoding}:
            raise fail("update_encoding", f"must be fp32 or int8, got {self.update_encoding!r}")
        if not is_finite_number(self.max_update_norm) or self.max_update_norm < 0:
            raise fail("max_update_norm", f"must be a number >= 0, got {self.max_update_norm!r}")
        multiple = self.median_norm_multiple
        if multiple is not None and not (is_finite_number(multiple) and multiple >= 0):
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

    def _check_labels(self, fail: Callable[[str, str], CoordinatorConfigError]) -> None:
        """Class names index the classification head, so they are distinct strings."""
        labels = self.labels
        if not isinstance(labels, tuple) or not all(
            isinstance(label, str) and label.strip() for label in labels
        ):
            raise fail("labels", f"must be a list of class names (strings), got {labels!r}")
        if len(set(labels)) != len(labels):
            repeated = sorted({label for label in labels if labels.count(label) > 1})
            raise fail("labels", f"must be distinct; repeated: {repeated}")
        if self.kind == "classification" and len(labels) < 2:
            raise fail("labels", "needs at least two class names for a classification task")

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
    device_timeout_seconds: float = 150.0
    """A device whose last heartbeat is older than this counts as offline. Agents publish
    a heartbeat when their eligibility changes and otherwise once a minute (the broker
    publishes a vanished agent's last will sooner): 2.5 minutes allows one lost beat."""
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
        check_text("[coordinator]", "state_dir", self.state_dir)
        check_seconds("[coordinator]", "startup_grace_seconds", self.startup_grace_seconds, True)
        for name in (
            "tick_seconds",
            "heartbeat_seconds",
            "device_timeout_seconds",
            "token_valid_seconds",
        ):
            check_seconds("[coordinator]", name, getattr(self, name))


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
            if not is_finite_number(value) or value < 0:
                raise fail(name, f"must be a finite number >= 0 (0 = none), got {value!r}")
        if not (is_finite_number(self.max_delta) and 0 < self.max_delta < 1):
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
                broker=_broker_from_table(data.get("broker", {})),
                tasks=tuple(
                    _task_from_table(index, table)
                    for index, table in enumerate(_array_of_tables(data, "tasks"))
                ),
                schools=tuple(
                    build_dataclass(
                        SchoolConfig, table, f"[[schools]] #{index + 1}", CoordinatorConfigError
                    )
                    for index, table in enumerate(_array_of_tables(data, "schools"))
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
    def load(cls, path: Path, serving: bool = False) -> CoordinatorConfig:
        """The validated file. With `serving`, also what only the daemon needs and would
        otherwise fail on after it connected (coordinator/serving_checks.py): at least one
        task, base models that resolve, eval files that parse, readable password files."""
        config = cls.from_dict(read_toml_file(path, CoordinatorConfigError), str(path))
        if serving:
            from coordinator.serving_checks import check_ready_to_serve

            try:
                check_ready_to_serve(config)
            except CoordinatorConfigError as error:
                raise CoordinatorConfigError(f"{path}: {error}") from None
        return config


def _array_of_tables(data: dict[str, Any], name: str) -> list[object]:
    """`[[name]]`: TOML gives a list of tables; `name = ...` or `[name]` gives something else."""
    value = data.get(name, [])
    if not isinstance(value, list):
        raise CoordinatorConfigError(f"{name} must be written as [[{name}]] tables")
    return value


BROKER_TEXT_KEYS = ("url", "username", "password_file", "ca_file")
BROKER_NUMBER_KEYS = (
    "bandwidth_limit_bytes_per_second",
    "receive_queue_max_messages",
    "receive_queue_max_bytes",
)


def _broker_from_table(table: object) -> BrokerSettings:
    """`[broker]`, with each key's type checked first: BrokerSettings (shared with the
    agent) compares numbers, and a string there would surface as a TypeError naming no key."""
    if not isinstance(table, dict):
        raise CoordinatorConfigError("[broker] must be a table")
    known = {f.name for f in fields(BrokerSettings)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise CoordinatorConfigError(
            f"[broker]: unknown keys {unknown}; known keys: {sorted(known)}"
        )
    for key, value in table.items():
        if key in BROKER_TEXT_KEYS:
            check_text("[broker]", key, value, allow_empty=key != "url")
        elif key == "tls_insecure":
            check_flag("[broker]", key, value)
        elif key in BROKER_NUMBER_KEYS and not (is_finite_number(value) and value > 0):
            raise invalid("[broker]", key, f"must be a number > 0, got {value!r}")
    try:
        return BrokerSettings.from_table(dict(table))
    except ValueError as error:
        raise CoordinatorConfigError(f"[broker]: {error}") from None


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
