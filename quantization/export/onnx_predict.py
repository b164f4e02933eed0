"""Classify a pupil's question with an exported schoolfl ONNX model (classroom inference).

`schoolfl coordinator export --onnx DIR` copies this file into DIR as `predict.py`, next to
`model.int8.onnx`, the tokenizer and `labels.json`. It is a standalone script on purpose: a
classroom laptop needs only `pip install onnxruntime tokenizers numpy` to run it, not
torch, transformers or schoolfl:

    python DIR/predict.py "How do plants make food from sunlight?"
    python DIR/predict.py --model model.onnx "..."      # the fp32 graph instead of int8

The exporter also imports it to measure the ONNX models' held-out accuracy, so what the
export report says is what this script does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime
from tokenizers import Tokenizer

DEFAULT_MODEL = "model.int8.onnx"
"""The quantized graph: about a quarter of the fp32 size, and faster on a CPU."""


def read_settings(folder: Path) -> dict[str, object]:
    """labels.json: class names in output order, plus how the model was tokenized."""
    return json.loads((Path(folder) / "labels.json").read_text(encoding="utf-8"))


def load_tokenizer(folder: Path, settings: dict[str, object]) -> Tokenizer:
    """tokenizer.json with the export's truncation and dynamic padding.

    Padding is set here, not taken from the file, because saved tokenizers often pad every
    input to a fixed length, which wastes time on short questions.
    """
    tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=int(settings["max_length"]))  # type: ignore[call-overload]
    tokenizer.enable_padding(
        pad_id=int(settings["pad_token_id"]),  # type: ignore[call-overload]
        pad_token=str(settings["pad_token"]),
    )
    return tokenizer


def load_session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def predict_logits(
    session: onnxruntime.InferenceSession,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    batch_size: int = 32,
) -> np.ndarray:
    """Logits (len(texts), num_labels) for `texts`, in batches padded to their longest."""
    rows = []
    for start in range(0, len(texts), batch_size):
        encodings = tokenizer.encode_batch(list(texts[start : start + batch_size]))
        input_ids = np.array([e.ids for e in encodings], dtype=np.int64)  # (B, T)
        attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)  # (B, T)
        (logits,) = session.run(
            ["logits"], {"input_ids": input_ids, "attention_mask": attention_mask}
        )
        rows.append(logits)  # (B, num_labels)
    return np.concatenate(rows, axis=0)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))  # (B, C)
    return shifted / shifted.sum(axis=-1, keepdims=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify questions with an exported model.")
    parser.add_argument("questions", nargs="+", help="One or more questions to classify.")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"ONNX file in the folder (default {DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--folder",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="The export folder (default: the folder of this script).",
    )
    arguments = parser.parse_args(argv)
    settings = read_settings(arguments.folder)
    labels = list(settings["labels"])  # type: ignore[call-overload]
    session = load_session(arguments.folder / arguments.model)
    tokenizer = load_tokenizer(arguments.folder, settings)
    probabilities = softmax(predict_logits(session, tokenizer, arguments.questions))
    for question, row in zip(arguments.questions, probabilities, strict=True):
        best = int(row.argmax())
        print(f"{labels[best]}\t{row[best]:.3f}\t{question}")  # noqa: T201 - a standalone CLI
    return 0


if __name__ == "__main__":
    sys.exit(main())
