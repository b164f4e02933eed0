"""The coordinator's cost at district scale (issue 20): tick time with thousands of idle
online devices, per-update accept time in a large round, and the time and memory from the
last update to the published version.

Real pieces throughout: a real Mosquitto on a free loopback port, the daemon's real store
(SQLite file), the real MiniLM task model at the configured rank, updates encoded by the
agent's codec. What is injected: enrollment rows (through the store's own API) and the
heartbeats (written into `daemon.liveness`, as a DeviceState would put them), so the
figures are the coordinator's own work, not the broker's or the agents'.

    python benchmarks/bench_coordinator_ticks.py --devices 5000 --round 500

Prints one line per figure. Run it against another tree (the code before a change) with
PYTHONPATH=<tree> to compare.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from coordinator.config import CoordinatorConfig, CoordinatorSettings, ScheduleConfig, TaskConfig
from coordinator.daemon import CoordinatorDaemon, DeviceLiveness
from coordinator.mosquitto import MosquittoConfig, MosquittoProcess
from device_profiles.profile import find_profile, profile_toml_text
from edge_runtime.wire import (
    BrokerSettings,
    CodecConfig,
    DeviceChannel,
    DeviceState,
    Ed25519PrivateKey,
    PowerSource,
    ReceivedMessage,
    Update,
    UpdateEncoding,
    device_topic,
    encode_frame,
    encode_update,
    generate_private_key,
    public_key_hex,
)
from quantization.models import minilm_path

PROFILES = ("laptop-mid-16gb", "laptop-low-4gb", "jetson-orin-nano-8gb")
SCHOOLS = 50


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process, MiB."""
    current = peak = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            current = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    return current, peak


def _config(state: Path, broker: MosquittoProcess, round_size: int) -> CoordinatorConfig:
    return CoordinatorConfig(
        coordinator=CoordinatorSettings(
            fleet="bench",
            state_dir=str(state),
            startup_grace_seconds=0.0,
            device_timeout_seconds=3600.0,
        ),
        broker=BrokerSettings(url=broker.url),
        tasks=(
            TaskConfig(
                id="t",
                kind="classification",
                base_model=str(minilm_path()),
                labels=("a", "b"),
                scheme="none",
                rank=8,
                rounds=100,
                schedule=ScheduleConfig(
                    devices_per_round=round_size,
                    min_updates=2,
                    over_selection=0.0,
                    gather_seconds=0.0,
                    round_deadline_seconds=24 * 3600.0,
                    strategy="fit-first",
                ),
            ),
        ),
    )


def _enroll(daemon: CoordinatorDaemon, count: int) -> dict[str, Ed25519PrivateKey]:
    texts = [profile_toml_text(find_profile(name)) for name in PROFILES]
    keys = {}
    for index in range(count):
        device_id = f"dev-{index:05d}"
        school = f"school-{index % SCHOOLS:02d}"
        token = f"bench-token-{device_id}"
        keys[device_id] = generate_private_key()
        daemon.store.add_enrollment_token(token, school, 3600.0)
        daemon.store.redeem_enrollment_token(
            token,
            device_id,
            bytes.fromhex(public_key_hex(keys[device_id])),
            texts[index % len(texts)],
        )
        state = DeviceState(
            fleet="bench",
            device_id=device_id,
            sequence=1,
            online=True,
            eligible=True,
            cpu_load=0.5,
            free_memory_bytes=8 * 2**30,
            power_source=PowerSource.MAINS,
            profile_digest="00" * 32,
        )
        daemon.liveness[device_id] = DeviceLiveness(state, daemon.now())
    return keys


def _heartbeats(
    daemon: CoordinatorDaemon, keys: dict[str, Ed25519PrivateKey], first_sequence: int
) -> list[float]:
    """Seconds `daemon.handle` spends on one signed DeviceState heartbeat (decode, store
    lookup, signature, liveness, heartbeat recorder): the per-message cost idle devices
    put on the coordinator, ~1 per device every 10 s."""
    times = []
    for sequence, (device_id, key) in enumerate(keys.items(), start=first_sequence):
        state = DeviceState(
            fleet="bench",
            device_id=device_id,
            sequence=sequence,
            online=True,
            eligible=True,
            cpu_load=0.5,
            free_memory_bytes=8 * 2**30,
            power_source=PowerSource.MAINS,
            profile_digest="00" * 32,
        )
        payload = encode_frame(state, sender=device_id, signing_key=key)
        message = ReceivedMessage(
            device_topic("bench", device_id, DeviceChannel.STATE), payload, 1, False
        )
        started = time.perf_counter()
        daemon.handle(message)
        times.append(time.perf_counter() - started)
    return times


def _timed_ticks(daemon: CoordinatorDaemon, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        daemon.tick()
        times.append(time.perf_counter() - started)
    return times


def _updates(
    daemon: CoordinatorDaemon, encoding: UpdateEncoding
) -> tuple[list[float], list[float], float]:
    """Send every assigned device's update straight to the round manager (the daemon's
    signature and MQTT steps cost the same before and after): per-update accept seconds
    (wall and CPU: the wall time includes the store's fsync), and the seconds of the last
    one, which closes the round and publishes the version."""
    [record] = daemon.store.open_rounds()
    current = daemon.rounds.current["t"]
    reference = current.state()
    generator = torch.Generator().manual_seed(0)
    assigned = sorted(daemon.store.assignments("t", record.round_number))
    times: list[float] = []
    cpu: list[float] = []
    for index, device_id in enumerate(assigned):
        scale = 10.0 if index % 50 == 7 else 1.0  # a few outliers for the median bound
        delta = {
            name: torch.randn(tensor.shape, generator=generator) * 1e-3 * scale
            for name, tensor in reference.items()
        }
        body = encode_update(delta, CodecConfig(encoding)).body
        update = Update(
            "bench", "t", record.round_number, device_id, 0, current.version, 16, 2, encoding
        )
        started, started_cpu = time.perf_counter(), time.process_time()
        status, reason, outgoing = daemon.rounds.accept_update(update, body)
        daemon._publish_all(outgoing)  # noqa: SLF001 - what the daemon's _update does
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
        if status.value != "accepted":
            raise SystemExit(f"update from {device_id} refused: {reason}")
    return times, cpu, times[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--round", type=int, default=500, dest="round_size")
    parser.add_argument("--ticks", type=int, default=10, help="idle ticks to time")
    parser.add_argument("--encoding", default="int8", choices=[e.value for e in UpdateEncoding])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        broker = MosquittoProcess(MosquittoConfig(workdir=work / "mosquitto", persistence=False))
        broker.start()
        daemon = CoordinatorDaemon(_config(work / "state", broker, args.round_size))
        try:
            daemon.start()
            started = time.perf_counter()
            keys = _enroll(daemon, args.devices)
            print(f"enrolled {args.devices} devices in {time.perf_counter() - started:.1f} s")
            print(f"rss after start: {_rss_mb()[0]:.0f} MiB")
            [opening] = _timed_ticks(daemon, 1)
            opened = daemon.store.open_rounds()
            print(
                f"opening tick ({args.round_size} of {args.devices}): {opening * 1000:.0f} ms "
                f"({len(opened)} round open)"
            )
            sample = dict(list(keys.items())[:1000])
            news = _heartbeats(daemon, sample, 2)  # each one news: written to the store
            beats = _heartbeats(daemon, sample, 2 + len(sample))  # the steady state
            print(
                f"heartbeat handling: median {statistics.median(beats) * 1e6:.0f} us "
                f"(first one of a device, written: {statistics.median(news) * 1e6:.0f} us); "
                f"{args.devices} devices every 10 s = "
                f"{statistics.median(beats) * args.devices / 10 * 100:.1f}% of one core (median)"
            )
            idle = _timed_ticks(daemon, args.ticks)
            print(
                f"idle tick with {args.devices} online devices, round open: median "
                f"{statistics.median(idle) * 1000:.2f} ms, max {max(idle) * 1000:.2f} ms "
                f"({statistics.median(idle) / 0.2 * 100:.1f}% of one core at 0.2 s ticks)"
            )
            times, cpu, last = _updates(daemon, UpdateEncoding(args.encoding))
            body_times, body_cpu = times[:-1], cpu[:-1]
            print(
                f"accept_update ({args.encoding}, round of {len(times)}): median "
                f"{statistics.median(body_times) * 1000:.1f} ms wall / "
                f"{statistics.median(body_cpu) * 1000:.1f} ms CPU; first 10 "
                f"{statistics.mean(body_cpu[:10]) * 1000:.1f} ms CPU, last 10 "
                f"{statistics.mean(body_cpu[-10:]) * 1000:.1f} ms CPU"
            )
            current, peak = _rss_mb()
            print(f"last update -> version published: {last:.2f} s")
            print(
                f"rss after the round: {current:.0f} MiB, peak {peak:.0f} MiB "
                f"(ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)"
            )
            idle = _timed_ticks(daemon, args.ticks)
            print(
                f"idle tick after the round closed (next round may open): median "
                f"{statistics.median(idle) * 1000:.2f} ms, max {max(idle) * 1000:.2f} ms"
            )
        finally:
            daemon.stop()
            broker.stop()


if __name__ == "__main__":
    main()
