"""int8 embeddings and the chunked loss on the real SmolLM2-135M (49,152-token tied vocabulary)."""

from __future__ import annotations

import os

import pytest
import torch

from quantization.causal_lm_loss import chunked_causal_lm_loss
from quantization.embeddings import Int8Embedding, quantize_embeddings
from quantization.loader import load_quantized
from quantization.models import load_tokenizer, smollm2_gguf_path

pytestmark = [pytest.mark.slow, pytest.mark.quantization]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = (
    "The water cycle describes how water evaporates from the surface of the earth, rises "
    "into the atmosphere, cools and condenses into clouds, and falls again as rain or snow."
)


def test_smollm2_int8_embeddings_keep_predictions_and_the_loss() -> None:
    tokenizer = load_tokenizer(smollm2_gguf_path())
    batch = dict(tokenizer([TEXT], return_tensors="pt"))
    batch["labels"] = batch["input_ids"]
    model = load_quantized(smollm2_gguf_path(), "nf4")
    with torch.no_grad():
        want = model(**batch)
        before = model.model.embed_tokens.weight.numel() * 4
        quantize_embeddings(model)
        got = model(**batch)
        chunked = chunked_causal_lm_loss(model, **batch, chunk_size=16)
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, Int8Embedding)
    assert embedding.quantized_nbytes() < 0.26 * before  # 113 MB -> 28 MB
    relative = ((got.logits - want.logits).norm() / want.logits.norm()).item()
    agreement = (got.logits.argmax(-1) == want.logits.argmax(-1)).float().mean().item()
    assert relative < 0.05 and agreement > 0.9, (relative, agreement)
    assert abs(got.loss.item() - want.loss.item()) < 0.05 * want.loss.item()
    assert abs(chunked.item() - got.loss.item()) < 1e-4 * got.loss.item()
