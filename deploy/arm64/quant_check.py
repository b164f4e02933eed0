"""Quantization checks that matter on ARM, run by deploy/arm64/build-and-test.sh --checks.

`dump OUT` (on the x86 host) writes weights and their nf4 / int8 codes, scales and
dequantized values to a safetensors file; `compare IN` (inside the arm64 root) quantizes
the same weights there and requires every tensor to be bit-identical, then checks that a
few LoRA steps on a tiny nf4 BERT lower the loss. Why: the agent's codes must not depend on
the CPU (an aggregate mixes x86 and ARM updates against one base), and aarch64 kernels
(NEON, different reduction orders) are where they could start to differ.

Command-line tool: prints its findings; no pickle (safetensors only).
"""

from __future__ import annotations

import platform
import sys

import torch
from safetensors.torch import load_file, save_file

from quantization.qlinear import Int8Linear, NF4Linear

SHAPES: dict[str, tuple[int, int]] = {"square": (384, 384), "wide": (1536, 384), "odd": (96, 640)}
"""MiniLM-L6 projection shapes, plus one not a multiple of 128 columns."""


def _weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(17)
    return {
        name: torch.randn(shape, generator=generator) * 0.05  # (out, in)
        for name, shape in SHAPES.items()
    }


def quantized_tensors(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every code, scale and dequantized weight, by a name saying which."""
    out: dict[str, torch.Tensor] = {}
    for name, weight in weights.items():
        nf4 = NF4Linear.from_weight(weight)
        int8 = Int8Linear.from_weight(weight)
        out[f"{name}.nf4_packed"] = nf4.nf4_packed.contiguous()
        out[f"{name}.nf4_scales"] = nf4.nf4_scales.contiguous()
        out[f"{name}.nf4_dequantized"] = nf4.dequantize().contiguous()
        out[f"{name}.int8_weight"] = int8.int8_weight.contiguous()
        out[f"{name}.int8_scales"] = int8.int8_scales.contiguous()
        out[f"{name}.int8_dequantized"] = int8.dequantize().contiguous()
    return out


def dump(path: str) -> None:
    weights = _weights()
    tensors = {f"{name}.weight": w.contiguous() for name, w in weights.items()}
    tensors.update(quantized_tensors(weights))
    save_file(tensors, path, metadata={"machine": platform.machine(), "torch": torch.__version__})
    print(f"wrote {len(tensors)} tensors from {platform.machine()} to {path}")


def compare(path: str) -> int:
    reference = load_file(path)
    weights = {name: reference[f"{name}.weight"] for name in SHAPES}
    ours = quantized_tensors(weights)
    mismatches = [name for name, tensor in ours.items() if not torch.equal(tensor, reference[name])]
    print(
        f"{platform.machine()}: {len(ours) - len(mismatches)}/{len(ours)} nf4/int8 tensors "
        f"bit-identical to the reference"
    )
    for name in mismatches:
        difference = (ours[name].float() - reference[name].float()).abs().max().item()
        print(f"  MISMATCH {name}: max abs difference {difference:.3g}")
    losses = lora_losses()
    lowered = losses[-1] < losses[0]
    print(
        f"nf4 tiny-BERT LoRA steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}: "
        f"{'lowered' if lowered else 'DID NOT LOWER'}"
    )
    return 0 if not mismatches and lowered else 1


def lora_losses(steps: int = 8) -> list[float]:
    """Loss of each step of LoRA training on a tiny nf4 BERT classifier (fixed batch)."""
    from transformers import BertForSequenceClassification

    from quantization.adapters import AdapterConfig, attach_adapter
    from quantization.models import tiny_bert_config
    from quantization.schemes import quantize_model

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(num_labels=2))
    model = attach_adapter(quantize_model(model, "nf4"), AdapterConfig(rank=4))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 256, (8, 16), generator=generator)  # (batch, seq)
    labels = torch.arange(8) % 2  # (batch,)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("dump", "compare"):
        print("usage: quant_check.py dump OUT.safetensors | compare IN.safetensors")
        return 2
    if sys.argv[1] == "dump":
        dump(sys.argv[2])
        return 0
    return compare(sys.argv[2])


if __name__ == "__main__":
    sys.exit(main())
