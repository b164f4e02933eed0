"""Time and size one secure-aggregation round in-process (all devices simulated on this CPU).

Prints, per configuration: wall time of the whole round, the mean device time (key sharing +
masking) and the coordinator's unmasking time, the bytes one device sends, and the max abs
error of the decoded sum against the plain float sum.

    python benchmarks/bench_secagg.py                # 5 x 9216 and 20 x 300k, 0 and 2 dropped
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from edge_runtime.secagg import (
    QuantizationConfig,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    TensorLayout,
)


def measure(num_devices: int, num_coordinates: int, num_dropped: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    devices = [f"dev-{index:03d}" for index in range(num_devices)]
    inputs = {d: {"w": torch.randn(num_coordinates, generator=generator)} for d in devices}
    layout = TensorLayout.of(inputs[devices[0]])
    threshold = num_devices // 2 + 1
    config = SecAggConfig(threshold, QuantizationConfig(clip_bound=8.0))
    start = time.perf_counter()
    server = SecAggServer("bench", config, layout)
    clients = {d: SecAggClient(d, "bench", config, layout) for d in devices}
    device_seconds = {d: 0.0 for d in devices}

    def timed(device_id, call, *args):
        began = time.perf_counter()
        result = call(*args)
        device_seconds[device_id] += time.perf_counter() - began
        return result

    adverts = [timed(d, clients[d].advertise_keys) for d in devices]
    roster = server.collect_advertisements(adverts)
    shares = [timed(d, clients[d].share_keys, roster) for d in devices]
    routed = server.route_shares(shares)
    for d, forwarded in routed.items():
        timed(d, clients[d].receive_shares, forwarded)
    masked = [timed(d, clients[d].mask_input, inputs[d]) for d in devices]
    delivered = masked[num_dropped:]
    request = server.collect_masked_inputs(delivered)
    responses = [timed(d, clients[d].unmask, request) for d in request.survivors]
    began = time.perf_counter()
    result = server.aggregate(responses)
    server_seconds = time.perf_counter() - began
    round_seconds = time.perf_counter() - start
    expected = sum(inputs[d]["w"].double() for d in result.contributors)
    sent = (
        len(json.dumps(adverts[-1].to_dict()))
        + len(json.dumps(shares[-1].to_dict()))
        + len(masked[-1].vector)
        + len(json.dumps(responses[-1].to_dict()))
    )
    return {
        "devices": num_devices,
        "coordinates": num_coordinates,
        "dropped": num_dropped,
        "threshold": threshold,
        "round_s": round(round_seconds, 3),
        "mean_device_s": round(sum(device_seconds.values()) / num_devices, 4),
        "server_unmask_s": round(server_seconds, 3),
        "bytes_sent_per_device": sent,
        "max_abs_error": float((result.total["w"].double() - expected).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    for devices, coordinates in ((5, 9216), (5, 300_000), (20, 300_000)):
        for dropped in (0, 2):
            print(json.dumps(measure(devices, coordinates, dropped, args.threads)))


if __name__ == "__main__":
    main()
