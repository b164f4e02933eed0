"""A whole secure-aggregation round in one process, every message relayed as JSON exactly as
the MQTT coordinator relays it: the reference the tests and benchmarks drive."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch

from edge_runtime.secagg.client import SecAggClient
from edge_runtime.secagg.config import SecAggConfig, SecAggResult
from edge_runtime.secagg.messages import (
    SecAggMessage,
)
from edge_runtime.secagg.ring import (
    QuantizationConfig,
    TensorLayout,
)
from edge_runtime.secagg.server import SecAggServer

MessageT = TypeVar("MessageT", bound=SecAggMessage)


def _over_the_wire(message: MessageT) -> MessageT:
    """Round-trip a message through its JSON text, as the MQTT relay would carry it."""
    return type(message).from_dict(json.loads(json.dumps(message.to_dict())))


def run_round_in_process(
    inputs: Mapping[str, Mapping[str, torch.Tensor]],
    threshold: int,
    quantization: QuantizationConfig | None = None,
    drop_after_masking: Sequence[str] = (),
    drop_before_unmasking: Sequence[str] = (),
    round_id: str = "round-1",
    server: SecAggServer | None = None,
    generator: torch.Generator | None = None,
) -> SecAggResult:
    """Run one full round in memory, every message relayed through the server as JSON.

    `drop_after_masking`: devices that computed their masked input but never delivered it (the
    case that needs their pairwise masks cancelled). `drop_before_unmasking`: devices whose
    masked input arrived but that do not answer the unmask request (their input still counts).
    Pass `server` to inspect its state afterwards (tests do).
    """
    layout = TensorLayout.of(next(iter(inputs.values())))
    config = SecAggConfig(threshold, quantization or QuantizationConfig())
    server = server or SecAggServer(round_id, config, layout)
    clients = {device_id: SecAggClient(device_id, round_id, config, layout) for device_id in inputs}
    wire = _over_the_wire
    roster = server.collect_advertisements(
        [wire(client.advertise_keys()) for client in clients.values()]
    )
    share_messages = [wire(client.share_keys(roster)) for client in clients.values()]
    routed = server.route_shares(share_messages)
    for device_id, forwarded in routed.items():
        clients[device_id].receive_shares([wire(message) for message in forwarded])
    masked = []
    for device_id, client in clients.items():
        message = client.mask_input(inputs[device_id], generator)
        if device_id not in drop_after_masking:
            masked.append(wire(message))
    request = server.collect_masked_inputs(masked)
    responses = [
        wire(clients[device_id].unmask(wire(request)))
        for device_id in request.survivors
        if device_id not in drop_before_unmasking
    ]
    return server.aggregate(responses)
