"""ONNX int8 export of a classification task's global adapter, for classroom inference.

A school laptop that only answers pupils' questions should not need torch, PEFT or the
quantized training stack. This module turns one global adapter version into a folder that
needs only onnxruntime, tokenizers and numpy:

    model.onnx          fp32 graph of the base with the adapter merged in (kept so the
                        operator can compare or re-quantize; delete it to deploy)
    model.int8.onnx     the same graph with int8 weights (onnxruntime dynamic quantization)
    tokenizer.json ...  the base model's tokenizer
    labels.json         class names in output order and the tokenization settings
    predict.py          a standalone example (quantization/export/onnx_predict.py)
    export_report.json  held-out accuracy of PyTorch vs ONNX, their agreement, file sizes

Steps: the base is loaded in fp32 (scheme "none", not the quantized training base), the
PEFT adapter folder is applied with `PeftModel.from_pretrained` exactly as a user would,
merged with `merge_and_unload`, exported with `torch.onnx.export` and quantized with
`onnxruntime.quantization.quantize_dynamic`. Both graphs are then scored on the task's
held-out file against the merged PyTorch model.

Why torch.onnx and not optimum: the ONNX exporter moved to the optimum-onnx package, whose
0.1.0 release pins transformers<4.58, while this project runs transformers 5.x; one pip
install cannot satisfy both. `torch.onnx.export(dynamo=True)` (torch.export + onnxscript)
exports a BERT-style sequence classifier with dynamic batch and sequence axes directly; the
TorchScript exporter (`dynamo=False`) is kept only as a fallback, because it is deprecated.

The folder is assembled under a temporary name next to its destination and renamed into
place at the end, so an interrupted export never leaves a half-written folder behind.

What is exported is described by an `ExportSpec`, which the caller builds from its task
(`coordinator.task_models.onnx_export_spec`): this module sits below the daemons and does
not read their configuration.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from durable.atomic_files import atomic_write_text, fsync_directory
from quantization.errors import QuantizationError
from quantization.export.onnx_report import (
    FP32_FILE,
    INT8_FILE,
    LABELS_FILE,
    PREDICT_FILE,
    REPORT_FILE,
    OnnxExportReport,
    missing_onnx_packages,
)
from quantization.loader import load_quantized
from quantization.models import load_tokenizer
from quantization.task_data import LocalDataError, read_labelled_texts
from quantization.task_model import resolve_base_model

logger = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"

EXPORT_CHECK_TOLERANCE = 1e-3
"""Largest |fp32 ONNX logit - PyTorch logit| accepted on a batch shaped unlike the trace."""


class OnnxExportError(Exception):
    """The export cannot be done or produced a wrong graph; the message says why."""


@dataclass(frozen=True)
class ExportSpec:
    """The task model an export merges, tokenizes for and scores: what it needs of a task."""

    task_id: str
    kind: str
    """Only 'classification' is exported; anything else is refused with a reason."""
    base_model: str
    """Known name (minilm-l6, ...) or a path, as `resolve_base_model` reads it."""
    labels: tuple[str, ...]
    """Class names in head order."""
    max_length: int
    """Tokenization length: the task's seq_len."""
    eval_file: Path | None = None
    """The task's held-out labelled questions; None = none."""


@dataclass(frozen=True)
class OnnxExportRequest:
    """Which adapter version to export, where to, and what to score it on."""

    spec: ExportSpec
    adapter_folder: Path
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    destination: Path
    """The folder to create; it must not exist yet."""
    version: int
    adapter_sha256: str
    eval_file: Path | None = None
    """Held-out labelled questions; None = the spec's eval_file."""
    batch_size: int = 32
    """Evaluation batch size (memory only; results do not depend on it)."""

    def __post_init__(self) -> None:
        if self.spec.kind != "classification":
            raise OnnxExportError(
                f"only classification tasks are exported to ONNX; task {self.spec.task_id!r} "
                f"is {self.spec.kind!r} (export its PEFT adapter folder without --onnx)"
            )
        if self.batch_size < 1:
            raise OnnxExportError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def held_out_file(self) -> Path | None:
        return self.eval_file if self.eval_file is not None else self.spec.eval_file


# -- the merged PyTorch model ----------------------------------------------------------------


class LogitsOnly(nn.Module):
    """Named tensor inputs in, logits out: the signature the ONNX graph gets."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, C)


def load_merged_classifier(spec: ExportSpec, adapter_folder: Path) -> tuple[nn.Module, object]:
    """(fp32 base with the adapter merged in, tokenizer).

    The base is loaded unquantized: devices train on an nf4 base, but merging into a
    quantized weight would round the adapter away, and ONNX quantizes on its own terms.
    """
    from peft import PeftModel

    try:
        source = resolve_base_model(spec.base_model)
        base = load_quantized(source, "none", task="classification", num_labels=len(spec.labels))
        tokenizer = load_tokenizer(source)
    except (QuantizationError, FileNotFoundError) as error:
        raise OnnxExportError(f"cannot load the base model {spec.base_model!r}: {error}") from error
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    try:
        peft_model = PeftModel.from_pretrained(base, str(adapter_folder))
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise OnnxExportError(
            f"cannot apply the adapter {adapter_folder} to {spec.base_model} with "
            f"{len(spec.labels)} labels: {error}"
        ) from error
    merged = peft_model.merge_and_unload().eval()
    for name, parameter in merged.named_parameters():
        if not torch.isfinite(parameter).all():
            raise OnnxExportError(f"merged weight {name} has NaN or Inf; refusing to export")
    return merged, tokenizer


@torch.no_grad()
def pytorch_logits(
    model: nn.Module, tokenizer: object, texts: Sequence[str], max_length: int, batch_size: int
) -> np.ndarray:
    """Logits (len(texts), C) of the merged model, tokenized as predict.py tokenizes."""
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(  # type: ignore[operator]
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        rows.append(logits.logits.float().numpy())  # (B, C)
    return np.concatenate(rows, axis=0)


# -- ONNX ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence torch.export's tracing chatter (missing torchvision ops, deprecations).

    It describes internals, not the result; `check_graph` is what says the graph is right.
    """
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category in (UserWarning, FutureWarning, DeprecationWarning):
                warnings.simplefilter("ignore", category)
            yield
    finally:
        onnx_logger.setLevel(level)


def _sample_inputs(tokenizer: object, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of two unequal questions: batch and sequence must both vary when traced."""
    batch = tokenizer(  # type: ignore[operator]
        ["What is a prime number?", "Why did the Roman Empire in the west fall apart?"],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return batch["input_ids"], batch["attention_mask"]


def _export_dynamo(wrapper: nn.Module, sample: tuple[torch.Tensor, ...], path: Path) -> None:
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence")
    torch.onnx.export(
        wrapper,
        sample,
        str(path),
        dynamo=True,
        verbose=False,
        input_names=list(INPUT_NAMES),
        output_names=[OUTPUT_NAME],
        dynamic_shapes={name: {0: batch, 1: sequence} for name in INPUT_NAMES},
        external_data=False,
        optimize=True,
    )


def _export_torchscript(wrapper: nn.Module, sample: tuple[torch.Tensor, ...], path: Path) -> None:
    torch.onnx.export(
        wrapper,
        sample,
        str(path),
        dynamo=False,
        verbose=False,
        input_names=list(INPUT_NAMES),
        output_names=[OUTPUT_NAME],
        dynamic_axes={
            **{name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES},
            OUTPUT_NAME: {0: "batch"},
        },
        opset_version=17,
    )


def export_graph(model: nn.Module, tokenizer: object, path: Path, max_length: int) -> str:
    """Write the fp32 ONNX graph of `model`; returns which exporter wrote it."""
    wrapper = LogitsOnly(model).eval()
    sample = _sample_inputs(tokenizer, max_length)
    with _quiet_exporter(), torch.no_grad():
        try:
            _export_dynamo(wrapper, sample, path)
            return "torch.onnx.export(dynamo=True)"
        # The dynamo exporter fails with many exception types (torch.export, onnxscript);
        # any of them means "try the other exporter", and check_graph vets its result.
        except Exception as error:  # noqa: BLE001
            logger.warning(
                "the dynamo ONNX exporter failed (%s: %s); using the TorchScript exporter",
                type(error).__name__,
                error,
            )
            path.unlink(missing_ok=True)
            _export_torchscript(wrapper, sample, path)
            return "torch.onnx.export(dynamo=False)"


def check_graph(model: nn.Module, tokenizer: object, path: Path, max_length: int) -> None:
    """The fp32 graph must reproduce PyTorch on a batch shaped unlike the traced one."""
    from quantization.export import onnx_predict

    texts = [
        "how do volcanoes form",
        "What happens to the energy when a ball rolls down a hill and stops?",
        "Who wrote Macbeth?",
    ]
    want = pytorch_logits(model, tokenizer, texts, max_length, batch_size=len(texts))
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length)  # type: ignore[operator]
    session = onnx_predict.load_session(path)
    (got,) = session.run(
        [OUTPUT_NAME],
        {name: np.array(batch[name], dtype=np.int64) for name in INPUT_NAMES},
    )
    difference = float(np.abs(got - want).max())
    if not difference <= EXPORT_CHECK_TOLERANCE:
        raise OnnxExportError(
            f"the exported graph differs from PyTorch by {difference:.3g} (limit "
            f"{EXPORT_CHECK_TOLERANCE}) on a batch of {len(texts)}; the export is wrong"
        )


def quantize_graph(fp32_path: Path, int8_path: Path) -> None:
    """int8 weights, dynamically quantized activations (no calibration data needed).

    Weights are quantized per output channel: with one scale per tensor, a briefly trained
    MiniLM-L6 classifier kept its fp32 prediction on only 91% of held-out questions, per
    channel on 97%, for 0.5% more bytes. ORT's pre-processing runs first, as its docs
    advise; its symbolic shape inference is skipped because it does not complete on
    torch.export graphs (and writes into the current directory when it fails).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = fp32_path.with_name("model.prepared.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(
            str(prepared), str(int8_path), weight_type=QuantType.QInt8, per_channel=True
        )
    finally:
        prepared.unlink(missing_ok=True)


def _opset(path: Path) -> int:
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), 0)


# -- the folder ----------------------------------------------------------------------------


def _write_inference_files(folder: Path, spec: ExportSpec, tokenizer: object) -> None:
    from quantization.export import onnx_predict

    tokenizer.save_pretrained(str(folder))  # type: ignore[attr-defined]
    if not (folder / "tokenizer.json").is_file():
        raise OnnxExportError(
            f"the tokenizer of {spec.base_model} has no fast (tokenizer.json) form, which "
            "predict.py needs"
        )
    settings = {
        "task": spec.task_id,
        "labels": list(spec.labels),
        "max_length": spec.max_length,
        "pad_token": tokenizer.pad_token,  # type: ignore[attr-defined]
        "pad_token_id": tokenizer.pad_token_id,  # type: ignore[attr-defined]
        "input_names": list(INPUT_NAMES),
        "output_name": OUTPUT_NAME,
    }
    atomic_write_text(folder / LABELS_FILE, json.dumps(settings, indent=2, sort_keys=True))
    shutil.copyfile(onnx_predict.__file__, folder / PREDICT_FILE)


def _agreement_metrics(
    folder: Path,
    tokenizer: object,
    model: nn.Module,
    request: OnnxExportRequest,
) -> dict[str, float | int | None]:
    """Held-out accuracy of PyTorch and both ONNX graphs, and their agreement."""
    from quantization.export import onnx_predict

    eval_file = request.held_out_file
    empty: dict[str, float | int | None] = {
        "eval_examples": 0,
        "pytorch_accuracy": None,
        "onnx_fp32_accuracy": None,
        "onnx_int8_accuracy": None,
        "agreement": None,
        "fp32_agreement": None,
    }
    if eval_file is None:
        logger.warning(
            "task %s has no eval_file: ONNX agreement is not measured", request.spec.task_id
        )
        return empty
    try:
        examples = read_labelled_texts(eval_file)
    except LocalDataError as error:
        raise OnnxExportError(f"cannot read the held-out file: {error}") from error
    label_index = {label: index for index, label in enumerate(request.spec.labels)}
    unknown = sorted({e.label for e in examples} - label_index.keys())
    if unknown:
        raise OnnxExportError(
            f"{eval_file} has labels {unknown} that task {request.spec.task_id!r} does not know"
        )
    texts = [e.text for e in examples]
    targets = np.array([label_index[e.label] for e in examples])
    max_length = request.spec.max_length
    reference = pytorch_logits(model, tokenizer, texts, max_length, request.batch_size)
    reference_labels = reference.argmax(axis=-1)
    settings = onnx_predict.read_settings(folder)
    onnx_tokenizer = onnx_predict.load_tokenizer(folder, settings)
    predicted = {}
    for file_name in (FP32_FILE, INT8_FILE):
        session = onnx_predict.load_session(folder / file_name)
        logits = onnx_predict.predict_logits(session, onnx_tokenizer, texts, request.batch_size)
        predicted[file_name] = logits.argmax(axis=-1)
    return {
        "eval_examples": len(examples),
        "pytorch_accuracy": float((reference_labels == targets).mean()),
        "onnx_fp32_accuracy": float((predicted[FP32_FILE] == targets).mean()),
        "onnx_int8_accuracy": float((predicted[INT8_FILE] == targets).mean()),
        "agreement": float((predicted[INT8_FILE] == reference_labels).mean()),
        "fp32_agreement": float((predicted[FP32_FILE] == reference_labels).mean()),
    }


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_directory(folder)


def export_onnx(request: OnnxExportRequest) -> OnnxExportReport:
    """Export, quantize, score and write the folder; returns what export_report.json says."""
    missing = missing_onnx_packages()
    if missing:
        raise OnnxExportError(
            f"ONNX export needs {', '.join(missing)}: pip install 'schoolfl[onnx]'"
        )
    destination = request.destination
    if destination.exists():
        raise OnnxExportError(f"{destination} exists; choose a new folder")
    started = time.monotonic()
    destination.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.tmp-"))
    try:
        work.chmod(0o755)  # mkdtemp's 0700 would hide the folder from a classroom account
        model, tokenizer = load_merged_classifier(request.spec, request.adapter_folder)
        max_length = request.spec.max_length
        exporter = export_graph(model, tokenizer, work / FP32_FILE, max_length)
        check_graph(model, tokenizer, work / FP32_FILE, max_length)
        quantize_graph(work / FP32_FILE, work / INT8_FILE)
        _write_inference_files(work, request.spec, tokenizer)
        metrics = _agreement_metrics(work, tokenizer, model, request)
        eval_file = request.held_out_file
        report = OnnxExportReport(
            task=request.spec.task_id,
            version=request.version,
            adapter_sha256=request.adapter_sha256,
            base_model=request.spec.base_model,
            exporter=exporter,
            opset=_opset(work / FP32_FILE),
            max_length=max_length,
            fp32_bytes=(work / FP32_FILE).stat().st_size,
            int8_bytes=(work / INT8_FILE).stat().st_size,
            eval_file=str(eval_file) if eval_file else None,
            seconds=round(time.monotonic() - started, 1),
            **metrics,  # type: ignore[arg-type]
        )
        atomic_write_text(work / REPORT_FILE, json.dumps(report.as_dict(), indent=2) + "\n")
        _fsync_tree(work)
        os.replace(work, destination)
        fsync_directory(destination.parent)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    logger.info(
        "exported %s v%d to %s: int8 %d bytes, agreement %s",
        request.spec.task_id,
        request.version,
        destination,
        report.int8_bytes,
        report.agreement,
    )
    return report
