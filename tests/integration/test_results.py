"""Stored results: ``store_results=True`` writes the handler's return value with the done
commit (in the group commit's one statement per batch, on every driver), manual commits
store theirs, ``max_result_bytes`` fails a job whose result is too large (not retried),
and ``None`` stores nothing."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event
from support.backends import TaskFactory, backend_url, unique_task_id
from support.helpers import record, wait_for, wait_status

from meepo import Job, Middleware, PayloadError, RunInfo, Status, Task
from meepo.connect import engine_for
from meepo.ledger import Ledger, Outcome
from meepo.ledger.clock import host_now
from meepo.records import NewJob

pytestmark = pytest.mark.timeout(120)

#: (driver, backend): every ledger driver on every server it supports.
DRIVERS = [
    ("portable", "sqlite"),
    ("portable", "mariadb"),
    ("portable", "postgres"),
    ("postgres", "postgres"),
    ("mysql", "mariadb"),
]
LEASE = timedelta(seconds=30)
TIMEOUT = timedelta(seconds=20)


@pytest.fixture(params=DRIVERS, ids=lambda c: f"{c[0]}-{c[1]}")
def ledger(request: pytest.FixtureRequest, sqlite_url: str) -> Ledger:
    driver, backend = request.param
    return Ledger(engine_for(backend_url(backend, sqlite_url)), "meepo_jobs", driver=driver)


def _doing(ledger: Ledger, task_id: str, n: int) -> list[tuple[int, int]]:
    got = ledger.insert(
        task_id, [NewJob(b"p%d" % i) for i in range(n)], now=host_now(), redispatch_timeout=TIMEOUT
    )
    jobs = ledger.claim(task_id, [(r.id, 0) for r in got], lease=LEASE, worker="w")
    assert len(jobs) == n
    return [(j.id, j.commit_id) for j in jobs]


def _updates(ledger: Ledger) -> tuple[list[str], Any]:
    seen: list[str] = []

    def count(_conn: Any, _cur: Any, statement: str, *_rest: Any) -> None:
        seen.extend(s for s in statement.split(";\n") if s.lstrip().upper().startswith("UPDATE"))

    event.listen(ledger.engine, "before_cursor_execute", count)
    return seen, lambda: event.remove(ledger.engine, "before_cursor_execute", count)


def test_a_group_commit_writes_every_result_in_its_one_statement(ledger: Ledger) -> None:
    task_id = unique_task_id("gc")
    pairs = _doing(ledger, task_id, 40)
    outcomes = [
        Outcome(i, c, Status.DONE, result=None if n % 4 == 0 else b"r%d" % i)
        for n, (i, c) in enumerate(pairs)
    ]
    seen, stop = _updates(ledger)
    try:
        won = ledger.finish(outcomes, now=host_now(), redispatch_timeout=TIMEOUT)
    finally:
        stop()
    assert won == set(pairs)
    assert len(seen) == 1, seen  # the batch's one UPDATE carries every row's result
    for n, (i, _) in enumerate(pairs):
        rec = ledger.get(i)
        assert rec is not None and rec.status is Status.DONE
        assert rec.result == (None if n % 4 == 0 else b"r%d" % i)


def test_results_ride_with_failures_and_retries_in_one_batch(ledger: Ledger) -> None:
    """Done rows with results, failed rows and retried rows in one batch: each status's
    UPDATE as before, only the done rows get a result, nothing else is touched."""
    task_id = unique_task_id("gm")
    pairs = _doing(ledger, task_id, 6)
    outcomes = [
        Outcome(*pairs[0], Status.DONE, result=b"\x00\xff binary"),
        Outcome(*pairs[1], Status.DONE, result=b"two"),
        Outcome(*pairs[2], Status.FAILED, "boom"),
        Outcome(*pairs[3], Status.TODO, "again"),
        Outcome(*pairs[4], Status.DONE),
        Outcome(pairs[5][0], pairs[5][1] + 7, Status.DONE, result=b"stale"),  # loses
    ]
    seen, stop = _updates(ledger)
    try:
        won = ledger.finish(outcomes, now=host_now(), redispatch_timeout=TIMEOUT)
    finally:
        stop()
    assert won == set(pairs[:5])
    if ledger.driver.name != "portable":  # portable redoes a batch that lost a row
        assert len(seen) == 3, seen  # done, failed, todo: one UPDATE each
    results = [rec.result for rec in (ledger.get(i) for i, _ in pairs) if rec is not None]
    assert results == [b"\x00\xff binary", b"two", None, None, None, None]
    rec = ledger.get(pairs[5][0])
    assert rec is not None and rec.status is Status.DOING


def test_a_batch_without_results_sends_the_statement_it_always_did(ledger: Ledger) -> None:
    task_id = unique_task_id("gn")
    pairs = _doing(ledger, task_id, 3)
    seen, stop = _updates(ledger)
    try:
        ledger.finish(
            [Outcome(i, c, Status.DONE) for i, c in pairs],
            now=host_now(),
            redispatch_timeout=TIMEOUT,
        )
    finally:
        stop()
    assert len(seen) == 1 and "result" not in seen[0].lower(), seen


def test_repush_clears_the_last_runs_result(ledger: Ledger) -> None:
    task_id = unique_task_id("gr")
    (pair,) = _doing(ledger, task_id, 1)
    ledger.finish(
        [Outcome(*pair, Status.DONE, result=b"old")], now=host_now(), redispatch_timeout=TIMEOUT
    )
    rec = ledger.get(pair[0])
    assert rec is not None and rec.result == b"old"
    ledger.repush([(pair[0], rec.commit_id)], now=host_now(), redispatch_timeout=TIMEOUT)
    rec = ledger.get(pair[0])
    assert rec is not None and rec.status is Status.TODO and rec.result is None


# -- through a running consumer ----------------------------------------------------------


def test_store_results_keeps_the_handlers_json_value(make_task: TaskFactory) -> None:
    def handler(job: Job) -> Any:
        n = job.data["n"]
        return None if n == 0 else {"square": n * n, "seen": job.data}

    task = make_task(job_func=handler, serializer="json", store_results=True)
    ids = task.push_many([{"n": i} for i in range(5)])
    task.start()
    recs = [task.wait(i, timeout=30) for i in ids]
    assert [r.status for r in recs] == [Status.DONE] * 5
    assert recs[0].result is None  # None stores nothing
    assert recs[3].result == {"square": 9, "seen": {"n": 3}}
    assert task.get(ids[4]) == recs[4]  # get decodes the same way


def test_without_store_results_the_return_value_is_not_stored(make_task: TaskFactory) -> None:
    task = make_task(job_func=lambda job: b"ignored")
    job_id = task.push(b"x")
    task.start()
    rec = task.wait(job_id, timeout=30)
    assert rec.status is Status.DONE and rec.result is None


def test_bytes_serializer_stores_bytes_and_str_as_utf8(make_task: TaskFactory) -> None:
    def handler(job: Job) -> Any:
        return "héllo" if job.payload == b"s" else job.payload + b"!"

    task = make_task(job_func=handler, store_results=True)
    s, b = task.push(b"s"), task.push(b"b")
    task.start()
    assert task.wait(s, timeout=30).result == "héllo".encode()
    assert task.wait(b, timeout=30).result == b"b!"


def test_a_result_the_serializer_cannot_write_fails_the_job_without_retry(
    make_task: TaskFactory,
) -> None:
    runs: list[int] = []

    def handler(job: Job) -> Any:
        runs.append(job.id)
        return {"when": {1, 2}}

    task = make_task(job_func=handler, serializer="json", store_results=True, max_failed_times=3)
    job_id = task.push({"x": 1})
    task.start()
    rec = task.wait(job_id, timeout=30)
    assert rec.status is Status.FAILED and rec.failed_times == 1
    assert rec.last_error is not None
    assert 'result["when"]: set is not JSON' in rec.last_error
    assert runs == [job_id]


def test_a_result_over_max_result_bytes_fails_the_job_naming_size_and_limit(
    make_task: TaskFactory,
) -> None:
    runs: list[int] = []

    def handler(job: Job) -> bytes:
        runs.append(job.id)
        return b"x" * 300

    task = make_task(job_func=handler, store_results=True, max_result_bytes=200, max_failed_times=5)
    job_id = task.push(b"big")
    task.start()
    rec = task.wait(job_id, timeout=30)
    assert rec.status is Status.FAILED and rec.failed_times == 1 and rec.result is None
    assert rec.last_error is not None
    assert "300 bytes" in rec.last_error and "max_result_bytes=200" in rec.last_error
    assert runs == [job_id]  # not retried


class _RunSpy(Middleware):
    """What after_run and after_commit saw."""

    def __init__(self) -> None:
        self.runs: list[RunInfo] = []
        self.commits: list[Outcome] = []

    def after_run(self, task: Any, job: Job, run: RunInfo) -> None:
        self.runs.append(run)

    def after_commit(self, task: Any, outcome: Outcome, accepted: bool) -> None:
        self.commits.append(outcome)


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_after_run_sees_a_result_over_max_result_bytes_as_a_failure(
    make_task: TaskFactory, kind: str
) -> None:
    """The result is checked before after_run: the middleware sees the run failed, with
    the error the job ends with (not a success for a job that is then failed)."""
    spy = _RunSpy()
    runs: list[int] = []

    def handler(job: Job) -> bytes:
        runs.append(job.id)
        return b"x" * 300

    async def async_handler(job: Job) -> bytes:
        return handler(job)

    task = make_task(
        job_func=handler if kind == "thread" else async_handler,
        store_results=True,
        max_result_bytes=200,
        max_failed_times=5,
        middleware=[spy],
    )
    job_id = task.push(b"big")
    task.start()
    rec = task.wait(job_id, timeout=30)
    assert rec.status is Status.FAILED and rec.failed_times == 1 and rec.result is None
    assert rec.last_error == (
        "PayloadError: result of 300 bytes exceeds max_result_bytes=200 (not retried)"
    )
    (run,) = spy.runs
    assert not run.ok and run.error == rec.last_error
    assert run.exception is None  # the handler returned: its result is what failed
    wait_for(lambda: spy.commits, message="after_commit")
    assert [(o.status, o.error) for o in spy.commits] == [(Status.FAILED, rec.last_error)]
    assert runs == [job_id]  # not retried
    assert task.consumer is not None
    counters = task.consumer.counters
    assert (counters.done, counters.failed, counters.retried) == (0, 1, 0)


def test_a_manual_commit_handlers_return_value_is_not_checked(make_task: TaskFactory) -> None:
    """store_results stores an auto-commit's return value only: a handler that commits
    by hand returns what it likes, however large."""
    spy = _RunSpy()

    def handler(job: Job) -> bytes:
        task.commit(job.id, Status.DONE, result=b"small")
        return b"x" * 300

    task = make_task(
        job_func=handler,
        auto_commit=False,
        store_results=True,
        max_result_bytes=200,
        middleware=[spy],
    )
    job_id = task.push(b"m")
    task.start()
    rec = task.wait(job_id, timeout=30)
    assert rec.status is Status.DONE and rec.result == b"small"
    wait_for(lambda: spy.runs, message="after_run")
    assert [r.error for r in spy.runs] == [None]


def test_max_result_bytes_is_checked_at_construction(db_url: str, redis_url: str) -> None:
    from meepo import ConfigError

    with pytest.raises(ConfigError, match="max_result_bytes"):
        Task(unique_task_id(), db_url, redis_url, max_result_bytes=0)
    with pytest.raises(ConfigError, match="max_result_bytes must be at most"):
        Task(unique_task_id(), db_url, redis_url, max_result_bytes=32 * 1024 * 1024)


# -- manual commits ----------------------------------------------------------------------


def test_a_manual_commit_stores_its_result(make_task: TaskFactory) -> None:
    def handler(job: Job) -> None:
        task.commit(job.id, Status.DONE, result={"by": "hand", "id": job.id})

    task = make_task(job_func=handler, auto_commit=False, serializer="json")
    job_id = task.push([1, 2])
    task.start()
    assert task.wait(job_id, timeout=30).result == {"by": "hand", "id": job_id}


def test_a_manual_commit_from_elsewhere_stores_its_result(make_task: TaskFactory) -> None:
    held: list[Job] = []
    go = threading.Event()

    def handler(job: Job) -> None:
        held.append(job)
        go.wait(30)

    worker = make_task(job_func=handler, auto_commit=False, serializer="json")
    producer = make_task(serializer="json")
    job_id = producer.push("payload")
    worker.start()
    wait_for(lambda: held, message="the job to start")
    job = held[0]
    with pytest.raises(PayloadError, match="set is not JSON"):
        producer.commit(job_id, Status.DONE, commit_id=job.commit_id, result={1, 2})
    assert record(producer, job_id).status is Status.DOING  # nothing was written
    with pytest.raises(ValueError, match="a result goes with a done commit"):
        producer.commit(job_id, Status.FAILED, commit_id=job.commit_id, result=1)
    producer.commit(job_id, Status.DONE, commit_id=job.commit_id, result=[3, "four"])
    go.set()
    assert producer.wait(job_id, timeout=30).result == [3, "four"]


def test_a_manual_result_over_the_limit_is_refused_and_nothing_is_written(
    make_task: TaskFactory,
) -> None:
    errors: list[BaseException] = []

    def handler(job: Job) -> None:
        try:
            task.commit(job.id, Status.DONE, result=b"y" * 101)
        except PayloadError as exc:
            errors.append(exc)
            task.commit(job.id, Status.DONE, result=b"short")

    task = make_task(job_func=handler, auto_commit=False, max_result_bytes=100)
    job_id = task.push(b"z")
    task.start()
    rec = wait_status(task, job_id, Status.DONE)
    assert rec.result == b"short"
    assert len(errors) == 1 and "101 bytes exceeds max_result_bytes=100" in str(errors[0])
