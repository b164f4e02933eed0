"""Training step time and peak RSS: full fine-tuning vs LoRA on fp32 / nf4 / int8 (/ bnb) bases.

Each configuration runs in its own subprocess (peak RSS is per process), one at a time, with
an explicit torch thread count, batch 4 x sequence 128. Ratios quoted in results come from a
single run of this script.

    python benchmarks/bench_training.py --threads 2 --output bench-out/training.md
    python benchmarks/bench_training.py --only smollm2      # one model family
    python benchmarks/bench_training.py --skip-1b           # without the 1.1B checkpoint
    python benchmarks/bench_training.py --only smollm2 --modes full-fp32,lora-fp32,agent,agent-gc \
        --targets qv,all                                     # issue 19: the agent vs plain PEFT

The `agent*` modes run what `schoolfl agent run` runs: the allocator set as the agent sets it,
bitsandbytes kept out as on a profile without bnb schemes, the task model built by
`build_task_model` from the task's base model name (the shipped GGUF for SmolLM2, int8
embeddings by default) and steps taken by the agent's `LocalTrainer.train_round` with a
`TrainingPlan` (chunked causal-LM loss, the plan's levers). The other modes are plain
transformers + PEFT processes with glibc's default allocator unless --malloc-mmap-threshold
is given.
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
    "agent",
    "agent-gc",
    "agent-pi4",
]
"""`-gc` = with gradient checkpointing (recompute each layer in backward): the setting for
devices where activations, not weights, are the memory limit. `agent*` = the agent's own
path (module docstring); `agent-pi4` runs the plan the coordinator's plan fitter gives the
raspberry-pi-4-4gb reference profile for this batch and sequence."""
TARGETS = {"qv": ("q", "v"), "all": ("q", "k", "v", "o", "gate", "up", "down")}
"""LoRA target sets by name (--targets), as plan roles; `_peft_targets` maps them to modules."""
AGENT_BASE_MODELS = {"smollm2": "smollm2-135m", "minilm": "minilm-l6"}
"""The task config's base_model names the agent modes use (the shipped model files)."""


def _peft_targets(model_name: str, roles: tuple[str, ...]) -> tuple[str, ...]:
    if model_name == "minilm":
        names = {"q": "query", "k": "key", "v": "value"}
        return tuple(names[r] for r in roles if r in names)
    return tuple(f"{role}_proj" for role in roles)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _agent_plan(mode: str, base_model: str, roles: tuple[str, ...], steps: int):  # noqa: ANN202
    """The TrainingPlan an agent mode trains with (see MODES)."""
    from dataclasses import replace

    from device_profiles.plan import TrainingPlan

    plan = TrainingPlan(
        scheme="nf4",
        rank=8,
        batch_size=BATCH,
        seq_len=SEQUENCE,
        local_steps=steps,
        target_modules=roles,
        learning_rate=1e-4,
    )
    if mode == "agent-gc":
        return replace(plan, gradient_checkpointing=True)
    if mode == "agent-pi4":
        from coordinator.plan_fitting import LadderLimits, PlanFitter
        from device_profiles.profile import find_profile
        from device_profiles.shapes import resolve_shape

        fitter = PlanFitter(
            resolve_shape(base_model),
            plan,
            LadderLimits.steps_only(plan),
            deadline_seconds=1e9,
        )
        fitted = fitter.fit_memory(find_profile("raspberry-pi-4-4gb"), plan)
        if isinstance(fitted, str):
            raise SystemExit(f"the plan fitter finds no plan for a Pi 4 4 GB: {fitted}")
        return fitted
    return plan


def _agent_worker(
    model_name: str, mode: str, roles: tuple[str, ...], steps: int, warmup: int, source: str = ""
) -> dict:
    """Train as the agent does (module docstring); step time from CPU and wall clocks.

    The base model is the shipped one for minilm / smollm2 and the `source` folder otherwise
    (the 1.1B random checkpoint, with a tokenizer saved beside it by `_prepare_1b`)."""
    from quantization.allocator import configure_training_allocator
    from quantization.bnb_backend import keep_bitsandbytes_out

    keep_bitsandbytes_out()
    configure_training_allocator()
    import peft  # noqa: F401 - imported by training anyway; part of the cost model's baseline
    import transformers  # noqa: F401

    baseline_bytes = _peak_rss_mb() * 2**20
    from edge_runtime.trainer import LocalTrainer
    from quantization.adapters import AdapterConfig
    from quantization.task_model import TaskModelSpec

    kind = "classification" if model_name == "minilm" else "causal-lm"
    spec = TaskModelSpec(
        task_id="bench",
        kind=kind,
        base_model=AGENT_BASE_MODELS.get(model_name, source),
        scheme="nf4",
        adapter=AdapterConfig(rank=8, alpha=16, target_modules=_peft_targets(model_name, roles)),
        labels=("no", "yes") if kind == "classification" else (),
    )
    examples = _agent_examples(kind)
    t0 = time.perf_counter()
    trainer = LocalTrainer(spec, examples)
    load_s = time.perf_counter() - t0
    rss_after_load = _peak_rss_mb()
    start = trainer.adapter_state()
    plan = _agent_plan(mode, spec.base_model, roles, steps)
    if warmup:
        from dataclasses import replace

        trainer.train_round(start, replace(plan, local_steps=warmup))
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    result = trainer.train_round(start, plan, round_seed=1)
    predicted = _predicted_peak_mb(spec.base_model, plan, baseline_bytes)
    return {
        "model": model_name,
        "mode": mode,
        "targets": ",".join(roles),
        "step_s": (time.perf_counter() - wall0) / result.num_steps,
        "step_cpu_s": (_cpu_seconds() - cpu0) / result.num_steps,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_load_mb": rss_after_load,
        "load_s": load_s,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "loss": result.last_loss,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "micro_batch_size": plan.micro_batch_size,
        "predicted_peak_mb": predicted,
    }


def _predicted_peak_mb(base_model: str, plan, baseline_bytes: float) -> float:  # noqa: ANN001
    """The cost model's training peak for this plan: the x86 calibration defaults (those of
    the Pi 4 reference profile) with this process's measured baseline (libraries imported)."""
    from dataclasses import replace

    from device_profiles.cost_model import predict
    from device_profiles.profile import find_profile
    from device_profiles.shapes import resolve_shape

    profile = find_profile("raspberry-pi-4-4gb")
    profile = replace(
        profile, throughput=replace(profile.throughput, baseline_rss_bytes=int(baseline_bytes))
    )
    return predict(profile, resolve_shape(base_model), plan).peak_bytes / 2**20


def _agent_examples(kind: str) -> list:
    """Texts long enough that every example fills the 128-token sequence (no padding)."""
    import random

    from quantization.task_data import LabelledText

    words = "the a school student learns reads writes counts river tree lesson map".split()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(4 * SEQUENCE)) for _ in range(32)]
    if kind == "classification":
        return [LabelledText(text, ("no", "yes")[i % 2]) for i, text in enumerate(texts)]
    return texts


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _worker(
    model_name: str,
    mode: str,
    source: str,
    steps: int,
    warmup: int,
    gradient_checkpointing: bool = False,
    roles: tuple[str, ...] = TARGETS["all"],
) -> dict:
    """Load, train `warmup + steps` steps, report median step time and peak RSS."""
    if mode.startswith("agent"):
        return _agent_worker(model_name, mode, roles, steps, warmup, source)
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
        targets = _peft_targets(model_name, roles)
        model = attach_adapter(model, AdapterConfig(rank=8, alpha=16, target_modules=targets))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (BATCH, SEQUENCE), generator=generator)
    labels = ids if task == "causal-lm" else torch.tensor([0, 1, 0, 1])
    times, cpu_times = [], []
    for step in range(warmup + steps):
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(_cpu_seconds() - cpu_start)
    return {
        "model": model_name,
        "mode": mode,
        "targets": ",".join(roles),
        "step_s": statistics.median(times),
        "step_cpu_s": statistics.median(cpu_times),
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_load_mb": rss_after_load,
        "load_s": load_s,
        "trainable_params": sum(p.numel() for p in trainable),
        "loss": float(loss.item()),
        "gradient_checkpointing": gradient_checkpointing,
    }


def _run_worker(
    args: argparse.Namespace,
    model: str,
    mode: str,
    source: Path,
    steps: int,
    warmup: int,
    targets: str = "all",
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
        "--targets",
        targets,
    ] + (["--gradient-checkpointing"] if model == "llama-1.1b" else [])
    print(f"  running {model} {mode} ({targets}) ...", file=sys.stderr, flush=True)
    env = dict(os.environ)
    if args.malloc_mmap_threshold and not mode.startswith("agent"):
        # glibc otherwise raises its mmap threshold up to 32 MiB as tensors are freed, and
        # activations then fragment the heap: RSS stays at the high-water mark of every
        # step. A fixed threshold returns freed tensors >= 1 MiB to the OS. The agent modes
        # set it themselves, as the agent does.
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
    """TinyLlama-1.1B's shape with random bf16 weights, and a tokenizer for the agent modes:
    MiniLM's (30,522 tokens, all below the model's 32,000), the only real one that ships."""
    folder = workdir / "llama-1.1b"
    if not (folder / "config.json").is_file():
        code = (
            "import torch\n"
            "from quantization.models import llama_1b_config, write_random_checkpoint\n"
            f"write_random_checkpoint(llama_1b_config(), {str(folder)!r}, dtype=torch.bfloat16)\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
    if not (folder / "tokenizer_config.json").is_file():
        code = (
            "from quantization.models import load_tokenizer, minilm_path\n"
            f"load_tokenizer(minilm_path()).save_pretrained({str(folder)!r})\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
    return folder


def _table(results: list[dict]) -> str:
    rows = [
        "| model | mode | LoRA on | step time (s) | step CPU (s) | peak RSS (MB) "
        "| predicted peak (MB) | RSS after load (MB) | load (s) | trainable params |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        mode = r["mode"] + (" + gc" if r.get("gradient_checkpointing") else "")
        if r.get("micro_batch_size"):
            mode += f" + micro {r['micro_batch_size']}"
        predicted = "-"
        if r.get("predicted_peak_mb"):
            error = r["predicted_peak_mb"] / r["peak_rss_mb"] - 1
            predicted = f"{r['predicted_peak_mb']:.0f} ({error:+.0%})"
        rows.append(
            f"| {r['model']} | {mode} | {r.get('targets', 'all')} | {r['step_s']:.3f} "
            f"| {r.get('step_cpu_s', float('nan')):.3f} | {r['peak_rss_mb']:.0f} "
            f"| {predicted} | {r['rss_after_load_mb']:.0f} | {r['load_s']:.1f} "
            f"| {r['trainable_params']:,} |"
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
    lines += _agent_ratios(results)
    for r in results:
        if r["model"] == "llama-1.1b":
            lines.append(
                f"- llama-1.1b {r['mode']} (gradient checkpointing): load nf4 + one LoRA step "
                f"peak RSS = {r['peak_rss_mb'] / 1024:.2f} GiB (target <= 1.6 GB), load "
                f"{r['load_s']:.0f} s (target <= 60 s)"
            )
    return lines


def _agent_ratios(results: list[dict]) -> list[str]:
    """Issue 19's targets: each agent row against plain PEFT LoRA fp32 and full fine-tuning
    of the same model in this run (LoRA fp32 with the same targets)."""
    lines = []
    for r in results:
        if not r["mode"].startswith("agent"):
            continue
        same = {
            x["mode"]: x
            for x in results
            if x["model"] == r["model"] and x.get("targets") in (r["targets"], None)
        }
        full = next(
            (x for x in results if x["model"] == r["model"] and x["mode"] == "full-fp32"), None
        )
        lora = same.get("lora-fp32")
        label = f"- {r['model']} {r['mode']} (LoRA on {r['targets']})"
        if lora:
            lines.append(
                f"{label}: peak RSS / LoRA fp32 = {r['peak_rss_mb'] / lora['peak_rss_mb']:.2f} "
                f"(target <= 0.5, moonshot 0.4); step CPU / LoRA fp32 = "
                f"{r['step_cpu_s'] / lora['step_cpu_s']:.2f}, wall "
                f"{r['step_s'] / lora['step_s']:.2f} (target <= 1.15)"
            )
        if full:
            lines.append(
                f"{label}: peak RSS / full fp32 = {r['peak_rss_mb'] / full['peak_rss_mb']:.2f} "
                "(target <= 0.35)"
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
        "--targets",
        default="all",
        help="comma-separated LoRA target sets to run each LoRA mode with: qv, all",
    )
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=0,
        help="MALLOC_MMAP_THRESHOLD_ for the plain workers (bytes; 0 = glibc's default, what "
        "a plain transformers process gets); the agent modes set their own",
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
            roles=TARGETS[args.targets],
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
        or m.startswith("agent")
        or available[Scheme(m.removeprefix("lora-").removesuffix("-gc"))] is None
    ]
    if args.modes:
        modes = [m for m in modes if m in args.modes.split(",")]
    target_sets = args.targets.split(",")
    unknown = sorted(set(target_sets) - set(TARGETS))
    if unknown:
        parser.error(f"--targets: unknown set(s) {unknown}; choose from {sorted(TARGETS)}")

    def runs(model: str, source: Path) -> list[tuple[str, str, Path, int, int, str]]:
        """Full fine-tuning once; every LoRA mode once per target set."""
        return [
            (model, mode, source, args.steps, args.warmup, targets)
            for mode in modes
            for targets in (["all"] if mode == "full-fp32" else target_sets)
        ]

    args.workdir.mkdir(parents=True, exist_ok=True)
    plan: list[tuple] = []
    if args.only in (None, "minilm"):
        plan += runs("minilm", minilm_path())
    if args.only in (None, "smollm2"):
        smollm2 = _prepare_smollm2(args.workdir)
        plan += runs("smollm2", smollm2)
    if args.only == "llama-1.1b" or (args.only is None and not args.skip_1b):
        llama_1b = _prepare_1b(args.workdir)
        wanted = args.modes.split(",") if args.modes else ["lora-nf4", "agent-gc", "agent-pi4"]
        plan += [
            ("llama-1.1b", mode, llama_1b, 1, 0)
            for mode in ("lora-nf4", "agent-gc", "agent-pi4")
            if mode in wanted
        ]
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
