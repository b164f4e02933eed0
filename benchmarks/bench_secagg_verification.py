"""What verifiable, robust unmasking costs (issue 16): bytes for the seed commitment, and the
coordinator's reconstruction time with and without a device revealing wrong shares.

Per device count n (t = floor(n/2) + 1, every device simulated in this process) it prints:

- `commitment_bytes_sent`: how much larger a device's SHARE_KEYS body is with its seed
  commitment than without the field; `forwarded_bytes_received`: what the empty field adds
  to the n - 1 forwarded share messages a device receives;
- `rebuild_ms`: `rebuild_secrets` (every requested secret rebuilt from all answers and
  verified) for: all honest answers; one liar among all n answers (Berlekamp-Welch, then the
  liar's shares tried last); one liar among t + 1 answers (the bounded subset search);
- `first_t_ms`: the old reconstruction (first t shares, no check) of the same secrets;
- `aggregate_ms`: the whole `SecAggServer.aggregate` with `--coordinates` coordinates
  (mask expansion included), honest and with one liar.

Each time is the median of `--repeats` runs on one thread.

    python benchmarks/bench_secagg_verification.py --devices 5 10 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_runtime.secagg import (  # noqa: E402
    PRIME,
    QuantizationConfig,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    TensorLayout,
    UnmaskResponse,
    message_body,
    rebuild_secrets,
    reconstruct_secret,
)
from edge_runtime.secagg.config import share_points  # noqa: E402
from edge_runtime.secagg.shamir import share_from_bytes, share_to_bytes  # noqa: E402


def _median_ms(call: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 2)


def _lie(response: UnmaskResponse) -> UnmaskResponse:
    def shifted(shares: dict[str, bytes]) -> dict[str, bytes]:
        return {o: share_to_bytes((share_from_bytes(s) + 12345) % PRIME) for o, s in shares.items()}

    return dataclasses.replace(
        response,
        self_mask_shares=shifted(response.self_mask_shares),
        mask_key_shares=shifted(response.mask_key_shares),
    )


def measure(num_devices: int, num_coordinates: int, num_dropped: int, repeats: int) -> dict:
    devices = [f"dev-{index:03d}" for index in range(num_devices)]
    generator = torch.Generator().manual_seed(0)
    inputs = {d: {"w": torch.randn(num_coordinates, generator=generator)} for d in devices}
    layout = TensorLayout.of(inputs[devices[0]])
    threshold = num_devices // 2 + 1
    config = SecAggConfig(threshold, QuantizationConfig(clip_bound=8.0))
    server = SecAggServer("bench", config, layout)
    clients = {d: SecAggClient(d, "bench", config, layout) for d in devices}
    roster = server.collect_advertisements([c.advertise_keys() for c in clients.values()])
    shares = [c.share_keys(roster) for c in clients.values()]
    routed = server.route_shares(shares)
    for device_id, forwarded in routed.items():
        clients[device_id].receive_shares(forwarded)
    masked = [clients[d].mask_input(inputs[d]) for d in devices[num_dropped:]]
    request = server.collect_masked_inputs(masked)
    answers = {d: clients[d].unmask(request) for d in request.survivors}

    without = shares[-1].to_dict()
    del without["self_mask_commitment"]
    sent = len(message_body(shares[-1])) - len(json.dumps(without, separators=(",", ":")))
    copy = routed[devices[-1]][0].to_dict()
    received_each = len(json.dumps(copy, separators=(",", ":")))
    del copy["self_mask_commitment"]
    received_each -= len(json.dumps(copy, separators=(",", ":")))

    points = share_points(server.shared_keys)
    public_keys = {d: a.mask_public_key for d, a in server.roster.items()}
    liar = request.survivors[0]  # among the first t by x: what the old code trusted

    def rebuild(responses: dict[str, UnmaskResponse]) -> object:
        return rebuild_secrets(
            "bench", request, responses, points, threshold, server.commitments, public_keys
        )

    def first_t(responses: dict[str, UnmaskResponse]) -> None:
        for owner in request.survivors:
            shares_of = {
                points[h]: share_from_bytes(r.self_mask_shares[owner]) for h, r in responses.items()
            }
            reconstruct_secret(shares_of, threshold)
        for owner in request.dropped:
            shares_of = {
                points[h]: share_from_bytes(r.mask_key_shares[owner]) for h, r in responses.items()
            }
            reconstruct_secret(shares_of, threshold)

    lying = {**answers, liar: _lie(answers[liar])}
    spare_one = dict(list(lying.items())[: threshold + 1])
    result = server.aggregate(list(lying.values()))
    assert [r.device_id for r in result.rejections] == [liar]
    return {
        "devices": num_devices,
        "threshold": threshold,
        "dropped": num_dropped,
        "commitment_bytes_sent": sent,
        "forwarded_bytes_received": received_each * (num_devices - 1),
        "first_t_ms": _median_ms(lambda: first_t(answers), repeats),
        "rebuild_ms_honest": _median_ms(lambda: rebuild(answers), repeats),
        "rebuild_ms_one_liar_all_answer": _median_ms(lambda: rebuild(lying), repeats),
        "rebuild_ms_one_liar_t_plus_1_answer": _median_ms(lambda: rebuild(spare_one), repeats),
        "coordinates": num_coordinates,
        "aggregate_ms_honest": _median_ms(
            lambda: server.aggregate(list(answers.values())), repeats
        ),
        "aggregate_ms_one_liar": _median_ms(
            lambda: server.aggregate(list(lying.values())), repeats
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--coordinates", type=int, default=100_000)
    parser.add_argument("--dropped", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # each liar is logged once per run; not the point here
    for devices in args.devices:
        print(json.dumps(measure(devices, args.coordinates, args.dropped, args.repeats)))


if __name__ == "__main__":
    main()
