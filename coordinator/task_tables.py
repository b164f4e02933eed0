"""The optional `[[tasks]]` sub-tables: `[tasks.privacy]`, `[tasks.secure_aggregation]` and
`[tasks.schedule]`.

Why a module of its own: each sub-table is one feature with its own validation, and
coordinator/config.py (the file, its top-level tables and `[[tasks]]`) would pass 600 lines
with them. coordinator/config.py re-exports every name here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from coordinator.config_values import invalid, is_finite_number, is_whole_number

SCHEDULERS = ("equity", "oort", "random", "fit-first")
DP_MODES = ("off", "central", "local")


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
            raise invalid(where, "mode", f"must be one of {', '.join(DP_MODES)}, got {self.mode!r}")
        for name in ("clip_norm", "noise_multiplier", "epsilon_budget", "delta"):
            value = getattr(self, name)
            if not is_finite_number(value) or value < 0:
                raise invalid(where, name, f"must be a finite number >= 0, got {value!r}")
        if not 0 < self.delta < 1:
            raise invalid(where, "delta", f"must be within (0, 1), got {self.delta!r}")
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
                raise invalid(
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
            raise invalid(where, "enabled", f"must be true or false, got {self.enabled!r}")
        for name in ("clip_bound", "step_seconds"):
            value = getattr(self, name)
            if not is_finite_number(value) or value <= 0:
                raise invalid(where, name, f"must be a positive number, got {value!r}")


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
            raise invalid(
                where,
                "strategy",
                f"must be one of {', '.join(SCHEDULERS)}, got {self.strategy!r}",
            )
        for name in ("devices_per_round", "min_updates"):
            value = getattr(self, name)
            if not is_whole_number(value) or value < 1:
                raise invalid(where, name, f"must be a positive integer, got {value!r}")
        if self.min_updates > self.devices_per_round:
            raise invalid(
                where,
                "min_updates",
                f"({self.min_updates}) exceeds devices_per_round ({self.devices_per_round})",
            )
        value = self.round_deadline_seconds
        if not is_finite_number(value) or value <= 0:
            raise invalid(
                where, "round_deadline_seconds", f"must be a positive number, got {value!r}"
            )
        if not is_finite_number(self.gather_seconds) or self.gather_seconds < 0:
            raise invalid(where, "gather_seconds", f"must be >= 0, got {self.gather_seconds}")
        if not is_finite_number(self.over_selection) or not 0 <= self.over_selection <= 2:
            raise invalid(
                where, "over_selection", f"must be within 0..2, got {self.over_selection}"
            )
        if not isinstance(self.allowed_ranks, tuple) or not all(
            is_whole_number(rank) and rank >= 1 for rank in self.allowed_ranks
        ):
            raise invalid(
                where,
                "allowed_ranks",
                f"must be a list of positive integers, got {self.allowed_ranks!r}",
            )
        for name in ("min_local_steps", "min_seq_len", "equity_rounds"):
            value = getattr(self, name)
            if not is_whole_number(value) or value < 0:
                raise invalid(where, name, f"must be a non-negative integer, got {value!r}")
        if self.equity_rounds < 1:
            raise invalid(where, "equity_rounds", f"must be >= 1, got {self.equity_rounds}")
        if not is_finite_number(self.exploration) or not 0 <= self.exploration <= 1:
            raise invalid(where, "exploration", f"must be within 0..1, got {self.exploration}")

    @property
    def devices_to_assign(self) -> int:
        """The quota plus the over-selection: how many devices a round assigns at most."""
        return math.ceil(self.devices_per_round * (1.0 + self.over_selection))
