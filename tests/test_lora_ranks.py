"""Adapters of different LoRA ranks in one round: truncation, padding, scaled alpha,
rank-sliced FedAvg, the round manager and the agent (no broker needed)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from coordinator.aggregation import (
    ClientUpdate,
    FedAvg,
    NormBound,
    rank_weighted_mean,
    update_problem,
    weighted_mean,
)
from quantization.adapter_deltas import update_l2_norm as l2_norm
from quantization.lora_ranks import (
    adapter_rank,
    pad_to_shapes,
    rank_axis,
    scaled_alpha,
    truncate_to_rank,
    truncated_shapes,
)

A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
B = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
HEAD = "base_model.model.classifier.weight"


def _state(rank: int = 4, fill: float | None = None) -> dict[str, torch.Tensor]:
    """A one-layer adapter: A [rank, 6], B [5, rank], and a head [2, 6]."""
    generator = torch.Generator().manual_seed(rank)
    shapes = {A: (rank, 6), B: (5, rank), HEAD: (2, 6)}
    if fill is not None:
        return {name: torch.full(shape, fill) for name, shape in shapes.items()}
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


# ---------------------------------------------------------------------------------------
# lora_ranks


@pytest.mark.parametrize(
    ("name", "axis"),
    [
        (A, 0),
        (B, 1),
        ("base_model.model.bert.embeddings.word_embeddings.lora_embedding_A", 0),
        ("base_model.model.bert.embeddings.word_embeddings.lora_embedding_B", 1),
        ("base_model.model.layer.query.lora_A.default.weight", 0),
        (HEAD, None),
        ("base_model.model.classifier.bias", None),
        ("base_model.model.layer.query.lora_B.bias", None),
        ("base_model.model.layer.query.lora_magnitude_vector", None),
    ],
)
def test_rank_axis_reads_the_peft_name(name: str, axis: int | None) -> None:
    assert rank_axis(name) == axis


def test_adapter_rank_and_its_errors() -> None:
    assert adapter_rank(_state(4)) == 4
    with pytest.raises(ValueError, match="disagree on rank"):
        adapter_rank({A: torch.zeros(4, 6), B: torch.zeros(5, 2)})
    with pytest.raises(ValueError, match="no LoRA factors"):
        adapter_rank({HEAD: torch.zeros(2, 6)})
    with pytest.raises(ValueError, match="rank on axis 1"):
        adapter_rank({B: torch.zeros(5)})


def test_truncate_keeps_first_components_and_pad_restores_them() -> None:
    state = _state(4)
    small = truncate_to_rank(state, 2)
    assert torch.equal(small[A], state[A][:2])
    assert torch.equal(small[B], state[B][:, :2])
    assert torch.equal(small[HEAD], state[HEAD])
    assert all(t.is_contiguous() for t in small.values())
    assert adapter_rank(small) == 2
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    assert truncated_shapes(shapes, 2) == {name: tuple(t.shape) for name, t in small.items()}

    padded = pad_to_shapes(small, shapes)
    assert torch.equal(padded[A][:2], state[A][:2]) and not padded[A][2:].any()
    assert torch.equal(padded[B][:, :2], state[B][:, :2]) and not padded[B][:, 2:].any()
    # A state whose components 2..3 are zero survives the round trip exactly.
    zeroed = {name: t.clone() for name, t in state.items()}
    zeroed[A][2:] = 0
    zeroed[B][:, 2:] = 0
    round_trip = pad_to_shapes(truncate_to_rank(zeroed, 2), shapes)
    assert all(torch.equal(round_trip[name], zeroed[name]) for name in zeroed)
    assert all(torch.equal(truncate_to_rank(state, 4)[n], state[n]) for n in state)


@pytest.mark.parametrize("rank", [0, 5, -1])
def test_truncation_refuses_ranks_outside_one_to_r(rank: int) -> None:
    with pytest.raises(ValueError, match=r"1\.\.4"):
        truncate_to_rank(_state(4), rank)
    with pytest.raises(ValueError, match=r"1\.\.4"):
        truncated_shapes({name: tuple(t.shape) for name, t in _state(4).items()}, rank)


def test_pad_refuses_anything_but_a_shorter_rank_axis() -> None:
    shapes = {name: tuple(t.shape) for name, t in _state(4).items()}
    with pytest.raises(ValueError, match="only the rank axis"):
        pad_to_shapes({**_state(4), A: torch.zeros(4, 5)}, shapes)
    with pytest.raises(ValueError, match="only the rank axis"):
        pad_to_shapes({**_state(4), HEAD: torch.zeros(1, 6)}, shapes)
    with pytest.raises(ValueError, match="missing"):
        pad_to_shapes({A: torch.zeros(4, 6)}, shapes)


def test_scaled_alpha() -> None:
    assert scaled_alpha(16.0, 8, 4) == 8.0
    assert scaled_alpha(16.0, 8, 2) == 4.0
    assert scaled_alpha(0.3, 3, 3) == 0.3  # full rank: the alpha itself, no rounding
    with pytest.raises(ValueError, match=r"1\.\.8"):
        scaled_alpha(16.0, 8, 9)


def test_scaled_alpha_makes_the_truncated_peft_model_compute_the_global_function() -> None:
    """A rank-2 PEFT model with alpha * 2 / 4, loaded with the first two components of a
    rank-4 global adapter, gives the outputs of the rank-4 model whose components 2..3 are
    zero; with the unscaled alpha it does not."""
    from transformers import BertForSequenceClassification

    from quantization.adapters import (
        AdapterConfig,
        attach_adapter,
        get_adapter_state,
        set_adapter_state,
    )
    from quantization.models import tiny_bert_config

    def model(rank: int, alpha: float) -> torch.nn.Module:
        torch.manual_seed(0)  # the same base weights every time
        base = BertForSequenceClassification(
            tiny_bert_config(vocab_size=100, max_position_embeddings=32, num_labels=2)
        )
        return attach_adapter(base, AdapterConfig(rank=rank, alpha=alpha)).eval()

    global_model = model(4, 16.0)
    generator = torch.Generator().manual_seed(1)
    state = {
        name: torch.randn(t.shape, generator=generator)
        for name, t in get_adapter_state(global_model).items()
    }
    for name, tensor in state.items():
        axis = rank_axis(name)
        if axis is not None:
            tensor.narrow(axis, 2, 2).zero_()
    set_adapter_state(global_model, state)
    small_model = model(2, scaled_alpha(16.0, 4, 2))
    set_adapter_state(small_model, truncate_to_rank(state, 2))
    unscaled_model = model(2, 16.0)
    set_adapter_state(unscaled_model, truncate_to_rank(state, 2))

    inputs = torch.randint(0, 100, (3, 12), generator=generator)
    with torch.no_grad():
        expected = global_model(input_ids=inputs).logits
        got = small_model(input_ids=inputs).logits
        unscaled = unscaled_model(input_ids=inputs).logits
        set_adapter_state(global_model, {n: torch.zeros_like(t) for n, t in state.items()})
        no_adapter = global_model(input_ids=inputs).logits
    assert not torch.allclose(expected, no_adapter, atol=1e-3)  # the adapter matters
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unscaled, expected, atol=1e-3)


# ---------------------------------------------------------------------------------------
# rank-sliced FedAvg


def _client(device: str, rank: int, value: float, samples: int) -> ClientUpdate:
    return ClientUpdate(device, _state(rank, fill=value), samples, num_steps=1, rank=rank)


def test_component_k_is_averaged_over_devices_of_rank_above_k() -> None:
    reference = _state(4, fill=0.0)
    updates = [
        _client("big", 4, 1.0, 10),  # components 0..3
        _client("mid", 2, 3.0, 30),  # components 0..1
        _client("small", 1, 7.0, 60),  # component 0
    ]
    result = FedAvg().aggregate(updates, reference)
    assert result.accepted_devices == ("big", "mid", "small")
    component = [
        (1.0 * 10 + 3.0 * 30 + 7.0 * 60) / 100,  # 5.2
        (1.0 * 10 + 3.0 * 30) / 40,  # 2.5
        1.0,
        1.0,
    ]
    for k, value in enumerate(component):
        assert torch.allclose(result.delta[A][k], torch.full((6,), value))
        assert torch.allclose(result.delta[B][:, k], torch.full((5,), value))
    assert torch.allclose(result.delta[HEAD], torch.full((2, 6), 5.2))  # over every update
    assert result.total_samples == 100


def test_a_component_no_update_reaches_stays_zero() -> None:
    result = FedAvg().aggregate(
        [_client("a", 1, 2.0, 1), _client("b", 2, 4.0, 3)], _state(3, fill=0.0)
    )
    assert torch.allclose(result.delta[A][0], torch.full((6,), 3.5))
    assert torch.allclose(result.delta[A][1], torch.full((6,), 4.0))
    assert not result.delta[A][2].any() and not result.delta[B][:, 2].any()


def test_same_rank_is_plain_fedavg_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(7)
    deltas = [
        {name: torch.randn(t.shape, generator=generator) for name, t in _state(4).items()}
        for _ in range(3)
    ]
    weights = [17, 5, 101]
    plain = weighted_mean(deltas, weights)
    sliced = rank_weighted_mean(deltas, weights, [4, 4, None], _state(4))
    assert all(torch.equal(sliced[name], plain[name]) for name in plain)

    reference = _state(4, fill=0.0)
    pairs = list(enumerate(zip(deltas, weights, strict=True)))
    implicit = FedAvg().aggregate(
        [ClientUpdate(f"d{i}", d, w, 1) for i, (d, w) in pairs], reference
    )
    explicit = FedAvg().aggregate(
        [ClientUpdate(f"d{i}", d, w, 1, rank=4) for i, (d, w) in pairs], reference
    )
    assert all(torch.equal(explicit.delta[n], implicit.delta[n]) for n in plain)
    assert all(torch.equal(implicit.delta[n], plain[n]) for n in plain)


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        (ClientUpdate("x", _state(4, fill=1.0), 5, 1, rank=5), "outside 1..4"),
        (ClientUpdate("x", _state(4, fill=1.0), 5, 1, rank=2), "rank 4, its plan says rank 2"),
        (ClientUpdate("x", _state(2, fill=1.0), 5, 1), "rank 2, its plan says rank 4"),
        (
            ClientUpdate("x", {**_state(2, fill=1.0), B: torch.ones(5, 3)}, 5, 1, rank=2),
            "disagree on rank",
        ),
        (
            ClientUpdate("x", {**_state(2, fill=1.0), A: torch.ones(2, 7)}, 5, 1, rank=2),
            "expected (2, 6)",
        ),
        (
            ClientUpdate("x", {**_state(2, fill=1.0), A: torch.full((2, 6), math.nan)}, 5, 1, 2),
            "NaN or Inf",
        ),
    ],
)
def test_bad_ranks_are_refused_with_a_reason(update: ClientUpdate, reason: str) -> None:
    reference = _state(4, fill=0.0)
    assert reason in (update_problem(update.delta, reference, update.rank) or "")
    result = FedAvg().aggregate([_client("good", 2, 1.0, 1), update], reference)
    assert result.accepted_devices == ("good",)
    assert reason in result.rejected_devices["x"]
    assert torch.allclose(result.delta[A][:2], torch.ones(2, 6))


def test_a_rank_needs_lora_factors_and_must_be_positive() -> None:
    assert "has none" in (update_problem({"w": torch.zeros(2)}, {"w": torch.zeros(2)}, 1) or "")
    with pytest.raises(ValueError, match="rank must be a positive int"):
        ClientUpdate("x", {}, 1, 1, rank=0)


def test_norm_bound_clips_a_small_rank_update_as_sent() -> None:
    result = FedAvg(NormBound(1.0)).aggregate([_client("loud", 2, 100.0, 1)], _state(4, 0.0))
    assert result.clipped_devices == ("loud",)
    assert l2_norm(result.delta) == pytest.approx(1.0, rel=1e-5)
    assert not result.delta[A][2:].any()


# ---------------------------------------------------------------------------------------
# through the round manager (no broker)


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.slow
def test_round_with_rank_4_and_rank_2_devices(tmp_path: Path, tiny_bert_folder: Path) -> None:
    from coordinator.config import (
        CoordinatorConfig,
        CoordinatorSettings,
        ScheduleConfig,
        TaskConfig,
    )
    from coordinator.rounds import RoundManager
    from coordinator.scheduler import DeviceCandidate, FitFirstScheduler
    from coordinator.store import CoordinatorStore, RoundState
    from device_profiles.profile import find_profile
    from edge_runtime.wire import (
        AckStatus,
        CodecConfig,
        TaskAssignment,
        Update,
        UpdateEncoding,
        decode_frame,
        encode_update,
        generate_private_key,
    )

    class HalfRankForDev1(FitFirstScheduler):
        def configure_round(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            schedule = super().configure_round(*args, **kwargs)
            plans = tuple(
                replace(p, plan=replace(p.plan, rank=2)) if p.device_id == "dev-1" else p
                for p in schedule.plans
            )
            return replace(schedule, plans=plans)

    task = TaskConfig(
        id="alpha",
        kind="classification",
        base_model=str(tiny_bert_folder),
        labels=("a", "b"),
        rank=4,
        batch_size=16,  # 3 steps x 16: both sample counts below are within the plan
        median_norm_multiple=0.0,  # the subject is rank mixing, not the norm bound
        schedule=ScheduleConfig(
            devices_per_round=2,
            min_updates=2,
            over_selection=0.0,
            round_deadline_seconds=60.0,
            gather_seconds=0.0,
        ),
    )
    config = CoordinatorConfig(
        coordinator=CoordinatorSettings(fleet="f", state_dir=str(tmp_path / "state")),
        tasks=(task,),
    )
    clock = _Clock()
    store = CoordinatorStore(config.state_dir / "coordinator.db", now=clock)
    manager = RoundManager(config, store, HalfRankForDev1(), generate_private_key(), now=clock)
    manager.start()
    profile = find_profile("laptop-mid-16gb")
    candidates = [DeviceCandidate(f"dev-{i}", "north", profile) for i in range(2)]
    assignments = {
        message.device_id: message
        for item in manager.open_rounds_if_possible(candidates)
        if "/task" in item.topic
        and item.payload
        and isinstance(message := decode_frame(item.payload).message, TaskAssignment)
    }
    assert {d: a.plan.rank for d, a in assignments.items()} == {"dev-0": 4, "dev-1": 2}
    reference = manager.current["alpha"].state()
    version = manager.current["alpha"].version

    def send(device: str, delta: dict[str, torch.Tensor], samples: int) -> tuple[AckStatus, str]:
        update = Update("f", "alpha", 1, device, 0, version, samples, 3, UpdateEncoding.FP32)
        body = encode_update(delta, CodecConfig(UpdateEncoding.FP32)).body
        status, reason, _ = manager.accept_update(update, body)
        return status, reason

    def filled(rank: int, value: float) -> dict[str, torch.Tensor]:
        shapes = truncated_shapes({n: tuple(t.shape) for n, t in reference.items()}, rank)
        return {name: torch.full(shape, value) for name, shape in shapes.items()}

    # dev-1's plan says rank 2: a full-rank delta does not decode against its shapes.
    status, reason = send("dev-1", filled(4, 3.0), 30)
    assert status is AckStatus.REJECTED and "undecodable" in reason
    assert send("dev-0", filled(4, 1.0), 10)[0] is AckStatus.ACCEPTED
    assert send("dev-1", filled(2, 3.0), 30)[0] is AckStatus.ACCEPTED

    record = store.round("alpha", 1)
    assert record is not None and record.state is RoundState.COMPLETED, record
    new = manager.current["alpha"].state()
    mixed = (1.0 * 10 + 3.0 * 30) / 40  # components 0..1 and the head: both devices
    for name, tensor in reference.items():
        axis = rank_axis(name)
        expected = torch.full(tensor.shape, mixed)
        if axis is not None:
            expected.narrow(axis, 2, 2).fill_(1.0)  # components 2..3: dev-0 only
        assert torch.allclose(new[name], tensor + expected, atol=1e-6), name
    assert [v.version for v in store.adapter_versions("alpha")] == [0, 1]


# ---------------------------------------------------------------------------------------
# the agent


class _FakeTransport:
    """Records what the agent publishes (the broker is not this test's subject)."""

    connect_count = 1

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.published.append((topic, payload))

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        pass

    def stop(self) -> None:
        pass


def enroll_with_alpha_data(config, coordinator_key) -> None:  # noqa: ANN001
    """An enrolled agent's state folder (key, enrollment) and 16 labelled rows for task
    alpha in its data folder."""
    from edge_runtime.enrollment_record import Enrollment
    from edge_runtime.wire import generate_private_key, public_key_hex, save_private_key

    config.state_dir.mkdir(parents=True)
    save_private_key(generate_private_key(), config.key_path)
    Enrollment("f", "pi-1", public_key_hex(coordinator_key), 0.0).save(config.state_dir)
    data = Path(config.agent.data_dir)
    data.mkdir()
    rows = [{"text": f"question number {i} about {'maths' if i % 2 else 'art'}",
             "label": "ab"[i % 2]} for i in range(16)]  # fmt: skip
    (data / "alpha.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def _agent(tmp_path: Path, coordinator_key):  # noqa: ANN001, ANN202
    from edge_runtime.agent import AgentDaemon
    from edge_runtime.agent_config import AgentConfig, AgentSettings
    from edge_runtime.eligibility import EligibilityPolicy

    config = AgentConfig(
        agent=AgentSettings(
            fleet="f",
            device_id="pi-1",
            school="north",
            state_dir=str(tmp_path / "state"),
            data_dir=str(tmp_path / "data"),
        ),
        eligibility=EligibilityPolicy(
            max_cpu_percent=100.0, min_battery_percent=0.0, memory_margin_bytes=0
        ),
    )
    enroll_with_alpha_data(config, coordinator_key)
    daemon = AgentDaemon(config)
    daemon.transport = _FakeTransport()  # type: ignore[assignment]
    return daemon


@pytest.mark.slow
def test_agent_trains_a_smaller_rank_plan_and_declines_a_larger_one(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    import time

    from device_profiles.plan import TrainingPlan
    from edge_runtime.wire import (
        COORDINATOR_SENDER,
        AssignmentDecline,
        ReceivedMessage,
        TaskAssignment,
        TaskSpec,
        Update,
        UpdateEncoding,
        decode_frame,
        decode_update,
        encode_frame,
        generate_private_key,
    )
    from quantization.adapters import AdapterConfig, get_adapter_state
    from quantization.task_model import TaskModelSpec, build_task_model

    spec = TaskSpec("classification", str(tiny_bert_folder), ("a", "b"), adapter_alpha=16.0)
    global_model, _ = build_task_model(
        TaskModelSpec(
            "alpha", "classification", spec.base_model, "none", AdapterConfig(4, 16.0), spec.labels
        )  # fmt: skip
    )
    global_state = get_adapter_state(global_model)
    version = "ab" * 32
    key = generate_private_key()
    daemon = _agent(tmp_path, key)
    daemon.global_states[version] = global_state

    def assign(server_round: int, rank: int) -> list[object]:
        plan = TrainingPlan(scheme="none", rank=rank, batch_size=4, seq_len=16, local_steps=2)
        assignment = TaskAssignment(
            "f", "alpha", server_round, "pi-1", 0, plan, time.time() + 600, version, spec,
            UpdateEncoding.FP32,
        )  # fmt: skip
        frame = encode_frame(assignment, sender=COORDINATOR_SENDER, signing_key=key)
        daemon.transport.published.clear()
        daemon.handle(ReceivedMessage("schoolfl/f/dev/pi-1/inbox/task", frame, 1, False))
        return [decode_frame(payload) for _, payload in daemon.transport.published]

    try:
        frames = assign(1, 2)
        updates = [f for f in frames if isinstance(f.message, Update)]
        assert len(updates) == 1, [type(f.message).__name__ for f in frames]
        delta = decode_update(updates[0].body)
        assert adapter_rank(delta) == 2
        shapes = {n: tuple(t.shape) for n, t in global_state.items()}
        assert {n: tuple(t.shape) for n, t in delta.items()} == truncated_shapes(shapes, 2)
        assert any(float(t.abs().max()) > 0 for t in delta.values())
        trainer = daemon.trainers["alpha"]
        assert trainer.spec.adapter.rank == 2 and trainer.spec.adapter.alpha == 8.0
        meta = json.loads((daemon.config.state_dir / "adapters" / "alpha.json").read_text())
        assert meta["rank"] == 2 and meta["spec"]["adapter_alpha"] == 8.0

        frames = assign(2, 8)
        declines = [f.message for f in frames if isinstance(f.message, AssignmentDecline)]
        assert len(declines) == 1 and len(frames) == 1
        assert "exceeds the global adapter's rank 4" in declines[0].reasons[0]
    finally:
        daemon.outbox.close()
        daemon.history.close()
