"""Chunked causal-LM loss: equal to HF's loss and gradients, without full-size logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from quantization.adapters import AdapterConfig, attach_adapter
from quantization.causal_lm_loss import ChunkedLossError, chunked_causal_lm_loss
from quantization.embeddings import quantize_embeddings
from quantization.loader import load_quantized
from quantization.models import tiny_llama_config

pytestmark = pytest.mark.quantization

# LoRA B starts at zero by default, which would make every gradient but B's trivially equal.
RANDOM_LORA = {"init_lora_weights": False}


def _padded_batch(padding_side: str = "right") -> dict[str, torch.Tensor]:
    """3 sequences of 12 tokens, two of them padded (labels -100 there, as causal_lm_batch)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 256, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, length in ((1, 8), (2, 3)):
        if padding_side == "right":
            attention_mask[row, length:] = 0
        else:
            attention_mask[row, : 12 - length] = 0
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _model(folder: Path, scheme: str, embeddings: bool, **adapter: Any) -> nn.Module:
    torch.manual_seed(0)
    base = load_quantized(folder, scheme)
    if embeddings:
        quantize_embeddings(base)
    model = attach_adapter(base, AdapterConfig(rank=4, extra=RANDOM_LORA, **adapter))
    model.train()
    return model


def _loss_and_grads(
    model: nn.Module, compute: Any, batch: dict[str, torch.Tensor]
) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = compute(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def _assert_same(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int) -> None:
    want, want_grads = _loss_and_grads(model, lambda b: model(**b).loss, batch)
    got, got_grads = _loss_and_grads(
        model, lambda b: chunked_causal_lm_loss(model, **b, chunk_size=chunk_size), batch
    )
    assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (got, want)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize(
    ("scheme", "embeddings"), [("none", False), ("nf4", False), ("nf4", True), ("int8", True)]
)
def test_loss_and_lora_gradients_equal_hf_loss(
    tiny_llama_checkpoint: Path, scheme: str, embeddings: bool, padding_side: str
) -> None:
    model = _model(tiny_llama_checkpoint, scheme, embeddings)
    _assert_same(model, _padded_batch(padding_side), chunk_size=5)


@pytest.mark.parametrize("chunk_size", [1, 7, 36, 4096])
def test_any_chunk_size_gives_the_same_loss(tiny_llama_checkpoint: Path, chunk_size: int) -> None:
    _assert_same(_model(tiny_llama_checkpoint, "nf4", True), _padded_batch(), chunk_size)


@pytest.mark.parametrize(
    ("untied", "embeddings"), [(False, False), (False, True), (True, False), (True, True)]
)
def test_lora_on_the_lm_head_trains_the_same(
    tiny_llama_checkpoint: Path, untied_llama_checkpoint: Path, untied: bool, embeddings: bool
) -> None:
    folder = untied_llama_checkpoint if untied else tiny_llama_checkpoint
    targets = ("q_proj", "v_proj", "lm_head")
    model = _model(folder, "int8", embeddings, target_modules=targets)
    assert any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)
    _assert_same(model, _padded_batch(), chunk_size=4)


@pytest.mark.parametrize("embeddings", [False, True])
def test_a_frozen_head_runs_once_per_chunk(tiny_llama_checkpoint: Path, embeddings: bool) -> None:
    """A frozen head (the agent's case) is not recomputed in backward: one head call per chunk
    for forward and backward together, as HF's loss makes one for the whole batch. A head
    that trains keeps the recompute (two calls per chunk), which its weight gradient needs."""
    batch, chunk_size = _padded_batch(), 4
    chunks = -(-int((batch["labels"][:, 1:] != -100).sum()) // chunk_size)
    for targets, calls_per_chunk in ((("q_proj", "v_proj"), 1), (("q_proj", "lm_head"), 2)):
        model = _model(tiny_llama_checkpoint, "int8", embeddings, target_modules=targets)
        calls = []
        head = model.get_base_model().get_output_embeddings()
        handle = head.register_forward_hook(lambda *_, seen=calls: seen.append(1))
        chunked_causal_lm_loss(model, **batch, chunk_size=chunk_size).backward()
        handle.remove()
        assert len(calls) == calls_per_chunk * chunks, (targets, len(calls), chunks)


def test_with_gradient_checkpointing_of_the_decoder(tiny_llama_checkpoint: Path) -> None:
    """The other memory lever: the body's layers recompute in backward, the head chunks."""
    model = _model(tiny_llama_checkpoint, "nf4", True)
    model.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    _assert_same(model, _padded_batch(), chunk_size=6)


def test_labels_default_to_input_ids_and_eval_needs_no_graph(tiny_llama_checkpoint: Path) -> None:
    model = _model(tiny_llama_checkpoint, "nf4", True).eval()
    ids = _padded_batch()["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids, labels=ids).loss
        got = chunked_causal_lm_loss(model, ids)
    assert not got.requires_grad
    assert abs(got.item() - want.item()) < 1e-5


def test_micro_batches_with_num_items_add_up_to_the_whole_batch(
    tiny_llama_checkpoint: Path,
) -> None:
    model = _model(tiny_llama_checkpoint, "nf4", True)
    batch = _padded_batch()
    _, whole = _loss_and_grads(model, lambda b: chunked_causal_lm_loss(model, **b), batch)
    count = int((batch["labels"][:, 1:] != -100).sum())
    model.zero_grad(set_to_none=True)
    for rows in (slice(0, 1), slice(1, 3)):
        part = {k: v[rows] for k, v in batch.items()}
        chunked_causal_lm_loss(model, **part, num_items_in_batch=count).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, whole[name], rtol=1e-4, atol=1e-6)


def test_under_bf16_autocast_matches_hf_loss(tiny_llama_checkpoint: Path) -> None:
    model = _model(tiny_llama_checkpoint, "nf4", True)
    batch = _padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = _loss_and_grads(model, lambda b: model(**b).loss, batch)
        got, got_grads = _loss_and_grads(
            model, lambda b: chunked_causal_lm_loss(model, **b, chunk_size=5), batch
        )
    assert abs(got - want) < 1e-3 * abs(want), (got, want)
    for name, grad in want_grads.items():
        cosine = torch.nn.functional.cosine_similarity(
            got_grads[name].flatten(), grad.flatten(), dim=0
        )
        assert cosine > 0.99, (name, cosine)


def test_a_batch_without_labels_is_a_clear_error(tiny_llama_checkpoint: Path) -> None:
    model = _model(tiny_llama_checkpoint, "nf4", False)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ChunkedLossError, match="no position"):
        chunked_causal_lm_loss(model, ids, labels=torch.full_like(ids, -100))
    with pytest.raises(ChunkedLossError, match="chunk_size"):
        chunked_causal_lm_loss(model, ids, chunk_size=0)


# -- memory ---------------------------------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    """Records the bytes of the largest tensor any op creates (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel() * tensor.element_size())
        return out


VOCAB_HEAVY = dict(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=1)


def test_no_tensor_is_as_large_as_the_full_logits() -> None:
    """Deterministic memory check: with the plain loss some tensor holds B*T*V fp32 values
    (the logits, their softmax or gradient); with the chunked loss none exceeds a chunk's."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(**VOCAB_HEAVY)).eval()
    for param in base.parameters():
        param.requires_grad_(False)
    model = attach_adapter(base, AdapterConfig(rank=4)).train()
    batch_size, seq_len, chunk_size, vocab = 4, 64, 32, VOCAB_HEAVY["vocab_size"]
    ids = torch.randint(0, vocab, (batch_size, seq_len))
    full_logits = batch_size * seq_len * vocab * 4
    for chunked in (False, True):
        with _LargestTensor() as tracker:
            if chunked:
                loss = chunked_causal_lm_loss(model, ids, labels=ids, chunk_size=chunk_size)
            else:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        if chunked:
            assert tracker.largest <= chunk_size * vocab * 4, tracker.largest
        else:
            assert tracker.largest >= full_logits, tracker.largest


def _peak_live_step_bytes(model: nn.Module, ids: torch.Tensor, chunked: bool) -> int:
    """High-water mark of tensors alive during forward + backward, from the CPU allocator's
    own events (torch.profiler): exact and repeatable, unlike peak RSS, which also counts
    whatever glibc keeps after a free (benchmarks/bench_loss_live_memory.py does the same)."""
    from torch.profiler import ProfilerActivity, profile

    from quantization.bench_worker import peak_live_tensor_bytes

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if chunked:
            loss = chunked_causal_lm_loss(model, ids, labels=ids)
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return peak_live_tensor_bytes(prof)


@pytest.mark.slow
def test_peak_live_memory_of_a_training_step_drops() -> None:
    """8 x 128 positions x 32,000 vocabulary make 131 MB per fp32 logits tensor: the plain
    loss holds several of them at once (logits, log-softmax, their gradient), the chunked one
    at most one 128-position chunk's (16 MB) plus the rest of the step."""
    from transformers import LlamaForCausalLM

    from quantization.models import tiny_llama_config

    config = tiny_llama_config(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1
    )
    ids = torch.randint(0, 32000, (8, 128), generator=torch.Generator().manual_seed(0))
    peaks = {}
    for chunked in (False, True):
        torch.manual_seed(0)
        base = LlamaForCausalLM(config).eval()
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        model = attach_adapter(base, AdapterConfig(rank=4)).train()
        peaks[chunked] = _peak_live_step_bytes(model, ids, chunked)
    logits = 8 * 128 * 32000 * 4
    assert peaks[False] > 2 * logits, peaks
    assert peaks[True] < 0.5 * logits, peaks
