"""Training step time and peak RSS: full fine-tuning vs LoRA on fp32 / nf4 / int8 (/ bnb) bases.

Each configuration runs in its own subprocess (peak RSS is per process), one at a time, with
an explicit torch thread count, batch 4 x sequence 128. Ratios quoted in results come from a
single run of this script.

    python benchmarks/bench_training.py --threads 2 --output bench-out/training.md
    python benchmarks/bench_training.py --only smollm2      # one model family
    python benchmarks/bench_training.py --skip-1b           # without the 1.1B checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

BATCH, SEQUENCE = 4, 128
MODES = [
    "full-fp32",
    "lora-fp32",
    "lora-nf4",
    "lora-int8",
    "lora-bnb-nf4",
    "lora-bnb-int8",
    "lora-nf4-gc",
]
"""`-gc` = with gradient checkpointing (recompute each layer in backward): the setting for
devices where activations, not weights, are the memory limit."""


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _worker(
    model_name: str,
    mode: str,
    source: str,
    steps: int,
    warmup: int,
    gradient_checkpointing: bool = False,
) -> dict:
    """Load, train `warmup + steps` steps, report median step time and peak RSS."""
    import torch

    from quantization.adapters import AdapterConfig, attach_adapter
    from quantization.loader import load_quantized

    torch.manual_seed(0)
    task = "causal-lm" if model_name != "minilm" else "classification"
    gradient_checkpointing = gradient_checkpointing or mode.endswith("-gc")
    scheme = "none" if mode.endswith("fp32") else mode.removeprefix("lora-").removesuffix("-gc")
    t0 = time.perf_counter()
    model = load_quantized(source, scheme, task=task, num_labels=2 if task != "causal-lm" else None)
    load_s = time.perf_counter() - t0
    rss_after_load = _peak_rss_mb()
    if gradient_checkpointing:
        # Recompute each decoder layer in backward: activations of 22 layers at batch 4 x 128
        # would otherwise take ~1.7 GB on the 1.1B model, more than its quantized weights.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "full-fp32":
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        model = attach_adapter(model, AdapterConfig(rank=8, alpha=16))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (BATCH, SEQUENCE), generator=generator)
    labels = ids if task == "causal-lm" else torch.tensor([0, 1, 0, 1])
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return {
        "model": model_name,
        "mode": mode,
        "step_s": statistics.median(times),
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_load_mb": rss_after_load,
        "load_s": load_s,
        "trainable_params": sum(p.numel() for p in trainable),
        "loss": float(loss.item()),
        "gradient_checkpointing": gradient_checkpointing,
    }


def _run_worker(
    args: argparse.Namespace, model: str, mode: str, source: Path, steps: int, warmup: int
) -> dict | None:
    command = [
        sys.executable,
        __file__,
        "--worker",
        model,
        mode,
        str(source),
        "--threads",
        str(args.threads),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
    ] + (["--gradient-checkpointing"] if model == "llama-1.1b" else [])
    print(f"  running {model} {mode} ...", file=sys.stderr, flush=True)
    env = dict(os.environ)
    if args.malloc_mmap_threshold:
        # glibc otherwise raises its mmap threshold up to 32 MiB as tensors are freed, and
        # activations then fragment the heap: RSS stays at the high-water mark of every
        # step. A fixed threshold returns freed tensors >= 1 MiB to the OS. Same for all modes.
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"  {model} {mode} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def _prepare_smollm2(workdir: Path) -> Path:
    """Convert the GGUF once to a safetensors folder so every mode streams the same file."""
    folder = workdir / "smollm2"
    if not (folder / "config.json").is_file():
        code = (
            "from quantization.loader import load_quantized\n"
            "from quantization.models import smollm2_gguf_path, save_checkpoint\n"
            f"save_checkpoint(load_quantized(smollm2_gguf_path(), 'none'), {str(folder)!r})\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
    return folder


def _prepare_1b(workdir: Path) -> Path:
    folder = workdir / "llama-1.1b"
    if not (folder / "config.json").is_file():
        code = (
            "import torch\n"
            "from quantization.models import llama_1b_config, write_random_checkpoint\n"
            f"write_random_checkpoint(llama_1b_config(), {str(folder)!r}, dtype=torch.bfloat16)\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
    return folder


def _table(results: list[dict]) -> str:
    rows = [
        "| model | mode | step time (s) | peak RSS (MB) | RSS after load (MB) | load (s) "
        "| trainable params |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        rows.append(
            f"| {r['model']} | {r['mode']} | {r['step_s']:.3f} | {r['peak_rss_mb']:.0f} "
            f"| {r['rss_after_load_mb']:.0f} | {r['load_s']:.1f} | {r['trainable_params']:,} |"
        )
    return "\n".join(rows)


def _ratios(results: list[dict]) -> list[str]:
    lines = []
    for model in ("minilm", "smollm2"):
        by_mode = {r["mode"]: r for r in results if r["model"] == model}
        full, lora, nf4 = (
            by_mode.get("full-fp32"),
            by_mode.get("lora-fp32"),
            by_mode.get("lora-nf4"),
        )
        if full and nf4:
            lines.append(
                f"- {model}: LoRA nf4 peak RSS / full fp32 = "
                f"{nf4['peak_rss_mb'] / full['peak_rss_mb']:.2f} (target <= 0.35)"
            )
        if lora and nf4:
            lines.append(
                f"- {model}: LoRA nf4 peak RSS / LoRA fp32 = "
                f"{nf4['peak_rss_mb'] / lora['peak_rss_mb']:.2f} (target <= 0.6)"
            )
            lines.append(
                f"- {model}: LoRA nf4 step time / LoRA fp32 = "
                f"{nf4['step_s'] / lora['step_s']:.2f} (target <= 1.25)"
            )
        gc = by_mode.get("lora-nf4-gc")
        if full and lora and gc:
            lines.append(
                f"- {model}: LoRA nf4 + gradient checkpointing peak RSS / full fp32 = "
                f"{gc['peak_rss_mb'] / full['peak_rss_mb']:.2f}, / LoRA fp32 = "
                f"{gc['peak_rss_mb'] / lora['peak_rss_mb']:.2f}; step time / LoRA fp32 = "
                f"{gc['step_s'] / lora['step_s']:.2f}"
            )
        int8 = by_mode.get("lora-int8")
        if lora and int8:
            lines.append(
                f"- {model}: LoRA int8 step time / LoRA fp32 = "
                f"{int8['step_s'] / lora['step_s']:.2f}"
            )
    for r in results:
        if r["model"] == "llama-1.1b":
            lines.append(
                f"- llama-1.1b (gradient checkpointing): load nf4 + one LoRA step peak RSS = "
                f"{r['peak_rss_mb'] / 1024:.2f} GB (target < 2.5 GB)"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "MODE", "SOURCE"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", choices=["minilm", "smollm2", "llama-1.1b"])
    parser.add_argument("--skip-1b", action="store_true")
    parser.add_argument("--modes", help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=2**20,
        help="MALLOC_MMAP_THRESHOLD_ for workers (bytes; 0 = glibc default)",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="worker only")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "schoolfl-bench"
    )
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        result = _worker(
            *args.worker,
            steps=args.steps,
            warmup=args.warmup,
            gradient_checkpointing=args.gradient_checkpointing,
        )
        print(json.dumps(result))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from quantization.models import minilm_path
    from quantization.schemes import Scheme, available_schemes

    available = available_schemes()
    modes = [
        m
        for m in MODES
        if m.endswith("fp32")
        or available[Scheme(m.removeprefix("lora-").removesuffix("-gc"))] is None
    ]
    if args.modes:
        modes = [m for m in modes if m in args.modes.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[str, str, Path, int, int]] = []
    if args.only in (None, "minilm"):
        plan += [("minilm", mode, minilm_path(), args.steps, args.warmup) for mode in modes]
    if args.only in (None, "smollm2"):
        smollm2 = _prepare_smollm2(args.workdir)
        plan += [("smollm2", mode, smollm2, args.steps, args.warmup) for mode in modes]
    if args.only == "llama-1.1b" or (args.only is None and not args.skip_1b):
        plan.append(("llama-1.1b", "lora-nf4", _prepare_1b(args.workdir), 1, 0))
    results = [r for r in (_run_worker(args, *item) for item in plan) if r is not None]
    header = (
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: "
        f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
        f"torch threads {args.threads}; batch {BATCH} x sequence {SEQUENCE}, LoRA r=8; "
        f"median of {args.steps} steps after {args.warmup} warm-up; MALLOC_MMAP_THRESHOLD_="
        f"{args.malloc_mmap_threshold or 'glibc default'}.\n"
        f"Command: python benchmarks/bench_training.py {' '.join(sys.argv[1:])}"
    )
    report = "\n\n".join([header, _table(results), "\n".join(_ratios(results))]) + "\n"
    print(report)
    if args.output:
        from durable.atomic_files import atomic_write_bytes

        atomic_write_bytes(args.output, report.encode())


if __name__ == "__main__":
    main()
