"""The retention policy's parsing and validation (``Task(retention=)``), checked before
anything connects."""

from __future__ import annotations

from datetime import timedelta

import pytest

from meepo import Status, Task
from meepo.errors import ConfigError
from meepo.runtime.cleaner import check_retention, parse_duration


@pytest.mark.parametrize(
    "value, seconds",
    [(90, 90.0), (1.5, 1.5), (timedelta(hours=2), 7200.0), ("30m", 1800.0), ("12h", 43200.0),
     ("7d", 604800.0), ("2w", 1209600.0), (" 45s ", 45.0), ("1.5h", 5400.0), ("3600", 3600.0)],
)  # fmt: skip
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value, "x") == seconds


@pytest.mark.parametrize(
    "value, message",
    [
        ({"done": "7 days"}, "retention['done']: invalid duration '7 days'"),
        ({"done": "0"}, "the duration must be positive, not '0'"),
        ({"done": "7y"}, "invalid duration '7y'"),
        ({"done": 0}, "retention['done']: the duration must be positive, not 0"),
        ({"failed": -5}, "the duration must be positive, not -5"),
        ({"done": timedelta(0)}, "must be positive"),
        ({"done": True}, "not bool"),
        ({"done": None}, "not NoneType"),
        (
            {"todo": "1d"},
            "retention: 'todo' is not a finished status: use 'done', 'failed' or 'cancelled'",
        ),
        ({"doing": "1d"}, "'doing' is not a finished status"),
        ({"finished": "1d"}, "'finished' is not a finished status"),
        (["done", "7d"], "retention must be a mapping such as {'done': '7d'"),
        ("7d", "retention must be a mapping"),
    ],
)
def test_bad_retention_is_a_value_error_naming_the_problem(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        check_retention(value)
    assert message in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_task_checks_retention_before_connecting() -> None:
    with pytest.raises(ConfigError, match="'todo' is not a finished status"):
        Task("t", "postgresql+psycopg://nobody@127.0.0.1:1/none", retention={"todo": "1d"})
    assert check_retention(None) is None
    assert check_retention({}) == {}
    assert check_retention({"DONE": "1d", "failed": 60}) == {
        Status.DONE: 86400.0,
        Status.FAILED: 60.0,
    }
