"""What one hostile device's inputs cost the coordinator, before and after issue 16 (4, 5).

1. `decode_update` of an update body declaring 10^6 one-element tensors (~70 MB, nearly all
   header): wall time and peak RSS growth of the decoding process, for the decoder of
   commit b842c6d (loaded from git) and for the current one, with and without expected
   shapes. Each measurement runs in a fresh subprocess so `ru_maxrss` is its own.
2. A flood into the receive queue of a transport whose loop is busy (nobody reads
   `received`), through a local Mosquitto: RSS growth of the receiving process, messages
   queued and dropped, for an unbounded queue (what b842c6d had) and the default bounds.
3. The alternative that was not chosen: a paho 2.x client with `manual_ack=True` that never
   acknowledges, flooded at QoS 1 and at QoS 0: how many messages reach its callback.

    python benchmarks/bench_hostile_inputs.py
    python benchmarks/bench_hostile_inputs.py --skip-before --flood-mib 128   # quicker
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coordinator.mosquitto import MosquittoConfig, MosquittoProcess, find_mosquitto  # noqa: E402
from edge_runtime.wire import (  # noqa: E402
    MqttTransport,
    ReceiveQueueConfig,
    TransportConfig,
    decode_update,
)

BASE_COMMIT = "b842c6d"
MIB = 1024 * 1024
TENSORS = 10**6
EXPECTED = {"w": (4, 8)}
METADATA = {
    "format": "schoolfl-update",
    "codec_version": "1",
    "encoding": "int8",
    "top_k_fraction": "",
    "shapes": json.dumps({"w": [4, 8]}),
}
HEADER_FITS = 15_000
"""Tensors whose header (~1 MiB) still fits under `decode_update`'s default bound: the most
JSON a hostile body can make the current decoder parse without expected shapes."""
TOPIC = "schoolfl/bench/dev/mallory/state"


def million_tiny_tensors(count: int = TENSORS) -> bytes:
    parts = [
        f'"t{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}'
        for i in range(count)
    ]
    header = ('{"__metadata__":' + json.dumps(METADATA) + "," + ",".join(parts) + "}").encode()
    return len(header).to_bytes(8, "little") + header + bytes(4 * count)


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so the next peak is this phase's own
    (importing torch peaks higher than a small phase would)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then includes the imports


def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass  # not Linux: fall back to getrusage (never reset)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass  # not Linux
    return _peak_rss_mib()


def _decoder(which: str):  # noqa: ANN202
    if which == "after":
        return decode_update
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{BASE_COMMIT}:edge_runtime/wire/update_codec.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "update_codec_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("update_codec_base", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.decode_update


def child_decode(which: str, body_path: str, with_expected: bool) -> None:
    """Runs in its own process: decode once, print one JSON line."""
    decode = _decoder(which)
    body = Path(body_path).read_bytes()
    before = _rss_mib()
    _reset_peak_rss()
    started = time.perf_counter()
    try:
        decode(body, EXPECTED if with_expected else None)
        outcome = "accepted (!)"
    except ValueError as error:  # ProtocolError subclasses ValueError
        outcome = f"{type(error).__name__}: {str(error)[:90]}"
    seconds = time.perf_counter() - started
    growth = _peak_rss_mib() - before
    print(json.dumps({"seconds": seconds, "rss_growth_mib": growth, "outcome": outcome}))


def measure_decode(skip_before: bool, count: int = TENSORS) -> None:
    body = million_tiny_tensors(count)
    with tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False) as handle:
        handle.write(body)
    size = len(body) / MIB
    print(f"\n## 1. decode_update of {count:,} one-element tensors ({size:.1f} MiB body)")
    print("| decoder | expected shapes | time (s) | peak RSS growth (MiB) | outcome |")
    print("|---|---|---|---|---|")
    for which in ("before", "after"):
        if which == "before" and skip_before:
            continue
        for with_expected in (True, False):
            command = [sys.executable, __file__, "--child-decode", which, handle.name]
            result = subprocess.run(
                [*command, str(with_expected)],
                check=True,
                capture_output=True,
                text=True,
            )
            row = json.loads(result.stdout.strip().splitlines()[-1])
            label = f"{BASE_COMMIT} (before)" if which == "before" else "current (after)"
            print(
                f"| {label} | {'yes' if with_expected else 'no'} | {row['seconds']:.3g} | "
                f"{row['rss_growth_mib']:.0f} | {row['outcome']} |"
            )
    Path(handle.name).unlink()


# -- the receive queue under a flood ---------------------------------------------------------


def child_flood_receiver(mode: str, host: str, port: int, expected: int) -> None:
    """Runs in its own process: subscribe, say READY, never read, report when all arrived."""
    if mode == "manual_ack":
        child_manual_ack(host, port, expected)
        return
    bounds = ReceiveQueueConfig()
    if mode == "unbounded":
        bounds = ReceiveQueueConfig(max_messages=2**62, max_bytes=2**62)
    transport = MqttTransport(
        TransportConfig(host=host, port=port, client_id=f"flooded-{mode}", receive=bounds)
    )
    transport.subscribe(TOPIC)
    transport.start(10)
    logging.getLogger("edge_runtime").setLevel(logging.ERROR)  # the table says it all
    before = _rss_mib()
    _reset_peak_rss()
    print("READY", flush=True)
    transport.received.wait_arrived(expected, 300)
    print(
        json.dumps(
            {
                "arrived": transport.received.arrived,
                "queued": transport.received.qsize(),
                "queued_mib": transport.received.queued_bytes / MIB,
                "dropped": transport.dropped,
                "rss_growth_mib": _peak_rss_mib() - before,
            }
        ),
        flush=True,
    )
    transport.stop()


def child_manual_ack(host: str, port: int, expected: int) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    counts = {0: 0, 1: 0}
    arrived = threading.Event()

    def on_message(client, userdata, message) -> None:  # noqa: ANN001
        counts[message.qos] += 1  # never acknowledged: the loop is "busy"

    def on_connect(client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        client.subscribe(TOPIC, qos=1)
        arrived.set()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="flooded-manual-ack", manual_ack=True
    )
    client.on_message = on_message
    client.on_connect = on_connect
    client.connect(host, port)
    client.loop_start()
    arrived.wait(10)
    time.sleep(0.5)  # the SUBACK
    print("READY", flush=True)
    sys.stdin.readline()  # the parent says when its flood is published
    time.sleep(3.0)  # let deliveries settle: a benchmark, not a test
    print(json.dumps({"qos1_delivered": counts[1], "qos0_delivered": counts[0]}), flush=True)
    client.loop_stop()


def _flood(broker: MosquittoProcess, mode: str, count: int, size: int, qos: int) -> dict:
    address = [broker.host, str(broker.port)]
    child = subprocess.Popen(
        [sys.executable, __file__, "--child-flood", mode, *address, str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline().strip() == "READY"
    flooder = MqttTransport(
        TransportConfig(host=broker.host, port=broker.port, client_id=f"mallory-{mode}-{qos}")
    )
    flooder.start(10)
    payload = b"f" * size
    started = time.perf_counter()
    infos = [flooder.publish(TOPIC, payload, qos=qos) for _ in range(count)]
    if qos:
        MqttTransport.wait_published(infos[-1], 300)
    child.stdin.write("published\n")
    child.stdin.flush()
    row = json.loads(child.stdout.readline())
    row["seconds"] = time.perf_counter() - started
    child.wait(60)
    flooder.stop()
    return row


def measure_flood(flood_mib: int) -> None:
    if find_mosquitto() is None:
        print("\n(no mosquitto: flood measurements skipped)")
        return
    size = MIB
    count = flood_mib
    with tempfile.TemporaryDirectory() as workdir:
        broker = MosquittoProcess(MosquittoConfig(workdir=Path(workdir), persistence=False))
        broker.start()
        try:
            print(f"\n## 2. Flood of {count} x {size // 1024} KiB QoS 1 messages, loop busy")
            defaults = ReceiveQueueConfig()
            print("| receive queue | arrived | queued | queued MiB | dropped | peak RSS +MiB |")
            print("|---|---|---|---|---|---|")
            bounded = f"bounded ({defaults.max_messages} msgs / {defaults.max_bytes // MIB} MiB)"
            for mode, label in (("unbounded", "unbounded (as at b842c6d)"), ("bounded", bounded)):
                row = _flood(broker, mode, count, size, qos=1)
                print(
                    f"| {label} | {row['arrived']} | {row['queued']} | {row['queued_mib']:.0f} | "
                    f"{row['dropped']} | {row['rss_growth_mib']:.0f} |"
                )
            print("\n## 3. manual_ack (never acknowledged) under 2000 x 1 KiB messages")
            print("| published QoS | messages reaching the callback |")
            print("|---|---|")
            for qos in (1, 0):
                row = _flood(broker, "manual_ack", 2000, 1024, qos=qos)
                delivered = row["qos1_delivered"] + row["qos0_delivered"]
                print(f"| {qos} | {delivered} of 2000 |")
        finally:
            broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-before", action="store_true", help="skip the slow b842c6d run")
    parser.add_argument("--flood-mib", type=int, default=384, help="flood size in 1 MiB messages")
    parser.add_argument("--child-decode", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-flood", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_decode:
        which, path, with_expected = args.child_decode
        child_decode(which, path, with_expected == "True")
        return
    if args.child_flood:
        mode, host, port, expected = args.child_flood
        child_flood_receiver(mode, host, int(port), int(expected))
        return
    print(f"# Hostile inputs ({platform.machine()}, Python {platform.python_version()})")
    measure_decode(args.skip_before)
    measure_decode(args.skip_before, HEADER_FITS)
    measure_flood(args.flood_mib)


if __name__ == "__main__":
    main()
