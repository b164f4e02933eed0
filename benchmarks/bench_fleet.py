"""Fleet load benchmark: thousands of emulated devices against a real coordinator and broker.

Measures, per fleet size (one run each): the coordinator's CPU (% of one core while idle,
CPU-seconds per round) and peak RSS (VmHWM), the time from a round's last accepted update
to the new model version reaching the devices, enrollments per second, updates sent /
accepted / lost (sent, never acknowledged) / refused, the messages the coordinator refused
(its store's `refusals` table), the broker's RSS after each round, and whether every round
completed.

How: a real Mosquitto on a free loopback port (`max_connections -1`, RLIMIT_NOFILE raised
to the hard limit, persistence off so the broker's disk stays out of the figures); a real
`schoolfl -v coordinator serve` with a generated coordinator.toml in a temporary state
folder (one MiniLM classification task, LoRA r=8, int8 updates, no eval file); one-time
tokens issued through the coordinator's store as `schoolfl coordinator enroll-token` does;
`--processes` workers of `fleet_devices.py`, each driving its share of the devices from one
selector loop (one MQTT connection, key and signed frames per device, no torch). The parent
decodes the coordinator's version-0 adapter body once with torch and int8-encodes (the
agent's default) a few random deltas of its shapes; devices send those bytes.

Phases: (1) devices connect at `--connect-rate`, enroll and, as `agent run` does, heartbeat
at once and then every 60 s (an idle agent publishes once a minute); the coordinator's
`startup_grace_seconds` (`--startup-grace`, by default long enough for the fleet to enroll
and beat once) holds round 1 back, and the
quiet stretch before it is "idle before"; (2) rounds: an assigned device drops out with
probability `--dropout` (silent: never answers, as a device switched off; or `decline`),
else sends its update after a random delay of up to `--max-delay` s; (3) `--idle-seconds`
after the last round, the "idle" figure: every device connected and heartbeating, no round
open (the task is done); (4) shutdown. Every wait has a deadline, `--timeout` bounds the
run, every child process is stopped on exit or Ctrl-C.

Sources: CPU from /proc/<pid>/stat (utime+stime, sampled every 0.25 s, interpolated at the
store's round opened_at/closed_at); rounds from the store opened read-only; publish time
device-side (one machine, one wall clock): the latest send of an update the round accepted
-> the first arrival of the new retained manifest. The coordinator acknowledges the
quota-filling update only after aggregating, so "last ACK -> manifest" (also shown) covers
only the publish. Devices learn versions from the retained manifest and by default do not
download the blob: the bench is about the coordinator's cost per device, and every device
fetching every version would measure broker fan-out instead (`--download-models` fetches,
as the agent does when an assignment names a version it lacks).

    python benchmarks/bench_fleet.py --devices 50 --round-size 20 --rounds 2      # smoke
    python benchmarks/bench_fleet.py --devices 1000 --round-size 100 --output out.md
    python benchmarks/bench_fleet.py --devices 1000,5000,10000                  # full
    python benchmarks/bench_fleet.py --devices 5000 --rounds 20                 # broker RSS
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import resource
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

import numpy as np

from edge_runtime.activity import HEARTBEAT_REFRESH_SECONDS as HEARTBEAT_SECONDS

FLEET, TASK = "bench", "subjects"
PROFILES = ("laptop-mid-16gb", "laptop-low-4gb", "raspberry-pi-5-8gb", "jetson-orin-nano-8gb")
DEVICES_PER_SCHOOL = 25
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
NAN = float("nan")

logger = logging.getLogger("bench_fleet")


class BenchError(RuntimeError):
    """A phase did not finish within its deadline, or a process died."""


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def status_kib(pid: int | None, key: str) -> int:
    """A /proc/<pid>/status figure (VmRSS, VmHWM) in KiB; 0 for a process that is gone."""
    with contextlib.suppress(OSError, TypeError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class CpuSampler(threading.Thread):
    """(wall time, CPU seconds) of one process every `period` seconds."""

    def __init__(self, pid: int, period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, float]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.samples.append((time.time(), cpu_seconds(self.pid)))
            except (OSError, ValueError):
                return  # the process is gone
            self.stop_event.wait(self.period)

    def between(self, start: float, end: float) -> float:
        """CPU seconds spent between two wall times (linear between samples)."""
        times, cpu = zip(*self.samples, strict=True) if self.samples else ((0.0,), (0.0,))
        return float(np.interp(end, times, cpu) - np.interp(start, times, cpu))


@dataclass
class Worker:
    """One `fleet_devices.py` process and what it last reported."""

    process: subprocess.Popen[str]
    result_file: Path
    progress: dict[str, Any] = field(default_factory=dict)
    final: bool = False

    def read(self) -> None:
        """Reader thread: keep the latest progress line (the pipe must never fill)."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                message = json.loads(line)
                if message.get("kind") == "progress":
                    self.progress = message
                self.final |= message.get("kind") == "final"

    def stop(self) -> None:
        with contextlib.suppress(OSError, AssertionError):  # gone: its results show that
            assert self.process.stdin is not None
            self.process.stdin.write("stop\n")
            self.process.stdin.flush()


def coordinator_toml(root: Path, url: str, devices: int, args: argparse.Namespace) -> Path:
    """One MiniLM task; the quota is the round size, the quorum 80% of it, so a round with
    10% silent drop-outs fills its quota from the 25% over-selection, and one with more
    closes at its deadline with a quorum."""
    grace = args.startup_grace
    if grace is None:  # worker start, paced connects (~100/s at most here), one heartbeat
        grace = round(30.0 + 1.5 * devices / min(args.connect_rate, 100.0) + 15.0, 1)
    text = f"""[coordinator]
fleet = "{FLEET}"
state_dir = "{root / "coordinator"}"
startup_grace_seconds = {float(grace)}

[broker]
url = "{url}"

[[tasks]]
id = "{TASK}"
kind = "classification"
base_model = "minilm-l6"
labels = ["maths", "science", "history", "languages"]
rank = 8
alpha = 16.0
rounds = {args.rounds}
local_steps = 20
batch_size = 8
seq_len = 64

[tasks.schedule]
strategy = "{args.strategy}"
devices_per_round = {args.round_size}
min_updates = {max(1, math.ceil(args.round_size * 0.8))}
over_selection = 0.25
round_deadline_seconds = {float(args.round_deadline)}
gather_seconds = 30.0
"""
    path = root / "coordinator.toml"
    path.write_text(text)
    return path


def issue_tokens(state_dir: Path, devices: int) -> list[dict[str, str]]:
    """One-time tokens made as `schoolfl coordinator enroll-token` makes them (its store
    call), one device spec per token; profiles cycle over four kinds of school hardware."""
    from coordinator.store import CoordinatorStore

    state_dir.mkdir(parents=True, exist_ok=True)
    store = CoordinatorStore(state_dir / "coordinator.db")
    specs = []
    try:
        for index in range(devices):
            school, token = f"school-{index // DEVICES_PER_SCHOOL:03d}", secrets.token_urlsafe(24)
            store.add_enrollment_token(token, school, 24 * 3600.0)
            profile = PROFILES[index % len(PROFILES)]
            specs.append(dict(device_id=f"dev-{index:05d}", school=school, profile=profile))
            specs[-1]["token"] = token
    finally:
        store.close()
    return specs


def update_bodies(state_dir: Path, folder: Path, count: int = 4) -> tuple[list[str], int]:
    """Random deltas of the version-0 adapter's shapes, int8-encoded as agents send them
    (the one use of torch in the bench). Returns the files and the adapter's LoRA rank."""
    import torch

    from edge_runtime.wire import CodecConfig, UpdateEncoding, decode_update, encode_update

    state = decode_update((state_dir / "adapters" / TASK / "v0000.body").read_bytes())
    ranks = {t.shape[0] for name, t in state.items() if "lora_A" in name}
    if len(ranks) != 1:
        raise BenchError(f"expected one LoRA rank in the version-0 adapter, found {ranks}")
    files = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        delta = {k: torch.randn(t.shape, generator=generator) * 1e-3 for k, t in state.items()}
        path = folder / f"update-{index}.body"
        path.write_bytes(encode_update(delta, CodecConfig(UpdateEncoding.INT8)).body)
        files.append(str(path))
    return files, ranks.pop()


def query(database: Path, sql: str, *parameters: object) -> list[tuple[Any, ...]]:
    """Rows from the coordinator's store, opened read-only; [] while it cannot be read."""
    try:
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=2.0)
        try:
            return db.execute(sql, parameters).fetchall()
        finally:
            db.close()
    except sqlite3.Error as error:
        logger.debug("store not readable: %s", error)
        return []


def read_rounds(database: Path) -> list[dict[str, Any]]:
    rows = query(
        database,
        "SELECT round_number, state, opened_at, closed_at, reason FROM rounds WHERE task_id=?"
        " ORDER BY round_number",
        TASK,
    )
    keys = ("round", "state", "opened_at", "closed_at", "reason")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def wait_for(predicate: Any, seconds: float, what: str, alive: Any) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        alive()
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(0.25)


class FleetRun:
    """One fleet size: start everything, drive the phases, collect, stop everything."""

    def __init__(self, devices: int, args: argparse.Namespace, deadline: float) -> None:
        self.devices, self.args, self.deadline = devices, args, deadline
        self.root = Path(tempfile.mkdtemp(prefix=f"bench-fleet-{devices}-"))
        self.state_dir = self.root / "coordinator"
        self.database = self.state_dir / "coordinator.db"
        self.broker: Any = None
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.workers: list[Worker] = []
        self.broker_rss: dict[int, int] = {}
        self.result: dict[str, Any] = {"devices": devices, "error": "", "rounds": []}

    def remaining(self, cap: float) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise BenchError("--timeout reached")
        return min(cap, left)

    def alive(self) -> None:
        if self.coordinator is not None and self.coordinator.poll() is not None:
            tail = (self.root / "coordinator.log").read_text(errors="replace")[-3000:]
            raise BenchError(f"the coordinator exited ({self.coordinator.returncode}):\n{tail}")
        for worker in self.workers:
            if worker.process.poll() is not None and not worker.final:
                raise BenchError(f"a device worker exited ({worker.process.returncode})")

    def run(self) -> dict[str, Any]:
        logger.info("fleet of %d devices in %s", self.devices, self.root)
        try:
            self._run()
        except BenchError as error:
            self.result["error"] = str(error)
            logger.error("fleet of %d: %s", self.devices, error)
        finally:
            self.stop()
        return self.result

    def _start_processes(self) -> None:
        from coordinator.mosquitto import MosquittoConfig, MosquittoProcess

        broker_config = MosquittoConfig(self.root / "broker", persistence=False)
        broker_config.extra_lines.append("max_connections -1")
        self.broker = MosquittoProcess(broker_config)
        self.broker.start()
        config = coordinator_toml(self.root, self.broker.url, self.devices, self.args)
        specs = issue_tokens(self.state_dir, self.devices)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        env["TOKENIZERS_PARALLELISM"] = "false"
        verbosity = [] if self.args.quiet_coordinator else ["-v"]
        command = [sys.executable, "-m", "schoolfl", *verbosity, "coordinator", "serve"]
        self.coordinator = subprocess.Popen(
            [*command, "--config", str(config)],
            stdout=(self.root / "coordinator.log").open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        body_file = self.state_dir / "adapters" / TASK / "v0000.body"
        wait_for(body_file.exists, self.remaining(300), "the version-0 adapter", self.alive)
        bodies, rank = update_bodies(self.state_dir, self.root)
        self.result["update_body_bytes"] = Path(bodies[0]).stat().st_size
        processes = max(1, min(self.args.processes, self.devices))
        for index in range(processes):
            result_file = self.root / f"worker-{index}.json"
            worker_config = dict(
                worker=index, host=self.broker.host, port=self.broker.port, fleet=FLEET,
                task=TASK, devices=specs[index::processes], bodies=bodies, body_rank=rank,
                connect_rate=self.args.connect_rate / processes, dropout=self.args.dropout,
                dropout_mode=self.args.dropout_mode, max_delay=self.args.max_delay,
                download_models=self.args.download_models, seed=1000 + index,
                result_file=str(result_file),
            )  # fmt: skip
            path = self.root / f"worker-{index}.config.json"
            path.write_text(json.dumps(worker_config))
            process = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("fleet_devices.py")), str(path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=(self.root / f"worker-{index}.log").open("wb"),
                text=True,
                env=env,
            )
            self.workers.append(Worker(process, result_file))
            threading.Thread(target=self.workers[-1].read, daemon=True).start()

    def counter(self, name: str) -> int:
        return sum(w.progress.get("counters", {}).get(name, 0) for w in self.workers)

    def _task_done(self) -> bool:
        """`--rounds` completed (a failed round is followed by another), none open."""
        rounds = read_rounds(self.database)
        for record in rounds:  # the broker's RSS as each round closes
            if record["state"] != "open":
                self.broker_rss.setdefault(record["round"], status_kib(self.broker.pid, "VmRSS"))
        completed = sum(r["state"] == "completed" for r in rounds)
        return completed >= self.args.rounds and all(r["state"] != "open" for r in rounds)

    def _run(self) -> None:
        self._start_processes()
        assert self.coordinator is not None
        sampler = CpuSampler(self.coordinator.pid)
        sampler.start()
        started, result = time.time(), self.result
        wait_for(
            lambda: self.counter("enrolled") + self.counter("enroll_refused") >= self.devices,
            self.remaining(self.devices / min(self.args.connect_rate, 25.0) + 120),
            f"{self.devices} enrollments",
            self.alive,
        )
        result["enroll_refused"] = self.counter("enroll_refused")
        first = min(w.progress["first_enroll_sent"] for w in self.workers)
        last = max(w.progress["last_enrolled_at"] for w in self.workers)
        result["enroll_seconds"] = last - first
        result["enrollments_per_second"] = self.devices / max(last - first, 1e-6)
        result["enroll_cpu_seconds"] = sampler.between(started, last)
        budget = (self.args.round_deadline + 90) * self.args.rounds + 60
        try:
            wait_for(self._task_done, self.remaining(budget), "the rounds", self.alive)
            time.sleep(2.0)  # the last version's messages settle
            idle_start = time.time()
            time.sleep(self.remaining(self.args.idle_seconds))
            idle = time.time() - idle_start
            result["idle_cpu_percent"] = 100 * sampler.between(idle_start, time.time()) / idle
        except BenchError as error:  # report the rounds that did run
            result["error"] = str(error)
        result["coordinator_peak_rss_kib"] = status_kib(self.coordinator.pid, "VmHWM")
        rounds = result["rounds"] = read_rounds(self.database)
        quiet_from = last + 12.0  # every device has sent a heartbeat since enrolling
        if rounds and rounds[0]["opened_at"] - 1.0 - quiet_from >= 5.0:
            quiet = rounds[0]["opened_at"] - 1.0 - quiet_from
            cpu = sampler.between(quiet_from, quiet_from + quiet)
            result["idle_before_cpu_percent"] = 100.0 * cpu / quiet
            result["idle_before_seconds"] = quiet
        result["round_1_during_enrollment"] = bool(rounds) and rounds[0]["opened_at"] < last
        for record in rounds:
            if record["closed_at"]:
                record["cpu_seconds"] = sampler.between(record["opened_at"], record["closed_at"])
            record["broker_rss_kib"] = self.broker_rss.get(record["round"], 0)
        sampler.stop_event.set()
        for worker in self.workers:
            worker.stop()
        wait_for(lambda: all(w.final for w in self.workers), 60, "the workers", self.alive)
        self._merge_workers()

    def _merge_workers(self) -> None:
        """Sum the workers' counts per round; latest times of the round's accepted updates
        and ACKs; earliest arrival of each manifest."""
        totals: dict[str, int] = {}
        per_round: dict[int, dict[str, Any]] = {}
        manifests: dict[int, float] = {}
        torch_seen, worker_rss = False, []
        for worker in self.workers:
            data = json.loads(worker.result_file.read_text())
            torch_seen |= data["torch_imported"]
            worker_rss.append(data["peak_rss_kib"] // 1024)
            for name, value in data["counters"].items():
                totals[name] = totals.get(name, 0) + value
            for number, (_, arrival) in data["manifests"].items():
                manifests[int(number)] = min(manifests.get(int(number), arrival), arrival)
            for number, stats in data["rounds"].items():
                merged = per_round.setdefault(int(number), {"late": 0, "reject_reasons": {}})
                merged["late"] += stats["reject_reasons"].get(f"round {number} is completed", 0)
                for reason, count in stats.pop("reject_reasons").items():
                    merged["reject_reasons"][reason] = merged["reject_reasons"].get(reason, 0)
                    merged["reject_reasons"][reason] += count
                for name, value in stats.items():
                    combine = max if name.endswith("_at") else (lambda a, b: a + b)
                    merged[name] = combine(merged.get(name, 0), value)
        for record in self.result["rounds"]:
            seen = per_round.get(record["round"], {})
            record.update(seen)
            arrival = manifests.get(record["round"])
            if arrival and seen.get("last_accepted_sent_at"):
                record["publish_seconds"] = arrival - seen["last_accepted_sent_at"]
                record["ack_to_manifest_seconds"] = arrival - seen["last_ack_at"]
        self.result["device_counters"] = totals
        self.result["torch_in_devices"] = torch_seen
        self.result["worker_peak_rss_mib"] = worker_rss

    def stop(self) -> None:
        """Stop every child process, each step bounded; then read the refusals the
        coordinator flushed on its way out."""
        for worker in self.workers:
            worker.stop()
        processes = [(w.process, 5.0) for w in self.workers] + [(self.coordinator, 0.0)]
        for process, grace in processes:
            for action in (None, process.terminate, process.kill) if process else ():
                if action is not None:
                    action()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=grace if action is None else 20)  # type: ignore[union-attr]
                    break
        if self.coordinator is not None:
            rows = query(self.database, "SELECT category, SUM(count) FROM refusals GROUP BY 1")
            self.result["refusals"] = {category: int(count) for category, count in rows}
        if self.broker is not None:
            self.broker.stop()
        self.workers, self.coordinator, self.broker = [], None, None
        if not self.args.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        self.result["folder"] = str(self.root) if self.args.keep else ""


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The Markdown report: one summary row per fleet size, then each run's rounds."""
    lines = [
        f"## Fleet benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Round size {args.round_size} (min_updates {math.ceil(args.round_size * 0.8)}, "
        f"over-selection 0.25, deadline {args.round_deadline:g} s, strategy {args.strategy}), "
        f"{args.rounds} round(s), drop-out {args.dropout:.0%} ({args.dropout_mode}), update "
        f"delay <= {args.max_delay:g} s, {args.processes} device processes, connects "
        f"{args.connect_rate:g}/s, models downloaded: {'yes' if args.download_models else 'no'}."
        f" Idle CPU: {args.idle_seconds:g} s after the last round, every device connected and "
        f"heartbeating every {HEARTBEAT_SECONDS:.0f} s (an idle agent's period), no round "
        "open. Publish: latest send of an accepted update -> first arrival of the new "
        "manifest (device side).",
        "",
        "| devices | idle CPU % | CPU s / round | coord. peak RSS MiB | publish s | enroll/s "
        "| sent | accepted | lost | refused late / other | coord. refusals | broker RSS MiB "
        "after each round | rounds completed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    details = []
    for result in results:
        rounds = result["rounds"]

        def total(name: str, rounds: list[dict[str, Any]] = rounds) -> int:
            return sum(r.get(name, 0) for r in rounds)

        publish = [r["publish_seconds"] for r in rounds if "publish_seconds" in r]
        broker = "/".join(f"{r.get('broker_rss_kib', 0) / 1024:.0f}" for r in rounds) or "-"
        lines.append(
            f"| {result['devices']} | {result.get('idle_cpu_percent', NAN):.1f} | "
            f"{fmean([r['cpu_seconds'] for r in rounds if 'cpu_seconds' in r] or [NAN]):.2f} | "
            f"{result.get('coordinator_peak_rss_kib', 0) / 1024:.0f} | "
            f"{fmean(publish or [NAN]):.2f} (max {max(publish, default=NAN):.2f}) | "
            f"{result.get('enrollments_per_second', NAN):.0f} | {total('sent')} | "
            f"{total('accepted')} | {total('lost')} | {total('late')} / "
            f"{total('rejected') - total('late')} | {sum(result.get('refusals', {}).values())} "
            f"| {broker} | {sum(r['state'] == 'completed' for r in rounds)}/{args.rounds}"
            + (" (error)" if result["error"] else "")
            + " |"
        )
        details.append(_details(result))
    return "\n".join(lines + [""] + details)


def _details(result: dict[str, Any]) -> str:
    lines = [
        f"### {result['devices']} devices",
        "",
        f"- enrollment: {result.get('enroll_seconds', NAN):.1f} s, coordinator "
        f"{result.get('enroll_cpu_seconds', NAN):.1f} CPU-s; refused "
        f"{result.get('enroll_refused', 0)}; update body {result.get('update_body_bytes', 0)} B",
        f"- idle before round 1: {result.get('idle_before_cpu_percent', NAN):.1f} % of a core "
        f"over {result.get('idle_before_seconds', 0):.0f} s; round 1 opened during enrollment:"
        f" {result.get('round_1_during_enrollment')}",
        f"- coordinator refusals by category: {result.get('refusals') or 'none'}",
        f"- device counters: {result.get('device_counters', {})}; torch in a device process: "
        f"{result.get('torch_in_devices')}; device processes' peak RSS MiB: "
        f"{result.get('worker_peak_rss_mib')}",
        *([f"- ERROR: {result['error'][:1500]}"] if result["error"] else []),
        *([f"- kept: {result['folder']}"] if result.get("folder") else []),
        "",
        "| round | state | closed by | open s | CPU s | assigned | dropped | declined | version"
        " != manifest | sent | resent | accepted | dup | lost | refused | publish s | last ACK ->"
        " manifest s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rounds"]:
        lines.append(
            f"| {r['round']} | {r['state']} | {(r['reason'] or '').split(':')[0]} | "
            f"{(r['closed_at'] or r['opened_at']) - r['opened_at']:.1f} | "
            f"{r.get('cpu_seconds', NAN):.2f} | "
            + " | ".join(
                str(r.get(k, 0))
                for k in ("assigned", "dropped", "declined", "version_mismatch", "sent")
                + ("resent", "accepted", "duplicate")
            )
            + f" | {r.get('lost', 0)} | {r.get('rejected', 0)} | "
            f"{r.get('publish_seconds', NAN):.2f} | {r.get('ack_to_manifest_seconds', NAN):.2f} |"
        )
        if r.get("reject_reasons"):
            lines.append(f"|  | refused: {r['reject_reasons']} |")
    return "\n".join(lines) + "\n"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add = parser.add_argument
    add("--devices", default="1000,5000,10000", help="fleet sizes, comma-separated, one run each")
    add("--round-size", type=int, default=500, help="updates per round (the quota)")
    add("--rounds", type=int, default=3)
    add("--round-deadline", type=float, default=120.0, help="seconds")
    add("--processes", type=int, default=4, help="device worker processes")
    add("--connect-rate", type=float, default=200.0, help="connects per second, in all")
    add("--dropout", type=float, default=0.1, help="share of assigned devices that drop out")
    add("--dropout-mode", choices=("silent", "decline"), default="silent")
    add("--max-delay", type=float, default=5.0, help="update delay after the assignment, s")
    add("--download-models", action="store_true", help="devices fetch each assigned version")
    add("--strategy", default="equity", help="[tasks.schedule] strategy")
    add("--idle-seconds", type=float, default=20.0)
    add("--startup-grace", type=float, help="seconds the coordinator holds round 1 (auto)")
    add("--timeout", type=float, default=3600.0, help="the whole run, seconds")
    add("--quiet-coordinator", action="store_true", help="run the coordinator without -v")
    add("--keep", action="store_true", help="keep the temporary folders (logs, store)")
    add("--output", type=Path, help="also write the Markdown report here")
    add("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    args.sizes = [int(size) for size in args.devices.split(",") if size.strip()]
    if not args.sizes or min(args.sizes) < 1 or args.round_size < 1:
        parser.error("--devices and --round-size must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_arguments(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the broker inherits it
    if max(args.sizes) + 100 > hard:
        logger.warning("RLIMIT_NOFILE hard limit %d is below the largest fleet + 100", hard)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally-blocks clean up
    deadline = time.monotonic() + args.timeout
    results = [FleetRun(size, args, deadline).run() for size in args.sizes]
    text = report(results, args)
    print(text)
    if args.output is not None:
        args.output.write_text(text)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(not r["error"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
