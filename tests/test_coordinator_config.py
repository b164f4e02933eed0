"""coordinator.toml validation."""

from __future__ import annotations

import socket
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


# -- every key checked at load; serve refuses a bad config before it connects -------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("rounds = 3", 'rounds = 3\nscheme = "nf5"'),
            "[[tasks]] 'subjects': scheme must be one of none, nf4, int8, bnb-nf4, bnb-int8, "
            "got 'nf5'",
        ),
        (
            ('state_dir = "/tmp/x"', 'state_dir = "/tmp/x"\ntick_seconds = "0.5"'),
            "[coordinator]: tick_seconds must be a number of seconds > 0, got '0.5'",
        ),
        (
            ('state_dir = "/tmp/x"', 'state_dir = "/tmp/x"\nstartup_grace_seconds = -1'),
            "[coordinator]: startup_grace_seconds must be a number of seconds >= 0, got -1",
        ),
        (
            ('labels = ["maths", "history"]', 'labels = "maths, history"'),
            "[[tasks]] 'subjects': labels must be a list of class names (strings)",
        ),
        (
            ('labels = ["maths", "history"]', 'labels = ["maths", "maths"]'),
            "[[tasks]] 'subjects': labels must be distinct; repeated: ['maths']",
        ),
        (
            ("rounds = 3", 'rounds = 3\nquantize_embeddings = "yes"'),
            "[[tasks]] 'subjects': quantize_embeddings must be true or false, got 'yes'",
        ),
        (
            ("rounds = 3", 'rounds = 3\nmax_update_norm = "2"'),
            "[[tasks]] 'subjects': max_update_norm must be a number >= 0, got '2'",
        ),
        (
            ("rounds = 3", "rounds = 3\nseed = 1.5"),
            "[[tasks]] 'subjects': seed must be an integer >= 0, got 1.5",
        ),
        (
            ("rounds = 3", "rounds = 3\neval_file = 7"),
            "[[tasks]] 'subjects': eval_file must be a string, got 7",
        ),
        (
            ('url = "mqtt://127.0.0.1:1883"', 'url = "mqtt://127.0.0.1:1883"\nqos = 1'),
            "[broker]: unknown keys ['qos']",
        ),
        (
            (
                'url = "mqtt://127.0.0.1:1883"',
                'url = "mqtt://127.0.0.1:1883"\nreceive_queue_max_messages = "many"',
            ),
            "[broker]: receive_queue_max_messages must be a number > 0, got 'many'",
        ),
        (
            ('url = "mqtt://127.0.0.1:1883"', 'url = "mqtt://127.0.0.1:1883"\ntls_insecure = 1'),
            "[broker]: tls_insecure must be true or false, got 1",
        ),
        (("[[tasks]]", "[tasks]"), "tasks must be written as [[tasks]] tables"),
    ],
)
def test_every_key_is_checked_at_load(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text(GOOD.replace(*change))
    with pytest.raises(CoordinatorConfigError) as error:
        CoordinatorConfig.load(path)
    assert str(error.value) == f"{path}: {message}" or message in str(error.value)
    assert str(error.value).startswith(f"{path}: ")


def _serving_config(tmp_path: Path, eval_lines: list[str] | None = None, **files: str) -> str:
    """GOOD with a real eval file and a broker password file, then `files` overrides."""
    eval_file = tmp_path / "eval.jsonl"
    rows = eval_lines or ['{"text": "x + y = 3", "label": "maths"}']
    eval_file.write_text("\n".join(rows) + "\n")
    password = tmp_path / "broker-password"
    password.write_text("s3cret\n")
    values = {"eval_file": str(eval_file), "password_file": str(password), **files}
    return GOOD.replace(
        'url = "mqtt://127.0.0.1:1883"',
        f'url = "mqtt://127.0.0.1:1883"\nusername = "coordinator"\n'
        f'password_file = "{values["password_file"]}"',
    ).replace("rounds = 3", f'rounds = 3\neval_file = "{values["eval_file"]}"')


def test_a_config_ready_to_serve_loads(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text(_serving_config(tmp_path))
    config = CoordinatorConfig.load(path, serving=True)
    assert config.broker.read_password() == "s3cret"


def _serving_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    CoordinatorConfig.load(path)  # well-formed: only the serving checks refuse it
    with pytest.raises(CoordinatorConfigError) as error:
        CoordinatorConfig.load(path, serving=True)
    assert str(error.value).startswith(f"{path}: "), error.value
    return str(error.value)


def test_serving_checks_name_the_key_and_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "eval.jsonl"
    assert _serving_error(tmp_path, _serving_config(tmp_path, eval_file=str(missing))).endswith(
        f"[[tasks]] 'subjects' eval_file: {missing} does not exist"
    )
    broken = ['{"text": "a", "label": "maths"}', '{"text": "b", "label": "history"', ""]
    assert (
        f"[[tasks]] 'subjects' eval_file: {tmp_path / 'eval.jsonl'}:2: not valid JSON"
        in _serving_error(tmp_path, _serving_config(tmp_path, broken))
    )
    strange = ['{"text": "a", "label": "maths"}', '{"text": "b", "label": "art"}']
    assert "labels ['art'] are not among the task's labels ['maths', 'history']" in (
        _serving_error(tmp_path, _serving_config(tmp_path, strange))
    )
    no_password = tmp_path / "absent-password"
    assert _serving_error(
        tmp_path, _serving_config(tmp_path, password_file=str(no_password))
    ).endswith(f"[broker] password_file: {no_password} does not exist")
    empty = tmp_path / "empty-password"
    empty.write_text("")
    assert _serving_error(tmp_path, _serving_config(tmp_path, password_file=str(empty))).endswith(
        f"[broker] password_file: {empty} is empty: the password goes on its first line"
    )


def test_serving_checks_the_base_model_and_the_tasks(tmp_path: Path) -> None:
    ready = _serving_config(tmp_path)
    message = _serving_error(tmp_path, ready.replace('"minilm-l6"', '"minilm-l12"'))
    assert "[[tasks]] 'subjects' base_model: base model 'minilm-l12' is neither a known name" in (
        message
    )
    empty_folder = tmp_path / "model"
    empty_folder.mkdir()
    message = _serving_error(tmp_path, ready.replace('"minilm-l6"', f'"{empty_folder}"'))
    assert f"base_model: {empty_folder} is a folder without config.json" in message
    no_tasks = ready[: ready.index("[[tasks]]")]
    assert "no [[tasks]]: the coordinator has nothing to train" in _serving_error(
        tmp_path, no_tasks
    )
    admin = tmp_path / "admin-password"
    with_admin = (
        ready + f'\n[broker_admin]\nusername = "schoolfl-admin"\npassword_file = "{admin}"\n'
    )
    assert _serving_error(tmp_path, with_admin).endswith(
        f"[broker_admin] password_file: {admin} does not exist"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("rounds = 3", 'rounds = 3\nscheme = "nf5"'), "scheme must be one of"),
        (
            ('state_dir = "/tmp/x"', 'state_dir = "/tmp/x"\ntick_seconds = "fast"'),
            "tick_seconds must be a number of seconds > 0, got 'fast'",
        ),
        (('base_model = "minilm-l6"', 'base_model = "/no/model"'), "base_model: base model"),
        (("rounds = 3", 'rounds = 3\neval_file = "/x/eval.jsonl"'), "eval_file: /x/eval.jsonl"),
    ],
)
def test_serve_refuses_a_bad_config_before_it_connects(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    """A listening socket stands in for the broker: serve must exit with the message and no
    traceback, and must never have connected to it."""
    from click.testing import CliRunner

    from coordinator.cli import coordinator_group

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as broker:
        broker.bind(("127.0.0.1", 0))
        broker.listen(4)
        broker.setblocking(False)
        port = broker.getsockname()[1]
        path = tmp_path / "bad.toml"
        text = GOOD.replace(*change).replace("mqtt://127.0.0.1:1883", f"mqtt://127.0.0.1:{port}")
        path.write_text(text.replace('state_dir = "/tmp/x"', f'state_dir = "{tmp_path / "state"}"'))
        result = CliRunner().invoke(coordinator_group, ["serve", "--config", str(path)])
        assert result.exit_code == 1, result.output
        assert isinstance(result.exception, SystemExit)
        assert f"Error: {path}: " in result.output and message in result.output, result.output
        assert "Traceback" not in result.output
        with pytest.raises(BlockingIOError):
            broker.accept()  # nobody connected
    assert not (tmp_path / "state").exists()
