"""Peak RSS and step time of the plan's memory levers, against the cost model's prediction.

Each point runs in a fresh interpreter (peak = that process's `ru_maxrss`), with a randomly
initialized model of a known shape (speed and memory need no trained weights), LoRA through
the quantization package as the benchmark workers attach it, one torch thread, and the
levers applied the way the trainer contract in docs/profile.md says:

- gradient checkpointing: `model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=
  {"use_reentrant": False})` on the base before the adapter is attached;
- micro-batches: the batch split into `batch_size // micro_batch_size` slices, each slice's
  loss divided by the number of slices and back-propagated, one optimizer step at the end.

    python benchmarks/bench_memory_levers.py --model smollm2-135m --scheme nf4 \
        --batch 4 --seq 128 --steps 2 --warmup 1

prints one line per configuration (measured vs predicted peak and step time), and the
ratios each lever costs. CPU time of the process is reported beside wall time: on a shared
machine CPU seconds of a one-thread process are what a dedicated device sees.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS: dict[str, tuple[bool, int]] = {
    "plain": (False, 0),
    "gc": (True, 0),
    "gc+micro2": (True, 2),
    "gc+micro1": (True, 1),
    "micro2": (False, 2),
    "micro1": (False, 1),
}
"""label -> (gradient_checkpointing, micro_batch_size); the first four are the fitter's order
of levers, the last two micro-batches alone (to compare their cost with checkpointing's)."""


def _child(request: dict) -> dict:
    """One measurement inside a fresh process."""
    import resource
    import statistics

    import torch

    from quantization.bench_worker import (
        _attach_lora,
        _build_model,
        _quantize,
        _release_free_heap,
        _reset_peak_rss,
        _set_malloc_thresholds,
    )

    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape = request["shape"]
    # As `quantization.bench_worker.measure_train_point` does (the calibration's points):
    # build with a low mmap threshold, return the build's free heap, then reset the peak
    # mark so the fp32 build (which a streaming-loaded agent never holds) is not counted.
    _set_malloc_thresholds(64 * 1024)
    model = _build_model(shape)
    model = _quantize(model, request["scheme"])
    if request["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = _attach_lora(model, shape, request["rank"], request["target_modules"])
    model.train()
    _release_free_heap()
    _set_malloc_thresholds(32 << 20, 64 << 20)
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset the peak-RSS mark (/proc/self/clear_refs)")
    batch, seq = request["batch_size"], request["seq_len"]
    micro = request["micro_batch_size"] or batch
    input_ids = torch.randint(0, shape["vocab"], (batch, seq))  # (B, S)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    walls, cpus = [], []
    for step in range(request["warmup"] + request["steps"]):
        wall, cpu = time.perf_counter(), time.process_time()
        slices = batch // micro
        for index in range(slices):
            ids = input_ids[index * micro : (index + 1) * micro]  # (micro, S)
            loss = model(input_ids=ids, labels=ids).loss / slices
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= request["warmup"]:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return {
        "step_seconds": statistics.median(walls),
        "step_cpu_seconds": statistics.median(cpus),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _baseline_child() -> dict:
    """RSS of a process that imported what a training process imports (the baseline)."""
    import resource

    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import quantization.bench_worker  # noqa: F401

    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _run(request: dict) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(request)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--scheme", default="nf4")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--configs",
        default="plain,gc,gc+micro2,gc+micro1",
        help=f"comma-separated, first is the reference for ratios; of {', '.join(CONFIGS)}",
    )
    args = parser.parse_args()
    if args.child:
        request = json.loads(args.child)
        result = _baseline_child() if request.get("baseline") else _child(request)
        print(json.dumps(result))
        return

    import dataclasses

    from device_profiles.cost_model import predict
    from device_profiles.plan import TrainingPlan
    from device_profiles.profile import find_profile
    from device_profiles.shapes import resolve_shape

    shape = resolve_shape(args.model)
    decoder_targets = ("q", "k", "v", "o", "gate", "up", "down")
    targets = decoder_targets if shape.family == "decoder" else ("q", "v")
    baseline = _run({"baseline": True})["peak_rss_bytes"]
    profile = find_profile("raspberry-pi-4-4gb")
    profile = dataclasses.replace(
        profile,
        throughput=dataclasses.replace(profile.throughput, baseline_rss_bytes=baseline),
    )
    print(
        f"baseline RSS {baseline / 2**20:.0f} MiB ({args.model}, {args.scheme}, "
        f"rank {args.rank}, batch {args.batch} x {args.seq}, 1 thread)"
    )
    rows = []
    for label in args.configs.split(","):
        checkpointing, micro = CONFIGS[label]
        if micro and args.batch % micro:
            continue
        request = {
            "shape": shape.to_dict(),
            "scheme": args.scheme,
            "rank": args.rank,
            "target_modules": list(targets),
            "batch_size": args.batch,
            "seq_len": args.seq,
            "gradient_checkpointing": checkpointing,
            "micro_batch_size": micro,
            "steps": args.steps,
            "warmup": args.warmup,
        }
        measured = _run(request)
        plan = TrainingPlan(
            scheme=args.scheme,
            rank=args.rank,
            batch_size=args.batch,
            seq_len=args.seq,
            target_modules=targets,
            gradient_checkpointing=checkpointing,
            micro_batch_size=micro,
        )
        predicted = predict(profile, shape, plan)
        rows.append((label, measured, predicted))
        error = predicted.peak_bytes / measured["peak_rss_bytes"] - 1
        print(
            f"{label:10s} peak {measured['peak_rss_bytes'] / 2**20:6.0f} MiB "
            f"(predicted {predicted.peak_bytes / 2**20:6.0f}, {error:+.0%}; above baseline "
            f"{(measured['peak_rss_bytes'] - baseline) / 2**20:5.0f} vs "
            f"{(predicted.peak_bytes - baseline) / 2**20:5.0f}); step "
            f"{measured['step_seconds']:.2f} s wall, {measured['step_cpu_seconds']:.2f} s cpu",
            flush=True,
        )
    plain = rows[0][1]
    for label, measured, _ in rows[1:]:
        print(
            f"{label:10s} / plain: peak {measured['peak_rss_bytes'] / plain['peak_rss_bytes']:.2f}"
            f", cpu step {measured['step_cpu_seconds'] / plain['step_cpu_seconds']:.2f}"
        )


if __name__ == "__main__":
    main()
