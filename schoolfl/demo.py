"""`schoolfl demo`: the whole system on one machine, for real.

A broker (embedded amqtt, or any broker with --broker), the coordinator daemon and several
emulated school devices, each a separate `schoolfl agent run` process with its own non-IID
shard of the shipped school-questions data, train nf4 + LoRA MiniLM-L6 in federated rounds.
Each device emulates its reference profile: compute is stretched to the profile's predicted
round time, and its uplink is limited to the profile's bandwidth. The demo watches the
coordinator's store and shows every round live, then writes the final adapter (a PEFT
folder), a plot and a summary.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import click

logger = logging.getLogger(__name__)

DEFAULT_FLEET: tuple[tuple[str, str], ...] = (
    ("raspberry-pi-4-4gb", "north"),
    ("raspberry-pi-4-4gb", "south"),
    ("raspberry-pi-5-8gb", "north"),
    ("jetson-orin-nano-8gb", "east"),
    ("laptop-low-4gb", "south"),
    ("laptop-mid-16gb", "east"),
)
"""Six devices in three schools: two Raspberry Pi 4, a Pi 5, a Jetson Orin Nano, two laptops."""

FLEET = "demo"
TASK = "subjects"


@dataclass(frozen=True)
class DemoSettings:
    devices: int
    rounds: int
    state_dir: Path
    plot_path: Path
    local_steps: int
    held_out: int
    per_device: int | None
    deadline_seconds: float


def _child_env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }


class DemoFleet:
    """Writes the configs, starts and stops every process of the demo."""

    def __init__(self, settings: DemoSettings, broker_url: str) -> None:
        self.settings = settings
        self.broker_url = broker_url
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.log_dir = settings.state_dir / "logs"
        self.agent_configs: list[Path] = []

    # -- configuration ---------------------------------------------------------------------

    def write_configs(self) -> tuple[str, ...]:
        from device_profiles.profile import find_profile
        from edge_runtime.agent_config import AgentConfig, AgentSettings
        from edge_runtime.broker_settings import BrokerSettings
        from edge_runtime.eligibility import EligibilityPolicy
        from edge_runtime.signing import generate_private_key, save_private_key
        from schoolfl.school_questions import split_questions, write_jsonl

        root = self.settings.state_dir
        split = split_questions(
            self.settings.devices,
            held_out=self.settings.held_out,
            alpha=0.5,
            seed=0,
            per_shard=self.settings.per_device,
        )
        eval_file = write_jsonl(split.held_out, root / "coordinator" / "held_out.jsonl")
        labels = ", ".join(f'"{label}"' for label in split.labels)
        quorum = max(2, (self.settings.devices + 1) // 2)
        (root / "coordinator.toml").write_text(
            f'[coordinator]\nfleet = "{FLEET}"\nstate_dir = "{root / "coordinator"}"\n'
            f"tick_seconds = 0.1\nheartbeat_seconds = 5.0\n\n"
            f'[broker]\nurl = "{self.broker_url}"\n\n'
            f'[[tasks]]\nid = "{TASK}"\nkind = "classification"\nbase_model = "minilm-l6"\n'
            f'labels = [{labels}]\nscheme = "nf4"\nrank = 8\nalpha = 16.0\n'
            f"learning_rate = 0.003\nrounds = {self.settings.rounds}\n"
            f"devices_per_round = {self.settings.devices}\nmin_updates = {quorum}\n"
            f"gather_seconds = 60.0\nover_selection = 0.0\n"
            f"round_deadline_seconds = {self.settings.deadline_seconds}\n"
            f"local_steps = {self.settings.local_steps}\nbatch_size = 8\nseq_len = 48\n"
            f'update_encoding = "int8"\neval_file = "{eval_file}"\n'
        )
        for index in range(self.settings.devices):
            profile_name, school = DEFAULT_FLEET[index % len(DEFAULT_FLEET)]
            profile = find_profile(profile_name)
            device_id = f"{school}-{profile_name.split('-')[0]}-{index}"
            folder = root / "devices" / device_id
            config = AgentConfig(
                agent=AgentSettings(
                    fleet=FLEET,
                    device_id=device_id,
                    school=school,
                    state_dir=str(folder / "state"),
                    data_dir=str(folder / "data"),
                    profile=profile_name,
                    threads=1,
                    emulate_profile=True,
                ),
                broker=BrokerSettings(
                    url=self.broker_url,
                    bandwidth_limit_bytes_per_second=profile.network.up_mbps * 1e6 / 8,
                ),
                # This one machine runs every device: its CPU is busy by design.
                eligibility=EligibilityPolicy(max_cpu_percent=100.0, memory_margin_bytes=0),
            )
            config.save(folder / "agent.toml")
            if not config.key_path.exists():
                save_private_key(generate_private_key(), config.key_path)
            write_jsonl(split.shards[index], folder / "data" / f"{TASK}.jsonl")
            self.agent_configs.append(folder / "agent.toml")
        return split.labels

    # -- processes ---------------------------------------------------------------------------

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "schoolfl", "-v", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_child_env(),
        )
        self.processes[name] = process
        pids = {n: p.pid for n, p in self.processes.items()}
        (self.settings.state_dir / "children.json").write_text(json.dumps(pids))
        return process

    def enroll_all(self) -> None:
        """Tokens from the store, then every device enrolls in parallel."""
        from coordinator.store import CoordinatorStore
        from edge_runtime.agent_config import AgentConfig
        from edge_runtime.enrollment import enroll_device

        store = CoordinatorStore(self.settings.state_dir / "coordinator" / "coordinator.db")
        errors: list[str] = []

        def enroll(config_path: Path, token: str) -> None:
            try:
                enroll_device(AgentConfig.load(config_path), token, timeout_seconds=180)
            except Exception as error:  # noqa: BLE001 - collected and reported below
                errors.append(f"{config_path.parent.name}: {error}")

        threads = []
        for config_path in self.agent_configs:
            token = os.urandom(18).hex()
            store.add_enrollment_token(token, AgentConfig.load(config_path).agent.school, 3600)
            threads.append(threading.Thread(target=enroll, args=(config_path, token), daemon=True))
        store.close()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise click.ClickException("enrollment failed: " + "; ".join(errors))

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _round_rows(store: object, task_id: str) -> list[dict[str, object]]:
    """What the live view and the summary show, read from the coordinator's store."""
    rows = []
    for record in store.rounds(task_id):  # type: ignore[attr-defined]
        plans = {
            d: json.loads(p) for d, p in store.assignments(task_id, record.round_number).items()
        }  # type: ignore[attr-defined]
        updates = store.updates(task_id, record.round_number)  # type: ignore[attr-defined]
        predicted = max(
            (p.get("predicted_round_seconds") or 0.0 for p in plans.values()), default=0.0
        )
        actual = max((u.received_at - record.opened_at for u in updates), default=0.0)
        rows.append(
            {
                "round": record.round_number,
                "state": record.state.value,
                "plans": ", ".join(
                    f"{d}:r{p['adapter_rank']}x{p['local_steps']}" for d, p in sorted(plans.items())
                ),
                "updates": f"{len(updates)}/{len(plans)}",
                "predicted": predicted,
                "actual": actual,
                "bytes_up": sum(len(u.body) for u in updates),
                "accuracy": record.metrics.get("accuracy"),
                "seconds": (record.closed_at or time.time()) - record.opened_at,
            }
        )
    return rows


def _table(rows: list[dict[str, object]], before: float | None):  # noqa: ANN202 - rich Table
    from rich.table import Table

    table = Table(title=f"schoolfl demo: task {TASK} (MiniLM-L6 nf4 + LoRA r=8)")
    for column in (
        "round",
        "state",
        "devices: rank x steps",
        "updates",
        "predicted s",
        "actual s",
        "bytes up",
        "accuracy",
    ):
        table.add_column(column)
    if before is not None:
        table.add_row("0", "initial", "", "", "", "", "", f"{before:.3f}")
    for row in rows:
        accuracy = row["accuracy"]
        table.add_row(
            str(row["round"]),
            str(row["state"]),
            str(row["plans"]),
            str(row["updates"]),
            f"{row['predicted']:.1f}",
            f"{row['actual']:.1f}",
            f"{row['bytes_up']:,}",
            "-" if accuracy is None else f"{accuracy:.3f}",
        )
    return table


def _plot(rows: list[dict[str, object]], before: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    completed = [r for r in rows if r["accuracy"] is not None]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rounds = [0] + [int(r["round"]) for r in completed]  # type: ignore[call-overload]
    accuracy = [before or 0.0] + [float(r["accuracy"]) for r in completed]  # type: ignore[arg-type]
    left.plot(rounds, accuracy, marker="o")
    left.set(
        title="held-out accuracy", xlabel="round", ylabel="accuracy", ylim=(0, 1), xticks=rounds
    )
    right.bar([int(r["round"]) for r in rows], [float(r["seconds"]) for r in rows])  # type: ignore[call-overload, arg-type]
    right.set(
        title="round time", xlabel="round", ylabel="seconds", xticks=[int(r["round"]) for r in rows]
    )  # type: ignore[call-overload]
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_demo(settings: DemoSettings, broker_url: str | None) -> int:
    from rich.console import Console
    from rich.live import Live

    from coordinator.embedded_broker import EmbeddedBroker
    from coordinator.store import CoordinatorStore

    console = Console()
    started = time.monotonic()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    embedded = None
    if broker_url is None:
        embedded = EmbeddedBroker()
        embedded.start()
        broker_url = embedded.url
        console.print(f"embedded MQTT broker on {broker_url}")
    fleet = DemoFleet(settings, broker_url)
    stop = threading.Event()
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        fleet.write_configs()
        console.print(
            f"{settings.devices} devices, {settings.rounds} rounds; state and logs in "
            f"{settings.state_dir}"
        )
        coordinator = fleet.start(
            "coordinator",
            "coordinator",
            "serve",
            "--config",
            str(settings.state_dir / "coordinator.toml"),
            "--exit-when-done",
        )
        with console.status("starting the coordinator and enrolling devices..."):
            fleet.enroll_all()
        for index, config_path in enumerate(fleet.agent_configs):
            fleet.start(f"device-{index}", "agent", "run", "--config", str(config_path))
        store = CoordinatorStore(settings.state_dir / "coordinator" / "coordinator.db")
        versions = store.adapter_versions(TASK)
        before = versions[0].metrics.get("accuracy") if versions else None
        with Live(_table([], before), console=console, refresh_per_second=2) as live:
            while coordinator.poll() is None and not stop.is_set():
                live.update(_table(_round_rows(store, TASK), before))
                stop.wait(0.5)
            live.update(_table(_round_rows(store, TASK), before))
        if stop.is_set():
            console.print("stopped")
            return 130
        if coordinator.returncode != 0:
            log = (fleet.log_dir / "coordinator.log").read_text(errors="replace")[-2000:]
            raise click.ClickException(f"the coordinator failed:\n{log}")
        rows = _round_rows(store, TASK)
        final = store.latest_adapter_version(TASK)
        store.close()
        adapter = settings.state_dir / "adapter"
        if final is not None:
            import shutil

            shutil.rmtree(adapter, ignore_errors=True)
            shutil.copytree(final.folder, adapter)
        _plot(rows, before, settings.plot_path)
        after = final.metrics.get("accuracy") if final else None
        summary = {
            "devices": settings.devices,
            "rounds_completed": sum(1 for r in rows if r["state"] == "completed"),
            "accuracy_before": before,
            "accuracy_after": after,
            "bytes_up": sum(int(r["bytes_up"]) for r in rows),  # type: ignore[call-overload]
            "total_seconds": round(time.monotonic() - started, 1),
            "adapter": str(adapter),
            "plot": str(settings.plot_path),
        }
        (settings.state_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        console.print(
            f"accuracy {before:.3f} -> {after:.3f} on {settings.held_out} held-out questions; "
            f"{summary['bytes_up']:,} bytes uploaded; {summary['total_seconds']} s in all"
        )
        console.print(
            f"adapter (PEFT folder): {adapter}\nplot: {settings.plot_path}\n"
            f"summary: {settings.state_dir / 'summary.json'}"
        )
        return 0
    except KeyboardInterrupt:
        console.print("interrupted: stopping every process")
        return 130
    finally:
        fleet.stop_all()
        signal.signal(signal.SIGTERM, previous_handler)
        if embedded is not None:
            embedded.stop()


@click.command("demo")
@click.option("--devices", default=6, show_default=True, help="Emulated school devices.")
@click.option("--rounds", default=3, show_default=True, help="Federated rounds to run.")
@click.option(
    "--broker",
    "broker_url",
    default=None,
    help="Use this broker (mqtt://HOST:PORT) instead of the embedded one.",
)
@click.option(
    "--state",
    "state_dir",
    type=click.Path(path_type=Path),
    default=Path("schoolfl-demo"),
    show_default=True,
    help="Folder for configs, stores, logs, the adapter and the summary.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    default=None,
    help="PNG with accuracy and round time per round (default STATE/demo.png).",
)
@click.option("--quick", is_flag=True, help="Fewer steps and questions (for tests).")
def demo_command(
    devices: int,
    rounds: int,
    broker_url: str | None,
    state_dir: Path,
    plot_path: Path | None,
    quick: bool,
) -> None:
    """Run a broker, the coordinator and emulated school devices on this machine.

    Every device is a separate agent process with its own share of the shipped
    school-questions data; they train nf4 + LoRA MiniLM-L6 in federated rounds.
    """
    if devices < 2:
        raise click.BadParameter("the demo needs at least 2 devices", param_hint="--devices")
    if rounds < 1:
        raise click.BadParameter("at least 1 round", param_hint="--rounds")
    if (state_dir / "coordinator").exists():
        raise click.ClickException(f"{state_dir} holds an earlier demo; remove it or pass --state")
    settings = DemoSettings(
        devices=devices,
        rounds=rounds,
        state_dir=state_dir.resolve(),
        plot_path=(plot_path or state_dir / "demo.png").resolve(),
        local_steps=6 if quick else 12,
        held_out=80 if quick else 160,
        per_device=60 if quick else None,
        deadline_seconds=240.0,
    )
    status = run_demo(settings, broker_url)
    if status:
        sys.exit(status)
