"""What `schoolfl demo` shows: the live round table, the plot and the summary line.

Everything is read from the coordinator's store, so the view shows what the coordinator
recorded, not what the demo hoped for. The held-out metric is the task's own (accuracy,
or loss where lower is better) and every heading says which way is better.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from schoolfl.demo_tasks import DemoTask


def round_rows(store: object, task: DemoTask) -> list[dict[str, object]]:
    """What the live view and the summary show, read from the coordinator's store."""
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
                "plans": ", ".join(
                    f"{d}:r{p['plan']['rank']}x{p['plan']['local_steps']}"
                    for d, p in sorted(plans.items())
                ),
                "updates": f"{len(updates)}/{len(plans)}",
                "predicted": predicted,
                "actual": actual,
                "bytes_up": sum(len(u.body) for u in updates),
                "metric": record.metrics.get(task.metric),
                "seconds": (record.closed_at or time.time()) - record.opened_at,
            }
        )
    return rows


def metric_heading(task: DemoTask) -> str:
    """The metric's name, saying which way is better where that is not obvious."""
    return f"{task.metric_label} (lower is better)" if task.lower_is_better else task.metric_label


def render_table(rows: list[dict[str, object]], before: float | None, task: DemoTask):  # noqa: ANN202 - rich Table
    from rich.table import Table

    table = Table(title=f"schoolfl demo: task {task.task_id} ({task.title})")
    for column in (
        "round",
        "state",
        "devices: rank x steps",
        "updates",
        "predicted s",
        "actual s",
        "bytes up",
        metric_heading(task),
    ):
        table.add_column(column)
    if before is not None:
        table.add_row("0", "initial", "", "", "", "", "", f"{before:.3f}")
    for row in rows:
        metric = row["metric"]
        table.add_row(
            str(row["round"]),
            str(row["state"]),
            str(row["plans"]),
            str(row["updates"]),
            f"{row['predicted']:.1f}",
            f"{row['actual']:.1f}",
            f"{row['bytes_up']:,}",
            "-" if metric is None else f"{metric:.3f}",
        )
    return table


def plot_rounds(
    rows: list[dict[str, object]], before: float | None, path: Path, task: DemoTask
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    completed = [r for r in rows if r["metric"] is not None]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rounds = ([0] if before is not None else []) + [int(r["round"]) for r in completed]  # type: ignore[call-overload]
    values = ([before] if before is not None else []) + [float(r["metric"]) for r in completed]  # type: ignore[arg-type]
    left.plot(rounds, values, marker="o")
    left.set(
        title=f"held-out {metric_heading(task)}",
        xlabel="round",
        ylabel=task.metric_label,
        xticks=rounds,
    )
    if not task.lower_is_better:
        left.set_ylim(0, 1)
    right.bar([int(r["round"]) for r in rows], [float(r["seconds"]) for r in rows])  # type: ignore[call-overload, arg-type]
    right.set(
        title="round time", xlabel="round", ylabel="seconds", xticks=[int(r["round"]) for r in rows]
    )  # type: ignore[call-overload]
    figure.tight_layout()
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
