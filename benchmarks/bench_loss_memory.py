"""Peak memory of a causal-LM training step: plain HF loss vs chunked loss vs int8 embeddings.

Each variant runs in a fresh process: load SmolLM2-135M (nf4 GGUF), attach LoRA (rank 8),
reset the kernel's peak-RSS counter (/proc/self/clear_refs), then train `--steps` steps
(forward, backward, AdamW) on a batch of random tokens and report the peak RSS of the step
(VmHWM) and its growth over the RSS before it. Linux only. With `--gradient-checkpointing`
the decoder keeps only each layer's input, so the logits become the largest part of the step.

    python benchmarks/bench_loss_memory.py --batch 4 --seq 128 --threads 2
    python benchmarks/bench_loss_memory.py --batch 4 --seq 128 --threads 2 --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

VARIANTS = ("plain", "chunked", "chunked+int8-embeddings")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _worker(
    variant: str, batch: int, seq: int, steps: int, threads: int, checkpointing: bool
) -> dict[str, float]:
    import torch

    from quantization.adapters import AdapterConfig, attach_adapter
    from quantization.causal_lm_loss import chunked_causal_lm_loss
    from quantization.embeddings import quantize_embeddings
    from quantization.loader import load_quantized
    from quantization.models import smollm2_gguf_path

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = load_quantized(smollm2_gguf_path(), "nf4")
    if variant.endswith("int8-embeddings"):
        quantize_embeddings(base)
    model = attach_adapter(base, AdapterConfig(rank=8)).train()
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    for _ in range(steps):
        if variant == "plain":
            loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = chunked_causal_lm_loss(model, ids, labels=ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = (time.perf_counter() - start) / steps
    peak = _status_kb("VmHWM")
    return {
        "rss_before_mb": before / 1024,
        "peak_mb": peak / 1024,
        "step_growth_mb": (peak - before) / 1024,
        "seconds_per_step": seconds,
        "loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--worker", choices=VARIANTS)
    args = parser.parse_args()
    if args.worker:
        result = _worker(
            args.worker,
            args.batch,
            args.seq,
            args.steps,
            args.threads,
            args.gradient_checkpointing,
        )
        sys.stdout.write(json.dumps(result) + "\n")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--worker", variant]
        for flag in ("batch", "seq", "steps", "threads"):
            command += [f"--{flag}", str(getattr(args, flag))]
        if args.gradient_checkpointing:
            command.append("--gradient-checkpointing")
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        logger.info(
            "%-24s batch %d x %d%s: RSS before step %.0f MB, peak %.0f MB (+%.0f MB), "
            "%.1f s/step, loss %.3f",
            variant,
            args.batch,
            args.seq,
            " (gradient checkpointing)" if args.gradient_checkpointing else "",
            result["rss_before_mb"],
            result["peak_mb"],
            result["step_growth_mb"],
            result["seconds_per_step"],
            result["loss"],
        )


if __name__ == "__main__":
    main()
