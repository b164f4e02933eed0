"""The agent's task models: built once per task and kept, and built *at start* for a task
the device has data for and has trained before, so the first assignment trains at once.

Building a quantized base is the largest fixed cost of a round (MiniLM-L6 nf4: ~7 s on one
core; SmolLM2 on a Pi: a minute), and the first assignment used to pay it. The wire's
`TaskSpec` arrives inside an assignment and in the task's retained model manifest, so what
to build at start comes from the device's memory of its last build (`task_models/<task>.json`:
the model spec and the plan it was built for, written atomically when a model is built,
never per round) or, for a task it has never trained, from the manifest it receives as
soon as it subscribes (`remember_announced`).

Ownership: one worker thread builds the preloaded models, one after the other, and hands
each over through a `Future`; the agent's loop alone owns `trainers` and adopts a finished
model on its next tick. Before the loop builds or trains anything it waits for the worker
(`settle()`): one heavy torch job at a time, so the memory the plan priced is the memory
in use, and the eligibility check sees the preloaded model already resident. The worker
never touches the transport or the activity file, so heartbeats and the MQTT loop run on
while it builds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_profiles.cost_model import predict
from device_profiles.plan import TrainingPlan
from device_profiles.profile import DeviceProfile
from device_profiles.shapes import resolve_shape
from durable.atomic_files import atomic_write_text
from edge_runtime.agent_config import AgentConfig
from edge_runtime.assignment_models import task_model_spec
from edge_runtime.eligibility import DeviceReadings, check_eligibility
from edge_runtime.trainer import LocalTrainer
from edge_runtime.wire import ModelManifest
from quantization.adapters import AdapterConfig
from quantization.task_data import LabelledText, read_labelled_texts, read_lm_texts
from quantization.task_model import TaskModelSpec

logger = logging.getLogger(__name__)

MODELS_FOLDER = "task_models"
MEMORY_SCHEMA = 1

TrainerFactory = Callable[[TaskModelSpec, Sequence[LabelledText] | Sequence[str]], LocalTrainer]
"""Builds a trainer from a spec and the local examples (the agent's `trainer_class`)."""


@dataclass(frozen=True)
class RememberedModel:
    """What the device last built for a task: enough to build the same model at start and
    to price it (the plan) against the device's memory before doing so."""

    spec: TaskModelSpec
    plan: TrainingPlan


def _memory_path(state_dir: Path, task_id: str) -> Path:
    return state_dir / MODELS_FOLDER / f"{task_id}.json"


def remember_model(state_dir: Path, spec: TaskModelSpec, plan: TrainingPlan) -> None:
    """Record the model just built for `spec.task_id` (atomic: a crash leaves the old one)."""
    adapter = spec.adapter
    data = {
        "schema": MEMORY_SCHEMA,
        "spec": {
            "task_id": spec.task_id,
            "kind": spec.kind,
            "base_model": spec.base_model,
            "scheme": spec.scheme,
            "labels": list(spec.labels),
            "quantize_embeddings": spec.quantize_embeddings,
            "adapter": {"rank": adapter.rank, "alpha": adapter.alpha},
        },
        "plan": {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(plan).items()
        },
    }
    path = _memory_path(state_dir, spec.task_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, sort_keys=True))


def remembered_model(state_dir: Path, task_id: str) -> RememberedModel | None:
    """The last build of `task_id`, or None (never built; an unreadable file is logged and
    ignored: the model is then built at the first assignment, as without a memory)."""
    path = _memory_path(state_dir, task_id)
    if not path.is_file():
        return None
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        if data.get("schema") != MEMORY_SCHEMA:
            raise ValueError(f"schema {data.get('schema')!r}, expected {MEMORY_SCHEMA}")
        spec_data = dict(data["spec"])
        adapter = spec_data.pop("adapter")
        spec = TaskModelSpec(
            **{**spec_data, "labels": tuple(spec_data["labels"])},
            adapter=AdapterConfig(rank=int(adapter["rank"]), alpha=float(adapter["alpha"])),
        )
        plan_data = dict(data["plan"])
        plan_data["target_modules"] = tuple(plan_data["target_modules"])
        plan = TrainingPlan(**plan_data)
    except (OSError, ValueError, TypeError, KeyError) as error:
        logger.warning(
            "ignoring %s (%s): task %s loads at its first assignment", path, error, task_id
        )
        return None
    if spec.task_id != task_id:
        logger.warning("ignoring %s: it describes task %r", path, spec.task_id)
        return None
    return RememberedModel(spec, plan)


def predicted_peaks(profile: DeviceProfile, base_model: str, plan: TrainingPlan) -> tuple[int, int]:
    """(RAM, discrete-GPU) peaks the cost model gives `plan` on `profile`: what the
    eligibility check holds free memory against. (0, 0) for a base of unknown shape."""
    try:
        shape = resolve_shape(base_model)
    except Exception:  # noqa: BLE001 - unknown shape: no memory requirement to check
        return 0, 0
    prediction = predict(profile, shape, plan)
    return prediction.peak_bytes, prediction.gpu_peak_bytes


def resident_bytes(trainer: LocalTrainer) -> int:
    """Bytes of the trainer's model weights (parameters and buffers) already in memory:
    part of a plan's predicted peak that free memory no longer shows."""
    model = trainer.model
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.nelement() * t.element_size() for t in tensors)


def read_examples(config: AgentConfig, spec: TaskModelSpec) -> list[LabelledText] | list[str]:
    """The device's examples for a task (clear errors for a missing or malformed file)."""
    data_file = config.data_file(spec.task_id)
    if spec.kind == "classification":
        return read_labelled_texts(data_file, labels=spec.labels)
    return read_lm_texts(data_file)


class TaskModels:
    """The loaded model of each task: preloaded at start, else built when first needed."""

    def __init__(self, config: AgentConfig, factory: TrainerFactory) -> None:
        self.config = config
        self._factory = factory
        self.trainers: dict[str, LocalTrainer] = {}
        """Owned by the agent's loop: the worker only fills `_pending`."""
        self._pending: dict[str, Future[LocalTrainer]] = {}
        self._worker: threading.Thread | None = None
        self.builds: list[tuple[str, str, float]] = []
        """(task, "preload" or "assignment", seconds) of every model built, for the log
        and the benchmark."""

    # -- building ------------------------------------------------------------------------

    def _build(self, spec: TaskModelSpec, why: str) -> LocalTrainer:
        examples = read_examples(self.config, spec)
        logger.info(
            "loading %s (%s) for task %s with %d local examples (%s)",
            spec.base_model,
            spec.scheme,
            spec.task_id,
            len(examples),
            why,
        )
        started = time.monotonic()
        trainer = self._factory(spec, examples)
        seconds = time.monotonic() - started
        self.builds.append((spec.task_id, why, seconds))
        logger.info("task %s: model loaded in %.1f s (%s)", spec.task_id, seconds, why)
        return trainer

    def preload(self, models: Sequence[RememberedModel]) -> None:
        """Build `models` in the worker thread, one after the other (returns at once)."""
        if not models or self._worker is not None:
            return
        futures = [(model, Future[LocalTrainer]()) for model in models]
        for model, future in futures:
            self._pending[model.spec.task_id] = future

        def work() -> None:
            for model, future in futures:
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(self._build(model.spec, "preload"))
                except BaseException as error:  # noqa: BLE001 - handed to the loop, which logs it
                    future.set_exception(error)

        self._worker = threading.Thread(target=work, name="schoolfl-preload", daemon=True)
        self._worker.start()

    @property
    def preloading(self) -> bool:
        return any(not future.done() for future in self._pending.values())

    def adopt(self) -> list[str]:
        """Take every finished preload into `trainers` (the loop's tick); the tasks adopted.
        A failed preload is logged and forgotten: the assignment builds the model again and
        declines with the reason if that fails too."""
        adopted = []
        for task_id, future in list(self._pending.items()):
            if not future.done():
                continue
            del self._pending[task_id]
            error = future.exception()
            if error is not None:
                logger.warning("task %s: preloading its model failed: %s", task_id, error)
                continue
            self.trainers[task_id] = future.result()
            adopted.append(task_id)
        if not self._pending:
            self._worker = None
        return adopted

    def settle(self) -> list[str]:
        """Wait for the worker to finish (before the loop trains or builds), then adopt."""
        for future in list(self._pending.values()):
            try:
                future.exception()  # waits; a failure is logged by adopt()
            except Exception:  # noqa: BLE001 - a cancelled future: nothing to adopt
                pass
        return self.adopt()

    def holds(self, spec: TaskModelSpec) -> bool:
        """Whether the model for `spec` is loaded and adopted (no build, no wait)."""
        trainer = self.trainers.get(spec.task_id)
        return not self._pending and trainer is not None and trainer.spec == spec

    def trainer_for(self, spec: TaskModelSpec, plan: TrainingPlan) -> LocalTrainer:
        """The task's model for `spec`: the loaded one when it was built for the same spec,
        else a new build (remembered, so the next start preloads it)."""
        self.settle()
        trainer = self.trainers.get(spec.task_id)
        if trainer is None or trainer.spec != spec:
            trainer = self._build(spec, "assignment")
            self.trainers[spec.task_id] = trainer
            try:
                remember_model(self.config.state_dir, spec, plan)
            except OSError as error:  # the memory only saves time at the next start
                logger.warning("could not remember task %s's model: %s", spec.task_id, error)
        return trainer

    def resident_bytes(self, task_id: str) -> int:
        trainer = self.trainers.get(task_id)
        return 0 if trainer is None else resident_bytes(trainer)

    def close(self, timeout_seconds: float = 30.0) -> None:
        """Cancel what has not started and wait (bounded) for a build in progress."""
        for future in self._pending.values():
            future.cancel()
        if self._worker is not None:
            self._worker.join(timeout_seconds)
            if self._worker.is_alive():
                logger.warning("a model preload is still running at stop; leaving it")


def remember_announced(config: AgentConfig, manifest: ModelManifest) -> bool:
    """Remember the model a coordinator's retained manifest describes, when this device may
    join the task, has data for it and has no memory of the task yet; True when it should
    be preloaded now. This is how a new agent builds its model before its first assignment
    (the manifest arrives as soon as it subscribes). A device that has built the task's
    model keeps its own memory: its assignments may bring a smaller plan than the
    manifest's, which is the plan of a device that needs nothing shrunk."""
    if manifest.spec is None or manifest.plan is None:
        return False  # a coordinator that does not describe its tasks
    task_id = manifest.task
    if config.agent.tasks and task_id not in config.agent.tasks:
        return False
    try:
        config.data_file(task_id)
    except ValueError:
        return False
    if _memory_path(config.state_dir, task_id).exists():
        return False
    plan = manifest.plan
    spec = task_model_spec(task_id, manifest.spec, plan.scheme, plan.rank, plan.rank)
    try:
        remember_model(config.state_dir, spec, plan)
    except OSError as error:  # the memory only saves time
        logger.warning("could not remember task %s's model: %s", task_id, error)
        return False
    logger.info("task %s announced by the coordinator: its model will be preloaded", task_id)
    return True


def preload_candidates(config: AgentConfig) -> Iterator[RememberedModel]:
    """Tasks this device may join, has local data for and has built a model for before."""
    models = config.state_dir / MODELS_FOLDER
    if not models.is_dir():
        return
    allowed = config.agent.tasks
    for path in sorted(models.glob("*.json")):
        task_id = path.stem
        if allowed and task_id not in allowed:
            continue
        try:
            config.data_file(task_id)
        except ValueError:
            logger.info("not preloading task %s: no local data for it any more", task_id)
            continue
        remembered = remembered_model(config.state_dir, task_id)
        if remembered is not None:
            yield remembered


def choose_preloads(
    config: AgentConfig,
    profile: DeviceProfile,
    readings: DeviceReadings,
    loaded: Collection[str] = (),
) -> list[RememberedModel]:
    """The remembered models to build at start: those whose plan the device could train
    now (its predicted peak fits in free memory and the other checks pass; a device that
    may not train now does not load a model now either). The others load at their first
    assignment. `profile` is the one priced for where the agent trains; tasks in `loaded`
    have their model already."""
    chosen = []
    for remembered in preload_candidates(config):
        if remembered.spec.task_id in loaded:
            continue
        peaks = predicted_peaks(profile, remembered.spec.base_model, remembered.plan)
        verdict = check_eligibility(config.eligibility, readings, *peaks)
        if not verdict.eligible:
            logger.info(
                "not preloading task %s's model now: %s",
                remembered.spec.task_id,
                "; ".join(verdict.reasons),
            )
            continue
        chosen.append(remembered)
    if chosen:
        logger.info("preloading the model of task(s) %s", [m.spec.task_id for m in chosen])
    return chosen
