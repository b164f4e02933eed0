"""Peak live tensor bytes of one training step: plain HF loss vs chunked loss vs int8 embeddings.

Unlike peak RSS (bench_loss_memory.py), which also counts what glibc keeps after a free, this
sums the CPU allocator's own alloc/free events (torch.profiler, profile_memory=True) in time
order: the exact high-water mark of tensors created during forward + backward, excluding the
model's own weights. The model has SmolLM2-135M's shape (vocab 49,152, hidden 576, MLP
1536, 9/3 heads; random weights, nf4) with `LAYERS` layers, LoRA rank 8, batch 4 x 128.

    python benchmarks/bench_loss_live_memory.py 30 nogc
    python benchmarks/bench_loss_live_memory.py 30 gc      # with gradient checkpointing
"""

from __future__ import annotations

import logging
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from quantization.adapters import AdapterConfig, attach_adapter
from quantization.bench_worker import peak_live_tensor_bytes
from quantization.causal_lm_loss import chunked_causal_lm_loss
from quantization.embeddings import quantize_embeddings
from quantization.models import tiny_llama_config
from quantization.schemes import quantize_model

logger = logging.getLogger(__name__)


def main() -> None:
    from transformers import LlamaForCausalLM

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    layers, checkpointing = int(sys.argv[1]), sys.argv[2] == "gc"
    torch.set_num_threads(2)
    config = tiny_llama_config(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
    )
    ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))
    for variant in ("plain", "chunked", "chunked+int8-embeddings"):
        torch.manual_seed(0)
        base = quantize_model(LlamaForCausalLM(config), "nf4")
        if variant.endswith("embeddings"):
            quantize_embeddings(base)
        model = attach_adapter(base, AdapterConfig(rank=8)).train()
        if checkpointing:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            if variant == "plain":
                loss = model(input_ids=ids, labels=ids).loss
            else:
                loss = chunked_causal_lm_loss(model, ids, labels=ids)
            loss.backward()
        weights = sum(t.numel() * t.element_size() for t in [*base.parameters(), *base.buffers()])
        logger.info(
            "%-24s %d layers%s: peak live step tensors %.0f MiB (model weights %.0f MiB)",
            variant,
            layers,
            ", gradient checkpointing" if checkpointing else "",
            peak_live_tensor_bytes(prof) / 2**20,
            weights / 2**20,
        )
        del model, base, prof


if __name__ == "__main__":
    main()
