"""A round's fixed cost on the agent (issue 20): nothing blocks for a fixed time on the
critical path, the personal copy is written after the update is published, the global
adapter is loaded once before the publish, and a task the device trained before is built
at start, before any assignment, without stopping heartbeats.

The agent runs against a real Mosquitto through a real `MqttTransport` (a subclass that
notes what the device looked like at each publish); assignments are signed with a
coordinator key and handed to the agent's `handle`, as its loop would.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from coordinator.mosquitto import MosquittoProcess
from device_profiles.plan import TrainingPlan
from edge_runtime.activity import Phase, read_activity
from edge_runtime.agent import AgentDaemon
from edge_runtime.agent_config import AgentConfig, AgentSettings
from edge_runtime.eligibility import CpuLoadMeter, CpuTimes, EligibilityPolicy, read_device
from edge_runtime.task_preload import remember_model, remembered_model
from edge_runtime.trainer import LocalTrainer
from edge_runtime.wire import (
    COORDINATOR_SENDER,
    BrokerSettings,
    DeviceChannel,
    Ed25519PrivateKey,
    ModelManifest,
    MqttTransport,
    ReceivedMessage,
    TaskAssignment,
    TaskSpec,
    TransportConfig,
    Update,
    UpdateEncoding,
    decode_frame,
    device_topic,
    encode_frame,
    generate_private_key,
)
from quantization.adapters import AdapterConfig, get_adapter_state, load_adapter
from quantization.task_model import TaskModelSpec, build_task_model
from tests.test_lora_ranks import enroll_with_alpha_data

# -- the CPU load, read without waiting ----------------------------------------------------


class ScriptedCpu:
    """A clock and cumulative CPU counters the test moves by hand (the meter's inputs)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.times = CpuTimes(total=0.0, busy=0.0, own=0.0)
        self.waited: list[float] = []

    def advance(self, seconds: float, busy: float, own: float = 0.0, cores: int = 2) -> None:
        """`seconds` pass; `busy` and `own` are the busy share of all cores (0..1)."""
        self.now += seconds
        total = seconds * cores
        self.times = CpuTimes(
            total=self.times.total + total,
            busy=self.times.busy + busy * total,
            own=self.times.own + own * total,
        )

    def wait(self, seconds: float) -> None:
        self.waited.append(seconds)
        self.advance(seconds, busy=0.3)

    def meter(self) -> CpuLoadMeter:
        return CpuLoadMeter(clock=lambda: self.now, wait=self.wait, times=lambda: self.times)


def test_readings_span_a_window_and_only_the_first_after_priming_waits() -> None:
    cpu = ScriptedCpu()
    meter = cpu.meter()
    meter.prime()
    cpu.advance(0.01, busy=1.0)  # 10 ms of counters: would read as a bogus 100%
    first = meter.percent()
    assert cpu.waited == [pytest.approx(0.49)]
    assert first == pytest.approx(100 * (0.01 * 1.0 + 0.49 * 0.3) / 0.5)  # ~31%, not 100%
    cpu.advance(0.01, busy=0.0)  # 10 ms later: still measured over a whole window, no wait
    second = meter.percent()
    assert second == pytest.approx(100 * (0.01 + 0.49 * 0.3) / 0.51) and len(cpu.waited) == 1
    cpu.advance(2.0, busy=0.8)
    assert meter.percent() == pytest.approx(80.0) and len(cpu.waited) == 1


def test_the_agent_s_own_work_is_not_someone_else_s_use() -> None:
    """After a round of training (the agent's own CPU), the device is not 'busy'."""
    cpu = ScriptedCpu()
    meter = cpu.meter()
    meter.prime()
    cpu.advance(30.0, busy=1.0, own=0.95)  # the agent trained for 30 s on every core
    assert meter.percent() == pytest.approx(5.0)


def test_the_load_is_recent_not_averaged_since_start() -> None:
    cpu = ScriptedCpu()
    meter = cpu.meter()
    meter.prime()
    cpu.advance(60.0, busy=1.0)  # a lesson kept the device busy for a minute
    meter.sample()
    for _ in range(10):  # then the loop ticked every 0.2 s on an idle device
        cpu.advance(0.2, busy=0.0)
        meter.sample()
    assert meter.percent() < 1.0


def test_a_real_reading_takes_well_under_50_ms() -> None:
    meter = CpuLoadMeter()
    meter.prime()
    meter.percent()  # the first one may wait out one window (at agent start)
    durations = []
    for _ in range(5):
        time.sleep(0.1)
        started = time.perf_counter()
        readings = read_device(cpu_meter=meter)
        durations.append(time.perf_counter() - started)
        assert 0.0 <= readings.cpu_percent <= 100.0
    assert max(durations) < 0.05, durations


# -- a real agent on a real broker ---------------------------------------------------------


class NotingTransport(MqttTransport):
    """The real transport; each publish notes the topic, whether the personal copy was on
    disk and how many global-adapter loads the trainer had done at that moment."""

    agent: AgentDaemon | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.notes: list[tuple[str, bool, int]] = []

    def publish(self, topic: str, payload: bytes, *args: object, **kwargs: object):  # noqa: ANN201
        agent = NotingTransport.agent
        if agent is not None and topic.endswith("/update"):
            copy = agent.config.state_dir / "adapters" / "alpha" / "adapter_model.safetensors"
            trainer = agent.trainers.get("alpha")
            self.notes.append((topic, copy.exists(), trainer.global_loads if trainer else 0))
        return super().publish(topic, payload, *args, **kwargs)  # type: ignore[arg-type]


class HeldTrainer(LocalTrainer):
    """Builds only once the test lets it: a slow model build, on demand."""

    release = threading.Event()
    building = threading.Event()

    def __init__(self, *args: object, **kwargs: object) -> None:
        HeldTrainer.building.set()
        assert HeldTrainer.release.wait(60), "the test never released the build"
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def _agent(tmp_path: Path, broker: MosquittoProcess, key: Ed25519PrivateKey) -> AgentDaemon:
    config = AgentConfig(
        agent=AgentSettings(
            fleet="f",
            device_id="pi-1",
            school="north",
            state_dir=str(tmp_path / "state"),
            data_dir=str(tmp_path / "data"),
        ),
        broker=BrokerSettings(url=broker.url),
        eligibility=EligibilityPolicy(
            max_cpu_percent=100.0, min_battery_percent=0.0, memory_margin_bytes=0
        ),
    )
    if not config.key_path.exists():
        enroll_with_alpha_data(config, key)
    daemon = AgentDaemon(config)
    daemon.transport_class = NotingTransport
    NotingTransport.agent = daemon
    return daemon


def _spec(folder: Path) -> TaskSpec:
    return TaskSpec("classification", str(folder), ("a", "b"), adapter_alpha=16.0)


def _assign(daemon: AgentDaemon, key: Ed25519PrivateKey, spec: TaskSpec, round_: int) -> None:
    plan = TrainingPlan(scheme="none", rank=4, batch_size=4, seq_len=16, local_steps=2)
    assignment = TaskAssignment(
        "f", "alpha", round_, "pi-1", 0, plan, time.time() + 600, "ab" * 32, spec,
        UpdateEncoding.FP32,
    )  # fmt: skip
    frame = encode_frame(assignment, sender=COORDINATOR_SENDER, signing_key=key)
    daemon.handle(ReceivedMessage("schoolfl/f/to/pi-1/task", frame, 1, False))


def _global_state(spec: TaskSpec) -> dict:
    model, _ = build_task_model(
        TaskModelSpec(
            "alpha", "classification", spec.base_model, "none", AdapterConfig(4, 16.0), spec.labels
        )
    )
    return get_adapter_state(model)


@pytest.mark.slow
def test_the_update_is_published_before_the_personal_copy_and_after_one_load(
    tmp_path: Path, mosquitto: MosquittoProcess, tiny_bert_folder: Path
) -> None:
    key = generate_private_key()
    spec = _spec(tiny_bert_folder)
    daemon = _agent(tmp_path, mosquitto, key)
    global_state = _global_state(spec)
    daemon.global_states["ab" * 32] = global_state
    listener = MqttTransport(
        TransportConfig(host=mosquitto.host, port=mosquitto.port, client_id="listener")
    )
    listener.subscribe(device_topic("f", "pi-1", DeviceChannel.UPDATE))
    listener.start(timeout_seconds=10)
    try:
        daemon.start()
        _assign(daemon, key, spec, 1)
        loads_after_round_1 = daemon.trainers["alpha"].global_loads
        _assign(daemon, key, spec, 2)
        transport = daemon.transport
        assert isinstance(transport, NotingTransport)
        # At each update's publish: no personal copy yet (round 1), one load per round,
        # and none after it (the personal copy is written from the state, not the model).
        (first, second) = transport.notes
        assert first[1:] == (False, 1), first
        assert loads_after_round_1 == 1 and second[2] == 2, (second, loads_after_round_1)
        assert daemon.trainers["alpha"].global_loads == 2
        folder = daemon.config.state_dir / "adapters" / "alpha"
        assert (folder / "adapter_model.safetensors").is_file()  # written after the publish
        fresh, _ = build_task_model(daemon.trainers["alpha"].spec, seed=7)
        load_adapter(fresh, folder)  # a valid PEFT folder holding the global adapter
        for name, tensor in get_adapter_state(fresh).items():
            assert torch.equal(tensor, global_state[name]), name
        received = listener.received.get(timeout=10)
        assert isinstance(decode_frame(received.payload).message, Update)
        remembered = remembered_model(daemon.config.state_dir, "alpha")  # for the next start
        assert remembered is not None and remembered.spec == daemon.trainers["alpha"].spec
        assert [why for _, why, _ in daemon.models.builds] == ["assignment"]
    finally:
        listener.stop()
        daemon.stop()


@pytest.mark.slow
def test_a_task_trained_before_is_built_at_start_while_heartbeats_go_on(
    tmp_path: Path, mosquitto: MosquittoProcess, tiny_bert_folder: Path
) -> None:
    key = generate_private_key()
    spec = _spec(tiny_bert_folder)
    model_spec = TaskModelSpec(
        "alpha", "classification", spec.base_model, "none", AdapterConfig(4, 16.0), spec.labels
    )
    plan = TrainingPlan(scheme="none", rank=4, batch_size=4, seq_len=16, local_steps=2)
    daemon = _agent(tmp_path, mosquitto, key)
    remember_model(daemon.config.state_dir, model_spec, plan)  # as an earlier run left it
    assert remembered_model(daemon.config.state_dir, "alpha") is not None
    daemon.trainer_class = HeldTrainer
    HeldTrainer.release.clear()
    HeldTrainer.building.clear()
    try:
        daemon.start()  # connects, heartbeats, starts the preload and returns
        assert HeldTrainer.building.wait(30), "no model build started at start"
        assert daemon.models.preloading and daemon.trainers == {}
        shown = read_activity(daemon.config.state_dir)
        assert shown is not None and shown.phase is Phase.LOADING_MODEL and shown.task == "alpha"
        beat_started = time.monotonic()
        daemon.heartbeat()  # the loop is free while the model builds
        daemon.tick()
        assert time.monotonic() - beat_started < 1.0
        HeldTrainer.release.set()
        daemon.models.settle()
        assert list(daemon.trainers) == ["alpha"]
        daemon.tick()  # adopts (already done) and shows the agent idle again
        shown = read_activity(daemon.config.state_dir)
        assert shown is not None and shown.phase is Phase.IDLE
        daemon.global_states["ab" * 32] = _global_state(spec)
        _assign(daemon, key, spec, 1)
        transport = daemon.transport
        assert isinstance(transport, NotingTransport)
        assert len(transport.notes) == 1  # the update went out
        assert [why for _, why, _ in daemon.models.builds] == ["preload"]  # no second build
        shown = read_activity(daemon.config.state_dir)
        assert shown is not None and shown.last_round is not None
        assert shown.last_round.outcome == "uploaded" and shown.last_round.load_seconds == 0.0
    finally:
        HeldTrainer.release.set()
        daemon.stop()


@pytest.mark.slow
def test_no_preload_when_the_remembered_plan_does_not_fit_in_memory(
    tmp_path: Path, mosquitto: MosquittoProcess, caplog: pytest.LogCaptureFixture
) -> None:
    import dataclasses
    import logging

    key = generate_private_key()
    daemon = _agent(tmp_path, mosquitto, key)
    daemon.config = dataclasses.replace(
        daemon.config,
        eligibility=dataclasses.replace(daemon.config.eligibility, memory_margin_bytes=2**50),
    )
    model_spec = TaskModelSpec(
        "alpha", "classification", "minilm-l6", "nf4", AdapterConfig(4, 8.0), ("a", "b")
    )
    remember_model(daemon.config.state_dir, model_spec, TrainingPlan(scheme="nf4", rank=4))
    try:
        with caplog.at_level(logging.INFO):
            daemon.start()
        assert not daemon.models.preloading and daemon.trainers == {}
        assert any("not preloading task alpha" in r.getMessage() for r in caplog.records)
    finally:
        daemon.stop()


def test_a_damaged_model_memory_is_ignored_not_fatal(tmp_path: Path) -> None:
    folder = tmp_path / "task_models"
    folder.mkdir()
    (folder / "alpha.json").write_text('{"schema": 1, "spec": {"kind": "poem"}}')
    assert remembered_model(tmp_path, "alpha") is None
    spec = TaskModelSpec("alpha", "causal-lm", "smollm2-135m", "nf4", AdapterConfig(8, 16.0))
    plan = TrainingPlan(scheme="nf4", rank=8, gradient_checkpointing=True, micro_batch_size=2)
    remember_model(tmp_path, spec, plan)
    assert remembered_model(tmp_path, "alpha") == remembered_model(tmp_path, "alpha")
    remembered = remembered_model(tmp_path, "alpha")
    assert remembered is not None and remembered.spec == spec and remembered.plan == plan


@pytest.mark.slow
def test_a_new_agent_builds_the_model_a_manifest_announces_before_any_assignment(
    tmp_path: Path, mosquitto: MosquittoProcess, tiny_bert_folder: Path
) -> None:
    """No memory of the task yet: the retained manifest describes its model, and the agent
    builds it before it is asked (round 1 then trains at once); a task without local data,
    or a manifest without a description (an older coordinator), builds nothing."""
    key = generate_private_key()
    spec = _spec(tiny_bert_folder)
    plan = TrainingPlan(scheme="none", rank=4, batch_size=4, seq_len=16, local_steps=2)
    daemon = _agent(tmp_path, mosquitto, key)
    assert remembered_model(daemon.config.state_dir, "alpha") is None

    def manifest(task: str, described: bool) -> ReceivedMessage:
        message = ModelManifest(
            "f", task, "ab" * 32, 0, 100, 100, 1,
            spec=spec if described else None, plan=plan if described else None,
        )  # fmt: skip
        frame = encode_frame(message, sender=COORDINATOR_SENDER, signing_key=key)
        return ReceivedMessage(f"schoolfl/f/coord/model/{task}/manifest", frame, 1, True)

    try:
        daemon.start()
        daemon.handle(manifest("alpha", described=False))
        daemon.handle(manifest("beta", described=True))  # no beta.jsonl on this device
        daemon.tick()
        assert not daemon.models.preloading and daemon.models.builds == []
        daemon.handle(manifest("alpha", described=True))
        daemon.tick()  # starts the preload
        daemon.models.settle()
        assert list(daemon.trainers) == ["alpha"]
        assert [why for _, why, _ in daemon.models.builds] == ["preload"]
        remembered = remembered_model(daemon.config.state_dir, "alpha")
        assert remembered is not None and remembered.plan == plan
        assert remembered.spec.adapter == AdapterConfig(4, 16.0)
        daemon.handle(manifest("alpha", described=True))  # the next round's manifest
        daemon.tick()
        assert len(daemon.models.builds) == 1  # remembered now: nothing built again
        daemon.global_states["ab" * 32] = _global_state(spec)
        _assign(daemon, key, spec, 1)
        assert len(daemon.models.builds) == 1  # the assignment trained the preloaded model
    finally:
        daemon.stop()
