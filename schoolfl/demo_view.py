"""What `schoolfl demo` shows: the live round table, the plot and the summary line.

Everything is read from the coordinator's store, so the view shows what the coordinator
recorded, not what the demo hoped for. The held-out metric is the task's own (accuracy,
or loss where lower is better) and every heading says which way is better.

The devices are emulated: each waits out its profile's predicted round time, so a round's
time is the prediction plus what the emulation cannot stretch (loading the model, the
upload). The table therefore splits the slowest device's round into model loading, real
compute, emulated wait and upload (from the agents' activity files), and the plot's bars
are the table's "round s": round open to the last update received.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from schoolfl.demo_tasks import DemoTask

if TYPE_CHECKING:
    from schoolfl.demo_activity import FleetActivity, RoundTimings

EMULATION_NOTE = (
    "Devices are emulated on this machine: each waits out its profile's predicted round "
    "time, so 'compute' is this machine's real time and 'emulated wait' the rest of the "
    "prediction; round 1 also loads the model."
)
SPLIT_COLUMNS = (
    ("load", "load s"),
    ("compute", "compute s"),
    ("emulated_wait", "emulated wait s"),
    ("upload", "upload s"),
)
"""Row key and heading of each part of the slowest device's round time."""


def _add_split(row: dict[str, object], timings: RoundTimings | None) -> None:
    split = timings.slowest(int(row["round"])) if timings else None  # type: ignore[call-overload]
    row["load"] = split["load_seconds"] if split else None
    row["compute"] = split["compute_seconds"] if split else None
    row["emulated_wait"] = split["emulated_wait_seconds"] if split else None
    row["upload"] = split["upload_seconds"] if split else None


def round_rows(
    store: object, task: DemoTask, timings: RoundTimings | None = None
) -> list[dict[str, object]]:
    """What the live view and the summary show, read from the coordinator's store; with
    `timings`, each row also has the slowest device's load / compute / wait / upload."""
    rows = []
    for record in store.rounds(task.task_id):  # type: ignore[attr-defined]
        plans = {
            d: json.loads(p)
            for d, p in store.assignments(task.task_id, record.round_number).items()  # type: ignore[attr-defined]
        }
        updates = store.updates(task.task_id, record.round_number)  # type: ignore[attr-defined]
        predicted = max(
            (p.get("predicted_round_seconds") or 0.0 for p in plans.values()), default=0.0
        )
        actual = max((u.received_at - record.opened_at for u in updates), default=0.0)
        rows.append(
            {
                "round": record.round_number,
                "state": record.state.value,
                "plans": _plan_summary(plans),
                "updates": f"{len(updates)}/{len(plans)}",
                "predicted": predicted,
                "actual": actual,
                "bytes_up": sum(len(u.body) for u in updates),
                "metric": record.metrics.get(task.metric),
                "seconds": (record.closed_at or time.time()) - record.opened_at,
            }
        )
        _add_split(rows[-1], timings)
    return rows


def metric_heading(task: DemoTask) -> str:
    """The metric's name, saying which way is better where that is not obvious."""
    return f"{task.metric_label} (lower is better)" if task.lower_is_better else task.metric_label


ROUND_SECONDS_HEADING = "round s"
"""Round open to the last update received: the table's and the plot's round time."""


def render_table(rows: list[dict[str, object]], before: float | None, task: DemoTask):  # noqa: ANN202 - rich Table
    from rich.table import Table

    table = Table(title=f"schoolfl demo: task {task.task_id} ({task.title})")
    columns = (
        "round",
        "state",
        "plans: devices x rank/steps",
        "updates",
        "predicted s",
        *(heading for _key, heading in SPLIT_COLUMNS),
        ROUND_SECONDS_HEADING,
        "bytes up",
        metric_heading(task),
    )
    for column in columns:
        table.add_column(column)
    if before is not None:
        table.add_row("0", "initial", *([""] * (len(columns) - 3)), f"{before:.3f}")
    for row in rows:
        metric = row["metric"]
        table.add_row(
            str(row["round"]),
            str(row["state"]),
            str(row["plans"]),
            str(row["updates"]),
            f"{row['predicted']:.1f}",
            *(_seconds(row.get(key)) for key, _heading in SPLIT_COLUMNS),
            f"{row['actual']:.1f}",
            f"{row['bytes_up']:,}",
            "-" if metric is None else f"{metric:.3f}",
        )
    return table


def _plan_summary(plans: dict[str, dict]) -> str:
    """Plans counted by (rank, steps): one short cell, so the table fits a terminal; which
    device does what is in the devices table below."""
    counts = Counter((p["plan"]["rank"], p["plan"]["local_steps"]) for p in plans.values())
    return ", ".join(f"{n} x r{rank}/{steps}" for (rank, steps), n in sorted(counts.items()))


def _seconds(value: object) -> str:
    return "-" if value is None else f"{float(value):.1f}"  # type: ignore[arg-type]


def render_devices(activity: FleetActivity, now: float | None = None):  # noqa: ANN201 - rich Table
    """One line per device: what it is doing now, and its last round's time split."""
    from rich.table import Table

    table = Table(title="devices (emulated)")
    for column in ("device", "now", "last round"):
        table.add_column(column)
    for device_id, doing, split in activity.lines(now):
        table.add_row(device_id, doing, split or "-")
    return table


def render_view(
    rows: list[dict[str, object]],
    before: float | None,
    task: DemoTask,
    activity: FleetActivity | None = None,
    now: float | None = None,
):  # noqa: ANN201 - rich Group
    """The live screen: the round table, the note that devices are emulated, and a line
    per device saying what it does right now."""
    from rich.console import Group
    from rich.text import Text

    parts: list[object] = [render_table(rows, before, task), Text(EMULATION_NOTE)]
    if activity is not None:
        parts.append(render_devices(activity, now))
    return Group(*parts)


def chance_level(task: DemoTask, labels: tuple[str, ...]) -> float | None:
    """Accuracy of a uniform guess, 1 / number of labels; None where it means nothing."""
    if task.lower_is_better or not labels:
        return None
    return 1.0 / len(labels)


def round_figure(
    rows: list[dict[str, object]],
    before: float | None,
    task: DemoTask,
    labels: tuple[str, ...] = (),
):  # noqa: ANN201 - matplotlib Figure
    """Held-out metric per round (with the chance line for a classifier) and the round
    time the table shows ("round s"), so the picture and the table never disagree."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    completed = [r for r in rows if r["metric"] is not None]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rounds = ([0] if before is not None else []) + [int(r["round"]) for r in completed]  # type: ignore[call-overload]
    values = ([before] if before is not None else []) + [float(r["metric"]) for r in completed]  # type: ignore[arg-type]
    left.plot(rounds, values, marker="o", label=task.metric_label)
    chance = chance_level(task, labels)
    if chance is not None:
        left.axhline(chance, linestyle="--", color="grey", label=f"chance (1/{len(labels)})")
        left.legend(loc="lower right")
    left.set(
        title=f"held-out {metric_heading(task)}",
        xlabel="round",
        ylabel=task.metric_label,
        xticks=rounds,
    )
    if not task.lower_is_better:
        left.set_ylim(0, 1)
    right.bar([int(r["round"]) for r in rows], [float(r["actual"]) for r in rows])  # type: ignore[call-overload, arg-type]
    right.set(
        title=f"{ROUND_SECONDS_HEADING}: round open to last update",
        xlabel="round",
        ylabel="seconds",
        xticks=[int(r["round"]) for r in rows],  # type: ignore[call-overload]
    )
    figure.tight_layout()
    return figure


def plot_rounds(
    rows: list[dict[str, object]],
    before: float | None,
    path: Path,
    task: DemoTask,
    labels: tuple[str, ...] = (),
) -> None:
    """Write `round_figure` as a PNG at `path`."""
    import matplotlib.pyplot as plt

    figure = round_figure(rows, before, task, labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def metric_text(
    task: DemoTask, held_out: int, before: dict[str, float], after: dict[str, float]
) -> str:
    """'accuracy 0.188 -> 0.625 on 160 held-out questions', or the loss with perplexity."""

    def value(metrics: dict[str, float], key: str) -> str:
        return f"{metrics[key]:.3f}" if key in metrics else "-"

    text = (
        f"{task.metric_label} {value(before, task.metric)} -> "
        f"{value(after, task.metric)} on {held_out} {task.held_out_noun}"
    )
    if task.lower_is_better:
        text += (
            f" (lower is better; perplexity {value(before, 'perplexity')} -> "
            f"{value(after, 'perplexity')})"
        )
    return text
