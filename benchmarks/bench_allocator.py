"""glibc malloc settings on the agent's training path: step CPU time, peak RSS, page faults.

Each setting runs `bench_training.py`'s agent worker (SmolLM2-135M GGUF, nf4, LoRA on all
projections, batch 4 x 128, the agent's trainer) in a fresh process, with the agent's own
allocator call replaced by the setting under test:

- `agent`: what the agent does (`quantization/allocator.py`: 1 MiB fixed mmap threshold);
- `default`: glibc untouched (dynamic threshold, up to 32 MiB);
- `mmap-N`: a fixed mmap threshold of N MiB;
- `agent-load-then-N`: the agent's 1 MiB while the model loads, then `malloc_trim(0)` and a
  fixed N MiB threshold for training;
- `agent-thp`: the agent's 1 MiB threshold with PyTorch's `THP_MEM_ALLOC_ENABLE=1` (tensors
  of 2 MiB or more 2 MiB-aligned and `madvise(MADV_HUGEPAGE)`: one fault per 2 MiB, not 512);
- `agent-hugetlb`: the agent's 1 MiB threshold with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
  (glibc asks for transparent huge pages on its own mappings).

    python benchmarks/bench_allocator.py                       # all settings
    python benchmarks/bench_allocator.py --settings agent,default

Read with the page-fault and system-time columns: a freed tensor returned to the OS must be
faulted in (and zeroed) again when the next one is allocated.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

SETTINGS = (
    "agent",
    "default",
    "mmap-2",
    "mmap-4",
    "agent-load-then-4",
    "agent-load-then-32",
    "agent-thp",
    "agent-hugetlb",
)
ENVIRONMENT = {
    "agent-thp": {"THP_MEM_ALLOC_ENABLE": "1"},
    "agent-hugetlb": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
}
"""Set before the worker starts: both are read once, at the process's first allocation."""
M_MMAP_THRESHOLD = -3
"""mallopt parameter number from glibc's malloc.h."""


def _worker(setting: str, steps: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch

    torch.set_num_threads(2)
    libc = ctypes.CDLL("libc.so.6")
    mib = 1024 * 1024

    def allocator() -> str:
        if setting in ("agent", "agent-thp", "agent-hugetlb") or setting.startswith(
            "agent-load-then-"
        ):
            libc.mallopt(M_MMAP_THRESHOLD, mib)
        elif setting.startswith("mmap-"):
            libc.mallopt(M_MMAP_THRESHOLD, int(float(setting.split("-")[1]) * mib))
        return setting

    import quantization.allocator

    quantization.allocator.configure_training_allocator = allocator
    if setting.startswith("agent-load-then-"):
        import edge_runtime.trainer as trainer_module

        original = trainer_module.LocalTrainer.train_round
        threshold = int(float(setting.rsplit("-", 1)[1]) * mib)
        switched: list[bool] = []

        def train_round(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if not switched:
                switched.append(True)
                libc.malloc_trim(0)
                libc.mallopt(M_MMAP_THRESHOLD, threshold)
            return original(self, *args, **kwargs)

        trainer_module.LocalTrainer.train_round = train_round
    import bench_training

    result = bench_training._agent_worker(
        "smollm2", "agent", bench_training.TARGETS["all"], steps, 1
    )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.update(
        setting=setting,
        process_user_s=usage.ru_utime,
        process_sys_s=usage.ru_stime,
        minor_faults=usage.ru_minflt,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.steps)))
        return
    print("| setting | step CPU s | / agent | peak RSS MB | RSS after load MB | sys s | faults |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    reference = None
    for setting in args.settings.split(","):
        command = [sys.executable, __file__, "--worker", setting, "--steps", str(args.steps)]
        env = {**os.environ, **ENVIRONMENT.get(setting, {})}
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            print(f"{setting} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(lines[-1])
        reference = reference or (r["step_cpu_s"] if setting == "agent" else None)
        ratio = f"{r['step_cpu_s'] / reference:.2f}" if reference else "-"
        print(
            f"| {setting} | {r['step_cpu_s']:.2f} | {ratio} | {r['peak_rss_mb']:.0f} "
            f"| {r['rss_after_load_mb']:.0f} | {r['process_sys_s']:.1f} | {r['minor_faults']:,} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
