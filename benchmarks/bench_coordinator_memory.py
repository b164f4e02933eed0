"""The coordinator's resident memory for one task's versions, before and after issue 20.

A fresh process per scenario (so nothing of another lingers) runs what the daemon does for a
MiniLM-L6 classification task, LoRA r=8, scheme nf4, no eval file:
`ModelVersions.load_or_create` (version 0), its `publish`, then 3 versions written
(`ModelVersions.write` + the store row, as a completed round does) and published. It prints
the process's VmRSS and VmHWM (/proc/self/status) after each step. Two scenarios:

- first start: an empty state folder (version 0 is made);
- restart: the same state folder again (versions in the store).

`--daemon-imports` imports coordinator.daemon and coordinator.rounds first (what the real
daemon holds whatever this module does). `--code DIR` runs another copy of the tree, e.g.
`git archive HEAD | tar -x -C /tmp/before`, so one script measures before and after:

    HF_HUB_OFFLINE=1 python benchmarks/bench_coordinator_memory.py
    HF_HUB_OFFLINE=1 python benchmarks/bench_coordinator_memory.py --code /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import json, re, sys, time
from pathlib import Path

def memory():
    status = Path("/proc/self/status").read_text()
    found = {k: re.search(k + r":\s+(\d+)", status) for k in ("VmRSS", "VmHWM")}
    return {k: int(match.group(1)) // 1024 for k, match in found.items()}

state_dir, daemon_imports = Path(sys.argv[1]), sys.argv[2] == "1"
marks = []
def mark(step):
    marks.append({"step": step, **memory()})

import torch
mark("import torch")
if daemon_imports:
    import coordinator.daemon, coordinator.rounds
    mark("import coordinator.daemon + rounds")
from coordinator.config import CoordinatorConfig, CoordinatorSettings, TaskConfig
from coordinator.model_versions import ModelVersions
from coordinator.store import AdapterVersion, CoordinatorStore
from coordinator.task_models import AdapterBody
from edge_runtime.wire import generate_private_key
mark("import coordinator.model_versions")

task = TaskConfig(id="t", kind="classification", base_model="minilm-l6", labels=("a", "b"), rank=8)
config = CoordinatorConfig(
    coordinator=CoordinatorSettings(fleet="f", state_dir=str(state_dir)), tasks=(task,)
)
store = CoordinatorStore(state_dir / "coordinator.db")
versions = ModelVersions(config, store, generate_private_key())
started = time.perf_counter()
body = versions.load_or_create("t")
versions.publish("t", body, 0)
mark(f"load_or_create + publish ({time.perf_counter() - started:.2f} s)")
for _ in range(3):
    latest = store.latest_adapter_version("t")
    state = {name: tensor + 0.01 for name, tensor in body.state().items()}
    body = AdapterBody.of(state)
    number = latest.version + 1
    started = time.perf_counter()
    folder = versions.write("t", number, state, body)
    store.add_adapter_version(AdapterVersion("t", number, number, body.version, str(folder), 0.0))
    versions.current["t"] = body
    versions.publish("t", body, number)
    mark(f"version {number} written + published ({time.perf_counter() - started:.3f} s)")
print(json.dumps(marks))
"""


def run_scenario(code: Path, state_dir: Path, daemon_imports: bool) -> list[dict[str, object]]:
    """One fresh process of WORKER on `state_dir`; its memory marks."""
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", WORKER, str(state_dir), "1" if daemon_imports else "0"],
        cwd=code,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"worker failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--daemon-imports", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        state_dir = Path(temp) / "state"
        for scenario in ("first start", "restart"):
            print(f"{scenario} ({args.code}):")
            for mark in run_scenario(args.code, state_dir, args.daemon_imports):
                rss, peak = mark["VmRSS"], mark["VmHWM"]
                print(f"  {mark['step']:<48} VmRSS {rss:>5} MB  VmHWM {peak:>5} MB")


if __name__ == "__main__":
    main()
