"""Test helpers: a real coordinator and real agents as separate processes on one broker.

Every process is the `schoolfl` command line, exactly as operators and school IT run it;
the helpers only write config files and keep track of processes so a test can kill them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from coordinator.mosquitto import MosquittoProcess
from edge_runtime.agent_config import AgentConfig
from edge_runtime.eligibility import EligibilityPolicy
from quantization.school_questions import split_questions, write_jsonl
from quantization.task_data import LabelledText

FLEET = "testfleet"
TASK = "subjects"


def schoolfl(*args: str, timeout: float = 120.0, check: bool = True) -> str:
    """Run one `schoolfl` command to completion and return its standard output."""
    completed = subprocess.run(
        [sys.executable, "-m", "schoolfl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )
    if check and completed.returncode != 0:
        raise AssertionError(
            f"schoolfl {' '.join(args)} exited {completed.returncode}:\n{completed.stderr[-3000:]}"
        )
    return completed.stdout


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }


@dataclass
class Fleet:
    """Config files and processes of one test fleet."""

    root: Path
    broker: MosquittoProcess
    coordinator_config: Path = field(init=False)
    agent_configs: list[Path] = field(default_factory=list)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    held_out: list[LabelledText] = field(default_factory=list)
    shards: list[list[LabelledText]] = field(default_factory=list)

    def write_coordinator_config(
        self, coordinator: dict[str, object] | None = None, **task_overrides: object
    ) -> Path:
        """A task override that is a dict (`schedule={...}`) updates that sub-table."""
        task: dict[str, object] = {
            "id": TASK,
            "kind": "classification",
            "base_model": "minilm-l6",
            "labels": list(self.labels),
            "scheme": "nf4",
            "rank": 4,
            "alpha": 8.0,
            "learning_rate": 3e-3,
            "rounds": 3,
            "local_steps": 12,
            "batch_size": 8,
            "seq_len": 40,
            "eval_file": str(write_jsonl(self.held_out, self.root / "held_out.jsonl")),
            "schedule": {
                "devices_per_round": 3,
                "min_updates": 3,
                "over_selection": 0.0,
                "round_deadline_seconds": 300.0,
            },
        }
        for key, item in task_overrides.items():
            current = task.get(key)
            if isinstance(item, dict) and isinstance(current, dict):
                task[key] = {**current, **item}
            else:
                task[key] = item
        sub_tables = {k: v for k, v in task.items() if isinstance(v, dict)}

        def value(item: object) -> str:
            if isinstance(item, str):
                return f'"{item}"'
            if isinstance(item, bool):
                return "true" if item else "false"
            if isinstance(item, list):
                return "[" + ", ".join(value(v) for v in item) + "]"
            return repr(item)

        lines = [
            "[coordinator]",
            f'fleet = "{FLEET}"',
            f'state_dir = "{self.root / "coordinator"}"',
            "tick_seconds = 0.1",
            "heartbeat_seconds = 5.0",
            *(f"{key} = {value(item)}" for key, item in (coordinator or {}).items()),
            "",
            "[broker]",
            f'url = "{self.broker.url}"',
            "",
            "[[tasks]]",
            *(f"{key} = {value(item)}" for key, item in task.items() if key not in sub_tables),
        ]
        for name, table in sub_tables.items():
            lines += ["", f"[tasks.{name}]", *(f"{k} = {value(v)}" for k, v in table.items())]
        self.coordinator_config = self.root / "coordinator.toml"
        self.coordinator_config.write_text("\n".join(lines) + "\n")
        return self.coordinator_config

    def add_agents(self, shards: list[list[LabelledText]], profiles: list[str]) -> None:
        """`schoolfl agent init` per device, its local data shard, a lab eligibility policy
        (the test machine is busy with the other agents, so no CPU-idle requirement)."""
        for index, (shard, profile) in enumerate(zip(shards, profiles, strict=True)):
            device_id = f"dev-{index}"
            folder = self.root / device_id
            config_path = folder / "agent.toml"
            schoolfl(
                "agent",
                "init",
                "--config",
                str(config_path),
                "--fleet",
                FLEET,
                "--device-id",
                device_id,
                "--school",
                f"school-{index % 2}",
                "--broker",
                self.broker.url,
                "--state-dir",
                str(folder / "state"),
                "--data-dir",
                str(folder / "data"),
                "--profile",
                profile,
                "--threads",
                "1",
            )
            config = AgentConfig.load(config_path)
            relaxed = replace(
                config, eligibility=EligibilityPolicy(max_cpu_percent=100.0, memory_margin_bytes=0)
            )
            relaxed.save(config_path)
            write_jsonl(shard, folder / "data" / f"{TASK}.jsonl")
            self.agent_configs.append(config_path)

    def start(
        self, name: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `schoolfl -v ARGS` as `name`; `env` adds variables (e.g. SCHOOLFL_CRASH_AT)."""
        log = (self.root / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "schoolfl", "-v", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**_env(), **(env or {})},
        )
        self.processes[name] = process
        return process

    def start_coordinator(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.start(
            "coordinator",
            "coordinator",
            "serve",
            "--config",
            str(self.coordinator_config),
            "--exit-when-done",
            env=env,
        )

    def enroll_agents(self) -> None:
        """Issue a token per device and run every `schoolfl agent enroll` at once."""
        enrollments = []
        for index, config_path in enumerate(self.agent_configs):
            token = schoolfl(
                "coordinator",
                "enroll-token",
                "--config",
                str(self.coordinator_config),
                "--school",
                f"school-{index % 2}",
            )
            enrollments.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "schoolfl",
                        "agent",
                        "enroll",
                        "--config",
                        str(config_path),
                        "--token",
                        token.strip(),
                        "--timeout",
                        "120",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=_env(),
                )
            )
        for process in enrollments:
            _, stderr = process.communicate(timeout=180)
            assert process.returncode == 0, f"agent enroll failed:\n{stderr[-3000:]}"

    def start_agent(self, index: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.start(
            f"dev-{index}", "agent", "run", "--config", str(self.agent_configs[index]), env=env
        )

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    def stop_all(self) -> None:
        for name in list(self.processes):
            process = self.processes.pop(name)
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_log(self, name: str, text: str, timeout: float) -> bool:
        """Wait until a process's log contains `text` (bounded; processes write logs only)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log(name):
                return True
            process = self.processes.get(name)
            if process is not None and process.poll() is not None:
                return text in self.log(name)
            time.sleep(0.2)
        return False


def make_fleet(root: Path, broker: MosquittoProcess, num_devices: int = 3) -> Fleet:
    split = split_questions(num_devices, held_out=120, alpha=0.5, seed=1, per_shard=120)
    return Fleet(
        root=root,
        broker=broker,
        labels=split.labels,
        held_out=split.held_out,
        shards=split.shards,
    )
