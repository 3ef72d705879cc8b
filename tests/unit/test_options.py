"""Task's options: each bad one a ValueError or TypeError naming it, before anything
connects; retry policies; the producer interface that Batch takes."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from meepo import ConfigError, Middleware, Task
from meepo.batch import Batch
from meepo.config import retry_policy
from meepo.options import TaskOptions, parameters
from meepo.records import NewJob


class Noop(Middleware):
    """A middleware that overrides nothing."""


class ListProducer:
    """A producer that is not a Task: Batch needs only new_job and push_jobs (and
    push_jobs_async for ``async with``)."""

    def __init__(self) -> None:
        self.pushed: list[list[NewJob]] = []

    def new_job(self, payload: bytes, **options: Any) -> NewJob:
        return NewJob(payload, None, options.get("priority") or "default")

    def push_jobs(self, jobs: list[NewJob], connection: Any = None) -> list[int]:
        self.pushed.append(list(jobs))
        return list(range(len(jobs)))

    async def push_jobs_async(self, jobs: list[NewJob]) -> list[int]:
        return self.push_jobs(jobs)


def test_batch_takes_any_producer() -> None:
    producer = ListProducer()
    with Batch(producer) as b:
        b.push(b"a")
        b.push_many([b"b", b"c"], priority="high")
    assert b.ids == [0, 1, 2]
    assert [[j.payload for j in p] for p in producer.pushed] == [[b"a", b"b", b"c"]]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"table_name": ""}, "table_name"),
        ({"list_name_prefix": ""}, "list_name_prefix"),
        ({"table_name": "no;such"}, "table_name"),
        ({"list_name_prefix": "{x}"}, "list_name_prefix"),
        ({"parallel_num": 0}, "parallel_num"),
        ({"max_failed_times": -1}, "max_failed_times"),
        ({"zombie_timeout": -1}, "zombie_timeout"),
        ({"zombie_period": "soon"}, "zombie_period"),
        ({"lease": 0}, "lease"),
        ({"prefetch": -1}, "prefetch"),
        ({"shutdown_grace": -1}, "shutdown_grace"),
        ({"job_timeout": 0}, "job_timeout"),
        ({"zombie_dst_status": "doing"}, "zombie_dst_status"),
        ({"zombie_dst_status": "nope"}, "zombie_dst_status"),
        ({"default_priority": "urgent"}, "default_priority"),
        ({"priorities": []}, "priorities"),
        ({"retry_backoff": "often"}, "retry_backoff"),
        ({"job_func": 3}, "job_func"),
        ({"clock": 5}, "clock"),
        ({"middleware": Noop()}, "middleware"),
        ({"middleware": [Noop]}, "middleware"),
        ({"middleware": [object()]}, "middleware"),
    ],
)
def test_a_bad_option_is_a_value_error_naming_it(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError, match=name) as info:
        Task("t", db="sqlite://", redis="redis://127.0.0.1:1/0", **kwargs)
    assert isinstance(info.value, ValueError)


def test_empty_names_are_errors_not_the_defaults() -> None:
    with pytest.raises(ValueError, match=r"table_name must not be empty.*'meepo_jobs'"):
        TaskOptions.from_kwargs("t", table_name="")
    with pytest.raises(ValueError, match=r"list_name_prefix must not be empty.*'meepo:own:'"):
        TaskOptions.from_kwargs("t", table_name="own", list_name_prefix="")
    opts = TaskOptions.from_kwargs("t", table_name="own")
    assert (opts.table_name, opts.list_name_prefix) == ("own", "meepo:own:")


def test_task_takes_exactly_the_options_it_validates() -> None:
    sig = inspect.signature(Task.__init__)
    task_defaults = {
        n: p.default for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert task_defaults == parameters()


@pytest.mark.parametrize("bad", [0, -1, "5", float("nan")])
def test_job_timeout_is_validated(bad: object) -> None:
    with pytest.raises(ConfigError, match="job_timeout"):
        Task("t", db="sqlite://", redis="redis://127.0.0.1:1/0", job_timeout=bad)  # type: ignore[arg-type]


def test_retry_policies() -> None:
    listed = retry_policy([2, 4, 8])
    assert listed is not None and [listed(n) for n in (1, 2, 3, 4, 9)] == [2, 4, 8, 8, 8]
    assert retry_policy(0) is None and retry_policy([]) is None and retry_policy(None) is None
    expo = retry_policy(1.5)
    assert expo is not None
    for n in range(1, 8):
        full = 1.5 * 2 ** (n - 1)
        assert full / 2 <= expo(n) <= full
    assert expo(100) <= 3600
    func_ = retry_policy(lambda n: n * 10.0)
    assert func_ is not None and func_(3) == 30.0
    for bad in ("5", [1, -1], [True], -2, float("inf"), {"a": 1}):
        with pytest.raises(ConfigError, match="retry_backoff"):
            retry_policy(bad)
