"""Task data formats: labelled texts and language-model texts, read from local files.

On a device these are the student data that never leave it; on the coordinator, the
held-out evaluation split.

Two shapes of data, matching the two model families:
- classification: CSV with a header containing `text` and `label`, or JSONL objects with
  those keys;
- causal-LM text: a .txt file (one example per blank-line-separated paragraph) or JSONL
  objects with a `text` key, or `instruction` + `response`.
Errors name the file and the line, because school IT will be fixing these files by hand.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class LocalDataError(ValueError):
    """A local data file cannot be used; the message names file and line."""


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str


def _fail(path: Path, line: int | None, problem: str) -> LocalDataError:
    where = f"{path}:{line}" if line is not None else str(path)
    return LocalDataError(f"{where}: {problem}")


def _jsonl_objects(path: Path) -> list[tuple[int, dict[str, object]]]:
    objects = []
    with path.open(encoding="utf-8") as stream:
        for line_number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise _fail(path, line_number, f"not valid JSON ({error.msg})") from None
            if not isinstance(value, dict):
                raise _fail(path, line_number, "expected a JSON object per line")
            objects.append((line_number, value))
    return objects


def _text_field(path: Path, line: int, record: dict[str, object], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, line, f"field {key!r} is missing or empty")
    return value.strip()


def _check_labels(
    path: Path, examples: Sequence[tuple[int, LabelledText]], labels: Sequence[str]
) -> None:
    """Every label is one of the task's: checked when the file is read, because a stray
    label otherwise fails only when a batch happens to draw it, rounds later."""
    allowed = set(labels)
    unknown = [(line, example.label) for line, example in examples if example.label not in allowed]
    if not unknown:
        return
    line, label = unknown[0]
    more = ""
    if len(unknown) > 1:
        others = ", ".join(str(number) for number, _ in unknown[1:6])
        ellipsis = ", ..." if len(unknown) > 6 else ""
        more = f"; {len(unknown) - 1} more line(s) with labels outside the task: {others}{ellipsis}"
    raise _fail(
        path,
        line,
        f"label {label!r} is not one of the task's labels {list(labels)}{more}",
    )


def read_labelled_texts(path: Path, labels: Sequence[str] | None = None) -> list[LabelledText]:
    """Classification examples from a .csv or .jsonl file; with `labels` (the task's), a
    label outside them is an error naming its line."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, None, "no such file")
    numbered: list[tuple[int, LabelledText]] = []
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", newline="") as stream:
            reader = csv.DictReader(stream)
            if reader.fieldnames is None or not {"text", "label"} <= set(reader.fieldnames):
                raise _fail(
                    path, 1, f"header must name 'text' and 'label', got {reader.fieldnames}"
                )
            for row in reader:
                line = reader.line_num
                text = _text_field(path, line, row, "text")
                numbered.append((line, LabelledText(text, _text_field(path, line, row, "label"))))
    elif path.suffix.lower() == ".jsonl":
        for line, record in _jsonl_objects(path):
            text = _text_field(path, line, record, "text")
            numbered.append((line, LabelledText(text, _text_field(path, line, record, "label"))))
    else:
        raise _fail(path, None, "unsupported file type; use .csv or .jsonl with text and label")
    if not numbered:
        raise _fail(path, None, "contains no examples")
    if labels is not None:
        _check_labels(path, numbered, labels)
    return [example for _, example in numbered]


def read_lm_texts(path: Path) -> list[str]:
    """Causal-LM training texts from a .txt or .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, None, "no such file")
    texts: list[str] = []
    if path.suffix.lower() == ".txt":
        content = path.read_text(encoding="utf-8")
        texts = [paragraph.strip() for paragraph in content.split("\n\n") if paragraph.strip()]
    elif path.suffix.lower() == ".jsonl":
        for line, record in _jsonl_objects(path):
            if "text" in record:
                texts.append(_text_field(path, line, record, "text"))
            elif "instruction" in record:
                instruction = _text_field(path, line, record, "instruction")
                response = _text_field(path, line, record, "response")
                texts.append(f"Question: {instruction}\nAnswer: {response}")
            else:
                raise _fail(path, line, "expected a 'text' field or 'instruction' + 'response'")
    else:
        raise _fail(path, None, "unsupported file type; use .txt or .jsonl")
    if not texts:
        raise _fail(path, None, "contains no examples")
    return texts
