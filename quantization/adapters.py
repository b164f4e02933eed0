"""PEFT LoRA adapters on a frozen (quantized) base: attach, state as named tensors, save, load.

The adapter is what travels between devices and the coordinator, so its tensor names must
not depend on how the base is stored: every scheme keeps the module paths of the original
model, and PEFT's state-dict names are built from those paths only. A classification head
(`modules_to_save`) travels with the LoRA matrices.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from durable.atomic_files import fsync_directory
from quantization.errors import AdapterError, ModelFileError
from quantization.qlinear import shape_only_weights

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"

DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "bert": ("query", "key", "value"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
"""LoRA targets per model type when `AdapterConfig.target_modules` is empty."""


@dataclass(frozen=True)
class AdapterConfig:
    """What the scheduler's plan says about the adapter (crosses threads: frozen)."""

    rank: int = 8
    """LoRA rank r; slow devices get a smaller one."""
    alpha: float = 16.0
    """LoRA scaling numerator (update scaled by alpha / rank)."""
    dropout: float = 0.0
    """Dropout on the LoRA input; 0 keeps steps deterministic for tests."""
    target_modules: tuple[str, ...] = ()
    """Module names to adapt; empty = DEFAULT_TARGET_MODULES for the model type."""
    modules_to_save: tuple[str, ...] | None = None
    """Fully trained modules that travel too; None = the classification head if any."""
    extra: dict[str, object] = field(default_factory=dict)
    """Further LoraConfig keyword arguments (e.g. init_lora_weights) passed through."""

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise AdapterError(f"AdapterConfig.rank must be a positive int, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise AdapterError(f"AdapterConfig.alpha must be > 0, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise AdapterError(f"AdapterConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str) or not all(
            isinstance(name, str) and name for name in self.target_modules
        ):
            raise AdapterError(
                "AdapterConfig.target_modules must be a tuple of module names, got "
                f"{self.target_modules!r}"
            )


def _head_modules(model: nn.Module) -> tuple[str, ...]:
    return tuple(
        name
        for name in ("classifier", "score")
        if isinstance(getattr(model, name, None), nn.Module)
    )


def attach_adapter(model: nn.Module, config: AdapterConfig):  # noqa: ANN201 - PeftModel
    """Wrap `model` in a PEFT LoRA model; only LoRA matrices (and the head) require grad."""
    from peft import LoraConfig, get_peft_model

    model_type = getattr(getattr(model, "config", None), "model_type", "")
    targets = config.target_modules or DEFAULT_TARGET_MODULES.get(model_type, ())
    if not targets:
        raise AdapterError(
            f"no default LoRA targets for model type {model_type!r}; set target_modules"
        )
    to_save = _head_modules(model) if config.modules_to_save is None else config.modules_to_save
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(targets),
        modules_to_save=list(to_save) or None,
        bias="none",
        **config.extra,
    )
    with shape_only_weights():  # PEFT reads each layer's weight only for shape/device/dtype
        peft_model = get_peft_model(model, lora, adapter_name=ADAPTER_NAME)
    for name, param in peft_model.named_parameters():
        param.requires_grad_("lora_" in name or "modules_to_save" in name)
    return peft_model


def get_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter (LoRA + saved modules) as named fp32 CPU tensors, detached copies.

    Names are PEFT's saved names (adapter name stripped), identical for every scheme and
    device: an adapter trained on a GPU leaves it in exactly the form a CPU one has.
    """
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    return {
        name: tensor.detach().to(device="cpu", dtype=torch.float32, copy=True)
        for name, tensor in state.items()
    }


def set_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load named adapter tensors; names and shapes must match exactly and be finite."""
    from peft import set_peft_model_state_dict

    expected = {name: tuple(t.shape) for name, t in get_adapter_state(model).items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise AdapterError(
            f"adapter state does not fit the model: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]} ({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise AdapterError(
                f"adapter tensor {name!r} has shape {tuple(tensor.shape)}, model expects "
                f"{expected[name]} (different rank?)"
            )
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"adapter tensor {name!r} contains NaN or Inf; refusing to load")
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    if getattr(result, "unexpected_keys", None):
        raise AdapterError(f"PEFT did not use adapter tensors {result.unexpected_keys[:4]}")


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_directory(folder)


def replace_folder_atomically(folder: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create `folder` by calling `fill(temporary_folder)`, then fsync and rename it into place.

    The temporary folder (`.NAME.tmp-*`) sits next to the destination; an existing folder is
    moved aside (`.NAME.old-PID`) only once the new one is complete, so a crash at any
    instant leaves either copy readable (`durable.atomic_files.sweep_leftovers` restores a
    moved-aside copy and removes a half-written one).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        fill(temp)
        _fsync_tree(temp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(temp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, folder)
        fsync_directory(folder.parent)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return folder


def save_adapter(model: nn.Module, folder: str | Path) -> Path:
    """Write a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) atomically.

    The folder is written under a temporary name next to its destination, fsynced, then
    renamed into place; an existing adapter is swapped out only after the new one is complete
    (`replace_folder_atomically`). The coordinator writes its versions without a model
    (quantization/peft_folder.py); this is for a model at hand.
    """
    folder = replace_folder_atomically(
        folder, lambda temp: model.save_pretrained(str(temp), safe_serialization=True)
    )
    logger.debug("saved adapter to %s", folder)
    return folder


def read_adapter_folder(folder: str | Path) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, tensors) of a PEFT adapter folder, with clear errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    weights_path = folder / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ModelFileError(f"adapter folder {folder} lacks {path.name}")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as error:
        raise AdapterError(f"{config_path} is not valid JSON: {error}") from error
    try:
        tensors = load_file(str(weights_path))
    except SafetensorError as error:
        raise ModelFileError(f"cannot read {weights_path}: {error} (truncated?)") from error
    return config, tensors


def load_adapter(model: nn.Module, folder: str | Path) -> None:
    """Load a PEFT adapter folder into a model that `attach_adapter` made with the same shape."""
    config, tensors = read_adapter_folder(folder)
    if config.get("peft_type") not in (None, "LORA"):
        raise AdapterError(f"{folder} holds a {config.get('peft_type')} adapter, expected LORA")
    set_adapter_state(model, tensors)
