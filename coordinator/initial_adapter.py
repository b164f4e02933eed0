"""Version 0 of a task's adapter, made by a child process that builds the model and exits.

Why a child process: version 0 must be the adapter the task's model starts with (LoRA A
drawn by PEFT's initialisation from the task's seed, B zero, the classification head the
base model's initialisation gives), so it comes from building that model, with the same
code and seed the devices use. Building it imports transformers and PEFT; in the daemon
their ~220 MB stay resident after the model itself is freed (measured: 489 MB left after
freeing MiniLM-L6, against 258 MB for a daemon that never built it;
benchmarks/bench_coordinator_memory.py). A child process returns all of it to the OS when
it exits, so the daemon's peak stays that of a daemon that never built a model. It costs
one interpreter start (about a second) once per task, on its first start.

The child gets the few task fields the model depends on as JSON on its command line and
writes the version 0 PEFT folder atomically (quantization/peft_folder.py); the parent reads
the tensors and the adapter config back from it. No pickle crosses.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from coordinator.config import TaskConfig
from quantization.peft_folder import WEIGHTS_NAME, read_peft_config

logger = logging.getLogger(__name__)

MODEL_FIELDS = (
    "id",
    "kind",
    "base_model",
    "scheme",
    "quantize_embeddings",
    "rank",
    "alpha",
    "labels",
    "seed",
)
"""The TaskConfig fields that the built model (and so version 0) depends on."""

CHILD_TIMEOUT_SECONDS = 3600.0
"""A 1B base on a slow coordinator streams in within minutes; an hour means it hangs."""


class InitialAdapterError(RuntimeError):
    """The child process could not make version 0 (its stderr tail says why)."""


def _model_task(fields: dict[str, object]) -> TaskConfig:
    labels = fields.get("labels", ())
    return TaskConfig(**{**fields, "labels": tuple(labels)})  # type: ignore[arg-type]


def make_initial_adapter(
    task: TaskConfig, folder: Path
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """(initial adapter state, adapter_config.json) of `task`, written as the PEFT folder
    `folder` by a child process."""
    from safetensors.torch import load_file

    fields = {name: getattr(task, name) for name in MODEL_FIELDS}
    fields["labels"] = list(task.labels)
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", __name__, json.dumps(fields), str(folder)]
    logger.info("task %s: building the model in a child process for version 0", task.id)
    try:
        result = subprocess.run(
            command,
            env=env,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise InitialAdapterError(
            f"task {task.id}: building version 0 took over {CHILD_TIMEOUT_SECONDS:.0f} s"
        ) from error
    if result.returncode != 0:
        raise InitialAdapterError(
            f"task {task.id}: the child process making version 0 failed "
            f"(exit {result.returncode}): {result.stderr[-2000:]}"
        )
    return load_file(str(folder / WEIGHTS_NAME)), read_peft_config(folder)


def main(argv: list[str]) -> int:
    """Child side: build the task's model, write its initial adapter folder."""
    from coordinator.task_models import TaskModel
    from quantization.peft_folder import write_peft_folder

    fields, folder = json.loads(argv[0]), Path(argv[1])
    model = TaskModel(_model_task(fields))
    write_peft_folder(folder, model.initial_state(), model.peft_config())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
