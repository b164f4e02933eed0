"""Client-level differential privacy: clipping, calibrated noise, the RDP accountant, the
budget stop in the round lifecycle, the device-side privatisation and the report."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import dp_accounting
import pytest
import torch
from click.testing import CliRunner
from dp_accounting import rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.aggregation import ClientUpdate
from coordinator.config import (
    CoordinatorConfig,
    CoordinatorConfigError,
    CoordinatorSettings,
    PrivacyConfig,
    ScheduleConfig,
    TaskConfig,
)
from coordinator.privacy import (
    RDP_ORDERS,
    DpFedAvg,
    DpPolicy,
    central_noise_std,
    epsilon_for_rounds,
    make_aggregator,
    sampling_probability,
)
from coordinator.rounds import RoundManager
from coordinator.scheduler import DeviceCandidate, FitFirstScheduler
from coordinator.store import CoordinatorStore, PrivacyRound, PrivacyStop, RoundState
from device_profiles.profile import find_profile
from edge_runtime.local_privacy import privatize_update
from edge_runtime.wire import (
    AckStatus,
    CodecConfig,
    DevicePrivacy,
    PrivacyMode,
    TaskAssignment,
    TaskSpec,
    Update,
    UpdateEncoding,
    decode_frame,
    encode_update,
    from_json_fields,
    generate_private_key,
    to_json_fields,
)
from quantization.adapter_deltas import clip_update, update_l2_norm
from schoolfl.cli import cli

DELTA = 1e-5


def _policy(mode: PrivacyMode = PrivacyMode.CENTRAL, clip: float = 0.5, z: float = 1.1) -> DpPolicy:
    return DpPolicy(mode, clip, z, epsilon_budget=10.0, delta=DELTA)


# ---------------------------------------------------------------------------------------
# (a) clipping


tensor_maps = st.dictionaries(
    st.sampled_from(["a.lora_A.weight", "a.lora_B.weight", "head.weight", "head.bias"]),
    st.tuples(
        st.integers(1, 6),
        st.integers(1, 6),
        st.floats(1e-3, 1e4),
        st.integers(0, 2**31 - 1),
    ),
    min_size=1,
).map(
    lambda spec: {
        name: torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
        for name, (rows, cols, scale, seed) in spec.items()
    }
)


@settings(max_examples=200, deadline=None)
@given(delta=tensor_maps, clip_norm=st.floats(1e-4, 1e3))
def test_clipped_updates_never_exceed_the_bound(
    delta: dict[str, torch.Tensor], clip_norm: float
) -> None:
    clipped = clip_update(delta, clip_norm)
    assert update_l2_norm(clipped) <= clip_norm
    if update_l2_norm(delta) <= clip_norm:  # within the bound: untouched
        assert all(torch.equal(clipped[name], delta[name].float()) for name in delta)
    # The device-side function clips the same way under either mode (no noise when z = 0).
    for mode in PrivacyMode:
        sent = privatize_update(delta, DevicePrivacy(mode, clip_norm, 0.0))
        assert update_l2_norm(sent) <= clip_norm


@settings(max_examples=50, deadline=None)
@given(scales=st.lists(st.floats(1e-3, 1e4), min_size=1, max_size=5))
def test_dp_fedavg_reclips_every_update_and_averages_uniformly(scales: list[float]) -> None:
    reference = {"head.weight": torch.zeros(3, 4)}
    updates = [
        ClientUpdate(
            f"d{i}", {"head.weight": torch.full((3, 4), s)}, num_samples=1 + 100 * i, num_steps=1
        )
        for i, s in enumerate(scales)
    ]
    result = DpFedAvg(_policy(z=0.0)).aggregate(updates, reference)
    assert update_l2_norm(result.delta) <= 0.5 + 1e-6
    clipped = [clip_update(u.delta, 0.5)["head.weight"] for u in updates]
    expected = torch.stack(clipped).double().mean(dim=0).float()  # unweighted: samples ignored
    assert torch.allclose(result.delta["head.weight"], expected, atol=1e-6)


# ---------------------------------------------------------------------------------------
# (b) noise scale


def test_central_noise_matches_the_configured_multiplier() -> None:
    clip, z, participants = 0.5, 1.1, 4
    coordinates = 100_000
    reference = {"head.weight": torch.zeros(coordinates)}
    updates = [
        ClientUpdate(f"d{i}", {"head.weight": torch.zeros(coordinates)}, 10, 1)
        for i in range(participants)
    ]
    aggregator = DpFedAvg(_policy(clip=clip, z=z), generator=torch.Generator().manual_seed(7))
    noise = aggregator.aggregate(updates, reference).delta["head.weight"].double()
    expected = z * clip / participants  # 0.1375
    assert expected == central_noise_std(z, clip, participants)
    assert abs(float(noise.std()) / expected - 1) < 0.02
    assert abs(float(noise.mean())) < 4 * expected / math.sqrt(coordinates)


def test_local_dp_clips_then_noises_with_z_times_clip() -> None:
    clip, z, coordinates = 2.0, 0.8, 100_000
    privacy = DevicePrivacy(PrivacyMode.LOCAL, clip, z)
    big = {"x.lora_A.weight": torch.full((coordinates,), 1.0)}  # norm 316 >> 2
    sent = privatize_update(big, privacy, torch.Generator().manual_seed(3))["x.lora_A.weight"]
    clipped = clip_update(big, clip)["x.lora_A.weight"]
    noise = sent.double() - clipped.double()
    assert abs(float(noise.std()) / (z * clip) - 1) < 0.02  # 1.6
    assert abs(float(noise.mean())) < 4 * z * clip / math.sqrt(coordinates)
    # Central DP: the device only clips; the coordinator adds the noise.
    central = privatize_update(big, DevicePrivacy(PrivacyMode.CENTRAL, clip, z))
    assert torch.equal(central["x.lora_A.weight"], clipped)


def test_task_spec_carries_the_policy_and_stays_compatible_without_it() -> None:
    plain = TaskSpec("classification", "minilm-l6", ("a", "b"))
    assert "privacy" not in to_json_fields(plain)  # agents that predate DP still parse it
    assert from_json_fields(TaskSpec, to_json_fields(plain)) == plain
    private = replace(plain, privacy=DevicePrivacy(PrivacyMode.LOCAL, 1.5, 0.9))
    fields = to_json_fields(private)
    assert fields["privacy"] == {"mode": "local", "clip_norm": 1.5, "noise_multiplier": 0.9}
    assert from_json_fields(TaskSpec, fields) == private


# ---------------------------------------------------------------------------------------
# (c) the accountant


@pytest.mark.parametrize("q, z", [(0.1, 1.0), (0.02, 0.8), (1.0, 2.0)])
def test_epsilon_grows_with_rounds_and_matches_dp_accounting(q: float, z: float) -> None:
    previous = 0.0
    for rounds in (1, 2, 5, 10, 50):
        ours = epsilon_for_rounds(PrivacyMode.CENTRAL, [(q, z)] * rounds, DELTA)
        library = rdp.RdpAccountant(list(RDP_ORDERS))
        event = dp_accounting.GaussianDpEvent(z)
        if q < 1:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        library.compose(event, rounds)
        assert ours == pytest.approx(library.get_epsilon(DELTA), rel=1e-9)
        assert ours > previous
        previous = ours


def test_local_dp_epsilon_has_no_sampling_amplification() -> None:
    library = rdp.RdpAccountant(list(RDP_ORDERS))
    library.compose(dp_accounting.GaussianDpEvent(1.0), 3)
    local = epsilon_for_rounds(PrivacyMode.LOCAL, [(0.1, 1.0)] * 3, DELTA)
    assert local == pytest.approx(library.get_epsilon(DELTA), rel=1e-9)
    assert local > epsilon_for_rounds(PrivacyMode.CENTRAL, [(0.1, 1.0)] * 3, DELTA)
    assert epsilon_for_rounds(PrivacyMode.CENTRAL, [], DELTA) == 0.0
    assert sampling_probability(2, 4) == 0.5 and sampling_probability(5, 4) == 1.0


# ---------------------------------------------------------------------------------------
# (e) configuration


def _task(**overrides: object) -> TaskConfig:
    """The task of a coordinator.toml [[tasks]] table (so errors name the task and table)."""
    values: dict[str, object] = {
        "id": "alpha",
        "kind": "classification",
        "base_model": "minilm-l6",
        "labels": ["a", "b"],
    }
    values.update(overrides)
    data = {"coordinator": {"fleet": "f", "state_dir": "/unused"}, "tasks": [values]}
    return CoordinatorConfig.from_dict(data).tasks[0]


DP_ON = {"mode": "central", "clip_norm": 1.0, "noise_multiplier": 1.0, "epsilon_budget": 8.0}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"privacy": {"mode": "global"}}, "mode must be one of off, central, local, got 'global'"),
        ({"privacy": {**DP_ON, "clip_norm": 0.0}}, "clip_norm must be > 0 when mode is 'central'"),
        ({"privacy": {**DP_ON, "noise_multiplier": 0.0}}, "without noise epsilon is infinite"),
        ({"privacy": {**DP_ON, "epsilon_budget": 0.0}}, "epsilon_budget must be > 0"),
        ({"privacy": {**DP_ON, "delta": 1.5}}, "delta must be within (0, 1), got 1.5"),
        ({"privacy": {**DP_ON, "clip_norm": -1.0}}, "clip_norm must be a finite number >= 0"),
        (
            {"privacy": {**DP_ON, "noise_multiplier": float("nan")}},
            "noise_multiplier must be a finite",
        ),
        (
            {"privacy": DP_ON, "max_update_norm": 2.0},
            "max_update_norm must be 0 when [tasks.privacy] mode",
        ),
    ],
)
def test_dp_config_errors_name_the_key(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(CoordinatorConfigError, match="alpha") as error:
        _task(**overrides)
    assert message in str(error.value)


def test_dp_off_by_default_and_policy_from_config() -> None:
    assert DpPolicy.of(_task()) is None
    assert type(make_aggregator(_task())).__name__ == "FedAvg"
    task = _task(privacy={**DP_ON, "mode": "local"})
    assert DpPolicy.of(task) == DpPolicy(PrivacyMode.LOCAL, 1.0, 1.0, 8.0, 1e-5)
    assert isinstance(make_aggregator(task), DpFedAvg)


# ---------------------------------------------------------------------------------------
# (d) the budget stops rounds


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.slow
def test_budget_allows_k_rounds_then_refuses_the_next(
    tmp_path: Path, tiny_bert_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    z, q = 1.0, 0.5  # 2 of 4 eligible devices per round
    two = epsilon_for_rounds(PrivacyMode.CENTRAL, [(q, z)] * 2, DELTA)
    three = epsilon_for_rounds(PrivacyMode.CENTRAL, [(q, z)] * 3, DELTA)
    task = TaskConfig(
        id="alpha",
        kind="classification",
        base_model=str(tiny_bert_folder),
        labels=("a", "b"),
        rank=2,
        schedule=ScheduleConfig(
            devices_per_round=2,
            min_updates=2,
            over_selection=0.0,
            round_deadline_seconds=60.0,
            gather_seconds=0.0,
        ),
        privacy=PrivacyConfig(
            mode="central", clip_norm=0.1, noise_multiplier=z, epsilon_budget=(two + three) / 2
        ),
    )
    config = CoordinatorConfig(
        coordinator=CoordinatorSettings(fleet="f", state_dir=str(tmp_path / "state")),
        tasks=(task,),
    )
    clock = _Clock()
    store = CoordinatorStore(config.state_dir / "coordinator.db", now=clock)
    manager = RoundManager(config, store, FitFirstScheduler(), generate_private_key(), now=clock)
    manager.start()
    profile = find_profile("laptop-mid-16gb")
    candidates = [DeviceCandidate(f"dev-{i}", "north", profile) for i in range(4)]

    for round_number in (1, 2):
        assignments = [
            message
            for item in manager.open_rounds_if_possible(candidates)
            if "/task" in item.topic
            and item.payload
            and isinstance(message := decode_frame(item.payload).message, TaskAssignment)
        ]
        assert len(assignments) == 2
        assert assignments[0].spec.privacy == DevicePrivacy(PrivacyMode.CENTRAL, 0.1, z)
        reference = manager.current["alpha"].state()
        version = manager.current["alpha"].version
        for assignment in assignments:
            delta = {name: torch.full(t.shape, 1.0) for name, t in reference.items()}
            update = Update(
                "f",
                "alpha",
                round_number,
                assignment.device_id,
                0,
                version,
                50,
                3,
                UpdateEncoding.FP32,
            )
            body = encode_update(delta, CodecConfig(UpdateEncoding.FP32)).body
            assert manager.accept_update(update, body)[0] is AckStatus.ACCEPTED
        record = store.round("alpha", round_number)
        assert record is not None and record.state is RoundState.COMPLETED
        # The new version = old + clipped mean (every coordinate 0.1 / sqrt(N)) + noise of
        # standard deviation z * C / n = 0.05 per coordinate.
        new = manager.current["alpha"].state()
        step = torch.cat([(new[name] - reference[name]).double().flatten() for name in reference])
        noise = step - 0.1 / math.sqrt(step.numel())
        assert step.numel() > 1000  # 1666 with the tiny BERT at rank 2
        assert abs(float(noise.std()) / (z * 0.1 / 2) - 1) < 0.1

    ledger = store.privacy_rounds("alpha")
    assert [(e.round_number, e.participants, e.eligible_devices) for e in ledger] == [
        (1, 2, 4),
        (2, 2, 4),
    ]
    assert [e.sampling_probability for e in ledger] == [q, q]
    assert ledger[0].epsilon == pytest.approx(
        epsilon_for_rounds(PrivacyMode.CENTRAL, [(q, z)], DELTA)
    )
    assert ledger[1].epsilon == pytest.approx(two)
    assert not any(e.secure_aggregation for e in ledger)

    caplog.set_level(logging.WARNING, logger="coordinator.rounds")
    assert manager.open_rounds_if_possible(candidates) == []
    assert manager.open_rounds_if_possible(candidates) == []  # and again, silently
    refusals = [r for r in caplog.records if "would spend epsilon" in r.getMessage()]
    assert len(refusals) == 1
    assert f"round 3 would spend epsilon {three:.4g} > budget" in refusals[0].getMessage()
    assert manager.task_finished("alpha") and manager.privacy_blocked("alpha")
    stop = store.privacy_stop("alpha")
    assert stop is not None and stop.round_number == 3 and stop.epsilon == pytest.approx(three)
    assert store.round("alpha", 3) is None


# ---------------------------------------------------------------------------------------
# (g) the report


REPORT_TOML = """
[coordinator]
fleet = "f"
state_dir = "{state}"

[[tasks]]
id = "private"
kind = "classification"
base_model = "minilm-l6"
labels = ["a", "b"]

[tasks.privacy]
mode = "central"
clip_norm = 0.5
noise_multiplier = 1.1
epsilon_budget = 3.0

[[tasks]]
id = "plain"
kind = "classification"
base_model = "minilm-l6"
labels = ["a", "b"]
"""


def test_privacy_report_lists_rounds_and_refuses_unknown_or_plain_tasks(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config_path = tmp_path / "coordinator.toml"
    config_path.write_text(REPORT_TOML.format(state=state))
    store = CoordinatorStore(state / "coordinator.db")
    epsilons = []
    for number, (participants, eligible) in enumerate([(3, 10), (2, 8)], start=1):
        q = participants / eligible
        epsilons.append(
            epsilon_for_rounds(PrivacyMode.CENTRAL, [(3 / 10, 1.1), (2 / 8, 1.1)][:number], DELTA)
        )
        entry = PrivacyRound(
            "private", number, eligible, participants, q, 0.5, 1.1, epsilons[-1], DELTA
        )
        store.open_round("private", number, number - 1, 1e12, {"d": "{}"}, privacy=entry)
        store.close_round("private", number, RoundState.COMPLETED, "done", privacy=entry)
    store.open_round("private", 3, 2, 1e12, {"d": "{}"}, privacy=replace(entry, round_number=3))
    store.set_privacy_stop(
        PrivacyStop("private", 4, 3.5, 3.0, DELTA, "task private: round 4 would spend...", 0.0)
    )
    store.close()

    def run(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(
            cli, ["coordinator", "privacy-report", *args, "--config", str(config_path)]
        )
        return result.exit_code, result.output

    code, output = run("private")
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0] == "task private: central DP, budget epsilon 3 at delta 1e-05"
    assert lines[1].split() == [
        "round",
        "devices",
        "eligible",
        "q",
        "clip",
        "noise",
        "z",
        "epsilon",
        "delta",
        "secure-agg",
    ]
    assert lines[2].split() == [
        "1",
        "3",
        "10",
        "0.300",
        "0.5",
        "1.1",
        f"{epsilons[0]:.4f}",
        "1.0e-05",
        "off",
    ]
    assert lines[3].split()[:2] == ["2", "2"] and lines[3].split()[6] == f"{epsilons[1]:.4f}"
    assert len(lines) == 5  # the open round 3 spent nothing yet
    assert lines[4] == "stopped: task private: round 4 would spend..."
    result = CliRunner().invoke(cli, ["coordinator", "status", "--config", str(config_path)])
    assert result.exit_code == 0, result.output
    assert f"privacy (central DP): epsilon {epsilons[1]:.4g} of budget 3 at delta 1e-05" in (
        result.output
    )
    assert "  stopped: task private: round 4 would spend..." in result.output
    result = CliRunner().invoke(cli, ["coordinator", "rounds", "--config", str(config_path)])
    assert "private stopped: task private: round 4" in result.output
    code, output = run("nosuch")
    assert code != 0 and "no task 'nosuch'" in output
    code, output = run("plain")
    assert code != 0 and "[tasks.privacy] mode = 'off'" in output


# ---------------------------------------------------------------------------------------
# (f) the agent applies the policy before encoding


@pytest.mark.slow
def test_agent_clips_and_under_local_dp_noises_what_it_uploads(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    import time

    from device_profiles.plan import TrainingPlan
    from edge_runtime.wire import COORDINATOR_SENDER, ReceivedMessage, decode_update, encode_frame
    from quantization.adapters import AdapterConfig, get_adapter_state
    from quantization.task_model import TaskModelSpec, build_task_model
    from tests.test_lora_ranks import _agent

    spec = TaskSpec("classification", str(tiny_bert_folder), ("a", "b"), adapter_alpha=16.0)
    global_model, _ = build_task_model(
        TaskModelSpec(
            "alpha", "classification", spec.base_model, "none", AdapterConfig(2, 16.0), spec.labels
        )
    )
    version = "ab" * 32
    key = generate_private_key()
    daemon = _agent(tmp_path, key)
    daemon.global_states[version] = get_adapter_state(global_model)
    clip = 1e-4

    def uploaded(server_round: int, privacy: DevicePrivacy) -> dict[str, torch.Tensor]:
        plan = TrainingPlan(scheme="none", rank=2, batch_size=4, seq_len=16, local_steps=2)
        assignment = TaskAssignment(
            "f", "alpha", server_round, "pi-1", 0, plan, time.time() + 600, version,
            replace(spec, privacy=privacy), UpdateEncoding.FP32,
        )  # fmt: skip
        frame = encode_frame(assignment, sender=COORDINATOR_SENDER, signing_key=key)
        daemon.transport.published.clear()
        daemon.handle(ReceivedMessage("schoolfl/f/dev/pi-1/inbox/task", frame, 1, False))
        frames = [decode_frame(payload) for _, payload in daemon.transport.published]
        updates = [f for f in frames if isinstance(f.message, Update)]
        assert len(updates) == 1, [type(f.message).__name__ for f in frames]
        return decode_update(updates[0].body)

    try:
        central = uploaded(1, DevicePrivacy(PrivacyMode.CENTRAL, clip, 1.0))
        assert 0 < update_l2_norm(central) <= clip  # trained, then clipped to the bound
        local = uploaded(2, DevicePrivacy(PrivacyMode.LOCAL, clip, 1.0))
        values = torch.cat([t.double().flatten() for t in local.values()])
        # The clipped delta spreads at most 1e-4 over the coordinates: what remains is noise
        # of standard deviation z * C = 1e-4.
        assert values.numel() > 1000
        assert abs(float(values.std()) / clip - 1) < 0.1
    finally:
        daemon.outbox.close()
        daemon.history.close()
