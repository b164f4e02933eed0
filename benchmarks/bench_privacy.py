"""What privacy costs: secure aggregation's overhead, and accuracy under client-level DP.

Part 1, secure aggregation vs plain, for 5, 20 and 50 devices sending a MiniLM-L6 LoRA r=8
update (q, k, v of 6 layers plus the 8-class head: 113,672 parameters). Plain is what
schoolfl sends today: the int8-encoded update (`edge_runtime.wire.update_codec`), decoded and
FedAvg-averaged by the coordinator. Secure aggregation is the in-process library
(`edge_runtime/secagg/`: key agreement, Shamir shares, masked ring vectors); every
device runs in this one process, so only the coordinator's steps are timed as coordinator
CPU. Reported: bytes one device sends and coordinator CPU seconds per round, and their
ratios (secure / plain).

Part 2, accuracy after 10 rounds at epsilon 8 and 3 (delta 1e-5) against no DP. This uses
the fleet simulator (`coordinator/simulation/simulator.py`: real LoRA training of the proxy model
over real MiniLM embeddings of the demo's questions, 200 devices, 20 updates per round, random
selection, the closest match to the accountant's Poisson sampling), aggregated by the
coordinator's `DpFedAvg` with central noise. The noise multiplier is the smallest that
keeps the `dp-accounting` RDP epsilon after 10 rounds at q = 20 / 200 within the target;
the clip norm is the median update norm of a non-private first round. It is not the demo
task itself (MiniLM through the daemons); part 3 is.

Part 3 (`--demo`), the same figure on the demo task itself: `schoolfl demo` (embedded
broker, coordinator daemon, 6 agent processes with the profiles' emulated speed, nf4 +
LoRA MiniLM-L6 classifying school questions, accuracy on the 160 held-out questions), 10
rounds, run three times: without DP, and with `--dp-epsilon 8` and `--dp-epsilon 3`. Every
device is in every round (6 of 6, q = 1), so there is no amplification by sampling; the
noise multiplier is the smallest that keeps the RDP epsilon after the rounds within the
target (`schoolfl.demo.noise_for_epsilon`, the same search as part 2). The clip norm is the
median update norm of the non-private run's first round, read back from its coordinator
store. Epsilon is the coordinator's own privacy ledger (`schoolfl coordinator
privacy-report`). About 6 minutes per configuration on 2 cores (5.7 for no DP).

    python benchmarks/bench_privacy.py --output bench-out/privacy.md
    python benchmarks/bench_privacy.py --demo --no-fast --output bench-out/privacy-demo.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from coordinator.aggregation import ClientUpdate, FedAvg  # noqa: E402
from coordinator.privacy import DpFedAvg, DpPolicy, epsilon_for_rounds  # noqa: E402
from coordinator.scheduler import RandomScheduler  # noqa: E402
from coordinator.simulation.compare import SimulationSettings, prepare  # noqa: E402
from coordinator.simulation.simulator import simulate  # noqa: E402
from edge_runtime.secagg import (  # noqa: E402  # noqa: E402
    QuantizationConfig,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    TensorLayout,
)
from edge_runtime.wire import (  # noqa: E402
    CodecConfig,
    PrivacyMode,  # noqa: E402
    UpdateEncoding,  # noqa: E402
    decode_update,
    encode_update,
)
from quantization.adapter_deltas import update_l2_norm  # noqa: E402
from schoolfl.demo_privacy import DP_DELTA, demo_privacy, median_update_norm  # noqa: E402
from schoolfl.demo_privacy import noise_for_epsilon as demo_noise_for_epsilon  # noqa: E402
from schoolfl.demo_tasks import CLASSIFY  # noqa: E402

MINILM_R8_SHAPES = {
    **{
        f"layer.{layer}.{role}.lora_A.weight": (8, 384)
        for layer in range(6)
        for role in ("query", "key", "value")
    },
    **{
        f"layer.{layer}.{role}.lora_B.weight": (384, 8)
        for layer in range(6)
        for role in ("query", "key", "value")
    },
    "classifier.weight": (8, 384),
    "classifier.bias": (8,),
}
DELTA = 1e-5


def _update(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        name: torch.randn(shape, generator=generator) * 0.01
        for name, shape in MINILM_R8_SHAPES.items()
    }


def plain_round(num_devices: int) -> tuple[int, float]:
    """(bytes one device sends, coordinator seconds to decode and average)."""
    generator = torch.Generator().manual_seed(0)
    updates = [_update(generator) for _ in range(num_devices)]
    bodies = [encode_update(u, CodecConfig(UpdateEncoding.INT8)).body for u in updates]
    shapes = {name: tuple(t.shape) for name, t in updates[0].items()}
    reference = {name: torch.zeros(shape) for name, shape in shapes.items()}
    started = time.process_time()
    decoded = [
        ClientUpdate(f"d{i}", decode_update(body, shapes), 10, 1) for i, body in enumerate(bodies)
    ]
    FedAvg().aggregate(decoded, reference)
    return len(bodies[0]), time.process_time() - started


def secure_round(num_devices: int) -> tuple[int, float, float]:
    """(bytes one device sends, coordinator seconds, max abs error of the sum)."""
    import json

    generator = torch.Generator().manual_seed(0)
    devices = [f"d{i:03d}" for i in range(num_devices)]
    inputs = {d: _update(generator) for d in devices}
    layout = TensorLayout.of(inputs[devices[0]])
    config = SecAggConfig(num_devices // 2 + 1, QuantizationConfig(clip_bound=1.0))
    coordinator_seconds = 0.0

    def on_coordinator(call, *args):  # noqa: ANN001, ANN002, ANN202
        nonlocal coordinator_seconds
        started = time.process_time()
        result = call(*args)
        coordinator_seconds += time.process_time() - started
        return result

    server = on_coordinator(SecAggServer, "bench", config, layout)
    clients = {d: SecAggClient(d, "bench", config, layout) for d in devices}
    adverts = [clients[d].advertise_keys() for d in devices]
    roster = on_coordinator(server.collect_advertisements, adverts)
    shares = [clients[d].share_keys(roster) for d in devices]
    routed = on_coordinator(server.route_shares, shares)
    for d, forwarded in routed.items():
        clients[d].receive_shares(forwarded)
    masked = [clients[d].mask_input(inputs[d]) for d in devices]
    request = on_coordinator(server.collect_masked_inputs, masked)
    responses = [clients[d].unmask(request) for d in request.survivors]
    result = on_coordinator(server.aggregate, responses)
    sent = (
        len(json.dumps(adverts[-1].to_dict()))
        + len(json.dumps(shares[-1].to_dict()))
        + len(masked[-1].vector)
        + len(json.dumps(responses[-1].to_dict()))
    )
    error = max(
        float(
            (result.total[name].double() - sum(inputs[d][name].double() for d in devices))
            .abs()
            .max()
        )
        for name in MINILM_R8_SHAPES
    )
    return sent, coordinator_seconds, error


def overhead_section() -> list[str]:
    lines = [
        "### Secure aggregation vs plain (MiniLM-L6 LoRA r=8 update, 113,672 parameters)",
        "",
        "| devices | plain bytes/device | secure bytes/device | ratio | plain coordinator s "
        "| secure coordinator s | ratio | max abs error of the sum |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for devices in (5, 20, 50):
        plain_bytes, plain_seconds = plain_round(devices)
        secure_bytes, secure_seconds, error = secure_round(devices)
        lines.append(
            f"| {devices} | {plain_bytes:,} | {secure_bytes:,} | "
            f"{secure_bytes / plain_bytes:.2f} | {plain_seconds:.3f} | {secure_seconds:.3f} | "
            f"{secure_seconds / max(plain_seconds, 1e-6):.1f} | {error:.2e} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def noise_for_epsilon(target: float, sampling_probability: float, rounds: int) -> float:
    """Smallest noise multiplier (to 1%) whose epsilon after `rounds` stays within `target`:
    the demo's own search, so parts 2 and 3 choose z the same way."""
    return demo_noise_for_epsilon(target, sampling_probability, rounds, DELTA)


def accuracy_section(rounds: int, seeds: list[int]) -> list[str]:
    settings = SimulationSettings(rounds=rounds, schedulers=("random",))
    q = settings.devices_per_round / settings.devices
    lines = [
        f"### Accuracy after {rounds} rounds with central DP (simulator, random selection, "
        f"q = {q:.2f}, delta {DELTA:g})",
        "",
        "| privacy | noise multiplier z | clip norm C | epsilon after the rounds | "
        "accuracy (mean over seeds) | per seed |",
        "|---|---|---|---|---|---|",
    ]
    from coordinator.simulation.compare import embed_all_questions

    embedded = embed_all_questions()
    prepared = {seed: prepare(SimulationSettings(seed=seed), embedded) for seed in seeds}

    def run(seed: int, aggregator: object | None) -> float:
        fleet, data, shape = prepared[seed]
        task = SimulationSettings(seed=seed, rounds=rounds).task(fleet.labels)
        result = simulate(
            "random",
            RandomScheduler(),
            fleet,
            data,
            task,
            shape,
            seed=seed,
            aggregator=aggregator,  # type: ignore[arg-type]
        )
        return result.final_accuracy

    clip_norm = _median_update_norm(prepared[seeds[0]], rounds)
    baseline = [run(seed, None) for seed in seeds]
    lines.append(
        f"| none | - | - | - | {statistics.mean(baseline):.3f} | "
        f"{', '.join(f'{a:.3f}' for a in baseline)} |"
    )
    for target in (8.0, 3.0):
        z = noise_for_epsilon(target, q, rounds)
        epsilon = epsilon_for_rounds(PrivacyMode.CENTRAL, [(q, z)] * rounds, DELTA)
        policy = DpPolicy(PrivacyMode.CENTRAL, clip_norm, z, target, DELTA)
        accuracies = [
            run(seed, DpFedAvg(policy, torch.Generator().manual_seed(seed))) for seed in seeds
        ]
        lines.append(
            f"| epsilon {target:g} | {z:.2f} | {clip_norm:.3f} | {epsilon:.2f} | "
            f"{statistics.mean(accuracies):.3f} | {', '.join(f'{a:.3f}' for a in accuracies)} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def _median_update_norm(prepared: tuple, rounds: int) -> float:  # type: ignore[type-arg]
    """Median L2 norm of first-round updates: the clip norm DP-FedAvg papers start from."""
    fleet, data, shape = prepared
    norms: list[float] = []

    class Recording(FedAvg):
        def aggregate(self, updates, reference):  # noqa: ANN001, ANN202
            norms.extend(update_l2_norm(u.delta) for u in updates)
            return super().aggregate(updates, reference)

    task = SimulationSettings(rounds=1).task(fleet.labels)
    simulate("random", RandomScheduler(), fleet, data, task, shape, aggregator=Recording())
    return statistics.median(norms)


def run_demo(
    state: Path, rounds: int, devices: int, quick: bool, extra: tuple[str, ...] = ()
) -> dict[str, object]:
    """One `schoolfl demo` run, as a user would start it; returns its summary.json.

    A subprocess, not `run_demo()` in this process: the demo installs a SIGTERM handler
    and starts its children with this interpreter, exactly as the command does."""
    shutil.rmtree(state, ignore_errors=True)
    state.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "schoolfl",
        "demo",
        "--devices",
        str(devices),
        "--rounds",
        str(rounds),
        "--no-onnx",
        "--state",
        str(state),
        *(("--quick",) if quick else ()),
        *extra,
    ]
    print("running:", " ".join(command[2:]), file=sys.stderr, flush=True)
    log = state.parent / f"{state.name}.log"
    with log.open("w") as out:
        completed = subprocess.run(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=3600,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
            check=False,
        )
    if completed.returncode != 0:
        raise SystemExit(f"schoolfl demo failed ({completed.returncode}); see {log}")
    return json.loads((state / "summary.json").read_text())


def privacy_report(state: Path) -> str:
    """`schoolfl coordinator privacy-report` of a finished DP demo: the ledger per round."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "schoolfl",
            "coordinator",
            "privacy-report",
            "--config",
            str(state / "coordinator.toml"),
            CLASSIFY.task_id,
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    ).stdout


def demo_section(
    rounds: int, devices: int, quick: bool, work: Path, clip_norm: float | None
) -> list[str]:
    """Part 3: accuracy of the demo task after `rounds` rounds, without DP and at epsilon 8
    and 3; the clip norm is the non-private run's median first-round update norm unless
    given."""
    q = 1.0  # devices_per_round = devices in the demo: every device is in every round
    lines = [
        f"### Accuracy after {rounds} rounds with central DP (the demo task: `schoolfl demo`, "
        f"{devices} devices, all in every round, q = {q:.2f}, delta {DP_DELTA:g})",
        "",
        "| privacy | noise multiplier z | clip norm C | epsilon after the rounds (ledger) | "
        "rounds completed | accuracy before | accuracy after | noise std on the mean (z*C/n) "
        "| wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    baseline = run_demo(work / "none", rounds, devices, quick)
    if clip_norm is None:
        clip_norm = median_update_norm(work / "none", CLASSIFY.task_id, 1)
    print(f"clip norm C = {clip_norm:.4f}", file=sys.stderr, flush=True)

    def row(label: str, summary: dict[str, object], z: str, c: str, eps: str, std: str) -> str:
        return (
            f"| {label} | {z} | {c} | {eps} | {summary['rounds_completed']} | "
            f"{summary['accuracy_before']:.3f} | {summary['accuracy_after']:.3f} | {std} | "
            f"{summary['total_seconds']} |"
        )

    lines.append(row("none", baseline, "-", "-", "-", "-"))
    print(lines[-1], file=sys.stderr, flush=True)
    for target in (8.0, 3.0):
        planned = demo_privacy(target, clip_norm, rounds, devices, devices)
        state = work / f"epsilon{target:g}"
        summary = run_demo(
            state,
            rounds,
            devices,
            quick,
            ("--dp-epsilon", f"{target:g}", "--dp-clip-norm", f"{clip_norm:.6g}"),
        )
        privacy = summary["privacy"]
        assert isinstance(privacy, dict)
        print(privacy_report(state), file=sys.stderr, flush=True)
        std = float(privacy["noise_multiplier"]) * float(privacy["clip_norm"]) / devices
        lines.append(
            row(
                f"epsilon {target:g}",
                summary,
                f"{planned.noise_multiplier:.2f}",
                f"{float(privacy['clip_norm']):.3f}",
                f"{float(privacy['epsilon_spent']):.2f}",
                f"{std:.3f}",
            )
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--output", default=None)
    parser.add_argument(
        "--demo",
        action="store_true",
        help="Also run part 3: the demo task itself, 3 x `schoolfl demo` (about 17 minutes).",
    )
    parser.add_argument(
        "--no-fast", action="store_true", help="Skip parts 1 and 2 (with --demo: part 3 only)."
    )
    parser.add_argument("--demo-devices", type=int, default=6)
    parser.add_argument(
        "--demo-quick", action="store_true", help="Pass --quick to the demo (fewer steps)."
    )
    parser.add_argument(
        "--demo-clip-norm",
        type=float,
        default=None,
        help="Clip norm for part 3 (default: median first-round update norm without DP).",
    )
    parser.add_argument("--demo-state", default="bench-out/demo-privacy")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        f"## Privacy benchmark ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"command: `python benchmarks/bench_privacy.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    if not args.no_fast:
        lines += overhead_section() + [""]
        lines += accuracy_section(args.rounds, [int(s) for s in args.seeds.split(",")])
        lines += [""]
    if args.demo:
        lines += demo_section(
            args.rounds,
            args.demo_devices,
            args.demo_quick,
            Path(args.demo_state).resolve(),
            args.demo_clip_norm,
        )
    print("\n".join(lines))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
