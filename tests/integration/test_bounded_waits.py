"""Bounded waits (docs/design.md invariant 9): meepo's own
threads run on a pool of their own, their lock waits are bounded from the lease, and a
connection that goes silent (a blackholing proxy, no reset) is given up within about a
third of the lease, then the worker recovers when the network heals.

Row locks, statement timeouts and networks are the servers' (SQLite has one writer and
no network): these tests run on MariaDB and PostgreSQL (``db_url`` over ``SERVERS``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from functools import partial

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from support.backends import SERVERS, backend_url
from support.helpers import TcpProxy, record, wait_for

from meepo import Job, Status, Task, UnsupportedServerError
from meepo import connect as meepo_connect
from meepo.ledger import engine as ledger_engine
from meepo.ledger import make_engine

pytestmark = pytest.mark.timeout(180)

TaskFactory = Callable[..., Task]


@pytest.fixture(params=SERVERS)
def db_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    return backend_url(request.param, sqlite_url)


def messages(caplog: pytest.LogCaptureFixture, text_: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text_ in r.getMessage()]


def variant(url: str, name: str) -> str:
    """``url`` spelled differently (a harmless query parameter), so that it gets Engines
    of its own in this process."""
    u = make_url(url)
    key = "application_name" if u.get_backend_name() == "postgresql" else "program_name"
    return u.update_query_dict({key: name}).render_as_string(False)


@pytest.fixture
def small_pool(db_url: str) -> Iterator[Callable[[int], str]]:
    """A URL whose handler pool (``task.engine``) holds exactly ``n`` connections."""
    made: list[str] = []

    def build(n: int) -> str:
        url = variant(db_url, "meepo_small_pool")
        meepo_connect._engines[url] = make_engine(
            url, pool_size=n, max_overflow=0, pool_timeout=120
        )
        made.append(url)
        return url

    yield build
    for url in made:
        meepo_connect._engines.pop(url).dispose()


def test_a_consumer_on_a_server_without_skip_locked_fails_at_start(
    make_task: TaskFactory, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raise the version meepo asks of MariaDB/MySQL above the real server's: start()
    fails at once naming the server's version (PostgreSQL is not concerned)."""
    monkeypatch.setattr(ledger_engine, "SKIP_LOCKED_SINCE", {"MariaDB": (99, 0), "MySQL": (99, 0)})
    task = make_task(job_func=print)
    if make_url(db_url).get_backend_name() == "postgresql":
        task.start()
        assert task.consumer is not None and task.consumer.running
        return
    with task.engine.connect() as conn:
        version = str(conn.execute(text("SELECT VERSION()")).scalar())
    with pytest.raises(UnsupportedServerError, match="SKIP LOCKED") as info:
        task.start()
    assert version in str(info.value) and ">= 99.0" in str(info.value)
    assert task.consumer is None


def test_handlers_exhausting_their_pool_do_not_starve_heartbeats(
    make_task: TaskFactory, small_pool: Callable[[int], str], db_url: str
) -> None:
    """Every handler holds a task.engine connection (the pool is exhausted) for longer
    than the lease: the leases are still renewed, a racing reaper finds nothing to reap,
    each job runs once and every commit is accepted."""
    n, lease = 3, 3.0
    url = small_pool(n)
    runs: list[tuple[int, int]] = []
    lock = threading.Lock()
    done = threading.Event()

    def handler(job: Job) -> None:
        with task.engine.connect() as conn:  # the handler's own connection, held
            conn.execute(text("SELECT 1"))
            with lock:
                runs.append((job.id, job.commit_id))
            done.wait(1.8 * lease)

    task = make_task(db=url, job_func=handler, lease=lease, parallel_num=n, prefetch=0)
    # A reaper elsewhere (its own engine), reaping as soon as a lease expires.
    other = make_task(db=variant(db_url, "meepo_other"), zombie_timeout=lease)
    ids = task.push_many([b"x"] * n)
    task.start()
    wait_for(lambda: len(runs) == n, timeout=30, message="every handler running")
    stop = threading.Event()
    reaped: list[int] = []

    def reap() -> None:
        while not stop.wait(0.2):
            report = other.reaper.run_once(reap=True)
            reaped.append(report.requeued + report.closed)

    th = threading.Thread(target=reap, daemon=True)
    th.start()
    try:
        wait_for(
            lambda: all(record(task, i).status is Status.DONE for i in ids),
            timeout=60,
            message="every job done",
        )
    finally:
        stop.set()
        th.join(10)
    assert sum(reaped) == 0
    assert sorted(i for i, _ in runs) == sorted(ids)  # each job ran once
    assert task.consumer is not None and task.consumer.counters.stale == 0


def test_a_row_lock_held_elsewhere_bounds_the_commit_and_it_retries(
    make_task: TaskFactory, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Another session holds the job's row lock while its commit is written: the commit
    fails fast with a lock timeout (logged, no crash) and lands once the lock is gone."""
    caplog.set_level(logging.WARNING, logger="meepo")
    lease = 6.0
    go = threading.Event()
    task = make_task(job_func=lambda job: go.wait(30), lease=lease, parallel_num=1)
    job_id = task.push(b"x")
    task.start()
    wait_for(lambda: record(task, job_id).status is Status.DOING, message="the job running")
    table = task.ledger.table
    locker = make_engine(variant(db_url, "meepo_locker"))
    conn = locker.connect()
    try:
        trans = conn.begin()
        conn.execute(table.select().where(table.c.id == job_id).with_for_update()).all()
        go.set()
        # Far below MariaDB's default 50 s lock wait and PostgreSQL's unbounded one.
        wait_for(lambda: messages(caplog, "commit failed"), timeout=lease, message="a bounded wait")
        assert record(task, job_id).status is Status.DOING
        trans.rollback()
    finally:
        conn.close()
        locker.dispose()
    wait_for(lambda: record(task, job_id).status is Status.DONE, message="the commit retried")
    assert task.consumer is not None and task.consumer.counters.done == 1


@pytest.fixture
def proxy(db_url: str) -> Iterator[TcpProxy]:
    p = TcpProxy.to(db_url).open()
    yield p
    p.stop()


def test_a_silent_network_is_detected_and_the_worker_recovers(
    make_task: TaskFactory, db_url: str, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The database goes silent without a reset: heartbeat, claim and reaper each give
    up within about a third of the lease (logged), instead of the kernel's ~15 minutes;
    once the network heals, the worker finishes every job."""
    caplog.set_level(logging.WARNING, logger="meepo")
    lease = 3.0
    release = threading.Event()
    started: list[int] = []

    def handler(job: Job) -> None:
        started.append(job.id)
        if len(started) == 1:
            release.wait(60)

    worker = make_task(
        db=proxy.url(db_url), job_func=handler, lease=lease, parallel_num=2, poll_interval=0.3
    )
    producer = make_task()  # direct connection
    first = producer.push(b"first")
    worker.start()
    wait_for(lambda: started, message="the first job running")
    proxy.blackhole()
    second = producer.push(b"second")  # popped by the worker, claimed over the dead link
    release.set()  # the first job's commit is written over the dead link
    limit = 6 * lease  # the old code stays blocked for minutes (a busy CI host: margin)
    for what in (
        "heartbeat failed",
        "claim failed",
        "commit failed",
        "reaper step",  # the sweep or the lease scan, on the database
        "scheduler pass failed",
    ):
        wait_for(partial(messages, caplog, what), timeout=limit, message=what)
    proxy.open()
    wait_for(
        lambda: all(record(producer, i).status is Status.DONE for i in (first, second)),
        timeout=60,
        message="both jobs done after the heal",
    )
