"""LoRA training on a CUDA GPU: step time and peak GPU memory, and one real round on CUDA.

One prepared script for a machine with an NVIDIA GPU (issue 18). For each model (real
MiniLM-L6, real SmolLM2-135M, the 1.1B LLaMA shape with random weights) and each mode
(LoRA on the project's nf4, on bitsandbytes nf4, and on a bf16 base) it trains through the
agent's own `LocalTrainer` on a `ComputeDevice` (autocast, fp32 adapters), in a fresh
subprocess per point, and reports median step time (synchronised) and peak
`torch.cuda.max_memory_allocated`. Then it runs `schoolfl demo` (coordinator, broker and
agents on this machine, agents on `device = "auto"`) for one round and checks from the
agents' logs that they trained on CUDA.

    python benchmarks/bench_cuda.py --output bench-out/cuda.md      # on the GPU machine
    python benchmarks/bench_cuda.py --device cpu --only minilm --steps 1 --no-round
                                                                    # smoke test, no GPU

Without a GPU and without `--device cpu` it stops at once and says why.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATCH, SEQUENCE = 4, 128
MODELS = ("minilm", "smollm2", "llama-1.1b")
MODES = ("lora-nf4", "lora-bnb-nf4", "lora-bf16")


def _source(model: str, workdir: Path) -> Path:
    from quantization.models import llama_1b_config, minilm_path, smollm2_gguf_path

    if model == "minilm":
        return minilm_path()
    if model == "smollm2":
        return smollm2_gguf_path()
    folder = workdir / "llama-1.1b"
    if not (folder / "config.json").is_file():
        import torch

        from quantization.models import write_random_checkpoint

        write_random_checkpoint(llama_1b_config(), str(folder), dtype=torch.bfloat16)
    return folder


def _worker(model: str, mode: str, device_name: str, steps: int, workdir: Path) -> dict:
    """One point in this process: load on the device, warm up once, time `steps` steps."""
    import torch

    from device_profiles.plan import TrainingPlan
    from edge_runtime.trainer import LocalTrainer
    from quantization.adapters import AdapterConfig
    from quantization.compute_device import ComputeDevice, cuda_compute_device, peak_gpu_memory
    from quantization.task_model import TaskModelSpec

    # --device cpu: the GPU's code path (bf16 autocast) on the CPU, as tests/test_compute_device.py
    device = (
        cuda_compute_device()
        if device_name == "cuda"
        else ComputeDevice(torch.device("cpu"), torch.bfloat16, "cpu (bf16 autocast)")
    )
    scheme = {"lora-nf4": "nf4", "lora-bnb-nf4": "bnb-nf4", "lora-bf16": "none"}[mode]
    kind = "classification" if model == "minilm" else "causal-lm"
    labels = ("a", "b") if kind == "classification" else ()
    spec = TaskModelSpec(
        "bench", kind, str(_source(model, workdir)), scheme, AdapterConfig(rank=8), labels
    )
    texts = [f"example {i} " * SEQUENCE for i in range(BATCH * (steps + 1))]
    if kind == "classification":
        from quantization.task_data import LabelledText

        examples: list = [LabelledText(t, labels[i % 2]) for i, t in enumerate(texts)]
    else:
        examples = texts
    started = time.perf_counter()
    trainer = LocalTrainer(spec, examples, device=device)
    if mode == "lora-bf16":  # a bf16 frozen base: the usual GPU LoRA baseline
        for parameter in trainer.model.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(torch.bfloat16)
    load_s = time.perf_counter() - started

    def step_plan(count: int) -> TrainingPlan:
        return TrainingPlan(
            scheme=scheme,
            rank=8,
            batch_size=BATCH,
            seq_len=SEQUENCE,
            local_steps=count,
            learning_rate=1e-4,
        )

    state = trainer.adapter_state()
    trainer.train_round(state, step_plan(1))  # warm-up: kernels, allocator, autotuning
    times = []
    with peak_gpu_memory(device) as peak:
        for _ in range(steps):
            if device.is_cuda:
                torch.cuda.synchronize()
            begin = time.perf_counter()
            result = trainer.train_round(state, step_plan(1))
            if device.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - begin)
    return {
        "model": model,
        "mode": mode,
        "device": device.describe(),
        "step_s": statistics.median(times),
        "peak_gpu_mb": peak[0] / 2**20,
        "load_s": load_s,
        "loss": result.last_loss,
        "update_on_cpu_fp32": all(
            t.device.type == "cpu" and t.dtype is torch.float32 for t in result.delta.values()
        ),
    }


def _run_point(args: argparse.Namespace, model: str, mode: str) -> dict | None:
    command = [sys.executable, __file__, "--worker", model, mode, "--device", args.device]
    command += ["--steps", str(args.steps), "--workdir", str(args.workdir)]
    print(f"  {model} {mode} on {args.device} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"  {model} {mode} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return {"model": model, "mode": mode, "failed": done.stderr.strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def _demo_round(workdir: Path) -> str:
    """One `schoolfl demo` round; what the agents' logs say they trained on."""
    state = workdir / "demo"
    command = [sys.executable, "-m", "schoolfl", "demo", "--devices", "2", "--rounds", "1"]
    command += ["--quick", "--no-onnx", "--state", str(state)]
    print("  schoolfl demo, 1 round ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    pattern = re.compile(r"training on (.*)\) started")  # the agent's start-up line
    devices = sorted(
        {
            match.group(1)
            for log in state.rglob("*.log")
            for match in pattern.finditer(log.read_text(errors="replace"))
        }
    )
    outcome = "completed" if done.returncode == 0 else f"failed (exit {done.returncode})"
    return f"demo round {outcome}; agents trained on: {', '.join(devices) or 'unknown'}"


def _table(results: list[dict]) -> str:
    rows = ["| model | mode | device | step (s) | peak GPU MB | load (s) | update fp32 CPU |"]
    rows.append("|---|---|---|---|---|---|---|")
    for r in results:
        if "failed" in r:
            rows.append(f"| {r['model']} | {r['mode']} | failed: {r['failed']} | | | | |")
            continue
        rows.append(
            f"| {r['model']} | {r['mode']} | {r['device']} | {r['step_s']:.3f} | "
            f"{r['peak_gpu_mb']:.0f} | {r['load_s']:.1f} | {r['update_on_cpu_fp32']} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--only", choices=MODELS, action="append", help="models (repeatable)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per point")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/cuda-work"))
    parser.add_argument("--no-round", action="store_true", help="skip the schoolfl demo round")
    parser.add_argument("--output", type=Path, help="also write the report here (markdown)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        print(json.dumps(_worker(*args.worker, args.device, args.steps, args.workdir)))
        return
    from quantization.compute_device import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if args.device == "cuda" and reason is not None:
        sys.exit(f"bench_cuda: no CUDA GPU here: {reason} (use --device cpu for a smoke test)")
    results = [_run_point(args, m, mode) for m in (args.only or MODELS) for mode in MODES]
    lines = [
        f"# bench_cuda, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"command: {' '.join(sys.argv)}",
        f"batch {BATCH} x seq {SEQUENCE}, LoRA r=8, median of {args.steps} steps",
        "",
        _table([r for r in results if r is not None]),
    ]
    if not args.no_round:
        lines += ["", _demo_round(args.workdir)]
    report = "\n".join(lines)
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report + "\n")


if __name__ == "__main__":
    main()
