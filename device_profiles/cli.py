"""`schoolfl profile ...`: what planners run to know which hardware can train what.

Commands: `bench` (measure this machine), `plan` (which plans fit which devices), `show`,
`list` and `validate` (inspect profile files). torch is imported only by `bench`'s worker
process, so every other command stays fast on a Raspberry Pi.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from device_profiles.errors import BenchError, ProfileError, ProfileValidationError
from device_profiles.gpu_path import MemoryKind, memory_kind, usable_gpu_memory_bytes
from device_profiles.plan import KNOWN_SCHEMES
from device_profiles.profile import (
    SECTION_FIELDS,
    DeviceProfile,
    find_profile,
    load_reference_profiles,
    reference_profile_paths,
)
from device_profiles.shapes import format_count, resolve_shape

if TYPE_CHECKING:
    from device_profiles.bench import BenchConfig


def _console() -> Console:
    """Built per command so that it reads the terminal width (or $COLUMNS) of this call."""
    return Console(highlight=False)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from error
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r}: expected integers >= 1")
    return values


def _str_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _memory_label(profile: DeviceProfile) -> str:
    """Which memory the plans below were checked against (cost_model.memory_kind)."""
    usable = _gb(profile.usable_ram_bytes)
    kind = memory_kind(profile)
    if kind is MemoryKind.UNIFIED:
        return f"{usable} usable RAM shared with the GPU"
    if kind is MemoryKind.GPU:
        return f"{usable} usable RAM, {_gb(usable_gpu_memory_bytes(profile))} GPU memory"
    return f"{usable} usable"


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


@click.group("profile")
def profile_group() -> None:
    """Benchmark devices, inspect profiles and plan which models fit which hardware."""


@profile_group.command("list")
def list_command() -> None:
    """List the reference profiles shipped with schoolfl."""
    console = _console()
    table = Table(title="reference profiles")
    for column in (
        "name",
        "kind",
        "cores",
        "RAM",
        "CPU GFLOPS",
        "GPU GFLOPS",
        "mem GB/s",
        "schemes",
        "down/up Mbit/s",
        "power",
    ):
        table.add_column(column)
    try:
        profiles = load_reference_profiles()
    except ProfileError as error:
        raise click.ClickException(str(error)) from error
    for profile in profiles:
        throughput = profile.throughput
        table.add_row(
            profile.name,
            profile.kind,
            str(profile.hardware.cores),
            _gb(profile.hardware.ram_bytes),
            f"{throughput.cpu_fp32_gflops:g}",
            f"{throughput.gpu_fp32_gflops:g}",
            f"{throughput.memory_bandwidth_gbps:g}",
            ",".join(throughput.quant_schemes),
            f"{profile.network.down_mbps:g}/{profile.network.up_mbps:g}",
            profile.power.source,
        )
    console.print(table)
    console.print(f"files: {reference_profile_paths()[0].parent}" if profiles else "")


@profile_group.command("show")
@click.argument("profile_ref", metavar="NAME_OR_FILE")
def show_command(profile_ref: str) -> None:
    """Show every field of a profile (file path or reference name) with its source."""
    console = _console()
    try:
        profile = find_profile(profile_ref)
    except ProfileError as error:
        raise click.ClickException(str(error)) from error
    console.print(f"[bold]{profile.name}[/bold] ({profile.kind}) {profile.description}")
    if profile.measured_at:
        console.print(f"measured at {profile.measured_at}")
    if profile.support == "unsupported":
        console.print(f"[red]UNSUPPORTED[/red]: {profile.support_note}")
    if not profile.predictions_validated:
        console.print(f"[yellow]unvalidated[/yellow]: {profile.validation_note}")
    if profile.notes:
        console.print(f"notes: {profile.notes}")
    table = Table()
    for column in ("field", "value", "source"):
        table.add_column(column)
    for section, specs in SECTION_FIELDS.items():
        part = getattr(profile, section)
        for spec in specs:
            value = getattr(part, spec.name)
            text = ", ".join(value) if isinstance(value, tuple) else str(value)
            if spec.name.endswith("_bytes") and isinstance(value, (int, float)):
                text = f"{value} ({_gb(value)})"
            table.add_row(f"{section}.{spec.name}", text, part.sources.get(spec.name, ""))
    console.print(table)
    if profile.measurements:
        grid = Table(title=f"{len(profile.measurements)} measured grid points")
        columns = ("model", "scheme", "rank", "batch", "seq", "step s", "cpu s", "spread", "peak")
        for column in columns:
            grid.add_column(column)
        for row in profile.measurements:
            grid.add_row(
                row.model,
                row.scheme,
                str(row.rank),
                str(row.batch_size),
                str(row.seq_len),
                f"{row.step_seconds:.3f}",
                f"{row.step_cpu_seconds:.3f}",
                f"{row.step_seconds_spread:.0%}",
                _gb(row.peak_rss_bytes),
            )
        console.print(grid)


@profile_group.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def validate_command(files: tuple[Path, ...]) -> None:
    """Check profile files; exit status 1 and every problem listed if any is invalid."""
    failed = False
    for path in files:
        try:
            profile = DeviceProfile.load(path)
        except ProfileValidationError as error:
            failed = True
            click.echo(f"INVALID {path}", err=True)
            for problem in error.problems:
                click.echo(f"  - {problem}", err=True)
            continue
        except ProfileError as error:
            failed = True
            click.echo(f"INVALID {path}: {error}", err=True)
            continue
        click.echo(f"ok {path} ({profile.kind} profile {profile.name!r})")
    if failed:
        sys.exit(1)


@profile_group.command("plan")
@click.option(
    "--model",
    "model_ref",
    required=True,
    metavar="SHAPE_OR_PATH",
    help="Known shape (minilm-l6, smollm2-135m, llama-1.1b) or config.json/folder.",
)
@click.option(
    "--steps",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="Local steps per round.",
)
@click.option(
    "--profile",
    "profile_refs",
    multiple=True,
    metavar="NAME_OR_FILE",
    help="Profiles to plan for (repeatable); default: every reference profile.",
)
@click.option("--schemes", default=",".join(KNOWN_SCHEMES), show_default=True)
@click.option("--ranks", default="8", show_default=True, help="Comma-separated LoRA ranks.")
@click.option("--batches", default="1,4,8", show_default=True)
@click.option("--seqs", default="128,256", show_default=True, help="Sequence lengths.")
@click.option("--fits-only", is_flag=True, help="Hide plans that do not fit.")
def plan_command(
    model_ref: str,
    steps: int,
    profile_refs: tuple[str, ...],
    schemes: str,
    ranks: str,
    batches: str,
    seqs: str,
    fits_only: bool,
) -> None:
    """For every profile: which (scheme, rank, batch, seq) fit and how long a round takes."""
    console = _console()
    from device_profiles.planner import evaluate, plan_grid

    try:
        shape = resolve_shape(model_ref)
        profiles = (
            [find_profile(ref) for ref in profile_refs]
            if profile_refs
            else load_reference_profiles()
        )
        plans = plan_grid(
            _str_list(schemes), _int_list(ranks), _int_list(batches), _int_list(seqs), steps
        )
    except ProfileError as error:
        raise click.ClickException(str(error)) from error
    console.print(
        f"model {shape.name}: {shape.family}, {format_count(shape.total_parameters())} "
        f"parameters; {steps} local steps per round"
    )
    rows = evaluate(profiles, shape, plans)
    for profile in profiles:
        status = "" if profile.predictions_validated else ", predictions unvalidated"
        table = Table(title=f"{profile.name} ({profile.kind}, {_memory_label(profile)}{status})")
        if profile.support == "unsupported":
            console.print(f"[red]{profile.name} is UNSUPPORTED[/red]: {profile.support_note}")
        if not profile.predictions_validated:
            console.print(
                f"[yellow]{profile.name}: unvalidated[/yellow]: {profile.validation_note}"
            )
        for column in ("scheme", "rank", "batch", "seq", "step s", "peak", "round s", "verdict"):
            table.add_column(column)
        mine = [row for row in rows if row.profile is profile]
        for row in mine:
            prediction = row.prediction
            if fits_only and not prediction.fits:
                continue
            verdict = (
                "[green]fits[/green]"
                if prediction.fits
                else (f"[red]does not fit[/red]: {prediction.reason}")
            )
            if not prediction.validated:
                verdict += " (unvalidated)"
            table.add_row(
                row.plan.scheme,
                str(row.plan.rank),
                str(row.plan.batch_size),
                str(row.plan.seq_len),
                f"{prediction.step_seconds:.2f}",
                _gb(prediction.peak_bytes),
                f"{prediction.round_seconds:.1f}",
                verdict,
            )
        console.print(table)
        if not any(row.prediction.fits for row in mine):
            console.print(f"[red]{profile.name}: no plan in the grid fits[/red]")


def _default_threads() -> int:
    """Cores other work is not already using.

    Oversubscribed OpenMP threads spin-wait for descheduled peers, which made 2 threads
    10-50x slower than 1 on a loaded 2-core box.
    """
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    busy = int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0
    return max(1, cores - busy)


def _bench_config(
    quick: bool,
    threads: int,
    *,
    broker_url: str | None,
    name: str | None,
    models: str | None,
    schemes: str | None,
    ranks: str | None,
    batches: str | None,
    seqs: str | None,
    timed_steps: int | None,
) -> BenchConfig:
    """The quick or full grid, replaced by a custom one if any grid option was given."""
    from device_profiles.bench import BenchConfig

    scheme_list = _str_list(schemes) if schemes else ["none", "int8", "nf4"]
    extra = {"broker_url": broker_url}
    if name:
        extra["name"] = name
    try:
        config = (
            BenchConfig.quick(threads, scheme_list, **extra)
            if quick
            else BenchConfig.full(threads, scheme_list, **extra)
        )
        if any((models, ranks, batches, seqs)):
            points = BenchConfig.grid(
                _str_list(models) if models else ["minilm-l6"],
                scheme_list,
                _int_list(ranks) if ranks else [8],
                _int_list(batches) if batches else [2],
                _int_list(seqs) if seqs else [64],
            )
            config = BenchConfig(points=points, threads=threads, **extra)
        if timed_steps:
            config = dataclasses.replace(config, timed_steps=timed_steps)
    except (ProfileError, KeyError) as error:
        raise click.ClickException(f"bad grid: {error}") from error
    return config


def _run_bench_with_progress(config: BenchConfig, console: Console) -> DeviceProfile:
    """A grid takes one to tens of minutes, so show which point is being measured."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from device_profiles.bench import run_bench

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("bench", total=len(config.points) + 1)

        def on_progress(label: str, done: int, total: int) -> None:
            progress.update(task, description=label, completed=done, total=total)

        try:
            return run_bench(config, on_progress)
        except (BenchError, ProfileError) as error:
            raise click.ClickException(str(error)) from error


@profile_group.command("bench")
@click.option("--quick", is_flag=True, help="Small grid (MiniLM-L6), under two minutes.")
@click.option(
    "--out",
    "out_path",
    type=click.Path(path_type=Path),
    default=Path("measured-profile.toml"),
    show_default=True,
    help="Where to write the measured profile (TOML, atomic).",
)
@click.option(
    "--broker",
    "broker_url",
    metavar="URL",
    help="mqtt://host:port: also measure RTT and throughput through this broker.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    help="PNG of the grid (measured vs cost model).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="torch threads; default: physical cores not already busy (load average).",
)
@click.option("--models", help="Override the grid: comma-separated model shapes.")
@click.option("--schemes", help="Override: schemes (default: every usable one).")
@click.option("--ranks", help="Override: LoRA ranks.")
@click.option("--batches", help="Override: batch sizes.")
@click.option("--seqs", help="Override: sequence lengths.")
@click.option(
    "--steps",
    "timed_steps",
    type=click.IntRange(min=1),
    help="Timed steps per grid point (median is kept).",
)
@click.option("--name", help="Profile name (default: measured-<hostname>).")
def bench_command(
    quick: bool,
    out_path: Path,
    broker_url: str | None,
    plot_path: Path | None,
    threads: int | None,
    models: str | None,
    schemes: str | None,
    ranks: str | None,
    batches: str | None,
    seqs: str | None,
    timed_steps: int | None,
    name: str | None,
) -> None:
    """Measure this machine and write a measured profile.

    Measures fp32 matmul GFLOPS, memory bandwidth, and train-step time and peak RSS on a
    grid of (model, scheme, rank, batch, seq), each point in a fresh process; with --broker
    also RTT and throughput through the broker. Fits the cost model to the grid.
    """
    console = _console()
    if threads is None:
        threads = _default_threads()
    config = _bench_config(
        quick,
        threads,
        broker_url=broker_url,
        name=name,
        models=models,
        schemes=schemes,
        ranks=ranks,
        batches=batches,
        seqs=seqs,
        timed_steps=timed_steps,
    )
    console.print(f"bench: {len(config.points)} grid points, {threads} torch thread(s)")
    profile = _run_bench_with_progress(config, console)
    profile.save(out_path)
    console.print(
        f"wrote {profile.kind} profile {profile.name!r} to {out_path} "
        f"({len(profile.measurements)} points; "
        f"{profile.throughput.cpu_fp32_gflops:.1f} GFLOPS, "
        f"{profile.throughput.memory_bandwidth_gbps:.1f} GB/s)"
    )
    failed = len(config.points) - len(profile.measurements)
    if failed:
        console.print(f"[yellow]{failed} grid point(s) failed; see the log (-v)[/yellow]")
    if plot_path:
        from device_profiles.plot import plot_grid

        console.print(f"plot: {plot_grid(profile, plot_path)}")
