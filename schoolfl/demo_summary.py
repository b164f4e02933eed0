"""The demo's closing report: summary.json and the lines printed after the last round.

Apart from `schoolfl.demo` because it only reads what the run produced (rows, metrics,
ledger, ONNX report) and starts nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from schoolfl.demo_privacy import privacy_line, privacy_summary
from schoolfl.demo_view import metric_text

if TYPE_CHECKING:
    from rich.console import Console

    from schoolfl.demo import DemoSettings


def onnx_lines(onnx: dict[str, object]) -> list[str]:
    """The summary's ONNX part: sizes and agreement, or why there is no export."""
    from quantization.export.onnx_report import PREDICT_FILE, OnnxExportReport

    if "skipped" in onnx:
        return [f"ONNX export skipped: {onnx['skipped']}"]
    folder = Path(str(onnx["folder"]))
    report = OnnxExportReport(**{k: v for k, v in onnx.items() if k != "folder"})  # type: ignore[arg-type]
    return [
        f"ONNX export for classroom inference ({report.exporter}): {folder}",
        *(f"  {line}" for line in report.summary_lines()),
        f'  try it: python {folder / PREDICT_FILE} "How do plants make food?"',
    ]


def round_timings(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """summary.json's `rounds`: per round the prediction, the slowest device's split (None
    where no device reported it) and the table's round time, in seconds."""
    keys = ("predicted", "load", "compute", "emulated_wait", "upload")
    return [
        {
            "round": row["round"],
            **{
                f"{key}_seconds": None if row.get(key) is None else round(float(row[key]), 2)  # type: ignore[arg-type]
                for key in keys
            },
            "round_seconds": round(float(row["actual"]), 2),  # type: ignore[arg-type]
        }
        for row in rows
    ]


def demo_summary(
    settings: DemoSettings,
    rows: list[dict[str, object]],
    metrics_before: dict[str, float],
    metrics_after: dict[str, float],
    ledger: list[object],
    *,
    started: float,
    adapter: Path,
    onnx: dict[str, object],
) -> dict[str, object]:
    """summary.json, in its documented key order; every metric appears before and after,
    even where only one side has it, so the file's shape does not depend on the run."""
    task = settings.task
    summary: dict[str, object] = {
        "task": task.name,
        "task_id": task.task_id,
        "base_model": task.base_model,
        "devices": settings.devices,
        "rounds_completed": sum(1 for r in rows if r["state"] == "completed"),
        "metric": task.metric,
        "lower_is_better": task.lower_is_better,
    }
    for key in sorted(metrics_before.keys() | metrics_after.keys()):
        summary[f"{key}_before"] = metrics_before.get(key)
        summary[f"{key}_after"] = metrics_after.get(key)
    summary["privacy"] = privacy_summary(settings.privacy, ledger)
    summary.update(
        {
            "held_out": settings.held_out,
            "bytes_up": sum(int(r["bytes_up"]) for r in rows),  # type: ignore[call-overload]
            "rounds": round_timings(rows),
            "total_seconds": round(time.monotonic() - started, 1),
            "adapter": str(adapter),
            "plot": str(settings.plot_path),
            "onnx": onnx,
        }
    )
    return summary


def print_results(
    console: Console,
    settings: DemoSettings,
    summary: dict[str, object],
    metrics_before: dict[str, float],
    metrics_after: dict[str, float],
    onnx: dict[str, object],
    adapter: Path,
) -> None:
    """The closing lines: the metric's change, the privacy spent, the ONNX export, and
    where every artefact is."""
    # soft_wrap: whole lines, so paths and figures stay greppable in a narrow terminal
    console.print(
        f"{metric_text(settings.task, settings.held_out, metrics_before, metrics_after)}; "
        f"{summary['bytes_up']:,} bytes uploaded; {summary['total_seconds']} s in all",
        soft_wrap=True,
    )
    if settings.privacy is not None:
        console.print(privacy_line(summary["privacy"]), soft_wrap=True)  # type: ignore[arg-type]
    for line in onnx_lines(onnx):
        console.print(line, soft_wrap=True, markup=False)  # "schoolfl[onnx]" is no markup
    console.print(
        f"adapter (PEFT folder): {adapter}\nplot: {settings.plot_path}\n"
        f"summary: {settings.state_dir / 'summary.json'}",
        soft_wrap=True,
    )
