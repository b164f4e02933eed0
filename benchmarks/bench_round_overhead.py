"""Per-round overhead beyond training: schoolfl against Flower 1.42's deployment runtime,
side by side in one run (issue 20).

schoolfl: a real Mosquitto, a real `schoolfl coordinator serve` and N real `schoolfl agent
run` processes (the helpers of tests/fleet.py), one local step per round, R rounds. From the
coordinator's store: a round's wall time (rounds.opened_at -> closed_at) and each update's
`train_seconds` (the trainer's own timing, in the update's metrics);

    beyond training = round wall time - the longest device's training time

Round 1 is reported on its own (it includes each agent's model build: the agents start
fresh, as on a device's first round of a task); rounds 2..R as their median.

Flower: `flower-superlink` and N `flower-supernode` processes on loopback from the venv at
--flower-venv (`python3 -m venv /tmp/flwr-venv && /tmp/flwr-venv/bin/pip install
flwr==1.42.0 numpy`), the apps of benchmarks/flower_app/ started with `flwr run`: FedAvg,
fraction_train 1.0, no federated evaluation, and a ClientApp that returns a float32 vector of
the update's size after one tiny op, so its round time (timed by the ServerApp itself,
configure_train -> aggregate_train) is all overhead. The size is the element count of the
adapter schoolfl's run stored (MiniLM r=8: q, k, v + head = 113,672; SmolLM2-135M r=16: all
seven projections = 4,884,480); schoolfl's updates travel as --update-encoding (fp32: the
bytes of Flower's vector; int8, the product default: a quarter).

Server-side memory: the peak RSS (VmHWM) of the coordinator plus the broker, against the
SuperLink plus its children (SuperExec, ServerApp); each process's peak, summed.

    python benchmarks/bench_round_overhead.py --agents 2 --models minilm --rounds 2
    python benchmarks/bench_round_overhead.py --agents 2,8 --models minilm,smollm2 \
        --output /tmp/round-overhead.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.flower_app.deployment import (  # noqa: E402
    PeakRss,
    child_pid,
    run_flower,
    status_kib,
    wait_until,
)
from coordinator.mosquitto import MosquittoConfig, MosquittoProcess, find_mosquitto  # noqa: E402
from tests.fleet import TASK, Fleet, make_fleet  # noqa: E402

PROFILE = "laptop-mid-16gb"
NAN = float("nan")


@dataclass(frozen=True)
class ModelCase:
    """One update size: the task a schoolfl fleet trains, the vector Flower's clients send."""

    name: str
    kind: str
    base_model: str
    rank: int
    params: int
    """Trainable parameters of the update, if the stored adapter cannot be read (issue 20's
    figure for MiniLM r=8, 331,776, is all six linear layers; schoolfl adapts q, k, v)."""
    batch_size: int
    seq_len: int


MODELS = {
    "minilm": ModelCase("minilm", "classification", "minilm-l6", 8, 331_776, 8, 40),
    "smollm2": ModelCase("smollm2", "causal-lm", "smollm2-135m", 16, 4_884_480, 4, 32),
}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else NAN


# -- schoolfl ------------------------------------------------------------------------------


def _query(database: Path, sql: str, *parameters: object) -> list[tuple[Any, ...]]:
    """Read-only, so polling never takes a write lock from the coordinator."""
    if not database.exists():
        return []
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
    try:
        return connection.execute(sql, parameters).fetchall()
    except sqlite3.OperationalError:  # the schema is not written yet
        return []
    finally:
        connection.close()


def _configure(fleet: Fleet, case: ModelCase, agents: int, args: argparse.Namespace) -> None:
    fleet.write_coordinator_config(
        kind=case.kind,
        base_model=case.base_model,
        labels=list(fleet.labels) if case.kind == "classification" else [],
        rank=case.rank,
        alpha=2.0 * case.rank,
        rounds=args.rounds,
        local_steps=1,
        batch_size=case.batch_size,
        seq_len=case.seq_len,
        update_encoding=args.update_encoding,
        eval_file="",
        schedule={
            "devices_per_round": agents,
            "min_updates": agents,
            "over_selection": 0.0,
            "round_deadline_seconds": 900.0,
        },
    )
    fleet.add_agents(fleet.shards, [PROFILE] * agents)


def _enroll(fleet: Fleet) -> None:
    """Tokens and enrollment need a running coordinator; it is stopped afterwards so the
    measured one starts with every agent already up (as a long-running service finds them)."""
    enroller = fleet.start(
        "coordinator-enroll", "coordinator", "serve", "--config", str(fleet.coordinator_config)
    )
    try:
        fleet.enroll_agents()
    finally:
        enroller.terminate()
        enroller.wait(timeout=60)
        fleet.processes.pop("coordinator-enroll", None)


def _adapter_params(folder: str) -> int:
    """Elements of the stored adapter (its safetensors header): the update's size."""
    path = Path(folder) / "adapter_model.safetensors"
    try:
        with path.open("rb") as stream:
            length = int.from_bytes(stream.read(8), "little")
            header = json.loads(stream.read(length))
    except (OSError, ValueError):
        return 0
    total = 0
    for name, entry in header.items():
        if name != "__metadata__":
            count = 1
            for dimension in entry["shape"]:
                count *= dimension
            total += count
    return total


def _schoolfl_rounds(database: Path, rounds: int) -> list[dict[str, Any]]:
    rows = _query(
        database,
        "SELECT round_number, state, opened_at, closed_at FROM rounds WHERE task_id = ? "
        "ORDER BY round_number",
        TASK,
    )
    versions = dict(
        _query(
            database,
            "SELECT round_number, created_at FROM adapter_versions WHERE task_id = ?",
            TASK,
        )
    )
    result = []
    for number, state, opened, closed in rows[:rounds]:
        updates = _query(
            database,
            "SELECT device_id, metrics_json, received_at FROM updates "
            "WHERE task_id = ? AND round_number = ? ORDER BY received_at",
            TASK,
            number,
        )
        train = [float(json.loads(m).get("train_seconds", NAN)) for _, m, _ in updates]
        wall = (closed - opened) if closed is not None else NAN
        longest = max(train) if train else NAN
        result.append(
            {
                "round": number,
                "state": state,
                "wall": wall,
                "train_max": longest,
                "beyond": wall - longest,
                "updates": len(updates),
                "first_update": (updates[0][2] - opened) if updates else NAN,
                "last_update": (updates[-1][2] - opened) if updates else NAN,
                "version": (versions[number] - opened) if number in versions else NAN,
            }
        )
    return result


def run_schoolfl(case: ModelCase, agents: int, args: argparse.Namespace, root: Path) -> dict:
    """One fleet from scratch: broker, enrollment, agents, then the measured coordinator."""
    root.mkdir(parents=True)
    broker = MosquittoProcess(MosquittoConfig(workdir=root / "mosquitto"))
    broker.start()
    fleet = make_fleet(root, broker, num_devices=agents)
    sampler: PeakRss | None = None
    try:
        _configure(fleet, case, agents, args)
        _enroll(fleet)
        names = [f"dev-{index}" for index in range(agents)]
        for index in range(agents):
            fleet.start_agent(index)
        for name in names:
            if not fleet.wait_for_log(name, "started;", args.timeout):
                raise RuntimeError(f"{name} did not start:\n{fleet.log(name)[-2000:]}")
        coordinator = fleet.start(
            "coordinator", "coordinator", "serve", "--config", str(fleet.coordinator_config)
        )
        broker_pid = child_pid("mosquitto")
        sampler = PeakRss([coordinator.pid] + ([broker_pid] if broker_pid else []))
        sampler.start()
        database = root / "coordinator" / "coordinator.db"

        def finished() -> bool:
            if coordinator.poll() is not None:
                raise RuntimeError(f"coordinator exited:\n{fleet.log('coordinator')[-3000:]}")
            closed = _query(
                database,
                "SELECT COUNT(*) FROM rounds WHERE task_id = ? AND closed_at IS NOT NULL",
                TASK,
            )
            return bool(closed) and closed[0][0] >= args.rounds

        wait_until(finished, args.timeout, f"schoolfl {case.name} N={agents}: {args.rounds} rounds")
        coordinator_kib = status_kib(coordinator.pid, "VmHWM")
        broker_kib = status_kib(broker_pid, "VmHWM") if broker_pid else 0
        rss = sampler.stop()
        sampler = None
        rounds = _schoolfl_rounds(database, args.rounds)
        opened = dict(_query(database, "SELECT round_number, opened_at FROM rounds"))
        _add_agent_phases(rounds, [fleet.log(name) for name in names], opened)
        folder = _query(
            database,
            "SELECT folder FROM adapter_versions WHERE task_id = ? ORDER BY version DESC",
            TASK,
        )
        return {
            "rounds": rounds,
            "rss_mib": rss,
            "coordinator_mib": coordinator_kib / 1024,
            "broker_mib": broker_kib / 1024,
            "params": _adapter_params(folder[0][0]) if folder else 0,
        }
    finally:
        if sampler is not None:
            sampler.stop()
        fleet.stop_all()
        broker.stop()


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
AGENT_EVENTS = (
    ("assigned", re.compile(r"task \S+ round (\d+): fetching model")),
    ("downloaded", re.compile(r"model \S+ downloaded")),
    ("trained", re.compile(r"task \S+ round (\d+): trained")),
    ("acked", re.compile(r"update update/\S+?/\S+?/(\d+)/\S+ acknowledged")),
)


def agent_events(log: str) -> dict[tuple[int, str], float]:
    """(round, event) -> wall time, from an agent's -v log: the assignment seen (it fetches
    the new version), the version downloaded, training done and the update handed to the
    broker (the 'trained' line comes after the publish), the coordinator's ack."""
    events: dict[tuple[int, str], float] = {}
    current = 0
    for line in log.splitlines():
        stamp = LOG_LINE.match(line)
        if stamp is None:
            continue
        for name, pattern in AGENT_EVENTS:
            found = pattern.search(line)
            if found is None:
                continue
            current = int(found.group(1)) if found.groups() else current
            when = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            events.setdefault((current, name), when)
    return events


def _add_agent_phases(rounds: list[dict[str, Any]], logs: list[str], opened: dict) -> None:
    """Each round's latest device at each phase, in seconds after the round opened."""
    per_device = [agent_events(log) for log in logs]
    for record in rounds:
        number = record["round"]
        for name, _ in AGENT_EVENTS:
            times = [e[(number, name)] for e in per_device if (number, name) in e]
            record[name] = (max(times) - opened[number]) if times else NAN


# -- the report ----------------------------------------------------------------------------


def summarize(case: ModelCase, agents: int, ours: dict, flower: dict) -> dict[str, Any]:
    steady = [r for r in ours["rounds"] if r["round"] > 1]
    flower_steady = [r["wall"] for r in flower["rounds"] if r["round"] > 1]
    first = ours["rounds"][0] if ours["rounds"] else {}
    flower_first = flower["rounds"][0]["wall"] if flower["rounds"] else NAN
    beyond = _median([r["beyond"] for r in steady])
    flower_round = _median(flower_steady)
    return {
        "agents": agents,
        "model": case.name,
        "params": ours["params"] or case.params,
        "round1": first.get("wall", NAN),
        "round1_beyond": first.get("beyond", NAN),
        "wall": _median([r["wall"] for r in steady]),
        "train": _median([r["train_max"] for r in steady]),
        "beyond": beyond,
        "flower_round1": flower_first,
        "flower_round": flower_round,
        "ratio": beyond / flower_round if flower_round else NAN,
        "rss": ours["rss_mib"],
        "flower_rss": flower["rss_mib"],
        "rss_ratio": ours["rss_mib"] / flower["rss_mib"] if flower["rss_mib"] else NAN,
    }


def table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| N | update (params) | schoolfl round 1 s (beyond training) | schoolfl round s "
        "(longest training) | schoolfl beyond training s | Flower round 1 s | Flower round s "
        "| beyond / Flower | server RSS schoolfl MiB | server RSS Flower MiB | RSS ratio |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"| {r['agents']} | {r['model']} ({r['params']:,}) | {r['round1']:.2f} "
            f"({r['round1_beyond']:.2f}) | {r['wall']:.2f} ({r['train']:.2f}) | "
            f"{r['beyond']:.2f} | {r['flower_round1']:.2f} | {r['flower_round']:.2f} | "
            f"{r['ratio']:.3f}x | {r['rss']:.0f} | {r['flower_rss']:.0f} | "
            f"{r['rss_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def details(case: ModelCase, agents: int, ours: dict, flower: dict) -> str:
    """Per round, seconds after the round opened, at the latest device (agent logs) and in
    the coordinator's store: where a round's time goes."""
    columns = (
        ("assigned", "assignment seen"),
        ("downloaded", "version downloaded"),
        ("trained", "trained line (after publish)"),
        ("last_update", "last update stored"),
        ("version", "version written"),
        ("wall", "closed (wall)"),
        ("acked", "acked"),
        ("train_max", "longest training"),
        ("beyond", "beyond training"),
    )
    lines = [
        f"\n### schoolfl {case.name}, N={agents}: per round (s after the round opened)\n",
        "| round | updates | " + " | ".join(title for _, title in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for r in ours["rounds"]:
        cells = " | ".join(f"{r.get(key, NAN):.3f}" for key, _ in columns)
        lines.append(f"| {r['round']} | {r['updates']} | {cells} |")
    lines.append(
        f"\nserver RSS: coordinator {ours['coordinator_mib']:.0f} MiB + broker "
        f"{ours['broker_mib']:.0f} MiB; Flower rounds: "
        + ", ".join(f"{r['wall']:.2f}" for r in flower["rounds"])
        + f" s ({flower['params']:,} float32); Flower server RSS {flower['rss_mib']:.0f} MiB"
    )
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", default="2,8", help="comma-separated fleet sizes")
    parser.add_argument("--models", default="minilm,smollm2", help=", ".join(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--update-encoding",
        default="fp32",
        choices=("fp32", "int8"),
        help="schoolfl's update encoding (fp32: the bytes of Flower's float32 vector)",
    )
    parser.add_argument("--flower-venv", type=Path, default=Path("/tmp/flwr-venv"))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per wait")
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument("--output", type=Path, help="also write the Markdown report here")
    parser.add_argument("--keep", type=Path, help="a new folder to run in and keep (logs)")
    args = parser.parse_args(argv)
    args.agents = [int(n) for n in args.agents.split(",")]
    args.models = [MODELS[name] for name in args.models.split(",")]
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is reported on its own)")
    return args


def measure(args: argparse.Namespace, root: Path) -> str:
    rows, notes = [], []
    empty: dict[str, Any] = {"rounds": [], "rss_mib": NAN, "params": 0}
    for case in args.models:
        for agents in args.agents:
            folder = root / f"{case.name}-{agents}"
            started = time.monotonic()
            try:
                ours = run_schoolfl(case, agents, args, folder / "schoolfl")
            except (RuntimeError, TimeoutError, AssertionError) as error:
                notes.append(f"schoolfl {case.name} N={agents} failed: {error}")
                print(notes[-1][:3000], file=sys.stderr)
                continue
            middle = time.monotonic()
            flower = empty
            if not args.skip_flower:
                try:
                    size = ours["params"] or case.params
                    flower = run_flower(
                        args.flower_venv, agents, args.rounds, size, folder / "flower", args.timeout
                    )
                except (RuntimeError, TimeoutError) as error:
                    notes.append(f"Flower {case.name} N={agents} failed: {error}")
                    print(notes[-1], file=sys.stderr)
            row = summarize(case, agents, ours, flower)
            rows.append(row)
            notes.append(details(case, agents, ours, flower))
            print(
                f"{case.name} N={agents}: schoolfl {middle - started:.0f} s, Flower "
                f"{time.monotonic() - middle:.0f} s; beyond training {row['beyond']:.3f} s, "
                f"Flower round {row['flower_round']:.3f} s",
                file=sys.stderr,
                flush=True,
            )
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    return (
        f"Round overhead, {stamp}, {args.rounds} rounds, one local step, schoolfl update "
        f"encoding {args.update_encoding}, {os.cpu_count()} cores, load {load:.1f}\n\n"
        + table(rows)
        + "\n"
        + "\n".join(notes)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if find_mosquitto() is None:
        raise SystemExit("mosquitto is not installed")
    if not args.skip_flower and not (args.flower_venv / "bin" / "flower-superlink").exists():
        raise SystemExit(f"no Flower in {args.flower_venv}: see this script's docstring")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=False)
        report = measure(args, args.keep.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="bench-round-overhead-") as folder:
            report = measure(args, Path(folder))
    print(report)
    if args.output is not None:
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
