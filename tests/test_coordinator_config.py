"""coordinator.toml validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import (
    MOVED_TASK_KEYS,
    CoordinatorConfig,
    CoordinatorConfigError,
    PrivacyConfig,
    ScheduleConfig,
    SecureAggregationConfig,
)

GOOD = """
[coordinator]
fleet = "district-7"
state_dir = "/tmp/x"

[broker]
url = "mqtt://127.0.0.1:1883"

[[tasks]]
id = "subjects"
kind = "classification"
base_model = "minilm-l6"
labels = ["maths", "history"]
rounds = 3
"""


def test_good_file(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text(GOOD)
    config = CoordinatorConfig.load(path)
    task = config.task("subjects")
    assert task.labels == ("maths", "history") and task.rounds == 3 and task.scheme == "nf4"
    with pytest.raises(KeyError, match="no task 'other'"):
        config.task("other")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("rounds = 3", "rounds = 0"), "rounds must be a positive integer"),
        (
            ("rounds = 3", "rounds = 3\n[tasks.schedule]\nmin_updates = 9"),
            "exceeds devices_per_round",
        ),
        (('labels = ["maths", "history"]', 'labels = ["maths"]'), "at least two class names"),
        (('kind = "classification"', 'kind = "regression"'), "kind must be"),
        (("rounds = 3", "rounds = 3\nlearnig_rate = 1.0"), "unknown keys ['learnig_rate']"),
        (('id = "subjects"', 'id = "a b"'), "id must match"),
        (('fleet = "district-7"\n', ""), "missing keys ['fleet']"),
        (("rounds = 3", 'rounds = 3\nupdate_encoding = "zip"'), "update_encoding"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text(GOOD.replace(*change))
    with pytest.raises(CoordinatorConfigError) as error:
        CoordinatorConfig.load(path)
    assert message in str(error.value)


def test_duplicate_task_ids(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    task = GOOD[GOOD.index("[[tasks]]") :]
    path.write_text(GOOD + task)
    with pytest.raises(CoordinatorConfigError, match="repeated"):
        CoordinatorConfig.load(path)


SUB_TABLES = """
[tasks.schedule]
strategy = "fit-first"
devices_per_round = 4
min_updates = 3
allowed_ranks = [4, 2]

[tasks.privacy]
mode = "central"
clip_norm = 0.5
noise_multiplier = 1.1
epsilon_budget = 3.0

[tasks.secure_aggregation]
enabled = true
clip_bound = 4.0
"""


def _load(tmp_path: Path, text: str) -> CoordinatorConfig:
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    return CoordinatorConfig.load(path)


def test_sub_tables_are_parsed_into_their_dataclasses(tmp_path: Path) -> None:
    task = _load(tmp_path, GOOD + SUB_TABLES.replace("allowed_ranks = [4, 2]\n", "")).task(
        "subjects"
    )
    assert task.schedule == ScheduleConfig(strategy="fit-first", devices_per_round=4, min_updates=3)
    assert task.privacy == PrivacyConfig(
        mode="central", clip_norm=0.5, noise_multiplier=1.1, epsilon_budget=3.0
    )
    assert task.secure_aggregation == SecureAggregationConfig(enabled=True, clip_bound=4.0)
    plain = _load(tmp_path, GOOD).task("subjects")
    assert (plain.schedule, plain.privacy) == (ScheduleConfig(), PrivacyConfig())
    assert not plain.secure_aggregation.enabled
    ranks = _load(tmp_path, GOOD + SUB_TABLES.split("[tasks.privacy]")[0]).task("subjects")
    assert ranks.schedule.allowed_ranks == (4, 2) and ranks.ladder_ranks == (8, 4, 2)


OLD_VALUES: dict[str, str] = {
    "dp_mode": '"central"',
    "secure_aggregation": "true",
    "scheduler": '"random"',
    "allowed_ranks": "[4]",
}


@pytest.mark.parametrize("old_key", sorted(MOVED_TASK_KEYS))
def test_an_old_flat_key_is_refused_with_its_new_place(tmp_path: Path, old_key: str) -> None:
    table, new_key = MOVED_TASK_KEYS[old_key]
    line = f"{old_key} = {OLD_VALUES.get(old_key, '3')}"
    with pytest.raises(CoordinatorConfigError) as error:
        _load(tmp_path, GOOD.replace("rounds = 3", f"rounds = 3\n{line}"))
    assert (
        f"[[tasks]] 'subjects': key {old_key!r} has moved: write `{new_key} = ...` "
        f"under [tasks.{table}]"
    ) in str(error.value)


def test_all_nineteen_moved_keys_are_known() -> None:
    assert len(MOVED_TASK_KEYS) == 19
    assert {table for table, _ in MOVED_TASK_KEYS.values()} == {
        "privacy",
        "secure_aggregation",
        "schedule",
    }


@pytest.mark.parametrize(
    ("sub_table", "message"),
    [
        ("[tasks.privacy]\nclipnorm = 1.0", "[tasks.privacy]: unknown keys ['clipnorm']"),
        ("[tasks.schedule]\nquota = 3", "[tasks.schedule]: unknown keys ['quota']"),
        ("[tasks.secure_aggregation]\non = true", "[tasks.secure_aggregation]: unknown keys"),
        ("[tasks.sched]\nstrategy = 'oort'", "unknown keys ['sched']"),
    ],
)
def test_an_unknown_key_inside_a_sub_table_is_refused(
    tmp_path: Path, sub_table: str, message: str
) -> None:
    with pytest.raises(CoordinatorConfigError) as error:
        _load(tmp_path, GOOD + sub_table + "\n")
    assert message in str(error.value)
    assert "[[tasks]] 'subjects'" in str(error.value)


@pytest.mark.parametrize(
    ("sub_table", "message"),
    [
        (
            "[tasks.privacy]\nmode = 'central'\nclip_norm = -1.0",
            "[[tasks]] 'subjects' [tasks.privacy]: clip_norm must be a finite number >= 0",
        ),
        (
            "[tasks.privacy]\nmode = 'central'",
            "[[tasks]] 'subjects' [tasks.privacy]: clip_norm must be > 0 when mode is 'central'",
        ),
        (
            "[tasks.schedule]\nstrategy = 'fastest'",
            "[[tasks]] 'subjects' [tasks.schedule]: strategy must be one of",
        ),
        (
            "[tasks.schedule]\nexploration = 1.5",
            "[[tasks]] 'subjects' [tasks.schedule]: exploration must be within 0..1",
        ),
        (
            "[tasks.schedule]\nallowed_ranks = [16]",
            "[[tasks]] 'subjects': [tasks.schedule] allowed_ranks must hold integers in 1..rank",
        ),
        (
            "[tasks.secure_aggregation]\nstep_seconds = 0",
            "[[tasks]] 'subjects' [tasks.secure_aggregation]: step_seconds must be a positive",
        ),
        (
            "[tasks.secure_aggregation]\nenabled = 'yes'",
            "[[tasks]] 'subjects' [tasks.secure_aggregation]: enabled must be true or false",
        ),
    ],
)
def test_a_bad_value_in_a_sub_table_is_named_with_its_table(
    tmp_path: Path, sub_table: str, message: str
) -> None:
    with pytest.raises(CoordinatorConfigError) as error:
        _load(tmp_path, GOOD + sub_table + "\n")
    assert message in str(error.value)


def test_a_sub_table_built_in_python_names_its_table() -> None:
    with pytest.raises(CoordinatorConfigError, match=r"\[tasks\.schedule\]: min_updates \(4\)"):
        ScheduleConfig(devices_per_round=3, min_updates=4)
    with pytest.raises(CoordinatorConfigError, match=r"\[tasks\.privacy\]: delta must be"):
        PrivacyConfig(delta=2.0)
