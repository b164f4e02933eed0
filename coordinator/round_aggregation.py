"""A closing round's aggregate: from the running sum (FedAvg with the norm bound), or, where
the sum cannot stream, from every stored update at once (DP-FedAvg).

Both paths first leave out the updates of schools whose `min_devices_per_aggregate` the
arrived updates do not reach: drop-outs can shrink a round that was assigned enough
devices, and the school's minimum is about the aggregate, not the assignment.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from coordinator.aggregation import AggregationResult, ClientUpdate, FedAvg
from coordinator.assignments import trusted_sample_count, update_shapes
from coordinator.config import SchoolConfig, TaskConfig
from coordinator.open_rounds import OpenRound, fold_stored, stored_delta
from coordinator.privacy import DpFedAvg, make_aggregator
from coordinator.school_policy import schools_below_minimum
from coordinator.store import CoordinatorStore
from edge_runtime.wire import decode_update
from quantization.adapter_deltas import TensorMap

logger = logging.getLogger(__name__)


def streams(aggregator: FedAvg) -> bool:
    """Whether the aggregator is plain FedAvg, which the running sum reproduces; DP-FedAvg
    (unweighted, clipped to its own bound, noised) keeps the batch path."""
    return type(aggregator) is FedAvg


def streams_task(task: TaskConfig) -> bool:
    return not task.secure_aggregation.enabled and streams(make_aggregator(task))


def schools_left_out(
    schools: Mapping[str, SchoolConfig],
    view: OpenRound,
    device_ids: list[str],
) -> set[str]:
    """The devices among `device_ids` whose school misses its minimum aggregate size in
    this round (logged per school)."""
    school_of = {device_id: view.schools.get(device_id, "") for device_id in device_ids}
    too_small = schools_below_minimum(schools, [school_of[d] for d in device_ids])
    task_id, round_number = view.key
    for school, why in too_small.items():
        logger.warning(
            "task %s round %d: updates of school %s left out: %s",
            task_id,
            round_number,
            school,
            why,
        )
    return {device_id for device_id, school in school_of.items() if school in too_small}


def streaming_result(
    store: CoordinatorStore,
    task: TaskConfig,
    view: OpenRound,
    reference: TensorMap,
    schools: Mapping[str, SchoolConfig],
) -> tuple[AggregationResult, int]:
    """The FedAvg result of the round from its running sum, after folding any stored update
    the sum lacks; and how many updates were considered (for the "every update refused"
    message)."""
    fold_stored(view, store, reference)
    running = view.running
    assert running is not None  # fold_stored makes one
    considered = sorted(running.devices)
    left_out = schools_left_out(schools, view, considered)
    aggregator = make_aggregator(task)
    result = running.finish(
        aggregator.norm_bound,
        left_out,
        stored_delta(store, view, reference),
    )
    view.running = None  # finished in place: a second close must fold again
    return result, len(considered) - len(left_out)


def batch_result(
    store: CoordinatorStore,
    task: TaskConfig,
    view: OpenRound,
    reference: TensorMap,
    schools: Mapping[str, SchoolConfig],
    aggregator: DpFedAvg | FedAvg | None = None,
) -> tuple[AggregationResult, int]:
    """The round's result from every stored update decoded at once (DP-FedAvg's path; its
    memory grows with the round: 500 MiniLM r=8 updates are ~650 MB of float32)."""
    task_id, round_number = view.key
    updates = []
    for stored in store.updates(task_id, round_number):
        plan = view.plan(stored.device_id)  # validated on arrival
        updates.append(
            ClientUpdate(
                stored.device_id,
                decode_update(stored.body, update_shapes(dict(reference), plan.rank)),
                num_samples=trusted_sample_count(stored.num_samples, stored.num_steps, plan),
                num_steps=stored.num_steps,
                rank=plan.rank,
            )
        )
    left_out = schools_left_out(schools, view, [u.device_id for u in updates])
    kept = [u for u in updates if u.device_id not in left_out]
    result = (aggregator or make_aggregator(task)).aggregate(kept, reference)
    return result, len(kept)
