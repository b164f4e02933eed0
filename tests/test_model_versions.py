"""Global adapter versions: folders written without the model, the model built only when
needed, and old versions' retained chunks cleared from a real Mosquitto."""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path

import pytest
import torch

from coordinator import model_versions
from coordinator.config import CoordinatorConfig, CoordinatorSettings, TaskConfig
from coordinator.model_versions import ModelVersions, chunk_topics
from coordinator.mosquitto import MosquittoProcess
from coordinator.store import AdapterVersion, CoordinatorStore, RoundState
from coordinator.task_models import AdapterBody, TaskModel
from edge_runtime.wire import (
    ModelManifest,
    ReconnectConfig,
    TransportConfig,
    decode_frame,
    generate_private_key,
)
from edge_runtime.wire.transport import MqttTransport
from quantization.adapters import (
    AdapterConfig,
    attach_adapter,
    get_adapter_state,
    save_adapter,
    set_adapter_state,
)
from quantization.errors import AdapterError
from quantization.loader import load_quantized
from quantization.peft_folder import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    peft_config_dict,
    read_peft_config,
    write_peft_folder,
)

FLEET = "f"
WAIT_SECONDS = 15.0


def _trained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's adapter with every tensor moved off its initial value (B is zero there)."""
    generator = torch.Generator().manual_seed(7)
    state = {
        name: tensor + 0.01 * torch.randn(tensor.shape, generator=generator)
        for name, tensor in get_adapter_state(model).items()
    }
    set_adapter_state(model, state)
    return state


def _normalised(config: dict[str, object]) -> dict[str, object]:
    """PEFT writes target_modules as `list(set)`, in an order that varies between runs."""
    return {k: sorted(v) if k == "target_modules" else v for k, v in config.items()}  # type: ignore[arg-type]


def _loaded_state(source: Path, task: str, folder: Path) -> dict[str, torch.Tensor]:
    """What `PeftModel.from_pretrained` makes of `folder` on a fresh base model."""
    from peft import PeftModel

    base = load_quantized(source, "none", task=task, num_labels=2 if task != "causal-lm" else None)
    return get_adapter_state(PeftModel.from_pretrained(base, str(folder)))


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_a_folder_written_without_the_model_is_what_peft_writes(
    tmp_path: Path, tiny_bert_folder: Path, tiny_llama_checkpoint: Path, task: str
) -> None:
    source = tiny_bert_folder if task == "classification" else tiny_llama_checkpoint
    base = load_quantized(source, "nf4", task=task, num_labels=2 if task != "causal-lm" else None)
    model = attach_adapter(base, AdapterConfig(rank=4))
    state = _trained(model)
    old = save_adapter(model, tmp_path / "old")
    new = write_peft_folder(tmp_path / "new", state, peft_config_dict(model))

    # Same tensors under the same names, byte for byte; the same config, field for field.
    assert (new / WEIGHTS_NAME).read_bytes() == (old / WEIGHTS_NAME).read_bytes()
    old_config = json.loads((old / CONFIG_NAME).read_text())
    new_config = json.loads((new / CONFIG_NAME).read_text())
    assert _normalised(new_config) == _normalised(old_config)
    assert "auto_mapping" in new_config and new_config["inference_mode"] is True
    # And PEFT loads it into exactly the adapter the old folder gives.
    from_new = _loaded_state(source, task, new)
    from_old = _loaded_state(source, task, old)
    assert from_new.keys() == from_old.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(from_new[name], tensor) and torch.equal(from_old[name], tensor)


def test_a_folder_that_disagrees_with_its_state_is_refused(tmp_path: Path) -> None:
    state = {"m.lora_A.weight": torch.zeros(2, 8), "m.lora_B.weight": torch.zeros(8, 2)}
    config = {"peft_type": "LORA", "r": 4}
    with pytest.raises(AdapterError, match="rank 4, the state has rank 2"):
        write_peft_folder(tmp_path / "a", state, config)
    state["m.lora_B.weight"] = torch.full((8, 2), float("nan"))
    with pytest.raises(AdapterError, match="NaN"):
        write_peft_folder(tmp_path / "a", state, {**config, "r": 2})
    assert not (tmp_path / "a").exists()


# -- ModelVersions -----------------------------------------------------------------------


def _config(tmp_path: Path, model: Path, eval_file: str = "", tasks: int = 1) -> CoordinatorConfig:
    def task(task_id: str) -> TaskConfig:
        return TaskConfig(
            id=task_id,
            kind="classification",
            base_model=str(model),
            labels=("a", "b"),
            rank=2,
            eval_file=eval_file,
        )

    return CoordinatorConfig(
        coordinator=CoordinatorSettings(fleet=FLEET, state_dir=str(tmp_path / "state")),
        tasks=tuple(task(name) for name in ("alpha", "beta")[:tasks]),
    )


class CountingFactory:
    """The real TaskModel, counting how often a model is built."""

    def __init__(self) -> None:
        self.built: list[str] = []

    def __call__(self, task: TaskConfig) -> TaskModel:
        self.built.append(task.id)
        return TaskModel(task)


def _versions(config: CoordinatorConfig, factory: CountingFactory) -> ModelVersions:
    store = CoordinatorStore(config.state_dir / "coordinator.db")
    return ModelVersions(config, store, generate_private_key(), model_factory=factory)


def _next_version(versions: ModelVersions, task_id: str, round_number: int) -> AdapterBody:
    """What a completed round does: a changed state, written, recorded, made current."""
    state = versions.current[task_id].state()
    state = {name: tensor + 0.01 * round_number for name, tensor in state.items()}
    body = AdapterBody.of(state)
    number = versions.store.latest_adapter_version(task_id).version + 1  # type: ignore[union-attr]
    folder = versions.write(task_id, number, state, body)
    versions.store.add_adapter_version(
        AdapterVersion(task_id, number, round_number, body.version, str(folder), 0.0)
    )
    versions.current[task_id] = body
    return body


def test_versions_are_written_without_the_model_and_a_restart_builds_none(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    config = _config(tmp_path, tiny_bert_folder)
    factory = CountingFactory()
    versions = _versions(config, factory)
    initial = versions.load_or_create("alpha")
    assert factory.built == ["alpha"] and versions.models == {}  # built for v0, then freed
    assert versions.evaluate("alpha", initial.state()) == {}
    body = _next_version(versions, "alpha", 1)
    assert factory.built == ["alpha"]  # v1 written without a model

    restarted_factory = CountingFactory()
    restarted = _versions(config, restarted_factory)
    assert restarted.load_or_create("alpha") == body
    _next_version(restarted, "alpha", 2)
    assert restarted_factory.built == []
    folders = [v.folder for v in restarted.store.adapter_versions("alpha")]
    configs = [read_peft_config(folder) for folder in folders]
    assert all(c == configs[0] for c in configs) and configs[0]["r"] == 2
    assert (Path(folders[-1]) / "README.md").read_text().startswith("# LoRA adapter")
    # The folder holds the state: PEFT loads it back exactly.
    loaded = _loaded_state(tiny_bert_folder, "classification", Path(folders[-1]))
    expected = restarted.current["alpha"].state()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


def test_version_0_from_a_child_process_is_the_models_initial_adapter(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    """The default factory makes version 0 in a child process (the daemon never imports
    the model's libraries for it): the same tensors the model built here starts with."""

    class InChild(ModelVersions):
        initial_in_child = True  # this test process has imported transformers already

    config = _config(tmp_path, tiny_bert_folder)
    versions = InChild(
        config, CoordinatorStore(config.state_dir / "coordinator.db"), generate_private_key()
    )
    initial = versions.load_or_create("alpha")
    assert versions.models == {}
    expected = TaskModel(config.task("alpha")).initial_state()
    state = initial.state()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[name], expected[name]) for name in expected)
    assert any(bool(t.abs().sum() > 0) for n, t in state.items() if "lora_A" in n)
    assert all(bool(t.abs().sum() == 0) for n, t in state.items() if "lora_B" in n)
    folder = Path(versions.store.latest_adapter_version("alpha").folder)  # type: ignore[union-attr]
    loaded = _loaded_state(tiny_bert_folder, "classification", folder)
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)
    # Here (transformers imported) the default builds it in this process and frees it:
    # the same tensors again.
    here = _config(tmp_path / "here", tiny_bert_folder)
    in_process = ModelVersions(
        here, CoordinatorStore(here.state_dir / "coordinator.db"), generate_private_key()
    )
    same = in_process.load_or_create("alpha").state()
    assert in_process.models == {}
    assert all(torch.equal(same[name], expected[name]) for name in expected)


@pytest.mark.slow
def test_minilm_versions_load_in_peft_as_the_old_folders_do(tmp_path: Path) -> None:
    """The real model: a version written without it and one PEFT saved from it."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from quantization.models import minilm_path

    task = TaskConfig(
        id="alpha", kind="classification", base_model="minilm-l6", labels=("a", "b"), rank=8
    )
    config = CoordinatorConfig(
        coordinator=CoordinatorSettings(fleet=FLEET, state_dir=str(tmp_path / "state")),
        tasks=(task,),
    )
    factory = CountingFactory()
    versions = _versions(config, factory)
    versions.load_or_create("alpha")
    body = _next_version(versions, "alpha", 1)
    new = Path(versions.store.latest_adapter_version("alpha").folder)  # type: ignore[union-attr]
    model = TaskModel(config.task("alpha"))
    set_adapter_state(model.model, body.state())
    old = save_adapter(model.model, tmp_path / "old")
    assert (new / WEIGHTS_NAME).read_bytes() == (old / WEIGHTS_NAME).read_bytes()
    assert _normalised(read_peft_config(new)) == _normalised(read_peft_config(old))
    base = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=2)
    loaded = get_adapter_state(PeftModel.from_pretrained(base, str(new)))
    expected = body.state()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


def test_a_task_with_an_eval_file_builds_its_model_once(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    eval_file = tmp_path / "eval.csv"
    eval_file.write_text("text,label\nhello there,a\ngood bye,b\n")
    config = _config(tmp_path, tiny_bert_folder, eval_file=str(eval_file))
    factory = CountingFactory()
    versions = _versions(config, factory)
    initial = versions.load_or_create("alpha")
    assert "accuracy" in versions.store.latest_adapter_version("alpha").metrics  # type: ignore[union-attr]
    assert set(versions.evaluate("alpha", initial.state())) == {"accuracy"}
    assert factory.built == ["alpha"] and "alpha" in versions.models


def _cleared(outgoing: list) -> set[str]:  # noqa: ANN001
    return {item.topic for item in outgoing if item.payload == b"" and item.retain}


def _topics(versions: ModelVersions, number: int, task_id: str = "alpha") -> set[str]:
    version = versions.store.adapter_versions(task_id)[number]
    size = Path(version.folder).with_suffix(".body").stat().st_size
    return set(chunk_topics(FLEET, version.sha256, size))


def test_old_chunks_are_cleared_unless_an_open_round_names_their_version(
    tmp_path: Path, tiny_bert_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_versions, "MODEL_CHUNK_BYTES", 1024)  # several chunks each
    config = _config(tmp_path, tiny_bert_folder)
    versions = _versions(config, CountingFactory())
    versions.load_or_create("alpha")
    assert _cleared(versions.publish("alpha", versions.current["alpha"], 0)) == set()
    _next_version(versions, "alpha", 1)
    versions.store.open_round("alpha", 2, base_version=1, deadline=1e12, plans_json={})
    _next_version(versions, "alpha", 2)  # a version made while round 2 still runs on v1
    outgoing = versions.publish("alpha", versions.current["alpha"], 2)
    assert len(_topics(versions, 0)) > 1
    assert _cleared(outgoing) == _topics(versions, 0)  # v1: named by the open round
    retained = [item for item in outgoing if item.payload]
    assert outgoing[: len(retained)] == retained  # chunks and manifest first, then clears

    versions.store.close_round("alpha", 2, RoundState.FAILED, "deadline")
    assert _cleared(versions.stale_retained("alpha")) == _topics(versions, 1)
    assert versions.stale_retained("alpha") == []  # each version cleared once per run
    # A restarted coordinator clears what any earlier run left: every older version.
    restarted = _versions(config, CountingFactory())
    restarted.load_or_create("alpha")
    assert _cleared(restarted.stale_retained("alpha")) == _topics(versions, 0) | _topics(
        versions, 1
    )


def test_a_version_another_task_still_serves_is_not_cleared(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    """Chunk topics are named by sha256 only, so two tasks whose versions have the same
    bytes share them (here beta starts from alpha's initial adapter)."""
    config = _config(tmp_path, tiny_bert_folder, tasks=2)
    versions = _versions(config, CountingFactory())
    alpha = versions.load_or_create("alpha")
    shared = versions.store.adapter_versions("alpha")[0]
    versions.store.add_adapter_version(
        AdapterVersion("beta", 0, None, alpha.version, shared.folder, 0.0)
    )
    assert versions.load_or_create("beta") == alpha
    _next_version(versions, "alpha", 1)
    assert _cleared(versions.publish("alpha", versions.current["alpha"], 1)) == set()
    _next_version(versions, "beta", 1)
    assert _cleared(versions.publish("beta", versions.current["beta"], 1)) == _topics(
        versions, 0, "beta"
    )


# -- against Mosquitto ---------------------------------------------------------------------


def _transport(broker: MosquittoProcess, client_id: str) -> MqttTransport:
    return MqttTransport(
        TransportConfig(
            host=broker.host,
            port=broker.port,
            client_id=client_id,
            keepalive_seconds=5,
            reconnect=ReconnectConfig(min_delay_seconds=1, max_delay_seconds=2),
        )
    )


def _retained_now(broker: MosquittoProcess, topic_filter: str) -> dict[str, bytes]:
    """What a fresh subscriber to `topic_filter` is handed: retained messages, collected
    until a sentinel it publishes after subscribing comes back (the broker sends the
    retained ones on subscribing, before anything published later)."""
    sentinel = f"schoolfl/{FLEET}/coord/sentinel-{time.monotonic_ns()}"
    transport = _transport(broker, "fresh-subscriber")
    transport.subscribe(topic_filter)
    transport.subscribe(sentinel)
    transport.start(timeout_seconds=WAIT_SECONDS)
    try:
        transport.publish(sentinel, b"end")
        received: dict[str, bytes] = {}
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            try:
                message = transport.received.get(timeout=deadline - time.monotonic())
            except queue.Empty:
                break
            if message.topic == sentinel:
                return received
            received[message.topic] = message.payload
        raise AssertionError(f"sentinel not back within {WAIT_SECONDS} s; got {len(received)}")
    finally:
        transport.stop()


@pytest.mark.integration
def test_a_fresh_subscriber_gets_only_the_current_versions_chunks(
    tmp_path: Path,
    tiny_bert_folder: Path,
    mosquitto: MosquittoProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(model_versions, "MODEL_CHUNK_BYTES", 4096)
    versions = _versions(_config(tmp_path, tiny_bert_folder), CountingFactory())
    publisher = _transport(mosquitto, "coordinator")
    publisher.start(timeout_seconds=WAIT_SECONDS)
    try:
        first = versions.load_or_create("alpha")
        outgoing = versions.publish("alpha", first, 0)
        for number in (1, 2):
            body = _next_version(versions, "alpha", number)
            outgoing += versions.publish("alpha", body, number)
        infos = [publisher.publish(o.topic, o.payload, retain=o.retain) for o in outgoing]
        assert all(publisher.wait_published(info, WAIT_SECONDS) for info in infos)
    finally:
        publisher.stop()

    blobs = _retained_now(mosquitto, f"schoolfl/{FLEET}/coord/blob/+/+")
    assert set(blobs) == _topics(versions, 2) and len(blobs) > 1
    assert all(f"/{body.version}/" in topic for topic in blobs)
    manifests = _retained_now(mosquitto, f"schoolfl/{FLEET}/coord/model/#")
    (manifest,) = manifests.values()
    message = decode_frame(manifest).message
    assert isinstance(message, ModelManifest) and message.version == body.version
