"""Secure rounds through the coordinator's round manager vs plain rounds, side by side.

Where `bench_privacy.py` part 1 times the secure-aggregation library alone, this runs whole
rounds through `coordinator.rounds.RoundManager` exactly as the daemon does (minus the
broker): signed frames decoded, every message validated and stored in SQLite, the
protocol state replayed from the store at each phase change, the new version written as a
PEFT folder. Task: MiniLM-L6 (scheme none), LoRA r=8 on query/key/value plus the 8-class
head; each device's delta is random (0.01 standard deviation), so the figures are about
cost, not learning.

Per device count n it reports, for one round:
- bytes one device sends: the int8 update frame (plain) against the sum of its four secure
  frames (keys, share boxes, masked input, revealed shares);
- coordinator CPU seconds (process time spent inside the round manager's calls; the
  devices' own work is excluded) and the ratio secure / plain;
- the secure round again with 10% of the devices dropping out after the share exchange.

    python benchmarks/bench_secure_rounds.py --devices 5 20 50
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from coordinator.config import (  # noqa: E402
    CoordinatorConfig,
    CoordinatorSettings,
    ScheduleConfig,
    SecureAggregationConfig,
    TaskConfig,
)
from coordinator.rounds import RoundManager  # noqa: E402
from coordinator.scheduler import DeviceCandidate, RandomScheduler  # noqa: E402
from coordinator.store import CoordinatorStore, RoundState  # noqa: E402
from device_profiles.profile import find_profile  # noqa: E402
from edge_runtime.secagg_session import SecureSession  # noqa: E402
from edge_runtime.wire import (  # noqa: E402
    SECURE_AGGREGATION_CAPABILITY,  # noqa: E402
    CodecConfig,
    SecAggEnvelope,
    SecAggStep,
    TaskAssignment,
    Update,
    UpdateEncoding,
    decode_frame,
    encode_frame,
    encode_update,
    generate_private_key,  # noqa: E402
)

LABELS = ("maths", "history", "science", "art", "music", "sport", "language", "geography")


class CoordinatorClock:
    """Process time spent inside the round manager."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def call(self, function, *args):  # noqa: ANN001, ANN002, ANN201
        started = time.process_time()
        result = function(*args)
        self.seconds += time.process_time() - started
        return result


def _manager(root: Path, num_devices: int, secure: bool) -> RoundManager:
    task = TaskConfig(
        id="bench",
        kind="classification",
        base_model="minilm-l6",
        labels=LABELS,
        scheme="none",
        rank=8,
        update_encoding="int8",
        schedule=ScheduleConfig(
            devices_per_round=num_devices,
            min_updates=max(2, num_devices // 2),
            over_selection=0.0,
            gather_seconds=0.0,
            round_deadline_seconds=3600.0,
        ),
        secure_aggregation=SecureAggregationConfig(enabled=secure),
    )
    config = CoordinatorConfig(
        coordinator=CoordinatorSettings(fleet="bench", state_dir=str(root)), tasks=(task,)
    )
    store = CoordinatorStore(config.state_dir / "coordinator.db")
    manager = RoundManager(config, store, RandomScheduler(), generate_private_key())
    manager.start()
    return manager


def _assignments(manager: RoundManager, num_devices: int) -> list[TaskAssignment]:
    profile = find_profile("laptop-mid-16gb")
    capable = frozenset({SECURE_AGGREGATION_CAPABILITY})
    candidates = [
        DeviceCandidate(f"d{i:03d}", "s", profile, capabilities=capable) for i in range(num_devices)
    ]
    return [
        decode_frame(item.payload).expect(TaskAssignment)
        for item in manager.open_rounds_if_possible(candidates)
        if item.topic.endswith("/task") and item.payload
    ]


def _delta(reference: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: 0.01 * torch.randn(tensor.shape, generator=generator)
        for name, tensor in reference.items()
    }


def plain_round(root: Path, num_devices: int) -> tuple[int, float]:
    """(bytes one device sends, coordinator CPU seconds for the round)."""
    manager = _manager(root, num_devices, secure=False)
    reference = manager.current["bench"].state()
    clock = CoordinatorClock()
    sent = 0
    for index, assignment in enumerate(_assignments(manager, num_devices)):
        key = generate_private_key()
        body = encode_update(_delta(reference, index), CodecConfig(UpdateEncoding.INT8)).body
        update = Update(
            "bench", "bench", 1, assignment.device_id, 0, assignment.model_version, 10, 2,
            UpdateEncoding.INT8,
        )  # fmt: skip
        frame = encode_frame(update, sender=assignment.device_id, body=body, signing_key=key)
        sent = len(frame)
        decoded = decode_frame(frame)  # the daemon decodes every frame it receives
        clock.call(manager.accept_update, decoded.expect(Update), decoded.body)
    record = manager.store.round("bench", 1)
    assert record is not None and record.state is RoundState.COMPLETED, record
    return sent, clock.seconds


def secure_round(root: Path, num_devices: int, drop_fraction: float) -> tuple[int, float]:
    """(bytes one device sends, coordinator CPU seconds for the round)."""
    manager = _manager(root, num_devices, secure=True)
    reference = manager.current["bench"].state()
    clock = CoordinatorClock()
    assignments = _assignments(manager, num_devices)
    sessions = {
        a.device_id: SecureSession(a, a.device_id, generate_private_key()) for a in assignments
    }
    dropped = set(sorted(sessions)[: int(drop_fraction * num_devices)])
    sent: dict[str, int] = dict.fromkeys(sessions, 0)
    pending: list[tuple[SecAggEnvelope, bytes]] = []

    def deliver(frame: bytes) -> None:
        decoded = decode_frame(frame)
        envelope = decoded.expect(SecAggEnvelope)
        sent[envelope.device_id] += len(frame)
        _, reason, outgoing = clock.call(manager.accept_secure, envelope, decoded.body)
        assert not reason, reason
        relay(outgoing)

    def relay(outgoing: list) -> None:  # noqa: ANN001
        for item in outgoing:
            if item.topic.endswith("/secagg"):
                message = decode_frame(item.payload)
                pending.append((message.expect(SecAggEnvelope), message.body))

    def drain() -> None:
        while pending:
            envelope, body = pending.pop(0)
            session = sessions[envelope.device_id]
            reply = session.answer(envelope.step, body)
            if reply is not None:
                deliver(reply)
            if envelope.step is SecAggStep.FORWARDED_SHARES and envelope.device_id not in dropped:
                delta = _delta(reference, int(envelope.device_id[1:]))
                deliver(session.masked_input(delta, 10, 2, {})[1])

    for session in sessions.values():
        deliver(session.advertise_frame())
    drain()
    if dropped:  # the round's deadline passes without the dropped devices' inputs
        later = time.time() + 7200
        manager.now = manager.secure.now = lambda: later  # type: ignore[method-assign]
        relay(clock.call(manager.close_due_rounds))
        drain()
    record = manager.store.round("bench", 1)
    assert record is not None and record.state is RoundState.COMPLETED, record.reason
    survivor = next(device for device in sorted(sessions) if device not in dropped)
    return sent[survivor], clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--output", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [
        "| devices | plain bytes/device | secure bytes/device | ratio | plain coordinator s "
        "| secure coordinator s | ratio | secure, 10% dropped: coordinator s | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for num_devices in args.devices:
            plain_bytes, plain_seconds = plain_round(root / f"plain{num_devices}", num_devices)
            secure_bytes, secure_seconds = secure_round(
                root / f"secure{num_devices}", num_devices, 0.0
            )
            _, dropped_seconds = secure_round(root / f"drop{num_devices}", num_devices, 0.1)
            row = (
                f"| {num_devices} | {plain_bytes:,} | {secure_bytes:,} | "
                f"{secure_bytes / plain_bytes:.2f} | {plain_seconds:.2f} | {secure_seconds:.2f} | "
                f"{secure_seconds / plain_seconds:.2f} | {dropped_seconds:.2f} | "
                f"{dropped_seconds / plain_seconds:.2f} |"
            )
            rows.append(row)
            print(row, flush=True)
    header = (
        f"{datetime.now(timezone.utc):%Y-%m-%d}, {platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, 1 torch thread"
    )
    text = "\n".join([header, "", *rows]) + "\n"
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)


if __name__ == "__main__":
    main()
