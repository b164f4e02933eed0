"""Streaming quantized loader: safetensors folders and GGUF files -> frozen quantized model.

Loading a model the usual way materialises every weight in full precision before any
quantization, which is the memory spike a 4 GB Raspberry Pi cannot afford. Here the model is
built with its parameters on the meta device (no storage); tensors are then read one at a time
(safetensors memory-maps, GGUF is dequantized tensor by tensor) and each Linear weight is
quantized the moment it arrives, so the peak is the quantized model plus one full tensor.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantization.embeddings import Int8Embedding, Int8LMHead, int8_quantize_rows
from quantization.errors import ModelFileError, ModelMismatchError, QuantizationError
from quantization.schemes import (
    DEFAULT_SKIP_MODULES,
    Scheme,
    _is_skipped,
    can_quantize,
    quantize_linear_weight,
    require_scheme,
)

logger = logging.getLogger(__name__)

TASKS = ("auto", "classification", "causal-lm", "embedding")
HEAD_MODULES = ("classifier", "score")
"""Heads that a base checkpoint may lack; they are initialised fresh (and trained)."""


# -- meta skeleton --------------------------------------------------------------------------


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device but buffers for real.

    Buffers such as RoPE's `inv_freq` or BERT's `position_ids` are computed in `__init__` and
    absent from checkpoints, so they must be real; parameters come from the file.
    """
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = meta

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _resolve_task(config, task: str, num_labels: int | None) -> str:  # noqa: ANN001
    if task not in TASKS:
        raise QuantizationError(f"task must be one of {TASKS}, got {task!r}")
    if task != "auto":
        return task
    architectures = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForCausalLM") for a in architectures) or config.model_type in (
        "llama",
        "mistral",
        "qwen2",
    ):
        return "causal-lm"
    if num_labels is not None or any(a.endswith("SequenceClassification") for a in architectures):
        return "classification"
    return "embedding"


def _build_skeleton(config, task: str, num_labels: int | None) -> nn.Module:  # noqa: ANN001
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "classification":
        config.num_labels = num_labels or getattr(config, "num_labels", 2)
        factory = AutoModelForSequenceClassification
    elif task == "causal-lm":
        factory = AutoModelForCausalLM
    else:
        factory = AutoModel
    with _parameters_on_meta():
        model = factory.from_config(config, attn_implementation="sdpa")
    return model


# -- tensor sources -------------------------------------------------------------------------


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise ModelFileError(f"{index} is not a valid safetensors index: {error}") from error
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(
            f"no *.safetensors weights in {folder}; expected model.safetensors or shards with "
            "model.safetensors.index.json"
        )
    for file in files:
        if not file.is_file():
            raise ModelFileError(f"weight shard {file} listed in the index is missing")
    return files


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 * 2**20


def _read_safetensors_header(file: Path, handle) -> tuple[dict, int]:  # noqa: ANN001
    """(tensor entries, byte offset where data starts), validated against the file size."""
    size = file.stat().st_size
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise ModelFileError(f"{file} is truncated: {size} bytes, no safetensors header")
    header_bytes = int.from_bytes(prefix, "little")
    if header_bytes > min(_MAX_HEADER_BYTES, size - 8):
        raise ModelFileError(
            f"{file}: header says {header_bytes} bytes but the file has {size}; truncated or "
            "not a safetensors file"
        )
    try:
        header = json.loads(handle.read(header_bytes))
    except ValueError as error:
        raise ModelFileError(f"{file}: safetensors header is not valid JSON ({error})") from error
    header.pop("__metadata__", None)
    data_start = 8 + header_bytes
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if data_start + end > size:
        raise ModelFileError(
            f"{file} is truncated: tensors need {data_start + end} bytes, file has {size}; "
            "download or copy it again"
        )
    return header, data_start


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Read tensors one at a time into fresh memory, in file order.

    `safetensors.safe_open` memory-maps the file; every page it touches stays in this
    process's RSS until the file is closed, which for a one-file checkpoint is the whole
    full-precision model: exactly the spike streaming is meant to avoid. Plain reads go
    through the page cache instead, which the kernel can drop.
    """
    for file in files:
        with open(file, "rb") as handle:
            header, data_start = _read_safetensors_header(file, handle)
            entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
            for key, entry in entries:
                dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
                if dtype is None:
                    raise ModelFileError(f"{file}: tensor {key!r} has unsupported dtype {entry}")
                begin, stop = entry["data_offsets"]
                shape = tuple(entry["shape"])
                tensor = torch.empty(shape, dtype=dtype)
                nbytes = tensor.numel() * tensor.element_size()
                if stop - begin != nbytes:
                    raise ModelFileError(
                        f"{file}: tensor {key!r} spans {stop - begin} bytes, shape {shape} "
                        f"{entry['dtype']} needs {nbytes}"
                    )
                handle.seek(data_start + begin)
                if nbytes and handle.readinto(tensor.view(-1).view(torch.uint8).numpy()) != nbytes:
                    raise ModelFileError(f"{file} is truncated inside tensor {key!r}")
                yield key, tensor


@contextlib.contextmanager
def shared_gguf_reader(path: str | Path) -> Iterator[Any]:
    """One parsed `gguf.GGUFReader` of `path` for every reader of it inside the block.

    transformers' GGUF helpers (config, tensor-name map, tokenizer) import `GGUFReader` and
    `get_tensor_name_map` from `gguf` at each call, so for the block both are swapped: a
    reader of `path` is the one parsed here (parsing SmolLM2's header, with its 49k-token
    vocabulary, took ~8 s and was done three times per model load), and the tensor-name map
    is memoized (`get_gguf_hf_weights_map` rebuilt the same map for each of ~400 modules:
    ~7 s). Profiled on SmolLM2-135M for issue 19. Nested blocks reuse the outer reader."""
    import gguf

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    reader = original_reader(str(path))
    target = Path(str(path)).resolve()

    def reuse_reader(other: object, *args: object, **kwargs: object) -> Any:
        if Path(str(other)).resolve() == target and not args and not kwargs:
            return reader
        return original_reader(other, *args, **kwargs)

    gguf.GGUFReader = reuse_reader
    gguf.get_tensor_name_map = functools.cache(original_map)
    try:
        yield reader
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map


def _gguf_config_and_tensors(path: Path, task: str, num_labels: int | None):  # noqa: ANN202
    """Config from the GGUF metadata, then a generator of (hf_name, fp32 tensor)."""
    import numpy as np
    from gguf import dequantize
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    try:
        with shared_gguf_reader(path) as reader:
            parsed = load_gguf_checkpoint(str(path), return_tensors=False)
            config_dict = dict(parsed["config"])
            model_type = config_dict.pop("model_type")
            config = AutoConfig.for_model(model_type, **config_dict)
            task = _resolve_task(config, "causal-lm" if task == "auto" else task, num_labels)
            model = _build_skeleton(config, task, num_labels)
            architecture = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
            processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
            processor = processor_class(config=parsed["config"])
            name_map = get_gguf_hf_weights_map(model, processor)
    except QuantizationError:
        raise  # a model that does not fit its config says so itself
    except (ValueError, OSError, KeyError, IndexError) as error:
        raise ModelFileError(f"cannot read GGUF file {path}: {error}") from error

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for tensor in reader.tensors:
            weights = dequantize(tensor.data, tensor.tensor_type)
            result = processor.process(
                weights=weights,
                name=tensor.name,
                tensor_key_mapping=name_map,
                parsed_parameters={"tensors": {}, "config": parsed["config"]},
            )
            if result.name not in name_map:
                logger.debug("GGUF tensor %s has no model parameter; ignored", result.name)
                continue
            array = np.ascontiguousarray(result.weights)
            if not array.flags.writeable:  # an unquantized tensor is a view of the mmap
                array = array.copy()
            yield name_map[result.name], torch.from_numpy(array)

    return model, tensors()


# -- streaming assembly ---------------------------------------------------------------------


def _vocabulary_modules(
    model: nn.Module,
) -> dict[str, Callable[[torch.Tensor], nn.Module] | None]:
    """Module name -> how to build its int8 replacement from the streamed weight, for the
    input embedding and a bias-free LM head. A tied head maps to None: a copy of it in the
    checkpoint is dropped, and `finish` builds the head on the embedding's rows."""
    builders: dict[str, Callable[[torch.Tensor], nn.Module] | None] = {}
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if type(embedding) is not nn.Embedding:
        return builders
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    plain_head = type(head) is nn.Linear and head.bias is None
    if tied and head is not None and not plain_head:
        logger.info("embedding tied to a %s head: left in full precision", type(head).__name__)
        return builders
    padding_idx = embedding.padding_idx
    for name, module in model.named_modules(remove_duplicate=False):
        if module is embedding:
            builders[name] = lambda weight: Int8Embedding(
                *int8_quantize_rows(weight), padding_idx=padding_idx
            )
        elif module is head and plain_head:
            builders[name] = (
                None if tied else (lambda weight: Int8LMHead(*int8_quantize_rows(weight)))
            )
    return builders


class _Assembler:
    """Puts streamed tensors into a meta skeleton, quantizing Linear weights on arrival."""

    def __init__(
        self,
        model: nn.Module,
        scheme: Scheme,
        skip_modules: tuple[str, ...],
        device: torch.device | None = None,
        int8_vocabulary: bool = False,
    ) -> None:
        self.model = model
        self.scheme = scheme
        self.device = device
        self.prefix = getattr(model, "base_model_prefix", "")
        self.parameters = dict(model.named_parameters(remove_duplicate=False))
        self.buffers = dict(model.named_buffers())
        self.to_quantize: set[str] = set()
        if scheme is not Scheme.NONE:
            for name, module in model.named_modules():
                if (
                    type(module) is nn.Linear
                    and not _is_skipped(name, skip_modules)
                    and can_quantize(tuple(module.weight.shape), scheme)
                ):
                    self.to_quantize.add(name)
        self.vocabulary = _vocabulary_modules(model) if int8_vocabulary else {}
        self.pending_bias: dict[str, torch.Tensor] = {}
        self.quantized: set[str] = set()
        self.loaded: set[str] = set()
        self.unexpected: list[str] = []

    def _model_key(self, key: str) -> str | None:
        known = self.parameters.keys() | self.buffers.keys()
        candidates = [key, f"{self.prefix}.{key}"]
        if self.prefix and key.startswith(self.prefix + "."):
            candidates.append(key[len(self.prefix) + 1 :])
        return next((c for c in candidates if c in known), None)

    def add(self, key: str, tensor: torch.Tensor, source: Path) -> None:
        name = self._model_key(key)
        if name is None:
            self.unexpected.append(key)
            return
        if name in self.buffers:
            buffer = self.buffers[name]
            if tuple(buffer.shape) == tuple(tensor.shape):
                buffer.copy_(tensor.to(buffer.dtype))
            self.loaded.add(name)
            return
        expected = tuple(self.parameters[name].shape)
        if tuple(tensor.shape) != expected:
            raise ModelMismatchError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)} but the config "
                f"({type(self.model).__name__}) expects {expected}; config.json and weights "
                "do not belong together"
            )
        module_name, _, attribute = name.rpartition(".")
        if attribute == "weight" and module_name in self.vocabulary:
            # Quantized from the streamed dtype a block of rows at a time: no fp32 copy of a
            # (vocab, hidden) matrix ever exists (262 MB each for a 32k x 2048 vocabulary).
            build = self.vocabulary[module_name]
            if build is not None:
                self._replace(module_name, build(tensor))
            self.loaded.add(name)
            return
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        module = self.model.get_submodule(module_name)
        if module_name in self.to_quantize:
            self._add_quantized(module_name, module, attribute, tensor)
        else:
            module._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)
        self.loaded.add(name)

    def _add_quantized(
        self, module_name: str, module: nn.Module, attribute: str, tensor: torch.Tensor
    ) -> None:
        if attribute == "bias":
            if module_name in self.quantized:
                module.bias.data.copy_(tensor)
            else:  # the weight has not streamed in yet; hold the (small) bias until it does
                self.pending_bias[module_name] = tensor
            return
        bias = self.pending_bias.pop(module_name, None)
        if bias is None and module.bias is not None:
            bias = torch.zeros(module.out_features)  # placeholder until the bias streams in
        with torch.no_grad():
            quantized = quantize_linear_weight(tensor, bias, self.scheme, self.device)
        self._replace(module_name, quantized)
        self.quantized.add(module_name)

    def _replace(self, module_name: str, module: nn.Module) -> None:
        parent_name, _, child_name = module_name.rpartition(".")
        setattr(self.model.get_submodule(parent_name), child_name, module)

    def finish(self, source: Path) -> nn.Module:
        model = self.model
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if (
            output is not None
            and getattr(model.config, "tie_word_embeddings", False)
            and isinstance(getattr(output, "weight", None), nn.Parameter)
            and output.weight.device.type == "meta"
        ):
            embedding = model.get_input_embeddings()
            if isinstance(embedding, Int8Embedding):  # the head reads the embedding's rows
                model.set_output_embeddings(Int8LMHead(tied_to=embedding))
            else:
                output.weight = embedding.weight
        missing = []
        for name, param in model.named_parameters():
            if param.device.type != "meta":
                continue
            module_name, _, attribute = name.rpartition(".")
            if module_name.split(".")[0] in HEAD_MODULES or _is_skipped(module_name, HEAD_MODULES):
                module = model.get_submodule(module_name)
                std = float(getattr(model.config, "initializer_range", 0.02))
                fresh = (
                    torch.zeros(param.shape)
                    if attribute == "bias"
                    else (torch.randn(param.shape) * std)
                )
                module._parameters[attribute] = nn.Parameter(fresh, requires_grad=False)
                logger.info("initialised head parameter %s (not in the checkpoint)", name)
            else:
                missing.append(name)
        if missing:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise ModelMismatchError(
                f"{source} lacks {len(missing)} tensor(s) the config needs: {shown}; "
                "config.json and weights do not belong together"
            )
        if self.pending_bias:
            raise ModelMismatchError(
                f"{source}: bias without weight for {sorted(self.pending_bias)}"
            )
        if self.unexpected:
            logger.warning(
                "%s: %d tensor(s) not used by the model, e.g. %s",
                source,
                len(self.unexpected),
                self.unexpected[:4],
            )
        for param in model.parameters():
            param.requires_grad_(False)
        model.eval()
        return model


def load_quantized(
    source: str | Path,
    scheme: str | Scheme,
    *,
    task: str = "auto",
    num_labels: int | None = None,
    skip_modules: tuple[str, ...] = DEFAULT_SKIP_MODULES,
    device: torch.device | None = None,
    int8_vocabulary: bool = False,
) -> nn.Module:
    """Load a Hugging Face model folder or a GGUF file with its Linear weights quantized.

    Parameters
    ----------
    source:
        A folder with config.json and one or sharded *.safetensors, or a *.gguf file.
    scheme:
        A `Scheme` or its name; must be available here (`available_schemes`).
    task:
        "classification" (sequence classification head, `num_labels` outputs),
        "causal-lm", "embedding" (bare encoder), or "auto" (from the config).
    device:
        Where the model ends up (default: the CPU; a bitsandbytes scheme defaults to the
        GPU when there is one). Weights stream in and are quantized on the CPU, then move,
        so the GPU never holds a full-precision Linear weight.
    int8_vocabulary:
        Store the input embedding and a bias-free LM head (tied or not) as int8 rows
        (`quantization/embeddings.py`), quantized as they stream in: the same modules and
        codes as `quantize_embeddings` on the loaded model, without its full-precision
        vocabulary matrices in memory first.

    All base parameters are frozen and the model is in eval mode; attach adapters next.
    Raises `ModelFileError` for missing/unreadable files and `ModelMismatchError` when the
    weights do not fit the config.
    """
    scheme = require_scheme(scheme, device.type if device is not None else None)
    source = Path(source)
    if not source.exists():
        raise ModelFileError(f"model source {source} does not exist")
    if source.is_file() and source.suffix == ".gguf":
        model, tensors = _gguf_config_and_tensors(source, task, num_labels)
    elif source.is_dir():
        config_path = source / "config.json"
        if not config_path.is_file():
            raise ModelFileError(f"{source} has no config.json; expected a Hugging Face folder")
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(source), local_files_only=True)
        except (ValueError, OSError) as error:
            raise ModelFileError(f"cannot read {config_path}: {error}") from error
        files = _safetensors_files(source)
        model = _build_skeleton(config, _resolve_task(config, task, num_labels), num_labels)
        tensors = _iter_safetensors(files)
    else:
        raise ModelFileError(f"{source} is neither a model folder nor a .gguf file")
    assembler = _Assembler(model, scheme, tuple(skip_modules), device, int8_vocabulary)
    for key, tensor in tensors:
        assembler.add(key, tensor, source)
        del tensor
    model = assembler.finish(source)
    if device is not None:
        model.to(device)
    logger.info("loaded %s with scheme %s (%s)", source, scheme.value, type(model).__name__)
    return model
