"""Validate the cost model against measurement on this machine.

Measures a grid of real model shapes (MiniLM-L6, SmolLM2-135M; random weights) x schemes x
ranks x batch x seq, each point in a fresh forked process (peak RSS of that process), in
`--passes` interleaved passes (each pass in a different order; the per-point median across
passes is kept). Calibrates the cost model on half of the points and predicts the other
half. Targets: step time median |error| <= 15 %, max <= 35 %; peak memory within 20 %.

    python benchmarks/bench_costmodel.py --threads 2 --passes 2 --raw bench-out/costmodel.json
    python benchmarks/bench_costmodel.py --from-raw bench-out/costmodel.json   # re-analyse
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from device_profiles.bench import BenchConfig, WorkerServer, measure_points
from device_profiles.calibration import Observation, fit_calibration
from device_profiles.cost_model import predict
from device_profiles.plan import TrainingPlan
from device_profiles.profile import (
    Calibration,
    DeviceProfile,
    Hardware,
    Network,
    Power,
    Throughput,
)
from device_profiles.shapes import KNOWN_SHAPES


def grid(schemes: list[str]) -> tuple:
    points = BenchConfig.grid(["minilm-l6"], schemes, [4, 16], [1, 4], [32, 128])
    points += BenchConfig.grid(["smollm2-135m"], schemes, [8], [1, 2], [32, 64])
    return points


def measure(args: argparse.Namespace) -> dict:
    points = grid(args.schemes.split(","))
    config = BenchConfig(
        points=points, threads=args.threads, warmup_steps=2, timed_steps=args.steps
    )
    server = WorkerServer()
    rows: dict[int, dict] = {
        i: {"steps": [], "cpu_steps": [], "peaks": []} for i in range(len(points))
    }
    started = time.monotonic()
    try:
        machine = [server.request({"op": "machine", "threads": args.threads, "id": "m"}, 300)]
        for number in range(args.passes):
            order = list(range(len(points)))
            random.Random(1000 * args.seed + number).shuffle(order)
            ordered = tuple(points[i] for i in order)
            for index, result in zip(order, measure_points(server, config, ordered), strict=True):
                if result.error:
                    print(f"point {index} failed: {result.error}", file=sys.stderr)
                    continue
                rows[index]["steps"].append(result.step_seconds)
                rows[index]["cpu_steps"].append(result.step_cpu_seconds)
                rows[index]["peaks"].append(result.peak_rss_bytes)
                rows[index]["spread"] = result.step_seconds_spread
                print(
                    f"pass {number} point {index:2d} {result.point.model_shape.name:13s} "
                    f"{result.point.plan.scheme:5s} r{result.point.plan.rank:<2d} "
                    f"b{result.point.plan.batch_size} s{result.point.plan.seq_len:<4d} "
                    f"{result.step_seconds:7.3f} s {result.peak_rss_bytes / 1e6:7.0f} MB "
                    f"[{time.monotonic() - started:5.0f} s]",
                    flush=True,
                )
            machine.append(
                server.request({"op": "machine", "threads": args.threads, "id": "m"}, 300)
            )
        baseline = server.baseline_rss_bytes
    finally:
        server.stop()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor()}",
        "threads": args.threads,
        "passes": args.passes,
        "timed_steps": args.steps,
        "baseline_rss_bytes": baseline,
        "gflops": [m["cpu_fp32_gflops"] for m in machine],
        "bandwidth": [m["memory_bandwidth_gbps"] for m in machine],
        "points": [
            {
                "model": p.model_shape.name,
                "scheme": p.plan.scheme,
                "rank": p.plan.rank,
                "batch_size": p.plan.batch_size,
                "seq_len": p.plan.seq_len,
                "steps": rows[i]["steps"],
                "cpu_steps": rows[i]["cpu_steps"],
                "peaks": rows[i]["peaks"],
            }
            for i, p in enumerate(points)
            if rows[i]["steps"]
        ],
    }


TIMINGS = {"wall": "steps", "cpu": "cpu_steps"}
"""Wall-clock step time, or CPU seconds of the (one-thread) process: the latter leaves out
the time other processes held the core on a shared machine."""
ESTIMATORS = {"median": statistics.median, "min": min}
"""How a point's per-pass step times are pooled: median (default), or min (the usual
estimator when interference only ever adds time)."""


def merge(raws: list[dict]) -> dict:
    """Pool the passes of several runs on the same grid (per-point lists concatenated)."""
    merged = dict(
        raws[0],
        points=[
            dict(
                p,
                steps=list(p["steps"]),
                cpu_steps=list(p.get("cpu_steps", [])),
                peaks=list(p["peaks"]),
            )
            for p in raws[0]["points"]
        ],
    )
    key = ("model", "scheme", "rank", "batch_size", "seq_len")
    index = {tuple(p[k] for k in key): p for p in merged["points"]}
    for raw in raws[1:]:
        merged["passes"] += raw["passes"]
        merged["gflops"] = merged["gflops"] + raw["gflops"]
        merged["bandwidth"] = merged["bandwidth"] + raw["bandwidth"]
        for point in raw["points"]:
            target = index.get(tuple(point[k] for k in key))
            if target is not None:
                target["steps"] += point["steps"]
                target["cpu_steps"] = target.get("cpu_steps", []) + point.get("cpu_steps", [])
                target["peaks"] += point["peaks"]
    return merged


def _describe(calibration: Calibration) -> str:
    return (
        f"flop_efficiency {calibration.flop_efficiency:.3f}, memory_efficiency "
        f"{calibration.memory_efficiency:.3f}, dequant int8 {calibration.dequant_int8:.2f}, nf4 "
        f"{calibration.dequant_nf4:.2f}, per layer {calibration.per_layer_seconds * 1e3:.2f} ms, "
        f"fixed {calibration.fixed_seconds * 1e3:.1f} ms, activation factor "
        f"{calibration.activation_factor_encoder:.3f} (encoder) / "
        f"{calibration.activation_factor_decoder:.3f} (decoder), dequant workspace "
        f"{calibration.dequant_memory_fraction:.3f}, overhead "
        f"{calibration.memory_overhead_bytes / 1e6:.1f} MB"
    )


def analyse(raw: dict, estimator: str = "median", timing: str = "wall") -> tuple[str, bool]:
    gflops = statistics.median(raw["gflops"])
    bandwidth = statistics.median(raw["bandwidth"])
    profile = DeviceProfile(
        name="this-machine",
        kind="measured",
        description="bench_costmodel",
        hardware=Hardware("x86_64", "bench", raw["threads"], 1 << 40, 0),
        throughput=Throughput(
            gflops,
            0.0,
            bandwidth,
            ("none", "int8", "nf4"),
            raw["baseline_rss_bytes"],
            raw["threads"],
        ),
        network=Network(100.0, 20.0, 1.0),
        power=Power("mains"),
    )
    observations = []
    for row in raw["points"]:
        plan = TrainingPlan(
            scheme=row["scheme"],
            rank=row["rank"],
            batch_size=row["batch_size"],
            seq_len=row["seq_len"],
        )
        observations.append(
            Observation(
                KNOWN_SHAPES[row["model"]],
                plan,
                ESTIMATORS[estimator](row[TIMINGS[timing]]),
                statistics.median(row["peaks"]),
            )
        )
    # Checkerboard split: a point is in the calibration half when the sum of its positions
    # along the scheme, rank, batch and seq axes is even, so each half spans every axis and
    # the test half is interpolation between calibration neighbours, not extrapolation.
    axes = ("scheme", "rank", "batch_size", "seq_len")
    values = {axis: sorted({row[axis] for row in raw["points"]}, key=str) for axis in axes}
    parity = [sum(values[axis].index(row[axis]) for axis in axes) % 2 for row in raw["points"]]
    train = [o for o, p in zip(observations, parity, strict=True) if p == 0]
    test = [o for o, p in zip(observations, parity, strict=True) if p == 1]
    test_rows = [r for r, p in zip(raw["points"], parity, strict=True) if p == 1]
    profile = dataclasses.replace(profile, calibration=fit_calibration(profile, train))
    lines = [
        "| model | scheme | rank | batch | seq | measured s | predicted s | err | pass spread |"
        " measured peak MB | predicted MB | err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    time_errors, memory_errors = [], []
    for observation, row in zip(test, test_rows, strict=True):
        prediction = predict(profile, observation.model_shape, observation.plan)
        time_error = prediction.step_seconds / observation.step_seconds - 1
        memory_error = prediction.peak_bytes / observation.peak_bytes - 1
        time_errors.append(abs(time_error))
        memory_errors.append(abs(memory_error))
        steps = row[TIMINGS[timing]]
        spread = (max(steps) - min(steps)) / statistics.median(steps) if len(steps) > 1 else 0
        plan = observation.plan
        lines.append(
            f"| {observation.model_shape.name} | {plan.scheme} | {plan.rank} | "
            f"{plan.batch_size} | {plan.seq_len} | {observation.step_seconds:.3f} | "
            f"{prediction.step_seconds:.3f} | {time_error:+.0%} | {spread:.0%} | "
            f"{observation.peak_bytes / 1e6:.0f} | {prediction.peak_bytes / 1e6:.0f} | "
            f"{memory_error:+.0%} |"
        )
    calibration = profile.calibration
    ok = (
        statistics.median(time_errors) <= 0.15
        and max(time_errors) <= 0.35
        and max(memory_errors) <= 0.20
    )
    summary = [
        f"- date: {raw['date']}; machine: {raw['machine']}; torch threads: {raw['threads']}; "
        f"{raw['passes']} interleaved passes x {raw['timed_steps']} timed steps per point "
        f"(median of each pass's steps; {estimator} across passes; {timing} time)",
        f"- measured matmul {gflops:.1f} GFLOPS (runs: "
        f"{', '.join(f'{g:.1f}' for g in raw['gflops'])}), copy bandwidth {bandwidth:.1f} GB/s",
        f"- calibrated on {len(train)} points, predicted {len(test)}: " + _describe(calibration),
        f"- fitted on all {len(observations)} points (what the reference profiles take): "
        + _describe(fit_calibration(profile, observations)),
        f"- step time |error|: median {statistics.median(time_errors):.1%}, max "
        f"{max(time_errors):.1%} (targets 15 % / 35 %)",
        f"- peak memory |error|: median {statistics.median(memory_errors):.1%}, max "
        f"{max(memory_errors):.1%} (target 20 %)",
        f"- targets met: {'yes' if ok else 'NO'}",
    ]
    return "\n".join(summary + ["", *lines]), ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per point per pass")
    parser.add_argument("--schemes", default="none,int8,nf4")
    parser.add_argument("--raw", type=Path, help="write raw measurements (JSON) here")
    parser.add_argument("--timing", choices=sorted(TIMINGS), default="wall")
    parser.add_argument("--estimator", choices=sorted(ESTIMATORS), default="median")
    parser.add_argument("--seed", type=int, default=0, help="shuffles the pass order")
    parser.add_argument(
        "--from-raw",
        type=Path,
        nargs="+",
        help="analyse saved measurements instead (several files: passes are merged)",
    )
    args = parser.parse_args()
    if args.from_raw:
        raw = merge([json.loads(path.read_text()) for path in args.from_raw])
    else:
        raw = measure(args)
        if args.raw:
            args.raw.parent.mkdir(parents=True, exist_ok=True)
            args.raw.write_text(json.dumps(raw, indent=1))
    report, ok = analyse(raw, args.estimator, args.timing)
    print(report)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
