"""coordinator.toml validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig, CoordinatorConfigError

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
        (("rounds = 3", "rounds = 3\nmin_updates = 9"), "exceeds devices_per_round"),
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
