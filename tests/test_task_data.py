"""Local data files: what school IT provides, and the errors they get when it is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantization.task_data import LocalDataError, read_labelled_texts, read_lm_texts


def test_csv_and_jsonl_classification(tmp_path: Path) -> None:
    csv_file = tmp_path / "q.csv"
    csv_file.write_text(
        'text,label\n"What is 2+2, really?",mathematics\nWhy is the sky blue?,physics\n'
    )
    jsonl_file = tmp_path / "q.jsonl"
    jsonl_file.write_text('{"text": "Who was Ashoka?", "label": "history"}\n\n')
    assert [e.label for e in read_labelled_texts(csv_file)] == ["mathematics", "physics"]
    assert read_labelled_texts(csv_file)[0].text == "What is 2+2, really?"
    assert read_labelled_texts(jsonl_file)[0].label == "history"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "a.jsonl",
            '{"text": "ok", "label": "x"}\n{"text": "no label"}\n',
            "a.jsonl:2: field 'label'",
        ),
        ("b.jsonl", '{"text": "ok", "label": "x"}\nnot json\n', "b.jsonl:2: not valid JSON"),
        ("c.jsonl", "[1, 2]\n", "c.jsonl:1: expected a JSON object"),
        ("d.csv", "question,subject\nx,y\n", "d.csv:1: header must name"),
        ("e.csv", "text,label\nfine,x\n,y\n", "e.csv:3: field 'text'"),
        ("f.parquet", "", "unsupported file type"),
        ("g.jsonl", "\n", "contains no examples"),
    ],
)
def test_bad_classification_files_name_file_and_line(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(LocalDataError) as error:
        read_labelled_texts(path)
    assert message in str(error.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LocalDataError, match="no such file"):
        read_labelled_texts(tmp_path / "absent.csv")


def test_lm_texts(tmp_path: Path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("First paragraph.\nStill first.\n\nSecond one.\n")
    assert read_lm_texts(txt) == ["First paragraph.\nStill first.", "Second one."]
    jsonl = tmp_path / "inst.jsonl"
    jsonl.write_text(
        '{"instruction": "Explain rain", "response": "Water falls."}\n{"text": "Hi"}\n'
    )
    assert read_lm_texts(jsonl) == ["Question: Explain rain\nAnswer: Water falls.", "Hi"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(LocalDataError, match="bad.jsonl:1"):
        read_lm_texts(bad)


def test_labels_outside_the_task_are_refused_at_load_with_file_and_line(tmp_path: Path) -> None:
    csv_file = tmp_path / "q.csv"
    csv_file.write_text("text,label\nfine,physics\nodd,maths\nalso odd,art\nok,history\n")
    with pytest.raises(LocalDataError) as error:
        read_labelled_texts(csv_file, labels=("physics", "history"))
    message = str(error.value)
    assert message.startswith(f"{csv_file}:3: label 'maths' is not one of the task's labels")
    assert "['physics', 'history']" in message and "1 more line(s)" in message and ": 4" in message
    jsonl_file = tmp_path / "q.jsonl"
    jsonl_file.write_text(
        '{"text": "a", "label": "physics"}\n\n{"text": "b", "label": "Physics"}\n'
    )
    with pytest.raises(LocalDataError, match=r"q.jsonl:3: label 'Physics'"):
        read_labelled_texts(jsonl_file, labels=("physics", "history"))
    assert len(read_labelled_texts(csv_file)) == 4  # without the task's labels: no check
    assert len(read_labelled_texts(jsonl_file, labels=("physics", "Physics"))) == 2
