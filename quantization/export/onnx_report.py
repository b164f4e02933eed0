"""What an ONNX export wrote and measured: file names, the report, required packages.

Kept apart from `quantization/export/onnx_export.py` so that reading a report (the demo's summary,
an operator's script) or checking whether the export can run imports neither torch nor
onnxruntime.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
"""Import names the export needs (the `onnx` extra)."""

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
REPORT_FILE = "export_report.json"
LABELS_FILE = "labels.json"
PREDICT_FILE = "predict.py"


def missing_onnx_packages() -> list[str]:
    """The ONNX packages that are not installed (checked without importing them)."""
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


@dataclass(frozen=True)
class OnnxExportReport:
    """What `export_report.json` holds: provenance, sizes and held-out agreement."""

    task: str
    version: int
    adapter_sha256: str
    base_model: str
    exporter: str
    """Which torch.onnx exporter produced model.onnx (dynamo, or the TorchScript fallback)."""
    opset: int
    max_length: int
    """Tokens per question (the task's seq_len), for evaluation and predict.py alike."""
    fp32_bytes: int
    int8_bytes: int
    eval_file: str | None
    eval_examples: int
    pytorch_accuracy: float | None
    """Merged fp32 PyTorch model (PeftModel.from_pretrained + merge_and_unload)."""
    onnx_fp32_accuracy: float | None
    onnx_int8_accuracy: float | None
    agreement: float | None
    """Fraction of held-out questions where ONNX int8 and PyTorch predict the same label."""
    fp32_agreement: float | None
    """The same for the fp32 ONNX graph (should be 1.0: it checks the export itself)."""
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def summary_lines(self) -> list[str]:
        """Human-readable lines for the CLI and the demo."""
        ratio = self.int8_bytes / self.fp32_bytes if self.fp32_bytes else float("nan")
        lines = [
            f"{FP32_FILE:16} fp32 {self.fp32_bytes / 1e6:7.1f} MB",
            f"{INT8_FILE:16} int8 {self.int8_bytes / 1e6:7.1f} MB ({ratio:.0%} of fp32)",
        ]
        if self.eval_examples and self.agreement is not None:
            lines.append(
                f"held-out ({self.eval_examples} questions): PyTorch merged accuracy "
                f"{self.pytorch_accuracy:.3f}, ONNX int8 {self.onnx_int8_accuracy:.3f}, "
                f"ONNX fp32 {self.onnx_fp32_accuracy:.3f}; int8 agrees with PyTorch on "
                f"{self.agreement:.1%}"
            )
        else:
            lines.append("no held-out file (the task has no eval_file): agreement not measured")
        return lines
