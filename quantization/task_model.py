"""A task's model: quantized frozen base + LoRA adapter + tokenizer, and its batches.

Both daemons build the same model for a task from the same `TaskModelSpec`: devices to
train it, the coordinator to create the initial adapter (including the classification
head every device starts from), to write PEFT adapter folders and to evaluate versions.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantization.adapters import AdapterConfig, attach_adapter
from quantization.loader import load_quantized, shared_gguf_reader
from quantization.models import load_tokenizer, minilm_path, smollm2_gguf_path
from quantization.schemes import Scheme, parse_scheme
from quantization.task_data import LabelledText

logger = logging.getLogger(__name__)

TASK_KINDS = ("classification", "causal-lm")

KNOWN_BASE_MODELS: dict[str, Callable[[], Path]] = {
    "minilm-l6": minilm_path,
    "smollm2-135m": smollm2_gguf_path,
}
"""Base models that ship as PyPI packages, by the short name a task config uses."""


def resolve_base_model(name_or_path: str) -> Path:
    """A known short name (see KNOWN_BASE_MODELS) or a path to a model folder / GGUF file."""
    if name_or_path in KNOWN_BASE_MODELS:
        return KNOWN_BASE_MODELS[name_or_path]()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"base model {name_or_path!r} is neither a known name "
            f"({', '.join(KNOWN_BASE_MODELS)}) nor an existing path"
        )
    return path


@dataclass(frozen=True)
class TaskModelSpec:
    """Everything needed to build the same model on every device and the coordinator."""

    task_id: str
    kind: str
    """'classification' or 'causal-lm'."""
    base_model: str
    """Known name (minilm-l6, smollm2-135m) or a path."""
    scheme: str
    """Quantization scheme of the frozen base (nf4, int8, none, ...)."""
    adapter: AdapterConfig
    labels: tuple[str, ...] = ()
    """Class names for classification, in head order; empty for causal-LM."""
    quantize_embeddings: bool = True
    """Store the frozen token embedding (and a frozen untied LM head) as int8 rows when the
    scheme quantizes (nf4, int8, bnb-*): a quarter of the fp32 table (SmolLM2: 113 -> 28 MB),
    logits within ~1% relative. False keeps them fp32 (a task that finds the difference
    matters); scheme `none` always keeps them fp32."""

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if self.kind == "classification" and len(self.labels) < 2:
            raise ValueError(f"task {self.task_id!r}: classification needs at least 2 labels")


TRAINED_VOCABULARY_MODULES = ("lm_head", "embed_tokens", "word_embeddings", "wte")
"""Modules that, listed in an adapter's modules_to_save, train fully: they stay fp32."""


def _quantizes_embeddings(spec: TaskModelSpec) -> bool:
    """Whether `build_task_model` stores this task's frozen vocabulary matrices in int8."""
    if not spec.quantize_embeddings or parse_scheme(spec.scheme) is Scheme.NONE:
        return False
    trained = set(spec.adapter.modules_to_save or ()) & set(TRAINED_VOCABULARY_MODULES)
    if trained:
        logger.info("task %s trains %s fully: embeddings stay fp32", spec.task_id, sorted(trained))
        return False
    return True


def build_task_model(
    spec: TaskModelSpec, seed: int = 0, device: torch.device | None = None
) -> tuple[nn.Module, object]:
    """(PEFT model, tokenizer) for a task: quantized frozen base + fresh adapter, on `device`
    (default the CPU).

    The seed fixes the adapter's (and head's) initial values, so the coordinator's version 0
    is reproducible (the coordinator builds it on the CPU); devices overwrite them with the
    global adapter before training, so a GPU's different random draws do not matter.
    """
    source = resolve_base_model(spec.base_model)
    torch.manual_seed(seed)
    # A GGUF file is parsed once for the weights, the config and the tokenizer.
    reading = shared_gguf_reader(source) if source.suffix == ".gguf" else contextlib.nullcontext()
    with reading:
        model = _quantized_model_with_adapter(spec, source, device)
        tokenizer = load_tokenizer(source)
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.kind == "classification" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _quantized_model_with_adapter(
    spec: TaskModelSpec, source: Path, device: torch.device | None
) -> nn.Module:
    int8_vocabulary = _quantizes_embeddings(spec)
    if spec.kind == "classification":
        base = load_quantized(
            source,
            spec.scheme,
            task="classification",
            num_labels=len(spec.labels),
            device=device,
            int8_vocabulary=int8_vocabulary,
        )
    else:
        base = load_quantized(
            source, spec.scheme, task="causal-lm", device=device, int8_vocabulary=int8_vocabulary
        )
    model = attach_adapter(base, spec.adapter)
    if device is not None:  # the adapter (and a classification head) follow the base
        model.to(device)
    return model


def classification_batch(
    tokenizer: object, examples: Sequence[LabelledText], labels: Sequence[str], seq_len: int
) -> dict[str, torch.Tensor]:
    label_index = {label: index for index, label in enumerate(labels)}
    unknown = sorted({e.label for e in examples} - label_index.keys())
    if unknown:
        raise ValueError(f"labels {unknown} are not among the task's labels {list(labels)}")
    batch = tokenizer(  # type: ignore[operator]
        [e.text for e in examples],
        padding=True,
        truncation=True,
        max_length=seq_len,
        return_tensors="pt",
    )
    batch["labels"] = torch.tensor([label_index[e.label] for e in examples])
    return dict(batch)


def causal_lm_batch(
    tokenizer: object, texts: Sequence[str], seq_len: int
) -> dict[str, torch.Tensor]:
    batch = tokenizer(  # type: ignore[operator]
        list(texts), padding=True, truncation=True, max_length=seq_len, return_tensors="pt"
    )
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100  # no loss on padding
    batch["labels"] = labels
    return dict(batch)


@torch.no_grad()
def classification_accuracy(
    model: nn.Module,
    tokenizer: object,
    examples: Sequence[LabelledText],
    labels: Sequence[str],
    seq_len: int = 64,
    batch_size: int = 32,
) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = classification_batch(tokenizer, chunk, labels, seq_len)
        targets = batch.pop("labels").to(device)
        predictions = model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(dim=-1)
        correct += int((predictions == targets).sum())
    return correct / len(examples)
