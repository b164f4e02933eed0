"""Wire cost of one adapter update: bytes, codec throughput, latency through Mosquitto.

Two updates, built from the published model shapes with random tensors (no download):
- MiniLM-L6 (hidden 384, intermediate 1536, 6 layers), LoRA r=8 on q/k/v/o + both FFN layers;
- SmolLM2-135M (hidden 576, intermediate 1536, 30 layers, 9 heads / 3 KV heads of dim 64),
  LoRA r=16 on q/k/v/o/gate/up/down.
For fp32, int8 and int8 + top-k (10 %) it reports encoded body bytes, bytes on the wire
(MQTT PUBLISH packets of the signed frame's 512 KiB chunks), the ratio to fp32, encode and
decode throughput (MB of dense fp32 per second) and the end-to-end latency of one update
(encode, sign, chunk, publish through a local Mosquitto, reassemble, verify, decode).

    python benchmarks/bench_protocol.py --output bench-out/protocol.md
    python benchmarks/bench_protocol.py --repeats 3 --no-broker     # codec only
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.mosquitto import MosquittoConfig, MosquittoProcess, find_mosquitto  # noqa: E402
from edge_runtime.wire import (  # noqa: E402  # noqa: E402
    DEFAULT_CHUNK_BYTES,
    ChunkHeader,
    ChunkReassembler,
    ChunkSender,
    CodecConfig,
    DeviceChannel,
    MqttTransport,
    TransportConfig,
    Update,
    UpdateEncoding,
    decode_frame,
    decode_update,
    device_topic,
    encode_frame,
    encode_update,
    generate_private_key,  # noqa: E402
    tensor_shapes,
    verify_frame,
)

MB = 1e6
CONFIGS = {
    "fp32": CodecConfig(UpdateEncoding.FP32),
    "int8": CodecConfig(UpdateEncoding.INT8),
    "int8+top-k 10%": CodecConfig(UpdateEncoding.INT8, top_k_fraction=0.1),
}


def lora_state(
    layers: dict[str, tuple[int, int]], num_layers: int, rank: int, prefix: str
) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA factors: A [rank, in], B [out, rank] for every listed linear layer."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for layer in range(num_layers):
        for name, (fan_in, fan_out) in layers.items():
            base = f"{prefix}.{layer}.{name}"
            state[f"{base}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.02
            state[f"{base}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01
    return state


def minilm_l6_r8() -> dict[str, torch.Tensor]:
    hidden, intermediate = 384, 1536
    layers = {
        "attention.self.query": (hidden, hidden),
        "attention.self.key": (hidden, hidden),
        "attention.self.value": (hidden, hidden),
        "attention.output.dense": (hidden, hidden),
        "intermediate.dense": (hidden, intermediate),
        "output.dense": (intermediate, hidden),
    }
    return lora_state(layers, 6, 8, "base_model.model.encoder.layer")


def smollm2_135m_r16() -> dict[str, torch.Tensor]:
    hidden, intermediate, kv = 576, 1536, 3 * 64
    layers = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, intermediate),
        "mlp.up_proj": (hidden, intermediate),
        "mlp.down_proj": (intermediate, hidden),
    }
    return lora_state(layers, 30, 16, "base_model.model.model.layers")


def mqtt_publish_bytes(topic: str, payload_bytes: int) -> int:
    """Size of a QoS 1 MQTT 3.1.1 PUBLISH packet."""
    remaining = 2 + len(topic.encode()) + 2 + payload_bytes
    length_bytes = (
        1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2**21 else 4
    )
    return 1 + length_bytes + remaining


def _update_message(config: CodecConfig) -> Update:
    return Update(
        fleet="bench",
        task="task",
        server_round=1,
        device_id="dev-1",
        attempt=0,
        model_version="ab" * 32,
        num_samples=64,
        num_steps=20,
        encoding=config.encoding,
        top_k_fraction=config.top_k_fraction,
        metrics={"loss": 1.0},
    )


def _median_seconds(function, repeats: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_codec(state: dict[str, torch.Tensor], repeats: int) -> list[dict]:
    key = generate_private_key()
    topic = device_topic("bench", "dev-1", DeviceChannel.CHUNK)
    rows = []
    shapes = tensor_shapes(state)
    for label, config in CONFIGS.items():
        encoded = encode_update(state, config)
        frame = encode_frame(
            _update_message(config), sender="dev-1", body=encoded.body, signing_key=key
        )
        sender = ChunkSender(
            frame, transfer_id="t-1", sender="dev-1", chunk_bytes=DEFAULT_CHUNK_BYTES
        )
        wire = sum(mqtt_publish_bytes(topic, len(data)) for _, data in sender.frames())
        encode_s = _median_seconds(lambda config=config: encode_update(state, config), repeats)
        decode_s = _median_seconds(lambda body=encoded.body: decode_update(body, shapes), repeats)
        rows.append(
            {
                "config": label,
                "raw": encoded.raw_bytes,
                "body": encoded.encoded_bytes,
                "wire": wire,
                "chunks": sender.count,
                "encode_mbps": encoded.raw_bytes / MB / encode_s,
                "decode_mbps": encoded.raw_bytes / MB / decode_s,
            }
        )
    fp32_wire = rows[0]["wire"]
    for row in rows:
        row["ratio"] = fp32_wire / row["wire"]
    return rows


def measure_latency(
    broker: MosquittoProcess, state: dict[str, torch.Tensor], config: CodecConfig, repeats: int
) -> float:
    """Median seconds from "encode starts" to "tensors decoded on the coordinator"."""
    key = generate_private_key()
    shapes = tensor_shapes(state)
    topic = device_topic("bench", "dev-1", DeviceChannel.CHUNK)
    base = TransportConfig(host=broker.host, port=broker.port, client_id="bench-coordinator")
    coordinator = MqttTransport(base)
    coordinator.subscribe(topic)
    coordinator.start()
    device = MqttTransport(
        TransportConfig(host=broker.host, port=broker.port, client_id="bench-dev")
    )
    device.start()
    times = []
    try:
        for attempt in range(repeats + 1):  # first run warms up connections and caches
            reassembler = ChunkReassembler()
            start = time.perf_counter()
            encoded = encode_update(state, config)
            frame = encode_frame(
                _update_message(config), sender="dev-1", body=encoded.body, signing_key=key
            )
            sender = ChunkSender(frame, transfer_id=f"t-{attempt}", sender="dev-1")
            for _, data in sender.frames():
                device.publish(topic, data)
            while True:
                message = coordinator.received.get(timeout=60)
                chunk = decode_frame(message.payload)
                completed = reassembler.accept(chunk.expect(ChunkHeader), chunk.body)
                if completed is not None:
                    break
            update_frame = completed.decode()
            verify_frame(update_frame, key.public_key())
            decode_update(update_frame.body, shapes)
            if attempt:
                times.append(time.perf_counter() - start)
    finally:
        device.stop()
        coordinator.stop()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--no-broker", action="store_true", help="skip the Mosquitto latency")
    parser.add_argument("--output", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models = {"MiniLM-L6 LoRA r=8": minilm_l6_r8(), "SmolLM2-135M LoRA r=16": smollm2_135m_r16()}
    lines = [
        "# Protocol benchmark",
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.machine()}, {platform.processor() or platform.platform()}, "
        f"torch threads {args.threads}, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        f"- load average at start (other work on the box skews MB/s): "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs",
        f"- command: `python benchmarks/bench_protocol.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- chunk size {DEFAULT_CHUNK_BYTES // 1024} KiB; wire = MQTT PUBLISH packets of the "
        "signed frame's chunks; MB/s = MB of dense fp32 per second; medians of "
        f"{args.repeats} runs",
        "",
    ]
    broker = None
    temp = tempfile.TemporaryDirectory()
    if not args.no_broker:
        if find_mosquitto() is None:
            print("mosquitto not found; latency column skipped", file=sys.stderr)
        else:
            broker = MosquittoProcess(MosquittoConfig(workdir=Path(temp.name), persistence=False))
            broker.start()
    try:
        for model_name, state in models.items():
            params = sum(t.numel() for t in state.values())
            lines += [
                f"## {model_name} ({len(state)} tensors, {params:,} parameters)",
                "",
                "| encoding | body bytes | wire bytes | chunks | fp32/this (wire) | encode MB/s "
                "| decode MB/s | end-to-end latency |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for row in measure_codec(state, args.repeats):
                latency = "n/a"
                if broker is not None:
                    seconds = measure_latency(broker, state, CONFIGS[row["config"]], args.repeats)
                    latency = f"{seconds * 1000:.0f} ms"
                lines.append(
                    f"| {row['config']} | {row['body']:,} | {row['wire']:,} | {row['chunks']} "
                    f"| {row['ratio']:.2f}x | {row['encode_mbps']:.0f} | {row['decode_mbps']:.0f} "
                    f"| {latency} |"
                )
            lines.append("")
    finally:
        if broker is not None:
            broker.stop()
        temp.cleanup()
    report = "\n".join(lines)
    print(report)
    if args.output:
        args.output.write_text(report + "\n")


if __name__ == "__main__":
    main()
