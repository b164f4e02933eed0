"""Schedulers compared in the fleet simulator, and the cost of scheduling 10,000 devices.

Part 1 runs `schoolfl coordinator simulate`'s comparison (same fleet, data and seed for every
scheduler: ours, an Oort-style selector without the equity floor, and random selection as in
Flower and FedML) and checks the issue's targets:
- time to the target accuracy with ours <= 0.5 x random's;
- no school below half the mean participation rate with ours;
- accuracy on the slow tier's schools with ours >= the Oort-style selector's.
Accuracies are the mean of the last five evaluations (one round's accuracy is noisy); a target
counts as reached when the mean of three consecutive evaluations reaches it; the comparison
runs on several seeds (fleet, data split, hidden speeds, drop-outs) and reports medians.

Part 2 times one `configure_round` over 10,000 devices in 500 schools, with a history of
earlier rounds and shared school links, for each scheduler (median of --repeats runs).

    python benchmarks/bench_scheduler.py --output bench-out/scheduler.md
    python benchmarks/bench_scheduler.py --rounds 20 --devices 100 --schools 10   # quicker
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from coordinator.config import ScheduleConfig, TaskConfig  # noqa: E402
from coordinator.fleet_history import FleetHistory, RoundOutcome  # noqa: E402
from coordinator.plan_fitting import SchoolLink  # noqa: E402
from coordinator.scheduler import DeviceCandidate, RoundContext  # noqa: E402
from coordinator.simulation.compare import (
    SimulationSettings,
    compare,
    embed_all_questions,
    plot_accuracy,
    prepare,
    summarise,
)
from coordinator.simulation.fleet import TIERS  # noqa: E402
from coordinator.utility_scheduler import scheduler_named  # noqa: E402
from device_profiles.profile import find_profile  # noqa: E402
from device_profiles.shapes import resolve_shape  # noqa: E402

TAIL = 5
"""Evaluations averaged for the 'final' accuracies."""


def tail_mean(values: list[float]) -> float:
    return sum(values[-TAIL:]) / len(values[-TAIL:])


def simulation_section(args: argparse.Namespace) -> list[str]:
    seeds = [int(seed) for seed in args.seeds.split(",")]
    started = time.perf_counter()
    embedded = embed_all_questions()
    per_seed: dict[str, list[dict[str, float | None]]] = {}
    lines = [
        f"### Fleet simulation: {args.devices} devices, {args.schools} schools, "
        f"{args.sim_seconds:.0f} simulated s (at most {args.rounds} rounds), "
        f"{args.per_round} updates per round, "
        f"deadline {args.deadline:.0f} s, seeds {args.seeds}",
        "",
        "Tiers (school link down/up): "
        + ", ".join(
            f"{tier} {link.down_mbps:.0f}/{link.up_mbps:.0f} Mbit/s"
            for tier, (link, _) in TIERS.items()
        )
        + ".",
        "",
        f"| seed | scheduler | time to {args.target:.2f} (sim s) | final acc | slow-tier acc | "
        "min / mean participation | Gini | schools < half mean | MB moved | "
        "late / dropped / surplus of assigned | rounds (sim s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    plotted = None
    for seed in seeds:
        settings = SimulationSettings(
            devices=args.devices,
            schools=args.schools,
            rounds=args.rounds,
            seed=seed,
            devices_per_round=args.per_round,
            deadline_seconds=args.deadline,
            target_accuracy=args.target,
            time_limit_seconds=args.sim_seconds,
        )
        fleet, results = compare(
            settings,
            prepare(settings, embedded),
            on_round=lambda name, point, seed=seed: print(
                f"  seed {seed} {name:7s} round {point.round_number:3d} "
                f"t={point.clock_seconds:7.0f} s accuracy {point.accuracy:.3f}",
                file=sys.stderr,
            ),
        )
        plotted = plotted or results
        for result in results:
            row = summarise(result, fleet, args.target)
            final = tail_mean([p.accuracy for p in result.curve])
            slow = tail_mean([p.slow_tier_accuracy for p in result.curve])
            per_seed.setdefault(result.scheduler, []).append(
                {
                    "time": row.time_to_target_seconds,
                    "final": final,
                    "slow": slow,
                    "below": row.schools_below_half_mean,
                    "gini": row.participation_gini,
                    "min": row.min_participation,
                    "mean": row.mean_participation,
                    "late": row.late_updates,
                    "wasted": row.wasted_updates / max(1, row.assigned_updates),
                }
            )
            reached = (
                "not reached"
                if row.time_to_target_seconds is None
                else f"{row.time_to_target_seconds:.0f}"
            )
            lines.append(
                f"| {seed} | {result.scheduler} | {reached} | {final:.3f} | {slow:.3f} | "
                f"{row.min_participation:.2f} / {row.mean_participation:.2f} | "
                f"{row.participation_gini:.3f} | {row.schools_below_half_mean} | "
                f"{row.bytes_moved / 1e6:.0f} | {row.late_updates} / {row.dropped_updates} / "
                f"{row.surplus_updates} of {row.assigned_updates} | "
                f"{row.rounds_completed} ({row.simulated_seconds:.0f}) |"
            )
    lines += [
        "",
        f"Over {len(seeds)} seeds (wall time {time.perf_counter() - started:.0f} s; "
        f"a target not reached within {args.sim_seconds:.0f} simulated s counts as infinite):",
        "",
        f"| scheduler | median time to {args.target:.2f} | mean final acc | mean slow-tier acc "
        "| mean Gini | schools < half mean (all seeds) | wasted share of assigned |",
        "|---|---|---|---|---|---|---|",
    ]
    medians: dict[str, float] = {}
    for name, rows in per_seed.items():
        times = [r["time"] if r["time"] is not None else math.inf for r in rows]
        medians[name] = statistics.median(times)
        lines.append(
            f"| {name} | {medians[name]:.0f} | {statistics.mean(r['final'] for r in rows):.3f} | "
            f"{statistics.mean(r['slow'] for r in rows):.3f} | "
            f"{statistics.mean(r['gini'] for r in rows):.3f} | "
            f"{sum(int(r['below']) for r in rows)} | "
            f"{statistics.mean(r['wasted'] for r in rows):.2f} |"
        )
    lines.append("")
    if "equity" in medians and "random" in medians:
        if math.isinf(medians["equity"]):
            lines.append(f"- median time to {args.target:.2f}: equity did not reach it (NOT met)")
        elif math.isinf(medians["random"]):
            lines.append(
                f"- median time to {args.target:.2f}: equity {medians['equity']:.0f} s; random "
                f"did not reach it within {args.sim_seconds:.0f} s (ratio < "
                f"{medians['equity'] / args.sim_seconds:.2f}; target <= 0.5: met)"
            )
        else:
            ratio = medians["equity"] / medians["random"]
            lines.append(
                f"- median time to {args.target:.2f}: equity / random = {ratio:.2f} "
                f"(target <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'})"
            )
        below = sum(int(r["below"]) for r in per_seed["equity"])
        lines.append(
            f"- schools below half the mean participation with equity, all seeds: {below} "
            f"(target 0: {'met' if below == 0 else 'NOT met'})"
        )
    if "equity" in per_seed and "oort" in per_seed:
        ours = statistics.mean(r["slow"] for r in per_seed["equity"])
        theirs = statistics.mean(r["slow"] for r in per_seed["oort"])
        lines.append(
            f"- slow-tier accuracy: equity {ours:.3f} vs oort {theirs:.3f} "
            f"(target >=: {'met' if ours >= theirs else 'NOT met'})"
        )
    if args.plot and plotted:
        plot_accuracy(plotted, args.target, Path(args.plot))
        lines.append(f"- plot (seed {seeds[0]}): {args.plot}")
    return lines


def timing_section(repeats: int) -> list[str]:
    names = [
        "raspberry-pi-4-4gb",
        "raspberry-pi-5-8gb",
        "jetson-nano-4gb",
        "jetson-orin-nano-8gb",
        "laptop-low-4gb",
        "laptop-mid-16gb",
    ]
    profiles = [find_profile(name) for name in names]
    rng = random.Random(0)
    devices, schools = 10_000, 500
    candidates = [
        DeviceCandidate(f"d{i:05d}", f"s{i % schools:03d}", profiles[rng.randrange(len(profiles))])
        for i in range(devices)
    ]
    links = {
        f"s{i:03d}": SchoolLink(4.0, 1.0) if i % 3 == 0 else SchoolLink(50.0, 10.0)
        for i in range(schools)
    }
    history = FleetHistory()
    for round_number in range(1, 6):
        outcomes = [
            RoundOutcome(
                c.device_id,
                c.school,
                rng.random() > 0.1,
                loss=rng.random() * 2,
                samples=rng.randrange(2, 50),
                actual_seconds=rng.uniform(10, 60),
                predicted_seconds=30.0,
            )
            for c in rng.sample(candidates, 200)
        ]
        history.observe(round_number, outcomes)
    shape = resolve_shape("minilm-l6")
    task = TaskConfig(
        id="timing",
        kind="classification",
        base_model="minilm-l6",
        labels=("a", "b"),
        schedule=ScheduleConfig(
            allowed_ranks=(4, 2),
            devices_per_round=100,
            min_updates=50,
            round_deadline_seconds=120.0,
        ),
    )
    context = RoundContext(history, links)
    lines = [
        "### Scheduling 10,000 devices (500 schools, shared links, 5 rounds of history)",
        "",
        "| scheduler | median seconds per round | devices chosen | target < 1 s |",
        "|---|---|---|---|",
    ]
    for name in ("equity", "oort", "random"):
        times, chosen = [], 0
        for _ in range(repeats):
            scheduler = scheduler_named(name)
            started = time.perf_counter()
            schedule = scheduler.configure_round(task, shape, candidates, 6, context)
            times.append(time.perf_counter() - started)
            chosen = len(schedule.plans)
        median = statistics.median(times)
        lines.append(f"| {name} | {median:.3f} | {chosen} | {'met' if median < 1 else 'NOT met'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--schools", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=300, help="At most this many rounds.")
    parser.add_argument(
        "--sim-seconds",
        type=float,
        default=1800.0,
        help="Each scheduler runs for this much simulated time: equal time, not equal rounds.",
    )
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--deadline", type=float, default=120.0)
    parser.add_argument("--target", type=float, default=0.7)
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated simulation seeds.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plot", default=None, help="PNG of accuracy over simulated time.")
    parser.add_argument("--output", default=None, help="Also write the report here.")
    parser.add_argument("--skip-simulation", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = [
        f"## Scheduler benchmark ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}; "
        f"command: `python benchmarks/bench_scheduler.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    lines = header + timing_section(args.repeats) + [""]
    print("\n".join(lines), flush=True)
    if not args.skip_simulation:
        section = simulation_section(args)
        print("\n".join(section), flush=True)
        lines += section
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
