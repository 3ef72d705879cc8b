"""The reaper and the sweep skip rows another transaction holds locked.

Row locks are a server's: these tests run on MariaDB and PostgreSQL (SQLite's write
lock covers the whole file, so nothing can hold one row).

On MariaDB a worker frozen (SIGSTOP) inside its claim transaction keeps its row locks
until it wakes up; another process's reaper must not wait for it. The lock here is held
by a real open transaction (``SELECT … FOR UPDATE``) on another connection; the reaper
runs in a thread so that a wait shows up as a missed deadline, not a hung test.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import select
from support.backends import SERVERS, backend_url
from support.helpers import Clock, claim_and_die, record, wait_for

from meepo import Status, Task
from meepo.runtime.reaper import ReapReport

pytestmark = pytest.mark.timeout(120)

TaskFactory = Callable[..., Task]


@contextmanager
def row_locked(task: Task, job_id: int) -> Iterator[None]:
    """Hold a row lock on ``job_id`` in an open transaction of another connection."""
    t = task.ledger.table
    with task.engine.connect() as conn:
        trans = conn.begin()
        try:
            got = conn.execute(select(t.c.id).where(t.c.id == job_id).with_for_update()).all()
            assert [r.id for r in got] == [job_id]
            yield
        finally:
            trans.rollback()


def in_thread(fn: Callable[[], ReapReport]) -> ReapReport:
    out: list[ReapReport] = []
    th = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    th.start()
    wait_for(lambda: out, message="the reaper pass, which must not wait for the lock")
    return out[0]


@pytest.fixture(params=SERVERS)
def db_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    return backend_url(request.param, sqlite_url)


def test_reaper_skips_a_locked_zombie_and_reaps_the_others(make_task: TaskFactory) -> None:
    clock = Clock()
    task = make_task(clock=clock, zombie_timeout=2.0)
    ids = task.push_many([b"z%d" % i for i in range(5)])
    dead = {j.id: j.commit_id for j in claim_and_die(task, ids, lease=2.0)}
    clock.advance(3)
    locked, others = ids[0], ids[1:]
    with row_locked(task, locked):
        report = in_thread(lambda: task.reaper.run_once(reap=True))
        assert (report.requeued, report.closed) == (4, 0)
        assert record(task, locked).status is Status.DOING
        assert {record(task, i).status for i in others} == {Status.TODO}
    report = task.reaper.run_once(reap=True)  # the lock is gone: its turn now
    assert (report.requeued, report.closed) == (1, 0)
    assert record(task, locked).status is Status.TODO
    assert [record(task, i).commit_id for i in ids] == [dead[i] + 1 for i in ids]  # reaped once


def test_sweep_skips_a_locked_row_and_sends_the_others(make_task: TaskFactory) -> None:
    clock = Clock()
    task = make_task(clock=clock, zombie_timeout=2.0)
    ids = task.push_many([b"s%d" % i for i in range(4)])
    task.redis.delete(task.transport.queue_key)  # popped by a consumer that died
    clock.advance(3)  # past their dispatch deadline
    locked = ids[-1]
    with row_locked(task, locked):
        swept = in_thread(lambda: ReapReport(swept=task.reaper.sweep())).swept
        assert swept == 3
        assert record(task, locked).commit_id == 0
    assert task.reaper.sweep() == 1
    assert [record(task, i).commit_id for i in ids] == [1] * 4
