"""The coordinator's copy of each task's model.

The coordinator needs the model itself for two things only: the reproducible initial
adapter (version 0, including a classification head every device starts from) and
evaluating a new version on the held-out split that never leaves the coordinator (and
`schoolfl coordinator export`, outside the daemon). Writing a version's PEFT folder does
not need it (quantization/peft_folder.py): the model's adapter config is all it takes,
once per task, so a daemon whose tasks have no eval file never holds the model: version 0
comes from a child process that builds it (coordinator/initial_adapter.py), and a restart
with versions in the store builds none (coordinator/model_versions.py).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from coordinator.config import TaskConfig
from edge_runtime.wire import (
    CodecConfig,
    SecureAggregationSpec,
    TaskSpec,
    UpdateEncoding,
    decode_update,
    encode_update,
)
from quantization.adapters import AdapterConfig, get_adapter_state, set_adapter_state
from quantization.export.onnx_export import ExportSpec
from quantization.peft_folder import peft_config_dict, write_peft_folder
from quantization.task_data import LabelledText, read_labelled_texts, read_lm_texts
from quantization.task_model import (
    TaskModelSpec,
    build_task_model,
    causal_lm_batch,
    classification_accuracy,
)

logger = logging.getLogger(__name__)


def wire_task_spec(task: TaskConfig) -> TaskSpec:
    """What a device needs to build the task's model: sent inside every assignment."""
    # Imported here: coordinator.privacy pulls dp_accounting and scipy (~70 MB resident),
    # which writing and publishing versions does not need.
    from coordinator.privacy import DpPolicy

    policy = DpPolicy.of(task)
    return TaskSpec(
        kind=task.kind,
        base_model=task.base_model,
        labels=task.labels,
        adapter_alpha=task.alpha,
        quantize_embeddings=task.quantize_embeddings,
        privacy=None if policy is None else policy.device_instructions(),
        secure_aggregation=(
            SecureAggregationSpec(clip_bound=task.secure_aggregation.clip_bound)
            if task.secure_aggregation.enabled
            else None
        ),
    )


def onnx_export_spec(task: TaskConfig) -> ExportSpec:
    """What `quantization.export.onnx_export` needs of a task to export its adapter."""
    return ExportSpec(
        task_id=task.id,
        kind=task.kind,
        base_model=task.base_model,
        labels=task.labels,
        max_length=task.seq_len,
        eval_file=Path(task.eval_file).expanduser() if task.eval_file else None,
    )


@dataclass(frozen=True)
class AdapterBody:
    """A global adapter as it travels: exact fp32 codec bytes, named by their sha256."""

    body: bytes
    version: str

    @classmethod
    def of(cls, state: dict[str, torch.Tensor]) -> AdapterBody:
        body = encode_update(state, CodecConfig(encoding=UpdateEncoding.FP32)).body
        return cls(body=body, version=hashlib.sha256(body).hexdigest())

    def state(self) -> dict[str, torch.Tensor]:
        return decode_update(self.body)


class TaskModel:
    """One task's model on the coordinator: builds, saves and evaluates global adapters."""

    def __init__(self, task: TaskConfig) -> None:
        self.task = task
        self.spec = TaskModelSpec(
            task_id=task.id,
            kind=task.kind,
            base_model=task.base_model,
            scheme=task.scheme,
            adapter=AdapterConfig(rank=task.rank, alpha=task.alpha),
            labels=task.labels,
            quantize_embeddings=task.quantize_embeddings,
        )
        self.model, self.tokenizer = build_task_model(self.spec, seed=task.seed)
        self._initial_state = get_adapter_state(self.model)
        self.eval_examples: list[LabelledText] | list[str] = []
        if task.eval_file:
            if task.kind == "classification":
                self.eval_examples = read_labelled_texts(Path(task.eval_file))
            else:
                self.eval_examples = read_lm_texts(Path(task.eval_file))

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {name: tensor.clone() for name, tensor in self._initial_state.items()}

    def peft_config(self) -> dict[str, object]:
        """The task's `adapter_config.json`, as PEFT's save_pretrained writes it."""
        return peft_config_dict(self.model)

    def write_version(self, state: dict[str, torch.Tensor], folder: Path) -> Path:
        """Write `state` as a PEFT adapter folder (atomically, without PEFT's model card;
        see `write_peft_folder`), after checking it fits this model."""
        set_adapter_state(self.model, state)
        return write_peft_folder(folder, state, self.peft_config())

    @torch.no_grad()
    def evaluate(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Held-out metrics of `state`: accuracy (classification) or loss (causal LM)."""
        if not self.eval_examples:
            return {}
        set_adapter_state(self.model, state)
        if self.task.kind == "classification":
            accuracy = classification_accuracy(
                self.model,
                self.tokenizer,
                self.eval_examples,  # type: ignore[arg-type]
                self.task.labels,
                seq_len=self.task.seq_len,
            )
            return {"accuracy": accuracy}
        self.model.eval()
        losses = []
        texts: list[str] = self.eval_examples  # type: ignore[assignment]
        for start in range(0, len(texts), 8):
            batch = causal_lm_batch(self.tokenizer, texts[start : start + 8], self.task.seq_len)
            losses.append(float(self.model(**batch).loss))
        mean = sum(losses) / len(losses)
        return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0))}
