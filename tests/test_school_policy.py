"""Per-school privacy policies: config validation, the pure policy rules, the round
manager honouring them (no broker), and the agent enforcing its own school's policy."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from coordinator.config import (
    CoordinatorConfig,
    CoordinatorConfigError,
    CoordinatorSettings,
    PrivacyConfig,
    ScheduleConfig,
    SchoolConfig,
    SecureAggregationConfig,
    TaskConfig,
)
from coordinator.rounds import RoundManager
from coordinator.scheduler import DeviceCandidate, FitFirstScheduler
from coordinator.school_policy import (
    aggregate_size_problem,
    policy_problem,
    schools_below_minimum,
)
from coordinator.store import CoordinatorStore
from device_profiles.plan import TrainingPlan
from device_profiles.profile import find_profile
from edge_runtime.agent_config import AgentConfig, AgentConfigError
from edge_runtime.privacy_policy import PrivacyPolicy, privacy_refusals
from edge_runtime.wire import (
    DevicePrivacy,
    PrivacyMode,
    TaskAssignment,
    TaskSpec,
    decode_frame,
    generate_private_key,
)

# ---------------------------------------------------------------------------------------
# coordinator.toml

BASE = {
    "coordinator": {"fleet": "f", "state_dir": "/tmp/x"},
    "tasks": [
        {"id": "subjects", "kind": "classification", "base_model": "minilm-l6",
         "labels": ["maths", "history"]},
        {"id": "private", "kind": "classification", "base_model": "minilm-l6",
         "labels": ["maths", "history"], "privacy": {"mode": "central", "clip_norm": 1.0,
         "noise_multiplier": 1.0, "epsilon_budget": 4.0}},
    ],
}  # fmt: skip


def _with_school(**keys: object) -> dict[str, object]:
    return {**BASE, "schools": [{"id": "north", **keys}]}


def test_a_school_may_have_a_policy_without_link_figures() -> None:
    config = CoordinatorConfig.from_dict(
        _with_school(
            max_epsilon=5.0,
            max_delta=1e-6,
            min_devices_per_aggregate=4,
            allowed_tasks=["private"],
        )
    )
    school = config.schools[0]
    assert school.allowed_tasks == ("private",) and school.max_epsilon == 5.0
    assert (school.down_mbps, school.up_mbps) == (0.0, 0.0) and not school.link_known
    assert SchoolConfig("south", 50.0, 10.0).link_known


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"allowed_tasks": ["subjects", "nope", "gone"]}, "unknown tasks ['gone', 'nope']"),
        ({"max_epsilon": -1.0}, "max_epsilon must be a finite number >= 0"),
        ({"max_delta": 0.0}, "max_delta must be within (0, 1)"),
        ({"max_delta": 1.5}, "max_delta must be within (0, 1)"),
        ({"min_devices_per_aggregate": -2}, "min_devices_per_aggregate must be an integer"),
        ({"min_devices_per_aggregate": 2.5}, "min_devices_per_aggregate must be an integer"),
        ({"require_secure_aggregation": "yes"}, "require_secure_aggregation must be true"),
        ({"allowed_tasks": "subjects"}, "allowed_tasks must be a list"),
        ({"down_mbps": -5.0}, "down_mbps must be a finite number >= 0"),
        ({"max_epsilom": 1.0}, "unknown keys ['max_epsilom']"),
    ],
)
def test_bad_school_policies_name_school_key_and_value(
    keys: dict[str, object], message: str
) -> None:
    with pytest.raises(CoordinatorConfigError) as caught:
        CoordinatorConfig.from_dict(_with_school(**keys))
    assert message in str(caught.value)
    if "unknown keys" not in message:
        assert "[[schools]] 'north'" in str(caught.value)


def test_secure_aggregation_task_loads_with_its_keys() -> None:
    secure = {**BASE["tasks"][0], "secure_aggregation": {"enabled": True, "clip_bound": 0.5}}  # type: ignore[index, dict-item]
    task = CoordinatorConfig.from_dict({**BASE, "tasks": [secure]}).task("subjects")
    assert task.secure_aggregation.enabled and task.secure_aggregation.clip_bound == 0.5
    assert task.secure_aggregation.step_seconds == 30.0


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"schedule": {"allowed_ranks": [4]}},
            "allowed_ranks must be empty with secure_aggregation",
        ),
        ({"max_update_norm": 2.0}, "never sees a single update"),
        ({"secure_aggregation": {"clip_bound": 0}}, "clip_bound must be a positive number"),
        ({"secure_aggregation": {"step_seconds": -1}}, "step_seconds must be a positive number"),
        ({"secure_aggregation": {"enabled": "yes"}}, "enabled must be true or false"),
    ],
)
def test_secure_aggregation_refuses_what_it_cannot_honour(
    keys: dict[str, object], message: str
) -> None:
    secure = {"enabled": True, **keys.pop("secure_aggregation", {})}  # type: ignore[dict-item]
    task = {**BASE["tasks"][0], "secure_aggregation": secure, **keys}  # type: ignore[index, dict-item]
    with pytest.raises(CoordinatorConfigError) as caught:
        CoordinatorConfig.from_dict({**BASE, "tasks": [task]})
    assert message in str(caught.value)
    assert "'subjects'" in str(caught.value)


# ---------------------------------------------------------------------------------------
# the rules


def _task(task_id: str = "alpha", **keys: object) -> TaskConfig:
    return TaskConfig(id=task_id, kind="classification", base_model="m", labels=("a", "b"), **keys)  # type: ignore[arg-type]


SECURE = SecureAggregationConfig(enabled=True)
PRIVATE = {
    "privacy": PrivacyConfig(
        mode="local", clip_norm=1.0, noise_multiplier=1.0, epsilon_budget=4.0, delta=1e-6
    ),
}


def test_no_table_or_default_policy_allows_every_task() -> None:
    assert policy_problem(None, _task()) is None
    assert policy_problem(SchoolConfig("north"), _task()) is None
    assert policy_problem(SchoolConfig("north"), _task(**PRIVATE)) is None


@pytest.mark.parametrize(
    ("school", "task", "problem"),
    [
        (SchoolConfig("n", allowed_tasks=("beta",)), _task(), "not in the school's allowed_tasks"),
        (SchoolConfig("n", allowed_tasks=("alpha",)), _task(), None),
        (SchoolConfig("n", max_epsilon=8.0), _task(), "has [tasks.privacy] mode = 'off'"),
        (SchoolConfig("n", max_epsilon=8.0), _task(**PRIVATE), None),
        (SchoolConfig("n", max_epsilon=4.0), _task(**PRIVATE), None),
        (SchoolConfig("n", max_epsilon=2.0), _task(**PRIVATE), "exceeds the school's max_epsilon"),
        (
            SchoolConfig("n", max_epsilon=8.0, max_delta=1e-7),
            _task(**PRIVATE),
            "exceeds the school's max_delta",
        ),
        (
            SchoolConfig("n", require_secure_aggregation=True),
            _task(**PRIVATE),
            "the task has [tasks.secure_aggregation] enabled = false",
        ),
        (
            SchoolConfig("n", require_secure_aggregation=True),
            _task(secure_aggregation=SECURE),
            None,
        ),
    ],
)
def test_policy_problem(school: SchoolConfig, task: TaskConfig, problem: str | None) -> None:
    found = policy_problem(school, task)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_aggregate_minimums_drop_schools_until_stable() -> None:
    assert aggregate_size_problem(None, 1) is None
    assert aggregate_size_problem(SchoolConfig("a", min_devices_per_aggregate=3), 3) is None
    assert "below the school's min_devices_per_aggregate 4" in (
        aggregate_size_problem(SchoolConfig("a", min_devices_per_aggregate=4), 3) or ""
    )
    schools = {
        "strict": SchoolConfig("strict", min_devices_per_aggregate=10),
        "mid": SchoolConfig("mid", min_devices_per_aggregate=4),
    }
    # 5 devices: strict (10) leaves; the 3 left are below mid's 4, so mid leaves too.
    dropped = schools_below_minimum(schools, ["strict", "strict", "mid", "mid", "open"])
    assert set(dropped) == {"strict", "mid"}
    assert schools_below_minimum(schools, ["mid", "mid", "open", "open"]) == {}


# ---------------------------------------------------------------------------------------
# the round manager


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _manager(tmp_path: Path, model: Path, schools: tuple[SchoolConfig, ...]) -> RoundManager:
    task = TaskConfig(
        id="alpha",
        kind="classification",
        base_model=str(model),
        labels=("a", "b"),
        rank=2,
        schedule=ScheduleConfig(
            devices_per_round=6, min_updates=2, over_selection=0.0, gather_seconds=0.0
        ),
    )
    config = CoordinatorConfig(
        coordinator=CoordinatorSettings(fleet="f", state_dir=str(tmp_path / "state")),
        tasks=(task,),
        schools=schools,
    )
    clock = Clock()
    store = CoordinatorStore(config.state_dir / "coordinator.db", now=clock)
    manager = RoundManager(config, store, FitFirstScheduler(), generate_private_key(), now=clock)
    manager.start()
    return manager


def _devices(**per_school: int) -> list[DeviceCandidate]:
    profile = find_profile("laptop-mid-16gb")
    return [
        DeviceCandidate(f"{school}-{i}", school, profile)
        for school, count in per_school.items()
        for i in range(count)
    ]


def _assigned(outgoing: list) -> set[str]:  # noqa: ANN001
    devices = set()
    for item in outgoing:
        if "/task" in item.topic and item.payload:  # an empty one clears a closed round
            message = decode_frame(item.payload).message
            assert isinstance(message, TaskAssignment)
            devices.add(message.device_id)
    return devices


@pytest.mark.slow
def test_a_school_whose_policy_excludes_the_task_gets_no_assignment(
    tmp_path: Path, tiny_bert_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    schools = (
        SchoolConfig("north", max_epsilon=4.0),  # requires DP; alpha has none
        SchoolConfig("east", require_secure_aggregation=True),
        SchoolConfig("south", down_mbps=100.0, up_mbps=20.0),
    )
    manager = _manager(tmp_path, tiny_bert_folder, schools)
    assert set(manager.selection.school_links) == {"south"}  # only schools with both link figures
    with caplog.at_level(logging.INFO, logger="coordinator.round_opening"):
        assigned = _assigned(manager.open_rounds_if_possible(_devices(north=2, east=2, south=3)))
    assert assigned == {"south-0", "south-1", "south-2"}
    excluded = [r.getMessage() for r in caplog.records if "excluded" in r.getMessage()]
    assert len(excluded) == 2
    assert any("school east" in m and "secure aggregation" in m for m in excluded)
    assert any("school north" in m and "[tasks.privacy] mode = 'off'" in m for m in excluded)


@pytest.mark.slow
def test_min_devices_per_aggregate_drops_a_school_or_waits(
    tmp_path: Path, tiny_bert_folder: Path
) -> None:
    schools = (SchoolConfig("north", min_devices_per_aggregate=5),)
    manager = _manager(tmp_path, tiny_bert_folder, schools)
    # 2 + 2 devices: a round of 4 is below north's minimum of 5, so north's devices leave.
    assigned = _assigned(manager.open_rounds_if_possible(_devices(north=2, south=2)))
    assert assigned == {"south-0", "south-1"}

    other = _manager(tmp_path / "other", tiny_bert_folder, schools)
    # Only north's devices: dropping them leaves none, below the quorum: no round.
    assert _assigned(other.open_rounds_if_possible(_devices(north=3))) == set()
    assert other.store.open_rounds() == []
    # Enough devices for north's minimum: it takes part.
    assigned = _assigned(other.open_rounds_if_possible(_devices(north=3, south=2)))
    assert len(assigned) == 5 and {"north-0", "north-1", "north-2"} <= assigned


# ---------------------------------------------------------------------------------------
# the agent


def _spec(privacy: DevicePrivacy | None = None) -> TaskSpec:
    return TaskSpec("classification", "minilm-l6", ("a", "b"), privacy=privacy)


LOCAL_DP = DevicePrivacy(PrivacyMode.LOCAL, clip_norm=1.0, noise_multiplier=0.8)


def test_privacy_refusals() -> None:
    assert privacy_refusals(PrivacyPolicy(), "alpha", _spec()) == []
    policy = PrivacyPolicy(require_dp=True, min_noise_multiplier=1.0, allowed_tasks=("beta",))
    reasons = privacy_refusals(policy, "alpha", _spec())
    assert len(reasons) == 2
    assert "not in the school's [privacy] allowed_tasks" in reasons[0]
    assert "requires differential privacy" in reasons[1]
    reasons = privacy_refusals(policy, "beta", _spec(LOCAL_DP))
    assert reasons == [
        "task beta noise multiplier 0.8 is below the school's min_noise_multiplier 1.0"
    ]
    assert (
        privacy_refusals(replace(policy, min_noise_multiplier=0.5), "beta", _spec(LOCAL_DP)) == []
    )


def test_an_agent_requiring_secure_aggregation_declines_a_plain_task() -> None:
    from edge_runtime.wire import SecureAggregationSpec

    policy = PrivacyPolicy.from_table({"require_secure_aggregation": True})
    assert privacy_refusals(policy, "alpha", _spec()) == [
        "the school requires secure aggregation; task alpha runs without it"
    ]
    secure = replace(_spec(), secure_aggregation=SecureAggregationSpec(clip_bound=1.0))
    assert privacy_refusals(policy, "alpha", secure) == []
    assert policy.to_table()["require_secure_aggregation"] is True
    with pytest.raises(ValueError, match="require_secure_aggregation must be true or false"):
        PrivacyPolicy(require_secure_aggregation="yes")  # type: ignore[arg-type]


AGENT = {
    "agent": {
        "fleet": "f",
        "device_id": "pi-1",
        "school": "north",
        "state_dir": "/tmp/s",
        "data_dir": "/tmp/d",
    }
}


def test_privacy_table_in_agent_toml(tmp_path: Path) -> None:
    assert AgentConfig.from_dict(AGENT).privacy == PrivacyPolicy()
    assert "privacy" not in AgentConfig.from_dict(AGENT).to_dict()
    config = AgentConfig.from_dict(
        {**AGENT, "privacy": {"require_dp": True, "allowed_tasks": ["alpha"]}}
    )
    assert config.privacy == PrivacyPolicy(require_dp=True, allowed_tasks=("alpha",))
    config.save(tmp_path / "agent.toml")
    assert AgentConfig.load(tmp_path / "agent.toml").privacy == config.privacy


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"require_db": True}, "unknown keys in [privacy]: ['require_db']"),
        ({"require_dp": "yes"}, "require_dp must be true or false"),
        ({"require_dp": True, "min_noise_multiplier": -1.0}, "min_noise_multiplier must be"),
        ({"min_noise_multiplier": 1.0}, "needs require_dp = true"),
        ({"allowed_tasks": "alpha"}, "allowed_tasks must be a list"),
    ],
)
def test_bad_privacy_tables(table: dict[str, object], message: str) -> None:
    with pytest.raises(AgentConfigError) as caught:
        AgentConfig.from_dict({**AGENT, "privacy": table})
    assert message in str(caught.value) and "agent.toml" in str(caught.value)


class _FakeTransport:
    """Records what the agent publishes (the broker is not this test's subject)."""

    connect_count = 1

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.subscribed: list[str] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.published.append((topic, payload))

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.subscribed.append(topic_filter)


def test_agent_declines_a_task_its_school_policy_forbids(tmp_path: Path) -> None:
    from edge_runtime.agent import AgentDaemon
    from edge_runtime.enrollment_record import Enrollment
    from edge_runtime.wire import (
        COORDINATOR_SENDER,
        AssignmentDecline,
        ReceivedMessage,
        UpdateEncoding,
        encode_frame,
        public_key_hex,
        save_private_key,
    )

    coordinator_key = generate_private_key()
    agent = {**AGENT["agent"], "state_dir": str(tmp_path / "s"), "data_dir": str(tmp_path)}
    config = AgentConfig.from_dict({"agent": agent, "privacy": {"require_dp": True}})
    config.state_dir.mkdir(parents=True)
    save_private_key(generate_private_key(), config.key_path)
    Enrollment("f", "pi-1", public_key_hex(coordinator_key), 0.0).save(config.state_dir)
    daemon = AgentDaemon(config)
    transport = _FakeTransport()
    daemon.transport = transport  # type: ignore[assignment]
    try:
        plan = TrainingPlan(scheme="none", rank=2, batch_size=4, seq_len=16, local_steps=2)
        assignment = TaskAssignment(
            "f", "alpha", 1, "pi-1", 0, plan, time.time() + 600, "ab" * 32, _spec(),
            UpdateEncoding.FP32,
        )  # fmt: skip
        frame = encode_frame(assignment, sender=COORDINATOR_SENDER, signing_key=coordinator_key)
        daemon.handle(ReceivedMessage("schoolfl/f/dev/pi-1/inbox/task", frame, 1, False))
        messages = [decode_frame(payload).message for _, payload in transport.published]
        assert len(messages) == 1 and isinstance(messages[0], AssignmentDecline)
        assert "requires differential privacy" in messages[0].reasons[0]
        assert transport.subscribed == []  # declined before fetching the model
        assert daemon.waiting == {}
        assert json.dumps(list(messages[0].reasons))
    finally:
        daemon.outbox.close()
        daemon.history.close()


@pytest.mark.slow
def test_min_devices_per_aggregate_is_checked_again_at_aggregation(
    tmp_path: Path, tiny_bert_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Five devices were assigned, enough for north's minimum of 5; only three updates
    arrive, so north's update is left out of the aggregate and only south's count."""
    from coordinator.store import RoundState, StoredUpdate
    from edge_runtime.wire import CodecConfig, UpdateEncoding, encode_update

    schools = (SchoolConfig("north", min_devices_per_aggregate=5),)
    manager = _manager(tmp_path, tiny_bert_folder, schools)
    devices = _devices(north=3, south=2)
    for device in devices:
        token = f"token-{device.device_id}"
        manager.store.add_enrollment_token(token, device.school, 3600.0)
        manager.store.redeem_enrollment_token(token, device.device_id, b"k" * 32, "")
    assert len(_assigned(manager.open_rounds_if_possible(devices))) == 5
    reference = manager.current["alpha"].state()
    for index, device_id in enumerate(("north-0", "south-0", "south-1")):
        delta = {name: torch.full_like(t, float(index + 1)) for name, t in reference.items()}
        body = encode_update(delta, CodecConfig(UpdateEncoding.FP32)).body
        manager.store.record_update(
            StoredUpdate(f"u{index}", "alpha", 1, device_id, 10, 1, {}, body)
        )
    record = manager.store.round("alpha", 1)
    assert record is not None
    with caplog.at_level(logging.WARNING, logger="coordinator.rounds"):
        manager.aggregate(record, reason="test")
    assert any("school north left out" in r.getMessage() for r in caplog.records)
    new_state = manager.current["alpha"].state()
    name = next(iter(reference))
    # Only south's deltas (2 and 3, equal weights) are averaged: the step is 2.5, not 2.
    assert torch.allclose(new_state[name] - reference[name], torch.full_like(reference[name], 2.5))
    assert manager.store.round("alpha", 1).state is RoundState.COMPLETED  # type: ignore[union-attr]
