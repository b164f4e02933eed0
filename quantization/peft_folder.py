"""A PEFT LoRA adapter folder written from a state dict, without the model.

Why this exists: the coordinator writes one folder per global version, the folder users
load with `peft.PeftModel.from_pretrained`. Writing it with `PeftModel.save_pretrained`
needs the whole model in memory (the base: hundreds of MB, kept for nothing but this) and
renders PEFT's model card from its template on every call. What the folder holds is small
and fixed:

- `adapter_config.json`: the LoraConfig, the same for every version of a task. It is taken
  once per task, from a PEFT model (`peft_config_dict`: what `save_pretrained` writes,
  `auto_mapping` included) or read back from an earlier folder of the task
  (`read_peft_config`), then written as PEFT writes it (`render_peft_config`: JSON, indent
  2, sorted keys, no trailing newline).
- `adapter_model.safetensors`: the state under PEFT's saved names (those of
  `quantization.adapters.get_adapter_state`), metadata `{"format": "pt"}`, as PEFT saves it.
- `README.md`: a short static text instead of PEFT's rendered model card.

Neither peft nor transformers is imported here: on the coordinator their import alone
costs ~220 MB of resident memory.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from quantization.adapters import ADAPTER_NAME, replace_folder_atomically
from quantization.errors import AdapterError, ModelFileError
from quantization.lora_ranks import adapter_rank

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
README_NAME = "README.md"

README_TEXT = """# LoRA adapter (schoolfl global version)

A PEFT LoRA adapter written by the schoolfl coordinator. Load it on its base model
(`base_model_name_or_path` in adapter_config.json, or the task's base model) with

    from peft import PeftModel
    model = PeftModel.from_pretrained(base_model, "<this folder>")
"""
"""Static on purpose: PEFT renders a model card from a template on every save."""


def _json_ready(config: dict[str, object]) -> dict[str, object]:
    """Sets as sorted lists: PEFT writes `list(set)` (an order that changes from run to run);
    sorted names load the same and make each version's config byte-identical."""
    return {
        key: sorted(value) if isinstance(value, (set, frozenset)) else value
        for key, value in config.items()
    }


def peft_config_dict(peft_model: object) -> dict[str, object]:
    """`adapter_config.json` of a PEFT model, as `PeftModel.save_pretrained` writes it.

    Mirrors PEFT 0.21's save path: a copy of the adapter's config with
    `base_model_name_or_path` filled from the base model, `inference_mode` true, and (the
    config has no task type) an `auto_mapping` naming the base model's class.
    """
    config = copy.deepcopy(peft_model.peft_config[ADAPTER_NAME])  # type: ignore[attr-defined]
    base = peft_model.base_model.model  # type: ignore[attr-defined]
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = base.__dict__.get("name_or_path", None) or None
    config.inference_mode = True
    output = _json_ready(config.to_dict())
    if config.task_type is None:
        output["auto_mapping"] = {
            "base_model_class": type(base).__name__,
            "parent_library": type(base).__module__,
        }
    return output


def render_peft_config(config: Mapping[str, object]) -> bytes:
    """The bytes of `adapter_config.json`, formatted as PEFT formats it."""
    return json.dumps(_json_ready(dict(config)), indent=2, sort_keys=True).encode()


def read_peft_config(folder: str | Path) -> dict[str, object]:
    """A LoRA folder's `adapter_config.json` (ModelFileError when absent or unreadable)."""
    path = Path(folder) / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelFileError(f"cannot read {path}: {error}") from error
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ModelFileError(f"{path} is not a LoRA adapter config")
    return config


def with_rank_and_alpha(config: Mapping[str, object], rank: int, alpha: float) -> dict[str, object]:
    """`config` for an adapter of rank `rank` and scaling numerator `alpha` (the task's)."""
    return {**config, "r": rank, "lora_alpha": alpha}


def checked_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state as contiguous fp32 CPU tensors; AdapterError for a non-finite one."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise AdapterError(f"adapter tensor {name!r} is not a floating-point tensor")
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"adapter tensor {name!r} contains NaN or Inf; refusing to save")
        tensors[name] = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not tensors:
        raise AdapterError("adapter state is empty; nothing to save")
    return tensors


def write_peft_folder(
    folder: str | Path, state: Mapping[str, torch.Tensor], config: Mapping[str, object]
) -> Path:
    """Write `state` with `config` as a PEFT adapter folder, atomically (temporary folder,
    fsync of every file, rename; see `replace_folder_atomically`).

    `config["r"]` must be the state's LoRA rank: a folder whose config and weights disagree
    would load into the wrong shapes.
    """
    from safetensors.torch import save_file

    tensors = checked_state(state)
    rank = adapter_rank(tensors)
    if config.get("r") != rank:
        raise AdapterError(
            f"adapter config says rank {config.get('r')!r}, the state has rank {rank}; "
            "derive the config with with_rank_and_alpha"
        )
    config_bytes = render_peft_config(config)

    def fill(temp: Path) -> None:
        save_file(tensors, str(temp / WEIGHTS_NAME), metadata={"format": "pt"})
        (temp / CONFIG_NAME).write_bytes(config_bytes)
        (temp / README_NAME).write_text(README_TEXT)

    folder = replace_folder_atomically(folder, fill)
    logger.debug("wrote adapter folder %s (%d tensors)", folder, len(tensors))
    return folder
