"""What `serve` needs besides a well-formed coordinator.toml: tasks, models, files, secrets.

Why a step of its own: these checks look at the machine (installed model packages, files and
their permissions), so they belong to the daemon's start, not to every command that reads
the config (`revoke` must work on a host without the eval files). Run before the daemon
connects, they turn what used to be a traceback after connecting (a missing eval file, a
password file the service user cannot read) into one message naming the table and key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.config_values import CoordinatorConfigError
from quantization.errors import ModelFileError, ModelPackageMissingError
from quantization.task_data import LocalDataError, read_labelled_texts, read_lm_texts
from quantization.task_model import KNOWN_BASE_MODELS, resolve_base_model

if TYPE_CHECKING:
    from coordinator.config import CoordinatorConfig, TaskConfig


def invalid(where: str, key: str, problem: str) -> CoordinatorConfigError:
    """`[[tasks]] 'faq' eval_file: /x/eval.jsonl does not exist`: the key, then what the
    machine says about the file it names."""
    return CoordinatorConfigError(f"{where} {key}: {problem}")


def _check_base_model(where: str, task: TaskConfig) -> None:
    """A known name whose package (or fetched file) is here, or a model folder / GGUF file."""
    try:
        source = resolve_base_model(task.base_model)
    except (FileNotFoundError, ModelPackageMissingError, ModelFileError) as error:
        raise invalid(where, "base_model", str(error)) from None
    if task.base_model in KNOWN_BASE_MODELS:
        return
    if source.is_dir() and not (source / "config.json").is_file():
        raise invalid(
            where,
            "base_model",
            f"{source} is a folder without config.json; name a Hugging Face model folder, "
            f"a .gguf file or one of {', '.join(KNOWN_BASE_MODELS)}",
        )
    if source.is_file() and source.suffix != ".gguf":
        raise invalid(
            where, "base_model", f"{source} is a file but not a .gguf model; name a folder or GGUF"
        )


def _check_eval_file(where: str, task: TaskConfig) -> None:
    """The file exists and parses as the task's kind of data, and (classification) names
    only the task's labels: otherwise the first evaluation, after a round, fails."""
    if not task.eval_file:
        return
    path = Path(task.eval_file).expanduser()
    if not path.exists():
        raise invalid(where, "eval_file", f"{path} does not exist")
    try:
        if task.kind != "classification":
            read_lm_texts(path)
            return
        examples = read_labelled_texts(path)
    except (LocalDataError, OSError, UnicodeDecodeError) as error:
        raise invalid(where, "eval_file", str(error)) from None
    unknown = sorted({example.label for example in examples} - set(task.labels))
    if unknown:
        raise invalid(
            where,
            "eval_file",
            f"{path}: labels {unknown} are not among the task's labels {list(task.labels)}",
        )


def _check_secret_file(where: str, key: str, value: str | None) -> None:
    """Readable by this process and not empty (the daemon reads it when it connects)."""
    if not value:
        return
    path = Path(value).expanduser()
    if not path.exists():
        raise invalid(where, key, f"{path} does not exist")
    if not os.access(path, os.R_OK) or not path.is_file():
        raise invalid(where, key, f"{path} is not a file this user (uid {os.geteuid()}) can read")
    try:
        first_line = path.read_text().splitlines()[:1]
    except (OSError, UnicodeDecodeError) as error:
        raise invalid(where, key, f"cannot read {path}: {error}") from None
    if not first_line or not first_line[0]:
        raise invalid(where, key, f"{path} is empty: the password goes on its first line")


def check_ready_to_serve(config: CoordinatorConfig) -> None:
    """Raise `CoordinatorConfigError` (table and key named) unless `serve` can run `config`."""
    if not config.tasks:
        raise CoordinatorConfigError(
            "no [[tasks]]: the coordinator has nothing to train; add a [[tasks]] table "
            "(docs/coordinator.md)"
        )
    for task in config.tasks:
        where = f"[[tasks]] {task.id!r}"
        _check_base_model(where, task)
        _check_eval_file(where, task)
    _check_secret_file("[broker]", "password_file", config.broker.password_file)
    ca_file = config.broker.ca_file
    if ca_file and not os.access(Path(ca_file).expanduser(), os.R_OK):
        raise invalid("[broker]", "ca_file", f"{ca_file} does not exist or cannot be read")
    if config.broker_admin is not None:
        _check_secret_file("[broker_admin]", "password_file", config.broker_admin.password_file)
