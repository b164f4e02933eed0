"""`schoolfl profile bench`: measure this machine and write a measured profile.

The measurements run in `quantization.bench_worker` (a server that forks a fresh child per
grid point, so each point's peak RSS is that of one process; it lives beside the quantized
layers it measures, and this package reaches it only as a subprocess, never by import); this
module chooses the grid, drives the server, optionally probes the broker, fits the
calibration and assembles the profile.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import logging
import os
import platform
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from device_profiles.battery import read_battery
from device_profiles.broker_probe import measure_broker
from device_profiles.calibration import Observation, fit_calibration
from device_profiles.errors import BenchError, ProfileError
from device_profiles.plan import TrainingPlan
from device_profiles.profile import (
    Calibration,
    DeviceProfile,
    Hardware,
    Measurement,
    Network,
    Power,
    Throughput,
)
from device_profiles.shapes import KNOWN_SHAPES, ModelShape

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridPoint:
    """One (model, scheme, rank, batch, seq) to measure."""

    model_shape: ModelShape
    plan: TrainingPlan


@dataclass(frozen=True)
class BenchConfig:
    """What `bench` measures; `quick()` and `full()` are the CLI's two grids."""

    points: tuple[GridPoint, ...]
    threads: int
    """torch threads in every measurement (set explicitly: timings depend on it)."""
    warmup_steps: int = 2
    """Untimed steps first: allocator growth and oneDNN kernel selection happen there."""
    timed_steps: int = 3
    broker_url: str | None = None
    point_timeout_seconds: float = 600.0
    name: str = field(default_factory=lambda: f"measured-{platform.node() or 'host'}")

    @staticmethod
    def grid(
        models: list[str],
        schemes: list[str],
        ranks: list[int],
        batches: list[int],
        seqs: list[int],
        target_modules: tuple[str, ...] = ("q", "v"),
    ) -> tuple[GridPoint, ...]:
        """Cartesian grid of known model shapes (the calibration looks shapes up by name)."""
        unknown = [model for model in models if model not in KNOWN_SHAPES]
        if unknown:
            raise ProfileError(
                f"unknown model shape(s) {', '.join(unknown)} for the bench; expected "
                f"{', '.join(KNOWN_SHAPES)}"
            )
        points = [
            GridPoint(
                KNOWN_SHAPES[model],
                TrainingPlan(
                    scheme=scheme,
                    rank=rank,
                    batch_size=batch,
                    seq_len=seq,
                    target_modules=target_modules,
                ),
            )
            for model, scheme, rank, batch, seq in itertools.product(
                models, schemes, ranks, batches, seqs
            )
        ]
        return tuple(points)

    @classmethod
    def quick(cls, threads: int, schemes: list[str], **kwargs: Any) -> BenchConfig:
        """About a minute on a 2-core laptop: MiniLM-L6, two ranks, two batch x seq sizes."""
        points = cls.grid(["minilm-l6"], schemes, [4, 16], [1, 4], [32])
        points += cls.grid(["minilm-l6"], ["none"], [8], [2], [128])
        return cls(points=points, threads=threads, **kwargs)

    @classmethod
    def full(cls, threads: int, schemes: list[str], **kwargs: Any) -> BenchConfig:
        """MiniLM-L6 and SmolLM2-135M over ranks, batches and sequence lengths (tens of min)."""
        points = cls.grid(["minilm-l6"], schemes, [4, 16], [1, 4], [32, 128])
        points += cls.grid(["smollm2-135m"], schemes, [8], [1, 2], [64, 128])
        return cls(points=points, threads=threads, timed_steps=3, **kwargs)


@dataclass(frozen=True)
class PointResult:
    """A measured grid point (or the reason it failed)."""

    point: GridPoint
    step_seconds: float = 0.0
    step_seconds_spread: float = 0.0
    step_cpu_seconds: float = 0.0
    peak_rss_bytes: int = 0
    load_peak_rss_bytes: int = 0
    error: str = ""


class WorkerServer:
    """The `bench_worker` process: start once, `request()` many times, `stop()`."""

    command = (sys.executable, "-m", "quantization.bench_worker")

    def __init__(self, timeout_seconds: float = 120.0) -> None:
        self._log = tempfile.TemporaryFile(mode="w+")
        environment = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        self._process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=environment,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        self._selector = selectors.DefaultSelector()
        assert self._process.stdout is not None
        self._selector.register(self._process.stdout, selectors.EVENT_READ)
        self.hello = self._read_line(timeout_seconds)
        self.baseline_rss_bytes = int(self.hello["baseline_rss_bytes"])

    def _read_line(self, timeout_seconds: float) -> dict[str, Any]:
        stdout: IO[str] | None = self._process.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self._selector.select(timeout=max(deadline - time.monotonic(), 0.01)):
                line = stdout.readline()
                if not line:
                    break
                return dict(json.loads(line))
        raise BenchError(
            f"bench worker gave no answer within {timeout_seconds:.0f} s; "
            f"its log ends with:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 15) -> str:
        self._log.seek(0)
        return "\n".join(self._log.read().splitlines()[-lines:])

    def request(self, payload: dict[str, Any], timeout_seconds: float) -> dict[str, Any]:
        stdin = self._process.stdin
        assert stdin is not None
        stdin.write(json.dumps(dict(payload, timeout_seconds=timeout_seconds)) + "\n")
        stdin.flush()
        return self._read_line(timeout_seconds + 30)

    def stop(self) -> None:
        if self._process.stdin:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._selector.close()
        self._log.close()


def measure_points(
    server: WorkerServer, config: BenchConfig, points: tuple[GridPoint, ...]
) -> Iterator[PointResult]:
    """Measure each point in a fresh forked child; yields as each finishes."""
    for index, point in enumerate(points):
        plan = point.plan
        answer = server.request(
            {
                "op": "train",
                "id": index,
                "threads": config.threads,
                "shape": point.model_shape.to_dict(),
                "scheme": plan.scheme,
                "rank": plan.rank,
                "batch_size": plan.batch_size,
                "seq_len": plan.seq_len,
                "target_modules": list(plan.target_modules),
                "warmup_steps": config.warmup_steps,
                "steps": config.timed_steps,
            },
            config.point_timeout_seconds,
        )
        if not answer.get("ok"):
            logger.warning("grid point %s failed: %s", point, answer.get("error"))
            yield PointResult(point, error=str(answer.get("error")))
            continue
        # A forked child maps the server's shared-library pages lazily, so its RSS starts
        # below that of a fresh process by the untouched part; add it back.
        untouched = max(server.baseline_rss_bytes - int(answer["baseline_rss_bytes"]), 0)
        yield PointResult(
            point,
            step_seconds=float(answer["step_seconds"]),
            step_seconds_spread=float(answer["step_seconds_spread"]),
            step_cpu_seconds=float(answer.get("step_cpu_seconds", 0.0)),
            peak_rss_bytes=int(answer["child_maxrss_bytes"]) + untouched,
            load_peak_rss_bytes=int(answer["ready_rss_bytes"]) + untouched,
        )


def _hardware(threads: int) -> Hardware:
    memory = psutil.virtual_memory()
    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: keep platform's answer
    measured = "measured: psutil / /proc/cpuinfo on this machine"
    return Hardware(
        architecture=platform.machine(),
        cpu_model=cpu_model,
        cores=psutil.cpu_count(logical=False) or os.cpu_count() or threads,
        ram_bytes=int(memory.total),
        os_reserved_bytes=int(memory.total - memory.available),
        accelerator="none",
        sources={
            k: measured
            for k in ("architecture", "cpu_model", "cores", "ram_bytes", "os_reserved_bytes")
        },
    )


ProgressReport = Callable[[str, int, int], None]
"""`on_progress(label, done, total)`: the CLI's progress bar (a no-op when none is given)."""


def _measure_machine(server: WorkerServer, config: BenchConfig) -> dict[str, Any]:
    """The server's matmul and bandwidth answer; without it no profile can be built, so fail."""
    machine = server.request(
        {"op": "machine", "threads": config.threads, "id": "machine"},
        config.point_timeout_seconds,
    )
    if not machine.get("ok"):
        raise BenchError(f"machine measurement failed: {machine.get('error')}")
    return machine


def _usable_schemes(machine: dict[str, Any]) -> list[str]:
    """The worker names each scheme with the reason it cannot run here, or None if it can."""
    return sorted(name for name, reason in machine["schemes"].items() if reason is None)


def _measure_grid(
    server: WorkerServer, config: BenchConfig, report: ProgressReport, total: int
) -> list[PointResult]:
    """Every grid point, reported as it finishes (steps 0 and 1 were the server and machine)."""
    results = []
    for done, result in enumerate(measure_points(server, config, config.points), start=2):
        results.append(result)
        plan = result.point.plan
        report(
            f"{result.point.model_shape.name} {plan.scheme} r{plan.rank} "
            f"b{plan.batch_size} s{plan.seq_len}",
            done,
            total,
        )
    return results


def _successful(results: list[PointResult]) -> list[PointResult]:
    """Failed points are dropped; a grid with none left has nothing to calibrate on."""
    good = [r for r in results if not r.error]
    if not good:
        errors = "; ".join(sorted({r.error for r in results}))
        raise BenchError(f"no grid point could be measured: {errors}")
    return good


def _network(config: BenchConfig, report: ProgressReport, total: int) -> Network:
    """The broker link when one is given, else placeholder figures labelled as assumed."""
    network = Network(
        down_mbps=100.0,
        up_mbps=20.0,
        rtt_ms=20.0,
        sources=dict.fromkeys(("down_mbps", "up_mbps", "rtt_ms"), "assumed (no --broker given)"),
    )
    if config.broker_url:
        link = measure_broker(config.broker_url)
        source = f"measured through {config.broker_url}"
        network = Network(
            down_mbps=link.throughput_mbps,
            up_mbps=link.throughput_mbps,
            rtt_ms=link.rtt_ms,
            sources=dict.fromkeys(("down_mbps", "up_mbps", "rtt_ms"), source),
        )
        report("broker round trip", total, total)
    return network


def _throughput(
    machine: dict[str, Any], usable: list[str], baseline: int, threads: int, measured: str
) -> Throughput:
    """No GPU path is benchmarked yet, so its rate is recorded as zero (measured as absent)."""
    return Throughput(
        cpu_fp32_gflops=float(machine["cpu_fp32_gflops"]),
        gpu_fp32_gflops=0.0,
        memory_bandwidth_gbps=float(machine["memory_bandwidth_gbps"]),
        quant_schemes=tuple(usable),
        baseline_rss_bytes=baseline,
        threads=threads,
        sources=dict.fromkeys(
            (
                "cpu_fp32_gflops",
                "gpu_fp32_gflops",
                "memory_bandwidth_gbps",
                "baseline_rss_bytes",
            ),
            measured,
        ),
    )


def _measurement(result: PointResult) -> Measurement:
    """A grid point as the profile stores it, so the calibration can be refitted later."""
    return Measurement(
        model=result.point.model_shape.name,
        scheme=result.point.plan.scheme,
        rank=result.point.plan.rank,
        batch_size=result.point.plan.batch_size,
        seq_len=result.point.plan.seq_len,
        step_seconds=result.step_seconds,
        peak_rss_bytes=result.peak_rss_bytes,
        load_peak_rss_bytes=result.load_peak_rss_bytes,
        step_seconds_spread=result.step_seconds_spread,
        step_cpu_seconds=result.step_cpu_seconds,
    )


def _uncalibrated_profile(
    config: BenchConfig,
    machine: dict[str, Any],
    usable: list[str],
    baseline: int,
    good: list[PointResult],
    network: Network,
) -> DeviceProfile:
    """The measured profile with default coefficients: the fit needs its rates to start from."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    measured = f"measured by schoolfl profile bench at {now}"
    battery, unreadable = read_battery()
    return DeviceProfile(
        name=config.name,
        kind="measured",
        description=f"{platform.node()} measured with {config.threads} torch thread(s)",
        measured_at=now,
        hardware=_hardware(config.threads),
        throughput=_throughput(machine, usable, baseline, config.threads, measured),
        network=network,
        power=Power(
            source="unknown" if unreadable else "battery+mains" if battery else "mains",
            sources={"source": unreadable or "measured: psutil.sensors_battery"},
        ),
        calibration=Calibration(),
        measurements=tuple(_measurement(r) for r in good),
    )


def run_bench(
    config: BenchConfig,
    on_progress: ProgressReport | None = None,
) -> DeviceProfile:
    """Measure the machine, the grid and (with a broker) the link; return a measured profile."""
    report = on_progress or (lambda label, done, total: None)
    total = len(config.points) + 1 + (1 if config.broker_url else 0)
    report("starting measurement server", 0, total)
    server = WorkerServer()
    try:
        machine = _measure_machine(server, config)
        usable = _usable_schemes(machine)
        report("matmul and memory bandwidth", 1, total)
        results = _measure_grid(server, config, report, total)
        baseline = server.baseline_rss_bytes
    finally:
        server.stop()
    good = _successful(results)
    network = _network(config, report, total)
    profile = _uncalibrated_profile(config, machine, usable, baseline, good, network)
    observations = observations_from(profile)
    calibration = fit_calibration(
        profile, observations, source=f"fitted on {len(observations)} measured points"
    )
    return dataclasses.replace(profile, calibration=calibration)


def observations_from(profile: DeviceProfile) -> list[Observation]:
    """A measured profile's grid as calibration observations (unknown models skipped)."""
    observations = []
    for row in profile.measurements:
        shape = KNOWN_SHAPES.get(row.model)
        if shape is None:
            logger.warning("measurement of unknown model %r ignored for calibration", row.model)
            continue
        plan = TrainingPlan(
            scheme=row.scheme, rank=row.rank, batch_size=row.batch_size, seq_len=row.seq_len
        )
        observations.append(Observation(shape, plan, row.step_seconds, row.peak_rss_bytes))
    return observations
