"""An agent's per-round fixed cost, and its first round with and without a preloaded model.

A real Mosquitto on a free loopback port, a real `schoolfl coordinator serve` and
`--agents` real `schoolfl agent run` processes (the helpers of tests/fleet.py: MiniLM-L6
nf4, LoRA r=4, a shard of the shipped school questions per device). A listener on the same
broker notes when each device's assignment and its update pass through the broker (on
loopback, within a millisecond of the agent's own receive and publish).

    fixed cost = (update published - assignment received) - training seconds

where the training seconds are the trainer's own (the agent's "trained N steps in X s"
line: the optimizer steps, timed inside `LocalTrainer.train_round`). What remains is the
round's overhead on the device: the model download and decode, the eligibility reading,
loading the global adapter, encoding and signing, the outbox, the publish, and (before
issue 20) the personal copy and a 0.2 s CPU sample.

Round 1 is measured after the agents have started and, with `--preload`, once every agent
has logged its preloaded model (the coordinator is stopped after enrollment and started
again only then, so the first assignment finds the agents as a long-running service would).
`--preload` seeds each device's memory of the task model (`state/task_models/<task>.json`,
as an earlier run leaves it); agents from before issue 20 ignore it.

`--agent-code DIR` / `--coordinator-code DIR` run the processes from another copy of the
tree (e.g. `git archive HEAD | tar -x -C /tmp/before`), so one script measures before and
after:

    python benchmarks/bench_agent_round.py --agents 2 --rounds 3
    python benchmarks/bench_agent_round.py --agents 2 --rounds 3 --preload
    python benchmarks/bench_agent_round.py --agents 2 --agent-code /tmp/before
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coordinator.mosquitto import MosquittoConfig, MosquittoProcess, find_mosquitto  # noqa: E402
from device_profiles.plan import TrainingPlan  # noqa: E402
from edge_runtime.task_preload import remember_model  # noqa: E402
from edge_runtime.wire import (  # noqa: E402
    MqttTransport,
    TaskAssignment,
    TransportConfig,
    Update,
    decode_frame,
)
from quantization.adapters import AdapterConfig  # noqa: E402
from quantization.task_model import TaskModelSpec  # noqa: E402
from tests.fleet import FLEET, TASK, make_fleet  # noqa: E402

TRAINED = re.compile(r"task \S+ round (\d+): trained \d+ steps in ([0-9.]+) s")


def _listener(broker: MosquittoProcess) -> MqttTransport:
    listener = MqttTransport(
        TransportConfig(host=broker.host, port=broker.port, client_id="bench-listener")
    )
    listener.subscribe(f"schoolfl/{FLEET}/to/+/task")
    listener.subscribe(f"schoolfl/{FLEET}/dev/+/update")
    listener.start(timeout_seconds=10)
    return listener


def _drain(listener: MqttTransport, seen: dict[tuple[str, str, int], float]) -> None:
    """First arrival of each (kind, device, round): 'assigned' and 'updated'."""
    while True:
        try:
            received = listener.received.get_nowait()
        except queue.Empty:
            return
        if not received.payload:
            continue
        arrived = time.monotonic()
        try:
            message = decode_frame(received.payload).message
        except Exception:  # noqa: BLE001 - a chunk or another kind: not timed here
            continue
        if isinstance(message, TaskAssignment):
            seen.setdefault(("assigned", message.device_id, message.server_round), arrived)
        elif isinstance(message, Update):
            seen.setdefault(("updated", message.device_id, message.server_round), arrived)


def _wait_logs(fleet, names: list[str], text: str, timeout: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    return all(fleet.wait_for_log(n, text, max(deadline - time.monotonic(), 0.1)) for n in names)


def _seed_memory(fleet, local_steps: int) -> None:  # noqa: ANN001
    """What an earlier run of the task leaves on each device: the model it built."""
    spec = TaskModelSpec(
        TASK, "classification", "minilm-l6", "nf4", AdapterConfig(4, 8.0), fleet.labels
    )
    plan = TrainingPlan(
        scheme="nf4", rank=4, batch_size=8, seq_len=40, local_steps=local_steps, learning_rate=3e-3
    )
    for index in range(len(fleet.agent_configs)):
        remember_model(fleet.root / f"dev-{index}" / "state", spec, plan)


def run(args: argparse.Namespace, root: Path) -> dict[str, object]:
    binary = find_mosquitto()
    if binary is None:
        raise SystemExit("mosquitto is not installed")
    agent_env = {"PYTHONPATH": str(args.agent_code)}
    coordinator_env = {"PYTHONPATH": str(args.coordinator_code)}
    os.environ["PYTHONPATH"] = str(args.agent_code)  # init / enroll run the agent's code
    os.chdir(root)  # `python -m schoolfl` looks in the working folder first
    broker = MosquittoProcess(MosquittoConfig(workdir=root / "mosquitto"), binary=binary)
    broker.start()
    fleet = make_fleet(root, broker, num_devices=args.agents)
    listener = None
    try:
        fleet.write_coordinator_config(
            rounds=args.rounds,
            local_steps=args.local_steps,
            schedule={
                "devices_per_round": args.agents,
                "min_updates": args.agents,
                "round_deadline_seconds": 600.0,
            },
        )
        fleet.add_agents(fleet.shards, ["laptop-mid-16gb"] * args.agents)
        if args.preload:
            _seed_memory(fleet, args.local_steps)
        fleet.start_coordinator(env=coordinator_env)
        fleet.enroll_agents()
        fleet.processes.pop("coordinator").terminate()  # round 1 waits for ready agents
        listener = _listener(broker)
        names = [f"dev-{index}" for index in range(args.agents)]
        started = time.monotonic()
        for index in range(args.agents):
            fleet.start_agent(index, env=agent_env)
        assert _wait_logs(fleet, names, "started;", 120), "agents did not start"
        preloads = args.preload and (args.agent_code / "edge_runtime" / "task_preload.py").exists()
        if preloads:
            assert _wait_logs(fleet, names, "model loaded in", 300), "no preload finished"
        ready_seconds = time.monotonic() - started
        coordinator = fleet.start_coordinator(env=coordinator_env)
        seen: dict[tuple[str, str, int], float] = {}
        deadline = time.monotonic() + args.timeout
        while coordinator.poll() is None and time.monotonic() < deadline:
            _drain(listener, seen)
            time.sleep(0.02)
        _drain(listener, seen)
        if coordinator.returncode != 0:
            raise SystemExit(f"coordinator failed:\n{fleet.log('coordinator')[-3000:]}")
        rows = []
        for name in names:
            trained = {int(r): float(s) for r, s in TRAINED.findall(fleet.log(name))}
            for server_round in range(1, args.rounds + 1):
                assigned = seen.get(("assigned", name, server_round))
                updated = seen.get(("updated", name, server_round))
                if assigned is None or updated is None or server_round not in trained:
                    continue
                latency = updated - assigned
                rows.append((name, server_round, latency, trained[server_round]))
        return {"rows": rows, "ready_seconds": ready_seconds}
    finally:
        if listener is not None:
            listener.stop()
        fleet.stop_all()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--preload", action="store_true", help="seed the model memory")
    parser.add_argument("--agent-code", type=Path, default=REPO)
    parser.add_argument("--coordinator-code", type=Path, default=REPO)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--keep", type=Path, help="a new folder to run in and keep (logs)")
    args = parser.parse_args()
    args.agent_code = args.agent_code.resolve()
    args.coordinator_code = args.coordinator_code.resolve()
    if args.keep is not None:  # the logs stay there for a look
        args.keep.mkdir(parents=True, exist_ok=False)
        result = run(args, args.keep.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="bench-agent-round-") as folder:
            result = run(args, Path(folder))
    rows = result["rows"]
    print(
        f"agents {args.agents}, rounds {args.rounds}, local steps {args.local_steps}, "
        f"preload {'seeded' if args.preload else 'off'}, agent code {args.agent_code}"
    )
    print(f"agents started (and preloaded) {result['ready_seconds']:.1f} s before round 1")
    print("device  round  assigned->published s  training s  fixed cost s")
    for name, server_round, latency, training in rows:
        fixed = latency - training
        print(f"{name:6}  {server_round:5}  {latency:21.3f}  {training:10.3f}  {fixed:12.3f}")
    for label, chosen in (
        ("round 1", [r for r in rows if r[1] == 1]),
        ("rounds 2+", [r for r in rows if r[1] > 1]),
    ):
        if chosen:
            fixed = [latency - training for _, _, latency, training in chosen]
            latencies = [latency for _, _, latency, _ in chosen]
            print(
                f"{label}: latency mean {statistics.mean(latencies):.3f} s, fixed cost mean "
                f"{statistics.mean(fixed):.3f} s, max {max(fixed):.3f} s (n={len(chosen)})"
            )


if __name__ == "__main__":
    main()
