"""`schoolfl profile ...`: what planners run to know which hardware can train what.

Commands: `bench` (measure this machine), `plan` (which plans fit which devices), `show`,
`list` and `validate` (inspect profile files). torch is imported only by `bench`'s worker
process, so every other command stays fast on a Raspberry Pi. `list`, `show` and `plan`
print whole values when stdout is not a terminal and take `--json` (`cli_output`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from device_profiles.cli_output import TextTable, echo_json, echo_note, echo_table, gib
from device_profiles.cli_output import console as _console
from device_profiles.errors import BenchError, ProfileError, ProfileValidationError
from device_profiles.plan import KNOWN_SCHEMES, TASK_TARGET_MODULES
from device_profiles.profile import (
    SECTION_FIELDS,
    DeviceProfile,
    find_profile,
    load_reference_profiles,
    reference_profile_paths,
    to_dict,
)
from device_profiles.shapes import LINEAR_ROLES, format_count, resolve_shape
from device_profiles.transfer import (
    DEFAULT_DEVICES_SHARING,
    DEFAULT_SCHOOL_DOWN_MBPS,
    DEFAULT_SCHOOL_UP_MBPS,
    SharedSchoolLink,
)

if TYPE_CHECKING:
    from device_profiles.bench import BenchConfig

JSON_OPTION = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (keys: docs/profile.md)."
)


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


def _link_mbps(text: str) -> tuple[float, float]:
    """'DOWN/UP' or one figure for both, in Mbit/s."""
    parts = text.split("/")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if (
        len(values) not in (1, 2)
        or min(values, default=0.0) <= 0
        or any(value != value or value == float("inf") for value in values)
    ):
        raise click.BadParameter(f"{text!r}: expected DOWN/UP Mbit/s (e.g. 100/30) or one number")
    return (values[0], values[-1])


def _targets(text: str, family: str) -> tuple[str, ...]:
    if text == "task":
        return TASK_TARGET_MODULES[family]
    roles = tuple(_str_list(text))
    unknown = [role for role in roles if role not in LINEAR_ROLES]
    if not roles or unknown:
        raise click.BadParameter(
            f"{text!r}: expected 'task' or a comma-separated subset of {', '.join(LINEAR_ROLES)}"
        )
    return roles


@click.group("profile")
def profile_group() -> None:
    """Benchmark devices, inspect profiles and plan which models fit which hardware."""


def _profile_summary(profile: DeviceProfile) -> dict[str, Any]:
    """One `profile list --json` entry (keys: docs/profile.md)."""
    hardware, throughput, network = profile.hardware, profile.throughput, profile.network
    return {
        "name": profile.name,
        "kind": profile.kind,
        "description": profile.description,
        "support": profile.support,
        "validated": profile.predictions_validated,
        "architecture": hardware.architecture,
        "cores": hardware.cores,
        "ram_bytes": hardware.ram_bytes,
        "usable_ram_bytes": profile.usable_ram_bytes,
        "accelerator": hardware.accelerator,
        "gpu_memory_bytes": hardware.gpu_memory_bytes or 0,
        "cpu_fp32_gflops": throughput.cpu_fp32_gflops,
        "gpu_fp32_gflops": throughput.gpu_fp32_gflops,
        "memory_bandwidth_gbps": throughput.memory_bandwidth_gbps,
        "quant_schemes": list(throughput.quant_schemes),
        "down_mbps": network.down_mbps,
        "up_mbps": network.up_mbps,
        "rtt_ms": network.rtt_ms,
        "power_source": profile.power.source,
    }


@profile_group.command("list")
@JSON_OPTION
def list_command(as_json: bool) -> None:
    """List the reference profiles shipped with schoolfl."""
    try:
        profiles = load_reference_profiles()
    except ProfileError as error:
        raise click.ClickException(str(error)) from error
    if as_json:
        echo_json([_profile_summary(profile) for profile in profiles])
        return
    columns = (
        "name",
        "kind",
        "cores",
        "RAM",
        "usable RAM",
        "CPU GFLOPS",
        "GPU GFLOPS",
        "mem GB/s",
        "schemes",
        "down/up Mbit/s",
        "power",
    )
    table = TextTable("reference profiles", columns)
    for profile in profiles:
        throughput = profile.throughput
        table.add_row(
            profile.name,
            profile.kind,
            str(profile.hardware.cores),
            gib(profile.hardware.ram_bytes),
            gib(profile.usable_ram_bytes),
            f"{throughput.cpu_fp32_gflops:g}",
            f"{throughput.gpu_fp32_gflops:g}",
            f"{throughput.memory_bandwidth_gbps:g}",
            ",".join(throughput.quant_schemes),
            f"{profile.network.down_mbps:g}/{profile.network.up_mbps:g}",
            profile.power.source,
        )
    echo_table(table)
    if profiles:
        echo_note(f"files: {reference_profile_paths()[0].parent}")


@profile_group.command("show")
@click.argument("profile_ref", metavar="NAME_OR_FILE")
@JSON_OPTION
def show_command(profile_ref: str, as_json: bool) -> None:
    """Show every field of a profile (file path or reference name) with its source."""
    try:
        profile = find_profile(profile_ref)
    except ProfileError as error:
        raise click.ClickException(str(error)) from error
    if as_json:
        document = to_dict(profile)
        document["derived"] = {
            "usable_ram_bytes": profile.usable_ram_bytes,
            "validated": profile.predictions_validated,
        }
        echo_json(document)
        return
    echo_note(f"{profile.name} ({profile.kind}) {profile.description}", "bold")
    if profile.measured_at:
        echo_note(f"measured at {profile.measured_at}")
    if profile.support == "unsupported":
        echo_note(f"UNSUPPORTED: {profile.support_note}", "red")
    if not profile.predictions_validated:
        echo_note(f"unvalidated: {profile.validation_note}", "yellow")
    if profile.notes:
        echo_note(f"notes: {profile.notes}")
    table = TextTable("", ("field", "value", "source"))
    for section, specs in SECTION_FIELDS.items():
        part = getattr(profile, section)
        for spec in specs:
            value = getattr(part, spec.name)
            text = ", ".join(value) if isinstance(value, tuple) else str(value)
            if spec.name.endswith("_bytes") and isinstance(value, (int, float)):
                text = f"{value} ({gib(value)})"
            table.add_row(f"{section}.{spec.name}", text, part.sources.get(spec.name, ""))
    echo_table(table)
    if profile.measurements:
        columns = ("model", "scheme", "rank", "batch", "seq", "step s", "cpu s", "spread", "peak")
        grid = TextTable(f"{len(profile.measurements)} measured grid points", columns)
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
                gib(row.peak_rss_bytes),
            )
        echo_table(grid)


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
@click.option(
    "--targets",
    default="task",
    show_default=True,
    help="LoRA target roles (q,k,v,o,gate,up,down); 'task': what a coordinator task "
    "trains (encoder q,k,v; decoder all seven).",
)
@click.option(
    "--levers/--no-levers",
    default=True,
    show_default=True,
    help="Price a plan that does not fit with the memory levers the trainer pulls "
    "(gradient checkpointing, then micro-batches).",
)
@click.option(
    "--school-link-mbps",
    default=f"{DEFAULT_SCHOOL_DOWN_MBPS:g}/{DEFAULT_SCHOOL_UP_MBPS:g}",
    show_default=True,
    metavar="DOWN/UP",
    help="The school's whole link in Mbit/s (default: UK DfE primary-school minimum).",
)
@click.option(
    "--devices-sharing",
    default=DEFAULT_DEVICES_SHARING,
    show_default=True,
    type=click.IntRange(min=1),
    help="Devices of the school transferring in the same round (default: a class set).",
)
@click.option("--fits-only", is_flag=True, help="Hide plans that do not fit.")
@JSON_OPTION
def plan_command(
    model_ref: str,
    steps: int,
    profile_refs: tuple[str, ...],
    schemes: str,
    ranks: str,
    batches: str,
    seqs: str,
    targets: str,
    levers: bool,
    school_link_mbps: str,
    devices_sharing: int,
    fits_only: bool,
    as_json: bool,
) -> None:
    """For every profile: which (scheme, rank, batch, seq) fit, with which memory levers,
    how long a round takes and what it moves over the network."""
    from device_profiles.plan_view import (
        bandwidth_note,
        plan_json,
        plan_table,
        unusable_lines,
    )
    from device_profiles.planner import evaluate, plan_grid

    down_mbps, up_mbps = _link_mbps(school_link_mbps)
    school_link = SharedSchoolLink(down_mbps, up_mbps, devices_sharing)
    try:
        shape = resolve_shape(model_ref)
        target_modules = _targets(targets, shape.family)
        profiles = (
            [find_profile(ref) for ref in profile_refs]
            if profile_refs
            else load_reference_profiles()
        )
        plans = plan_grid(
            _str_list(schemes),
            _int_list(ranks),
            _int_list(batches),
            _int_list(seqs),
            steps,
            target_modules,
        )
    except ProfileError as error:
        raise click.ClickException(str(error)) from error
    evaluated = evaluate(profiles, shape, plans, school_link, use_levers=levers)
    if as_json:
        echo_json(
            plan_json(shape, steps, target_modules, school_link, evaluated, fits_only=fits_only)
        )
        return
    echo_note(
        f"model {shape.name}: {shape.family}, {format_count(shape.total_parameters())} "
        f"parameters; {steps} local steps per round; LoRA on {', '.join(target_modules)}"
    )
    echo_note(bandwidth_note(school_link))
    for result in evaluated:
        profile = result.profile
        if profile.support == "unsupported":
            echo_note(f"{profile.name} is UNSUPPORTED: {profile.support_note}", "red")
        if not profile.predictions_validated:
            echo_note(f"{profile.name}: unvalidated: {profile.validation_note}", "yellow")
        echo_table(plan_table(result, fits_only=fits_only))
        for line in unusable_lines(result):
            echo_note(line)
        if not result.any_fits:
            echo_note(f"{profile.name}: no plan in the grid fits", "red")


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
