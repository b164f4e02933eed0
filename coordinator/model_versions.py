"""Each task's global adapter: its versions on disk and in the store, the model that
evaluates them, and the retained messages devices download them from.

A version is written as the PEFT adapter folder users load (`adapters/<task>/vNNNN/`) and,
next to it, the exact bytes devices download (`vNNNN.body`, named by their sha256, so they
are kept and never re-encoded); the store records it only once both are on disk.

Memory and per-version cost: the folder is written from the state and the task's adapter
config (quantization/peft_folder.py), not through the model, so the daemon builds the base
model only to evaluate, when the task has an eval file; version 0 of a task without one
comes from a child process (coordinator/initial_adapter.py), and a restart with versions
in the store builds no model at all. Each version's
chunks are retained on the broker under their own topics; once a newer version is out and
no open round still names an older one, its chunks are cleared (`stale_retained`), or the
broker would keep every version a fleet ever trained.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import hashlib
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from coordinator.assignments import shape_of
from coordinator.config import CoordinatorConfig, TaskConfig
from coordinator.initial_adapter import make_initial_adapter
from coordinator.outgoing import Outgoing
from coordinator.scheduler import task_plan
from coordinator.store import AdapterVersion, CoordinatorStore
from coordinator.task_models import AdapterBody, TaskModel, wire_task_spec
from durable.atomic_files import atomic_write_bytes
from edge_runtime.secagg import TensorLayout
from edge_runtime.wire import (
    COORDINATOR_SENDER,
    ChunkSender,
    Ed25519PrivateKey,
    ModelManifest,
    UpdateEncoding,
    encode_frame,
    model_blob_topic,
    model_manifest_topic,
)
from quantization.errors import ModelFileError
from quantization.lora_ranks import adapter_rank
from quantization.peft_folder import read_peft_config, with_rank_and_alpha, write_peft_folder

logger = logging.getLogger(__name__)

MODEL_CHUNK_BYTES = 256 * 1024
"""Global adapters are published in retained chunks of this size."""


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise: a freed model's
    many small allocations stay resident). A no-op where there is no glibc."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return


def chunk_topics(fleet: str, sha256: str, body_bytes: int) -> list[str]:
    """Every retained chunk topic of a body of `body_bytes` published under `sha256`."""
    count = math.ceil(body_bytes / MODEL_CHUNK_BYTES)
    return [model_blob_topic(fleet, sha256, index) for index in range(count)]


MODEL_LIBRARIES = ("transformers",)
"""What building a model imports first (PEFT comes with it); the daemon imports it for
nothing else. Together ~220 MB that stay resident in the importing process."""


class ModelVersions:
    """The current global adapter of every task, and how a new one is written."""

    initial_in_child: bool | None = None
    """Make version 0 of a task without an eval file in a child process. None (auto): when
    this process has not imported MODEL_LIBRARIES; what the child spares the daemon is that
    import, and once it is paid (another task evaluates; a test process) building here and
    freeing the model leaves nothing behind. A subclass sets True or False to choose."""

    def __init__(
        self,
        config: CoordinatorConfig,
        store: CoordinatorStore,
        signing_key: Ed25519PrivateKey,
        *,
        now: Callable[[], float] = time.time,
        model_factory: Callable[[TaskConfig], TaskModel] = TaskModel,
    ) -> None:
        self.config = config
        self.fleet = config.coordinator.fleet
        self.store = store
        self.key = signing_key
        self.now = now
        self._model_factory = model_factory
        self.models: dict[str, TaskModel] = {}
        self.current: dict[str, AdapterBody] = {}
        """Task id -> the global adapter devices train from."""
        self._layouts: dict[str, TensorLayout] = {}
        """Adapter version -> its tensor layout (what secure rounds' masked inputs encode)."""
        self._adapter_configs: dict[str, dict[str, object]] = {}
        """Task id -> its adapter_config.json (as PEFT writes it), for every version."""
        self._cleared: set[tuple[str, int]] = set()
        """(task, version number) whose retained chunks this run has cleared already."""

    def adapters_dir(self, task_id: str) -> Path:
        return self.config.state_dir / "adapters" / task_id

    def model(self, task_id: str) -> TaskModel:
        """The task's model, built on first use (version 0, evaluation): the base model's
        full memory, so nothing else asks for it."""
        if task_id not in self.models:
            self.models[task_id] = self._model_factory(self.config.task(task_id))
        return self.models[task_id]

    def evaluate(self, task_id: str, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Held-out metrics of `state`; {} without building the model when the task has no
        eval file (the model is built once, on the first call, when it has one)."""
        if not self.config.task(task_id).eval_file:
            return {}
        return self.model(task_id).evaluate(state)

    def _release_model(self, task_id: str) -> None:
        """Free the task's model when nothing will use it again (no eval file)."""
        if self.config.task(task_id).eval_file or task_id not in self.models:
            return
        del self.models[task_id]
        _return_freed_memory()
        logger.info("task %s: model freed (no eval file: versions are written without it)", task_id)

    def adapter_config(self, task_id: str) -> dict[str, object]:
        """The task's adapter_config.json: from its model when built, else from the newest
        readable folder of its versions (the same for every version but rank and alpha,
        which `write` sets), else from a model built for it (a damaged state folder)."""
        if task_id not in self._adapter_configs:
            template = None
            if task_id not in self.models:
                template = self._stored_adapter_config(task_id)
            if template is None:
                template = self.model(task_id).peft_config()
                self._release_model(task_id)
            self._adapter_configs[task_id] = template
        return self._adapter_configs[task_id]

    def _stored_adapter_config(self, task_id: str) -> dict[str, object] | None:
        for version in reversed(self.store.adapter_versions(task_id)):
            try:
                return read_peft_config(version.folder)
            except ModelFileError as error:
                logger.warning("task %s version %d: %s", task_id, version.version, error)
        return None

    def layout(self, task_id: str) -> TensorLayout:
        body = self.current[task_id]
        if body.version not in self._layouts:
            current = {b.version for b in self.current.values()}  # only current ones are asked
            self._layouts = {v: kept for v, kept in self._layouts.items() if v in current}
            self._layouts[body.version] = TensorLayout.of(body.state())
        return self._layouts[body.version]

    def load_or_create(self, task_id: str) -> AdapterBody:
        """The task's latest version from the store, or version 0 made and recorded now; a
        task that evaluates has its model built here, at start, either way."""
        latest = self.store.latest_adapter_version(task_id)
        if latest is None:
            state, body, folder = self._initial_version(task_id)
            metrics = self.evaluate(task_id, state)
            self.store.add_adapter_version(
                AdapterVersion(task_id, 0, None, body.version, str(folder), self.now(), metrics)
            )
            logger.info("task %s: initial adapter %s %s", task_id, body.version[:12], metrics)
            self._release_model(task_id)
        else:
            body = self._load_body(latest)
            if self.config.task(task_id).eval_file:
                self.model(task_id)  # built now: a closing round must not wait for it
        self.current[task_id] = body
        return body

    def _initial_version(self, task_id: str) -> tuple[dict[str, torch.Tensor], AdapterBody, Path]:
        """Version 0 (state, body, folder), from the model the devices build (same code,
        same seed: the same LoRA A matrices and head). A task without an eval file never
        needs the model again, so a child process builds it (coordinator/initial_adapter.py;
        see `initial_in_child`) and the daemon never holds it; otherwise (or with a custom
        model factory) it is built here: kept for evaluation, or freed at once."""
        task = self.config.task(task_id)
        in_child = self.initial_in_child
        if in_child is None:
            in_child = not all(name in sys.modules for name in MODEL_LIBRARIES)
        if task.eval_file or self._model_factory is not TaskModel or not in_child:
            state = self.model(task_id).initial_state()
            body = AdapterBody.of(state)
            return state, body, self.write(task_id, 0, state, body)
        folder = self.adapters_dir(task_id) / "v0000"
        state, adapter_config = make_initial_adapter(task, folder)
        self._adapter_configs[task_id] = adapter_config
        body = AdapterBody.of(state)
        atomic_write_bytes(folder.with_suffix(".body"), body.body)
        return state, body, folder

    def write(
        self, task_id: str, version_number: int, state: dict[str, torch.Tensor], body: AdapterBody
    ) -> Path:
        """The PEFT adapter folder and the download bytes of one version, without the
        model (and without PEFT's model card)."""
        folder = self.adapters_dir(task_id) / f"v{version_number:04d}"
        config = with_rank_and_alpha(
            self.adapter_config(task_id), adapter_rank(state), self.config.task(task_id).alpha
        )
        write_peft_folder(folder, state, config)
        atomic_write_bytes(folder.with_suffix(".body"), body.body)
        return folder

    def _load_body(self, version: AdapterVersion) -> AdapterBody:
        path = Path(version.folder).with_suffix(".body")
        try:
            body = AdapterBody(path.read_bytes(), version.sha256)
        except OSError as error:
            raise RuntimeError(
                f"cannot read {path}: {error}; the state folder is damaged"
            ) from None
        if hashlib.sha256(body.body).hexdigest() != version.sha256:
            raise RuntimeError(
                f"{path} does not match the version recorded in the store "
                f"({version.sha256[:12]}); the state folder is damaged"
            )
        return body

    def publish(self, task_id: str, body: AdapterBody, server_round: int) -> list[Outgoing]:
        """Retained blob chunks, then the retained manifest that points at them, then the
        empty retained messages that clear older versions' chunks (`stale_retained`): in
        that order, so the broker never holds a manifest without its chunks."""
        task = self.config.task(task_id)
        sender = ChunkSender(
            body.body,
            transfer_id=body.version,
            sender=COORDINATOR_SENDER,
            chunk_bytes=MODEL_CHUNK_BYTES,
        )
        outgoing = [
            Outgoing(model_blob_topic(self.fleet, body.version, index), frame, retain=True)
            for index, frame in sender.frames()
        ]
        manifest = ModelManifest(
            fleet=self.fleet,
            task=task_id,
            version=body.version,
            server_round=server_round,
            body_bytes=len(body.body),
            chunk_bytes=MODEL_CHUNK_BYTES,
            chunk_count=sender.count,
            encoding=UpdateEncoding.FP32,
            spec=wire_task_spec(task),
            plan=task_plan(task, shape_of(task)),
        )
        outgoing.append(
            Outgoing(
                model_manifest_topic(self.fleet, task_id),
                encode_frame(manifest, sender=COORDINATOR_SENDER, signing_key=self.key),
                retain=True,
            )
        )
        return outgoing + self.stale_retained(task_id)

    def _versions_in_use(self) -> set[str]:
        """The sha256 of every version a device may still fetch: each task's latest (what
        manifests point at; tasks whose adapters are byte-identical share chunk topics) and
        the version each open round's assignments name (its base version)."""
        in_use = {body.version for body in self.current.values()}
        for task in self.config.tasks:
            latest = self.store.latest_adapter_version(task.id)
            if latest is not None:
                in_use.add(latest.sha256)
        for record in self.store.open_rounds():
            for version in self.store.adapter_versions(record.task_id):
                if version.version == record.base_version:
                    in_use.add(version.sha256)
        return in_use

    def stale_retained(self, task_id: str) -> list[Outgoing]:
        """Empty retained messages on every chunk topic of the task's older versions that
        no device may still fetch (see `_versions_in_use`).

        MQTT removes a retained message when an empty retained one arrives on its topic
        (current subscribers get it empty; agents ignore empty payloads). A version kept
        for an open round is cleared at a later call, once that round is closed. The first
        call of a run (at start) covers every older version in the store, so what earlier
        runs left behind is cleared too: at most versions x chunks messages, once per run.
        """
        in_use = self._versions_in_use()
        outgoing: list[Outgoing] = []
        for version in self.store.adapter_versions(task_id):
            key = (task_id, version.version)
            if key in self._cleared or version.sha256 in in_use:
                continue
            size = self._body_bytes(task_id, version)
            outgoing += [
                Outgoing(topic, b"", retain=True)
                for topic in chunk_topics(self.fleet, version.sha256, size)
            ]
            self._cleared.add(key)
        if outgoing:
            logger.debug("task %s: clearing %d stale retained chunk(s)", task_id, len(outgoing))
        return outgoing

    def _body_bytes(self, task_id: str, version: AdapterVersion) -> int:
        """A version's body size, from its .body file; without it, the current version's
        (every version of a task has the same tensors, so the same size)."""
        try:
            return Path(version.folder).with_suffix(".body").stat().st_size
        except OSError:
            current = self.current.get(task_id)
            return len(current.body) if current is not None else MODEL_CHUNK_BYTES
