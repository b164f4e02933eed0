"""A round's assignments: what the store keeps of each device's plan, how it is read back,
and the `TaskAssignment` frames built from it.

The store is the source of truth for an open round (a restarted coordinator re-sends the
same assignments), so the scheduler's plan goes into it once, as the wire carries it, and
everything after (the assignment frames, checking an arriving update's shapes, aggregation)
reads it back through `stored_plan`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch

from coordinator.config import TaskConfig
from coordinator.outgoing import Outgoing
from coordinator.scheduler import DevicePlan
from coordinator.store import RoundRecord
from coordinator.task_models import wire_task_spec
from device_profiles.plan import TrainingPlan
from device_profiles.shapes import ModelShape, resolve_shape
from edge_runtime.wire import (
    COORDINATOR_SENDER,
    Ed25519PrivateKey,
    InboxChannel,
    TaskAssignment,
    UpdateEncoding,
    encode_frame,
    from_json_fields,
    inbox_topic,
    tensor_shapes,
    to_json_fields,
)
from quantization.lora_ranks import adapter_rank, truncated_shapes
from quantization.task_model import resolve_base_model

LEGACY_PLAN_FIELDS = {"adapter_rank": "rank", "sequence_length": "seq_len"}
"""Plan fields as a store written before the one plan vocabulary named them."""
LEGACY_TERMS = ("update_encoding", "top_k_fraction", "predicted_round_seconds")
"""Assignment terms that such a store kept inside the plan."""


def shape_of(task: TaskConfig) -> ModelShape:
    """The cost-model shape of a task's base model (known name or its config.json)."""
    try:
        return resolve_shape(task.base_model)
    except Exception:  # noqa: BLE001 - fall back to the model's own config file
        source = resolve_base_model(task.base_model)
        return resolve_shape(str(source if source.is_dir() else source.parent))


def update_shapes(reference: dict[str, torch.Tensor], rank: int) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of an update from a device whose plan has LoRA rank `rank`: the
    global adapter's, truncated to that rank (ValueError when it exceeds the global's)."""
    shapes = tensor_shapes(reference)
    if rank == adapter_rank(reference):
        return shapes
    return truncated_shapes(shapes, rank)


def assignment_json(task: TaskConfig, chosen: DevicePlan) -> str:
    """What the store keeps of one device's assignment: the scheduler's plan, as the
    `TaskAssignment` carries it, and the terms the assignment carries beside it."""
    return json.dumps(
        {
            "plan": to_json_fields(chosen.plan),
            "update_encoding": UpdateEncoding(task.update_encoding).value,
            "predicted_round_seconds": chosen.prediction.round_seconds,
        },
        sort_keys=True,
    )


def _upgraded(stored: dict[str, object]) -> dict[str, object]:
    """A stored assignment of the form before the one plan vocabulary (the wire's own flat
    plan: adapter_rank, sequence_length and the assignment's terms mixed in), in today's form,
    so a coordinator upgraded while a round is open can still finish it."""
    if "plan" in stored:
        return stored
    plan = {LEGACY_PLAN_FIELDS.get(key, key): value for key, value in stored.items()}
    terms = {key: plan.pop(key) for key in LEGACY_TERMS if key in plan}
    return {
        "plan": plan,
        "update_encoding": terms.get("update_encoding", UpdateEncoding.INT8.value),
        "predicted_round_seconds": terms.get("predicted_round_seconds"),
    }


def trusted_sample_count(claimed: int, steps: int, plan: TrainingPlan) -> int:
    """What an update weighs in FedAvg: the device's claimed sample count, but no more than
    the examples its plan let it train on (steps x batch size, steps at most the plan's).

    The coordinator cannot see a device's data, so a count is a claim; without a bound one
    device claiming 10^9 samples took 0.99999982 of the weight. Bounded, a liar weighs at
    most what an honest device that ran the whole plan weighs (the count remains trusted
    below that bound, and a device can still shade its weight within it)."""
    return max(1, min(claimed, min(steps, plan.local_steps) * plan.batch_size))


def stored_plan(text: str) -> TrainingPlan:
    """The plan of a stored assignment (`assignment_json`), checked as the wire checks it."""
    return from_json_fields(TrainingPlan, _upgraded(json.loads(text))["plan"], "plan")


def assignment_messages(
    fleet: str,
    record: RoundRecord,
    stored: dict[str, str],
    task: TaskConfig,
    model_version: str,
    signing_key: Ed25519PrivateKey,
) -> list[Outgoing]:
    """The signed `TaskAssignment` frame of every device assigned in `record`, retained on
    the device's task inbox: an agent restarted mid-training (it keeps no memory of an
    assignment it has not finished) gets it again on subscribing, and trains. Devices are
    busy with one open round at a time, so one retained assignment per device suffices;
    `cleared_assignments` removes it when the round closes."""
    outgoing = []
    for device_id, text in stored.items():
        terms = _upgraded(json.loads(text))
        assignment = TaskAssignment(
            fleet=fleet,
            task=record.task_id,
            server_round=record.round_number,
            device_id=device_id,
            attempt=0,
            plan=stored_plan(text),
            deadline=record.deadline,
            model_version=model_version,
            spec=wire_task_spec(task),
            update_encoding=UpdateEncoding(terms["update_encoding"]),
            predicted_round_seconds=terms["predicted_round_seconds"],
        )
        frame = encode_frame(assignment, sender=COORDINATOR_SENDER, signing_key=signing_key)
        topic = inbox_topic(fleet, device_id, InboxChannel.TASK)
        outgoing.append(Outgoing(topic, frame, retain=True))
    return outgoing


def cleared_assignments(fleet: str, device_ids: Iterable[str]) -> list[Outgoing]:
    """Empty retained messages that clear a closed round's assignments from the broker, so
    that an agent starting later is not handed a round that is over."""
    return [
        Outgoing(inbox_topic(fleet, device_id, InboxChannel.TASK), b"", retain=True)
        for device_id in sorted(device_ids)
    ]
