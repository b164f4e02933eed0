"""Each task's global adapter: its versions on disk and in the store, the model that
evaluates them, and the retained messages devices download them from.

A version is written as the PEFT adapter folder users load (`adapters/<task>/vNNNN/`) and,
next to it, the exact bytes devices download (`vNNNN.body`, named by their sha256, so they
are kept and never re-encoded); the store records it only once both are on disk.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from coordinator.config import CoordinatorConfig, TaskConfig
from coordinator.outgoing import Outgoing
from coordinator.store import AdapterVersion, CoordinatorStore
from coordinator.task_models import AdapterBody, TaskModel
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

logger = logging.getLogger(__name__)

MODEL_CHUNK_BYTES = 256 * 1024
"""Global adapters are published in retained chunks of this size."""


class ModelVersions:
    """The current global adapter of every task, and how a new one is written."""

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

    def adapters_dir(self, task_id: str) -> Path:
        return self.config.state_dir / "adapters" / task_id

    def model(self, task_id: str) -> TaskModel:
        if task_id not in self.models:
            self.models[task_id] = self._model_factory(self.config.task(task_id))
        return self.models[task_id]

    def layout(self, task_id: str) -> TensorLayout:
        body = self.current[task_id]
        if body.version not in self._layouts:
            self._layouts[body.version] = TensorLayout.of(body.state())
        return self._layouts[body.version]

    def load_or_create(self, task_id: str) -> AdapterBody:
        """The task's latest version from the store, or version 0 made and recorded now."""
        latest = self.store.latest_adapter_version(task_id)
        if latest is None:
            state = self.model(task_id).initial_state()
            body = AdapterBody.of(state)
            folder = self.write(task_id, 0, state, body)
            metrics = self.model(task_id).evaluate(state)
            self.store.add_adapter_version(
                AdapterVersion(task_id, 0, None, body.version, str(folder), self.now(), metrics)
            )
            logger.info("task %s: initial adapter %s %s", task_id, body.version[:12], metrics)
        else:
            body = self._load_body(latest)
        self.current[task_id] = body
        return body

    def write(
        self, task_id: str, version_number: int, state: dict[str, torch.Tensor], body: AdapterBody
    ) -> Path:
        """The PEFT adapter folder and the download bytes of one version."""
        folder = self.adapters_dir(task_id) / f"v{version_number:04d}"
        self.model(task_id).write_version(state, folder)
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
        """Retained blob chunks, then the retained manifest that points at them."""
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
        )
        outgoing.append(
            Outgoing(
                model_manifest_topic(self.fleet, task_id),
                encode_frame(manifest, sender=COORDINATOR_SENDER, signing_key=self.key),
                retain=True,
            )
        )
        return outgoing
