"""`schoolfl coordinator export --onnx`: merged fp32 model -> ONNX -> int8, scored on held-out.

The main test trains a real MiniLM-L6 adapter for a few seconds (a single process, no
fleet: the subject here is the export, not the rounds), exports it through the CLI and
checks that ONNX int8 predicts like the merged PyTorch model and that predict.py runs
on its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime  # noqa: F401 - the [onnx] extra is part of [test]: fail, never skip
import pytest
import torch
from click.testing import CliRunner

from coordinator.config import TaskConfig
from coordinator.store import AdapterVersion, CoordinatorStore
from coordinator.task_models import onnx_export_spec
from quantization.adapters import AdapterConfig, attach_adapter, get_adapter_state, save_adapter
from quantization.export.onnx_export import (
    OnnxExportError,
    OnnxExportRequest,
    export_onnx,
    load_merged_classifier,
    pytorch_logits,
)
from quantization.loader import load_quantized
from quantization.peft_folder import peft_config_dict, write_peft_folder
from quantization.school_questions import split_questions, write_jsonl
from quantization.task_model import TaskModelSpec, build_task_model, classification_batch
from schoolfl.cli import cli

TASK = "subjects"
SEQ_LEN = 48


def _coordinator_toml(state: Path, labels: tuple[str, ...], eval_file: Path) -> str:
    """A classification task and a causal-LM task (which --onnx refuses)."""
    labels_toml = ", ".join(f'"{label}"' for label in labels)
    return (
        f'[coordinator]\nfleet = "f"\nstate_dir = "{state}"\n\n'
        f'[[tasks]]\nid = "{TASK}"\nkind = "classification"\nbase_model = "minilm-l6"\n'
        f'labels = [{labels_toml}]\nseq_len = {SEQ_LEN}\neval_file = "{eval_file}"\n\n'
        f'[[tasks]]\nid = "stories"\nkind = "causal-lm"\nbase_model = "smollm2-135m"\n'
    )


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def trained_fleet_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A coordinator state whose task has one version: a MiniLM-L6 adapter trained briefly.

    Trained on an fp32 base (faster than nf4 here; the adapter folder is the same format),
    30 steps of 16 questions: about 0.7 held-out accuracy, enough for margins that make
    the int8 agreement figure meaningful.
    """
    torch.set_num_threads(1)  # the CI machine has 2 cores; oversubscribing is far slower
    root = tmp_path_factory.mktemp("onnx-export")
    split = split_questions(1, held_out=160, seed=0)
    spec = TaskModelSpec(
        TASK, "classification", "minilm-l6", "none", AdapterConfig(rank=8), split.labels
    )
    model, tokenizer = build_task_model(spec)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    train = split.shards[0]
    for step in range(30):
        start = step * 16 % (len(train) - 16)
        batch = classification_batch(tokenizer, train[start : start + 16], split.labels, SEQ_LEN)
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    state = root / "state"
    # Written as the coordinator writes its versions: from the state, without the model.
    adapter = write_peft_folder(
        state / "adapters" / TASK / "v0001", get_adapter_state(model), peft_config_dict(model)
    )
    eval_file = write_jsonl(split.held_out, root / "held_out.jsonl")
    (root / "coordinator.toml").write_text(_coordinator_toml(state, split.labels, eval_file))
    store = CoordinatorStore(state / "coordinator.db")
    store.add_adapter_version(AdapterVersion(TASK, 1, 1, "ab" * 32, str(adapter), 1.0))
    store.close()
    return root


@pytest.mark.slow
def test_onnx_int8_agrees_with_pytorch_on_held_out(trained_fleet_state: Path) -> None:
    root = trained_fleet_state
    destination = root / "onnx"
    config = str(root / "coordinator.toml")
    code, output = _run(
        "coordinator", "export", "--config", config, "--onnx", "--task", TASK, str(destination)
    )
    assert code == 0, output
    print(output)
    report = json.loads((destination / "export_report.json").read_text())
    assert report["exporter"] == "torch.onnx.export(dynamo=True)"
    assert report["eval_examples"] == 160
    assert report["fp32_agreement"] == 1.0
    assert report["agreement"] >= 0.95, report
    assert report["pytorch_accuracy"] > 0.5, report  # trained, well above 1/8 chance
    assert abs(report["onnx_int8_accuracy"] - report["pytorch_accuracy"]) <= 0.05
    assert report["int8_bytes"] < 0.4 * report["fp32_bytes"], report
    for name in ("model.onnx", "model.int8.onnx", "tokenizer.json", "labels.json", "predict.py"):
        assert (destination / name).is_file(), name
    assert report["int8_bytes"] == (destination / "model.int8.onnx").stat().st_size
    assert "agrees with PyTorch" in output and "MB" in output
    assert not list(root.glob(".onnx.tmp-*"))  # the temporary folder was renamed away

    # predict.py on its own (fp32 graph, so the comparison with PyTorch has no near ties).
    labels = json.loads((destination / "labels.json").read_text())["labels"]
    questions = ["How do plants make food from sunlight?", "what is 3/4 as a percentage"]
    model, tokenizer = load_merged_classifier(
        onnx_export_spec(
            TaskConfig(id=TASK, kind="classification", base_model="minilm-l6", labels=tuple(labels))
        ),
        root / "state" / "adapters" / TASK / "v0001",
    )
    expected = [
        labels[i] for i in pytorch_logits(model, tokenizer, questions, SEQ_LEN, 8).argmax(-1)
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for model_file in ("model.onnx", "model.int8.onnx"):
        completed = subprocess.run(
            [sys.executable, str(destination / "predict.py"), "--model", model_file, *questions],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=root,
        )
        assert completed.returncode == 0, completed.stderr
        lines = completed.stdout.strip().splitlines()
        assert [line.split("\t")[2] for line in lines] == questions
        predicted = [line.split("\t")[0] for line in lines]
        assert all(label in labels for label in predicted), predicted
        if model_file == "model.onnx":
            assert predicted == expected


def test_onnx_export_refuses_bad_requests(tmp_path: Path) -> None:
    """Clear errors, before any model is loaded: no versions, unknown task, causal-LM task,
    existing destination."""
    state = tmp_path / "state"
    eval_file = tmp_path / "held_out.jsonl"
    config = tmp_path / "coordinator.toml"
    config.write_text(_coordinator_toml(state, ("a", "b"), eval_file))
    CoordinatorStore(state / "coordinator.db").close()
    args = ["coordinator", "export", "--config", str(config), "--onnx"]

    code, output = _run(*args, "--task", TASK, str(tmp_path / "out"))
    assert code != 0 and "no adapter versions yet" in output, output
    code, output = _run(*args, "--task", "nope", str(tmp_path / "out"))
    assert code != 0 and "no task 'nope'" in output and TASK in output, output
    code, output = _run(*args, "--task", "stories", str(tmp_path / "out"))
    assert code != 0 and "only classification tasks are exported to ONNX" in output, output
    code, output = _run(*args, str(tmp_path / "out"))
    assert code != 0 and "choose a task with --task" in output, output

    folder = state / "adapters" / TASK / "v0001"
    folder.mkdir(parents=True)
    store = CoordinatorStore(state / "coordinator.db")
    store.add_adapter_version(AdapterVersion(TASK, 1, 1, "ab" * 32, str(folder), 1.0))
    store.close()
    (tmp_path / "taken").mkdir()
    code, output = _run(*args, "--task", TASK, str(tmp_path / "taken"))
    assert code != 0 and "exists; choose a new folder" in output, output

    task = TaskConfig(id="stories", kind="causal-lm", base_model="smollm2-135m")
    with pytest.raises(OnnxExportError, match="only classification tasks"):
        OnnxExportRequest(onnx_export_spec(task), folder, tmp_path / "x", 1, "ab" * 32)


def test_torchscript_fallback_when_dynamo_fails(
    tiny_bert_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the dynamo exporter fails, the TorchScript exporter writes a graph that still
    passes the numeric check (tiny random BERT: fast; agreement is not the point here)."""
    from quantization.export import onnx_export

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated torch.export failure")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    labels = ("a", "b", "c")
    base = load_quantized(tiny_bert_folder, "none", task="classification", num_labels=3)
    adapter = save_adapter(attach_adapter(base, AdapterConfig(rank=2)), tmp_path / "adapter")
    eval_file = tmp_path / "held_out.jsonl"
    rows = [{"text": f"question number {i}", "label": labels[i % 3]} for i in range(6)]
    eval_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = TaskConfig(
        id=TASK,
        kind="classification",
        base_model=str(tiny_bert_folder),
        labels=labels,
        seq_len=16,
        eval_file=str(eval_file),
    )
    request = OnnxExportRequest(onnx_export_spec(task), adapter, tmp_path / "onnx", 3, "cd" * 32)
    report = export_onnx(request)
    assert report.exporter == "torch.onnx.export(dynamo=False)"
    assert report.eval_examples == 6 and report.fp32_agreement == 1.0
    assert report.int8_bytes > 0 and (tmp_path / "onnx" / "export_report.json").is_file()
