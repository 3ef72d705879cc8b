"""Servers down at worker start, and going away mid-run, with real servers
behind a TCP proxy that the test closes and reopens (MariaDB, PostgreSQL) and a
throwaway redis-server started late (test_redis_outage.py). SQLite has no server to
lose: these tests run on the servers only (``db_url`` over ``SERVERS``)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy.engine import make_url
from support.backends import SERVERS, backend_url, unique_task_id
from support.helpers import Runs, TcpProxy, messages, record, wait_for

from meepo import LedgerUnavailableError, SchemaError, Status, Task
from meepo.connect import engine_for

pytestmark = pytest.mark.timeout(180)

TaskFactory = Callable[..., Task]


@pytest.fixture(params=SERVERS)
def db_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    return backend_url(request.param, sqlite_url)


@pytest.fixture
def proxy(db_url: str) -> Iterator[TcpProxy]:
    p = TcpProxy.to(db_url)
    yield p
    p.stop()
    engine_for(p.url(db_url)).dispose()


def test_worker_started_with_the_database_down_starts_when_it_returns(
    make_task: TaskFactory, db_url: str, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meepo")
    producer = make_task()
    ids = producer.push_many([b"a", b"b", b"c"])
    runs = Runs()
    worker = make_task(db=proxy.url(db_url), job_func=runs, init_db=True, poll_interval=0.2)
    assert messages(caplog, "cannot migrate now")  # init_db waits for the start
    worker.start()  # does not raise: it waits in the background
    wait_for(lambda: len(messages(caplog, "cannot start consuming yet")) >= 2, message="retries")
    line = messages(caplog, "cannot start consuming yet")[0]
    assert f"127.0.0.1:{proxy.port}" in line and "retrying in" in line
    assert all(record(producer, i).status is Status.TODO for i in ids)

    proxy.open()  # the database is back: the same Task starts consuming by itself
    wait_for(lambda: all(record(producer, i).status is Status.DONE for i in ids), timeout=30)
    assert messages(caplog, "the database is reachable, starting")
    later = producer.push(b"later")
    wait_for(lambda: record(producer, later).status is Status.DONE)


def test_start_with_the_database_down_logs_a_masked_url(
    db_url: str, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    closed = TcpProxy.to(db_url)  # never opened: every connection is reset
    url = make_url(closed.url(db_url)).set(username="meepo", password="s3cret-pw")
    task = Task(unique_task_id(), db=url.render_as_string(False), redis=redis_url, job_func=print)
    try:
        task.start()
        wait_for(lambda: messages(caplog, "cannot start consuming yet"), message="a retry line")
        assert not any("s3cret-pw" in r.getMessage() for r in caplog.records)
        assert "***" in messages(caplog, "cannot start consuming yet")[0]
    finally:
        task.stop()
        closed.stop()
    assert task.consumer is None


def test_missing_schema_is_an_immediate_error_and_after_the_database_returns(
    db_url: str, redis_url: str, proxy: TcpProxy
) -> None:
    task = Task(unique_task_id(), db=db_url, redis=redis_url, job_func=print, table_name="t_nope")
    with pytest.raises(SchemaError, match="t_nope"):
        task.start()  # the database answers: no waiting

    late = Task(
        task.task_id, db=proxy.url(db_url), redis=redis_url, job_func=print, table_name="t_nope"
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            late.run()  # not the main thread: no signal handlers
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    proxy.open()
    th.join(60)
    assert not th.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], SchemaError)


def test_database_lost_mid_run_no_job_half_committed(
    make_task: TaskFactory, db_url: str, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="meepo")
    proxy.open()
    runs = Runs(delay=0.02)
    worker = make_task(
        db=proxy.url(db_url), job_func=runs, parallel_num=4, lease=3.0, poll_interval=0.2
    )
    worker.start()
    producer = make_task()
    ids = producer.push_many([b"%d" % i for i in range(200)])
    wait_for(lambda: len(runs.claims()) >= 20, message="jobs running")
    proxy.close()  # every connection reset, mid-claim, mid-run, mid-commit
    wait_for(
        lambda: messages(caplog, "failed") or messages(caplog, "cannot"),
        message="the worker to notice",
    )
    proxy.open()
    wait_for(lambda: all(record(producer, i).status is Status.DONE for i in ids), timeout=60)
    claims = runs.claims()
    for i in ids:
        rec = record(producer, i)
        assert rec.expires_at is None  # a whole done commit, not part of one
        assert (i, rec.commit_id - 1) in claims  # committed by a run that completed


def test_pushes_after_the_database_returned_never_raise_a_driver_error(
    make_task: TaskFactory, db_url: str, proxy: TcpProxy
) -> None:
    """Every pooled connection was cut (a database restart): each push after the server
    is back either succeeds or raises LedgerUnavailableError, never the driver's own
    error, single or batched; and pushes succeed again right away."""
    proxy.open()
    producer = make_task(db=proxy.url(db_url))
    ids = [producer.push(b"warm-%d" % i) for i in range(3)]
    ids += producer.push_many([b"warm-many-%d" % i for i in range(3)])
    with contextlib.ExitStack() as stack:  # several pooled connections, all checked in
        conns = [stack.enter_context(producer.engine.connect()) for _ in range(3)]
        assert len(conns) == 3
    proxy.close()  # every open connection reset
    proxy.open()
    outcomes: list[str] = []
    for i in range(8):
        try:
            if i % 2:
                ids += producer.push_many([b"after-%d" % i])
            else:
                ids.append(producer.push(b"after-%d" % i))
            outcomes.append("ok")
        except LedgerUnavailableError:
            outcomes.append("unavailable")
    assert outcomes[-3:] == ["ok"] * 3, outcomes
    assert all(record(producer, i).status is Status.TODO for i in ids)
