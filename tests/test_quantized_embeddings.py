"""int8 token embeddings and LM heads: bounded error, a quarter of the bytes, tying kept."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from quantization.adapters import AdapterConfig, attach_adapter, get_adapter_state
from quantization.causal_lm_loss import chunked_causal_lm_loss
from quantization.embeddings import (
    Int8Embedding,
    Int8LMHead,
    int8_quantize_rows,
    quantize_embeddings,
)
from quantization.loader import load_quantized
from quantization.models import save_checkpoint, tiny_bert_config, tiny_llama_config
from quantization.qlinear import Int8Linear
from quantization.task_model import TaskModelSpec, _quantizes_embeddings, build_task_model

pytestmark = pytest.mark.quantization


@pytest.fixture(scope="module")
def tokenized_llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with MiniLM's tokenizer next to it (vocabulary sized to fit it)."""
    from transformers import LlamaForCausalLM

    from quantization.models import minilm_path

    torch.manual_seed(2)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=30522)).eval()
    folder = save_checkpoint(model, tmp_path_factory.mktemp("llama-tok"))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_path() / name).exists():
            shutil.copy(minilm_path() / name, folder / name)
    return folder


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def test_lookup_error_is_at_most_half_a_step_per_row() -> None:
    torch.manual_seed(0)
    table = nn.Embedding(300, 48)
    table.weight.data[7] *= 50  # an outlier row gets its own, larger scale
    quantized = Int8Embedding.from_embedding(table)
    ids = torch.tensor([[0, 7, 299, 7], [1, 2, 3, 4]])
    got, want = quantized(ids), table(ids).detach()
    assert got.shape == want.shape and got.dtype == torch.float32
    step = quantized.int8_scales[ids].unsqueeze(-1)  # (2, 4, 1)
    assert ((got - want).abs() <= step * (0.5 + 1e-5)).all()  # the max element: exactly 1/2
    torch.testing.assert_close(quantized.dequantize()[ids], got)


def test_row_blocks_give_exactly_int8_linear_codes() -> None:
    torch.manual_seed(0)
    weight = torch.randn(5000, 16)  # more rows than one quantization step
    codes, scales = int8_quantize_rows(weight)
    reference = Int8Linear.from_weight(weight)
    assert torch.equal(codes, reference.int8_weight)
    assert torch.equal(scales, reference.int8_scales)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_tied_logits_close_and_one_int8_storage(tiny_llama_checkpoint: Path, scheme: str) -> None:
    fp32_embeddings = load_quantized(tiny_llama_checkpoint, scheme)
    model = quantize_embeddings(load_quantized(tiny_llama_checkpoint, scheme))
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, Int8Embedding) and isinstance(head, Int8LMHead)
    assert head.is_tied and head._codes()[0].data_ptr() == embedding.int8_weight.data_ptr()
    assert _relative(_logits(model), _logits(fp32_embeddings)) < 1e-2
    # no fp32 copy of the vocabulary matrix anywhere, and state_dict holds it once
    vocab, hidden = 256, 64
    assert not any(
        t.shape == (vocab, hidden) and t.is_floating_point() for t in model.state_dict().values()
    )
    assert [k for k in model.state_dict() if "embed" in k or "lm_head" in k] == [
        "model.embed_tokens.int8_weight",
        "model.embed_tokens.int8_scales",
    ]
    fp32_bytes = vocab * hidden * 4
    assert embedding.quantized_nbytes() == vocab * hidden + vocab * 4  # ~1/4 (+ row scales)
    assert embedding.quantized_nbytes() <= fp32_bytes * (0.25 + 1 / hidden)
    assert head.quantized_nbytes() == 0  # reads the embedding's rows


def test_tying_survives_deepcopy_and_moves(tiny_llama_checkpoint: Path) -> None:
    model = quantize_embeddings(load_quantized(tiny_llama_checkpoint, "nf4"))
    copied = copy.deepcopy(model)
    assert copied.lm_head._tied_to is copied.model.embed_tokens
    assert "lm_head._tied_to" not in dict(copied.named_modules())
    copied.to(torch.float32)  # .to() touches only registered buffers; the head follows them
    torch.testing.assert_close(_logits(copied), _logits(model))


def test_untied_frozen_head_gets_its_own_int8_rows(untied_llama_checkpoint: Path) -> None:
    reference = load_quantized(untied_llama_checkpoint, "int8")
    model = quantize_embeddings(load_quantized(untied_llama_checkpoint, "int8"))
    head = model.get_output_embeddings()
    assert isinstance(head, Int8LMHead) and not head.is_tied
    assert head.int8_weight.data_ptr() != model.model.embed_tokens.int8_weight.data_ptr()
    assert _relative(_logits(model), _logits(reference)) < 1e-2


@pytest.mark.parametrize("tied", [True, False])
def test_loader_quantizes_vocabulary_as_it_streams(
    tiny_llama_checkpoint: Path, untied_llama_checkpoint: Path, tied: bool
) -> None:
    """Same modules and codes as quantize_embeddings after loading, tying kept."""
    folder = tiny_llama_checkpoint if tied else untied_llama_checkpoint
    after_load = quantize_embeddings(load_quantized(folder, "nf4"))
    streamed = load_quantized(folder, "nf4", int8_vocabulary=True)
    embedding, head = streamed.get_input_embeddings(), streamed.get_output_embeddings()
    assert isinstance(embedding, Int8Embedding) and isinstance(head, Int8LMHead)
    assert head.is_tied is tied
    want, got = after_load.state_dict(), streamed.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    torch.testing.assert_close(_logits(streamed), _logits(after_load))


def test_streamed_vocabulary_is_never_made_fp32(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A bf16 checkpoint's vocabulary goes to int8 from bf16 (a block of rows at a time), and a
    tied checkpoint that stores the head too gets the head on the embedding's rows."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from quantization import loader

    torch.manual_seed(3)
    model = LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16).eval()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert "lm_head.weight" in state  # the tied copy is written as well (some exports do)
    model.config.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"))
    dtypes: list[torch.dtype] = []

    def recorded(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtypes.append(weight.dtype)
        return int8_quantize_rows(weight)

    monkeypatch.setattr(loader, "int8_quantize_rows", recorded)
    streamed = load_quantized(tmp_path, "nf4", int8_vocabulary=True)
    assert dtypes == [torch.bfloat16]  # the embedding once; the tied head's copy dropped
    assert streamed.get_output_embeddings().is_tied
    codes, scales = int8_quantize_rows(state["model.embed_tokens.weight"].float())
    assert torch.equal(streamed.model.embed_tokens.int8_weight, codes)
    assert torch.equal(streamed.model.embed_tokens.int8_scales, scales)


def test_head_matmul_in_blocks_matches_one_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    import quantization.embeddings as embeddings

    monkeypatch.setattr(embeddings, "HEAD_BLOCK_ROWS", 7)  # uneven last block
    torch.manual_seed(0)
    linear = nn.Linear(16, 50, bias=False)
    head = Int8LMHead.from_linear(linear)
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = head(x)
    torch.testing.assert_close(y, x @ head.dequantize().T)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    torch.testing.assert_close(grad, (2 * y) @ head.dequantize(), rtol=1e-5, atol=1e-5)


def test_classification_head_stays_fp32_and_trains(tmp_path: Path) -> None:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    folder = save_checkpoint(BertForSequenceClassification(tiny_bert_config()), tmp_path)
    model = quantize_embeddings(load_quantized(folder, "nf4", task="classification"))
    assert isinstance(model.get_input_embeddings(), Int8Embedding)
    assert type(model.classifier) is nn.Linear
    peft_model = attach_adapter(model, AdapterConfig(rank=2))
    assert any("classifier" in n for n, p in peft_model.named_parameters() if p.requires_grad)


def test_adapter_names_unchanged_and_loss_goes_down(tiny_llama_checkpoint: Path) -> None:
    def adapter(embeddings: bool) -> nn.Module:
        torch.manual_seed(0)
        base = load_quantized(tiny_llama_checkpoint, "nf4")
        return attach_adapter(quantize_embeddings(base) if embeddings else base, AdapterConfig())

    plain, model = adapter(False), adapter(True)
    assert sorted(get_adapter_state(model)) == sorted(get_adapter_state(plain))
    assert not any("embed" in n or "lm_head" in n for n in get_adapter_state(model))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8] * 2] * 4)
    losses = []
    for _ in range(15):
        loss = chunked_causal_lm_loss(model, ids, labels=ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert isinstance(model.get_base_model().model.embed_tokens, Int8Embedding)


def test_trained_or_vocab_modules_are_never_quantized(tiny_llama_checkpoint: Path) -> None:
    base = load_quantized(tiny_llama_checkpoint, "none")
    base.lm_head.weight.requires_grad_(True)  # e.g. a fully trained tied head
    assert type(quantize_embeddings(base).model.embed_tokens) is nn.Embedding


def _spec(scheme: str, folder: Path, **fields: object) -> TaskModelSpec:
    fields.setdefault("adapter", AdapterConfig(rank=2))
    return TaskModelSpec("t", "causal-lm", str(folder), scheme, **fields)  # type: ignore[arg-type]


def test_task_spec_opts_out_and_scheme_none_keeps_fp32(tokenized_llama_folder: Path) -> None:
    folder = tokenized_llama_folder
    assert _quantizes_embeddings(_spec("nf4", folder))
    assert not _quantizes_embeddings(_spec("none", folder))
    assert not _quantizes_embeddings(_spec("nf4", folder, quantize_embeddings=False))
    trained_head = AdapterConfig(rank=2, modules_to_save=("lm_head",))
    assert not _quantizes_embeddings(_spec("int8", folder, adapter=trained_head))
    model, tokenizer = build_task_model(_spec("nf4", folder))
    assert isinstance(model.get_base_model().model.embed_tokens, Int8Embedding)
    model, _ = build_task_model(_spec("nf4", folder, quantize_embeddings=False))
    assert type(model.get_base_model().model.embed_tokens) is nn.Embedding
