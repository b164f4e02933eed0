"""Shared fixtures. Integration tests talk to a real Mosquitto started here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.mosquitto import MosquittoConfig, MosquittoProcess, find_mosquitto


def _require_mosquitto() -> str:
    """In CI a missing broker is a test error, never a skip: those tests are core."""
    binary = find_mosquitto()
    if binary is None:
        message = "mosquitto is not installed (apt-get install -y mosquitto)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return binary


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A fresh Mosquitto on a free loopback port; `.stop()`, `.start()`, `.restart()` work.

    Persistence is on, so persistent sessions and queued QoS 1 messages survive a restart
    as they do in production.
    """
    binary = _require_mosquitto()
    broker = MosquittoProcess(MosquittoConfig(workdir=tmp_path / "mosquitto"), binary=binary)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def _with_minilm_tokenizer(folder: Path) -> Path:
    """Copy the real MiniLM tokenizer next to a saved tiny model (its vocabulary: 30522)."""
    import shutil

    from quantization.models import minilm_path

    for name in TOKENIZER_FILES:
        source = minilm_path() / name
        if source.exists():
            shutil.copy(source, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT with random weights, saved as config.json + safetensors, with the
    real MiniLM tokenizer next to it: loads in milliseconds, for daemon tests whose subject
    is the protocol and the round lifecycle, not model quality."""
    from transformers import BertModel

    from quantization.models import save_checkpoint, tiny_bert_config

    folder = tmp_path_factory.mktemp("tiny-bert")
    model = BertModel(tiny_bert_config(vocab_size=30522, max_position_embeddings=128))
    save_checkpoint(model, folder)
    return _with_minilm_tokenizer(folder)


def _tiny_llama_checkpoint(folder: Path, seed: int, **overrides: object) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    from quantization.models import save_checkpoint, tiny_llama_config

    torch.manual_seed(seed)
    return save_checkpoint(LlamaForCausalLM(tiny_llama_config(**overrides)).eval(), folder)


@pytest.fixture(scope="session")
def tiny_llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaMA with tied embeddings, random weights (seed 0), no tokenizer."""
    return _tiny_llama_checkpoint(tmp_path_factory.mktemp("llama"), 0)


@pytest.fixture(scope="session")
def untied_llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaMA with an untied LM head, random weights (seed 1), no tokenizer."""
    return _tiny_llama_checkpoint(
        tmp_path_factory.mktemp("llama-untied"), 1, tie_word_embeddings=False
    )
