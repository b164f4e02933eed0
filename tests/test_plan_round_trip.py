"""One plan object from the scheduler to the trainer: built once, carried, run unchanged."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from coordinator.assignments import stored_plan
from coordinator.config import CoordinatorConfig, CoordinatorSettings, ScheduleConfig, TaskConfig
from coordinator.rounds import RoundManager
from coordinator.scheduler import DeviceCandidate, FitFirstScheduler, RoundSchedule
from coordinator.store import CoordinatorStore
from device_profiles.plan import TrainingPlan
from device_profiles.profile import find_profile
from edge_runtime.trainer import LocalTrainer, TrainingResult
from edge_runtime.wire import (
    ReceivedMessage,
    TaskAssignment,
    Update,
    decode_frame,
    generate_private_key,
)
from tests.test_lora_ranks import _agent


class RecordingScheduler(FitFirstScheduler):
    """Fit-first, keeping the schedule it returned."""

    schedules: list[RoundSchedule]

    def configure_round(self, *args, **kwargs) -> RoundSchedule:  # noqa: ANN002, ANN003
        schedule = super().configure_round(*args, **kwargs)
        self.schedules = [*getattr(self, "schedules", []), schedule]
        return schedule


class RecordingTrainer(LocalTrainer):
    """The real trainer, keeping the plan objects it was asked to run."""

    plans: list[TrainingPlan] = []

    def train_round(
        self, global_state: dict[str, torch.Tensor], plan: TrainingPlan, **kwargs: object
    ) -> TrainingResult:
        RecordingTrainer.plans.append(plan)
        return super().train_round(global_state, plan, **kwargs)  # type: ignore[arg-type]


def test_the_agent_trains_the_plan_the_scheduler_built(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    task = TaskConfig(
        id="alpha",
        kind="classification",
        base_model=str(tiny_bert_folder),
        labels=("a", "b"),
        rank=4,
        scheme="none",
        local_steps=2,
        batch_size=4,
        seq_len=16,
        learning_rate=3e-3,
        schedule=ScheduleConfig(
            devices_per_round=1,
            min_updates=1,
            over_selection=0.0,
            round_deadline_seconds=600.0,
            gather_seconds=0.0,
        ),
    )
    config = CoordinatorConfig(
        coordinator=CoordinatorSettings(fleet="f", state_dir=str(tmp_path / "coordinator")),
        tasks=(task,),
    )
    key = generate_private_key()
    store = CoordinatorStore(config.state_dir / "coordinator.db", now=time.time)
    scheduler = RecordingScheduler()
    manager = RoundManager(config, store, scheduler, key, now=time.time)
    manager.start()
    profile = find_profile("laptop-mid-16gb")
    outgoing = manager.open_rounds_if_possible([DeviceCandidate("pi-1", "north", profile)])
    (built,) = scheduler.schedules[-1].plans
    (item,) = [o for o in outgoing if isinstance(decode_frame(o.payload).message, TaskAssignment)]

    daemon = _agent(tmp_path, key)
    daemon.trainer_class = RecordingTrainer
    daemon.global_states[manager.current["alpha"].version] = manager.current["alpha"].state()
    RecordingTrainer.plans = []
    try:
        daemon.handle(ReceivedMessage(item.topic, item.payload, 1, False))
        sent = [decode_frame(payload).message for _, payload in daemon.transport.published]
    finally:
        daemon.outbox.close()
        daemon.history.close()
        store.close()
    assert [type(message) for message in sent] == [Update]
    assert RecordingTrainer.plans == [built.plan]
    assert built.plan.learning_rate == 3e-3 and built.plan.rank == 4


def test_an_assignment_stored_before_the_one_plan_vocabulary_still_reads() -> None:
    """A coordinator upgraded while a round is open finds the old flat plan in its store
    (the wire's former field names, the terms mixed in) and reads the same plan from it."""
    old = {
        "adapter_rank": 4,
        "local_steps": 12,
        "batch_size": 8,
        "sequence_length": 40,
        "update_encoding": "int8",
        "top_k_fraction": None,
        "scheme": "nf4",
        "learning_rate": 0.003,
        "predicted_round_seconds": 31.5,
    }
    plan = stored_plan(json.dumps(old))
    assert (plan.rank, plan.local_steps, plan.batch_size, plan.seq_len) == (4, 12, 8, 40)
    assert (plan.scheme, plan.learning_rate) == ("nf4", 0.003)
