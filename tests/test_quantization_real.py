"""Quantization on the real base models: MiniLM-L6 (encoder) and SmolLM2-135M (GGUF decoder)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from quantization.adapters import AdapterConfig, attach_adapter, load_adapter, save_adapter
from quantization.loader import load_quantized
from quantization.models import load_tokenizer, mean_pool, minilm_path, smollm2_gguf_path
from quantization.schemes import Scheme, available_schemes, is_quantized_linear, quantize_model

pytestmark = [pytest.mark.slow, pytest.mark.quantization]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUANTIZING = [s for s, r in available_schemes().items() if r is None and s is not Scheme.NONE]

# Real MiniLM weights have outlier rows, unlike random ones: per-row int8 reaches ~0.021
# relative error on the worst layer (encoder.layer.0.output.dense), NF4 ~0.10.
WEIGHT_BOUND = {Scheme.NF4: 0.12, Scheme.BNB_NF4: 0.12, Scheme.INT8: 0.03, Scheme.BNB_INT8: 0.03}
# Minimum cosine between quantized and fp32 mean-pooled sentence embeddings (measured:
# nf4 0.973, bnb-nf4 0.974, int8 0.9996, bnb-int8 0.997).
COSINE_BOUND = {Scheme.NF4: 0.95, Scheme.BNB_NF4: 0.95, Scheme.INT8: 0.995, Scheme.BNB_INT8: 0.99}
# Share of next-token argmax predictions on real text equal to the fp32 model's.
AGREEMENT_BOUND = {Scheme.NF4: 0.6, Scheme.BNB_NF4: 0.6, Scheme.INT8: 0.85, Scheme.BNB_INT8: 0.85}

SENTENCES = [
    "The cat sat on the mat.",
    "Federated learning keeps student data on the device.",
    "Photosynthesis turns light into chemical energy.",
    "The train to the city leaves at nine.",
    "I really enjoyed this lesson about fractions.",
    "This homework was boring and far too long.",
]
TEXT = (
    "The water cycle describes how water evaporates from the surface of the earth, rises "
    "into the atmosphere, cools and condenses into clouds, and falls again as rain or snow. "
    "Students can observe this process with a simple experiment using a bowl of water."
)


@pytest.fixture(scope="module")
def minilm() -> tuple[nn.Module, object, dict[str, torch.Tensor]]:
    from transformers import AutoModel

    tokenizer = load_tokenizer(minilm_path())
    reference = AutoModel.from_pretrained(str(minilm_path())).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return reference, tokenizer, batch


def _restored_weight(module: nn.Module, in_features: int) -> torch.Tensor:
    if hasattr(module, "dequantize"):
        return module.dequantize()
    with torch.no_grad():  # bitsandbytes: W = (f(I) - b).T
        out = module(torch.eye(in_features))
    return (out - (0 if module.bias is None else module.bias)).T


@pytest.mark.parametrize("scheme", QUANTIZING, ids=lambda s: s.value)
def test_minilm_weights_and_embeddings_close_to_full_precision(scheme: Scheme, minilm) -> None:  # noqa: ANN001
    reference, _, batch = minilm
    model = load_quantized(minilm_path(), scheme, task="embedding")
    reference_modules = dict(reference.named_modules())
    checked = 0
    for name, module in model.named_modules():
        if is_quantized_linear(module):
            weight = reference_modules[name].weight
            restored = _restored_weight(module, weight.shape[1])
            error = ((restored - weight).norm() / weight.norm()).item()
            assert error < WEIGHT_BOUND[scheme], (name, error)
            checked += 1
    assert checked == 6 * 6 + 1  # q, k, v, attn-out, ffn-in, ffn-out per layer, + pooler
    with torch.no_grad():
        want = mean_pool(reference(**batch).last_hidden_state, batch["attention_mask"])
        got = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    cosine = torch.nn.functional.cosine_similarity(got, want).min().item()
    assert cosine >= COSINE_BOUND[scheme], cosine


def test_minilm_nf4_classifier_learns_and_adapter_loads_on_plain_model(
    minilm,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    _, tokenizer, batch = minilm
    labels = torch.tensor([1, 1, 1, 0, 1, 0])
    torch.manual_seed(0)
    model = attach_adapter(
        load_quantized(minilm_path(), "nf4", task="classification", num_labels=2),
        AdapterConfig(rank=8),
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(24):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses
    model.eval()
    folder = save_adapter(model, tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=2)
    plain = PeftModel.from_pretrained(base.eval(), str(folder)).eval()
    fp_ours = attach_adapter(
        load_quantized(minilm_path(), "none", task="classification", num_labels=2),
        AdapterConfig(rank=8),
    ).eval()
    load_adapter(fp_ours, folder)
    with torch.no_grad():
        plain_logits = plain(**batch).logits
        torch.testing.assert_close(fp_ours(**batch).logits, plain_logits, rtol=1e-4, atol=1e-4)
        # The nf4 model's own logits differ from full precision only by quantization error.
        assert (model(**batch).logits - plain_logits).abs().max().item() < 0.5


@pytest.fixture(scope="module")
def smollm2() -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor]]:
    tokenizer = load_tokenizer(smollm2_gguf_path())
    reference = load_quantized(smollm2_gguf_path(), "none")
    nf4 = load_quantized(smollm2_gguf_path(), "nf4")
    batch = tokenizer([TEXT], return_tensors="pt")
    return reference, nf4, batch


@pytest.mark.parametrize("scheme", QUANTIZING, ids=lambda s: s.value)
def test_smollm2_next_token_predictions_mostly_agree(scheme: Scheme, smollm2) -> None:  # noqa: ANN001
    reference, nf4, batch = smollm2
    if scheme is Scheme.NF4:
        model = nf4  # the streaming GGUF path
    else:
        model = quantize_model(copy.deepcopy(reference), scheme)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        want = reference(**batch).logits.argmax(-1)
        got = model(**batch).logits.argmax(-1)
    agreement = (got == want).float().mean().item()
    assert agreement >= AGREEMENT_BOUND[scheme], agreement


def test_smollm2_nf4_lora_lowers_loss(smollm2) -> None:  # noqa: ANN001
    _, nf4, batch = smollm2
    torch.manual_seed(0)
    model = attach_adapter(copy.deepcopy(nf4), AdapterConfig(rank=8))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    ids = batch["input_ids"][:, :24]
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable)


def test_smollm2_task_model_parses_its_gguf_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights, config and tokenizer come from one parse of the GGUF header (issue 19: it
    was parsed three times, ~8 s each on this machine)."""
    import gguf

    from quantization.adapters import AdapterConfig
    from quantization.task_model import TaskModelSpec, build_task_model

    parses: list[str] = []
    original = gguf.GGUFReader

    class CountingReader(original):  # type: ignore[misc, valid-type]
        def __init__(self, path: object, *args: object, **kwargs: object) -> None:
            parses.append(str(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    spec = TaskModelSpec("t", "causal-lm", "smollm2-135m", "nf4", AdapterConfig(rank=4))
    model, tokenizer = build_task_model(spec)
    assert parses == [str(smollm2_gguf_path())]
    assert tokenizer("photosynthesis")["input_ids"]
    assert any("lora_" in name for name, _ in model.named_parameters())
    assert gguf.GGUFReader is CountingReader  # the shortcut is undone after the load
