"""Delayed jobs, retry backoff, unique keys, priorities and batches, on every
backend with the real Redis."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from support.backends import TaskFactory, unique_task_id
from support.helpers import Clock, record, wait_for, wait_status

from meepo import ConfigError, Job, Status, Task
from meepo.transport.transport import decode


def rows(task: Task) -> int:
    t = task.ledger.table
    with task.engine.connect() as conn:
        return int(
            conn.execute(select(func.count()).where(t.c.task_id == task.task_id)).scalar_one()
        )


def queue(task: Task, priority: str = "default") -> list[tuple[int, int]]:
    raw: list[bytes] = task.redis.lrange(task.transport.key_for(priority), 0, -1)  # type: ignore[assignment]
    return [p for p in (decode(bytes(m)) for m in raw) if p is not None]


def delayed(task: Task) -> dict[bytes, float]:
    got: list[tuple[bytes, float]] = task.redis.zrange(  # type: ignore[assignment]
        task.transport.delayed_key, 0, -1, withscores=True
    )
    return {bytes(m): s for m, s in got}


# -- delayed jobs ----------------------------------------------------------------------


def test_delayed_job_waits_in_the_delayed_set_until_due(make_task: TaskFactory) -> None:
    clock = Clock()
    task = make_task(clock=clock)
    now = clock()
    job_id = task.push(b"later", delay=30)
    rec = record(task, job_id)
    assert rec.status is Status.TODO
    assert timedelta(seconds=29) < rec.run_at - now < timedelta(seconds=31)
    assert task.depths() == {"high": 0, "default": 0, "low": 0, "delayed": 1}
    assert delayed(task) == {b"%d:0:default" % job_id: rec.run_at.timestamp()}

    assert task.promoter.run_once() == (0, rec.run_at.timestamp())
    assert task.reaper.run_once(reap=True).swept == 0  # not due: the sweep leaves it
    clock.advance(31)
    assert task.promoter.run_once() == (1, None)
    assert queue(task) == [(job_id, 0)] and delayed(task) == {}
    assert task.promoter.run_once() == (0, None)  # promoted once


def test_run_at_is_kept_and_a_past_one_is_due_now(make_task: TaskFactory) -> None:
    task = make_task()
    at = datetime(2031, 5, 6, 7, 8, 9, 123000, tzinfo=timezone(timedelta(hours=2)))
    later = task.push(b"at", run_at=at)
    assert record(task, later).run_at == at
    assert delayed(task) == {b"%d:0:default" % later: at.timestamp()}

    past = task.push(b"past", run_at=datetime.now(timezone.utc) - timedelta(hours=1))
    negative = task.push(b"negative", delay=-5)
    assert queue(task) == [(past, 0), (negative, 0)]  # due now: straight to the queue
    assert record(task, negative).run_at < record(task, negative).created_at


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"delay": 1, "run_at": datetime(2031, 1, 1, tzinfo=timezone.utc)}, ValueError, "not both"),
        ({"run_at": datetime(2031, 1, 1)}, ValueError, "aware datetime"),
        ({"run_at": "2031-01-01"}, TypeError, "run_at must be a datetime"),
        ({"delay": "5"}, TypeError, "delay must be seconds"),
        ({"delay": float("nan")}, ValueError, "finite"),
        ({"priority": "urgent"}, ValueError, "unknown priority 'urgent'"),
        ({"key": ""}, ValueError, "key must be a non-empty string"),
        ({"key": "k" * 256}, ValueError, "at most 255"),
        ({"unique_for": 10}, ValueError, "unique_for= needs a key="),
        ({"key": "k", "unique_for": -1}, ValueError, "non-negative"),
    ],
)
def test_bad_push_options_write_nothing(
    make_task: TaskFactory, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    task = make_task()
    with pytest.raises(error, match=match):
        task.push(b"x", **kwargs)
    with pytest.raises(error, match=match), task.batch() as b:
        b.push(b"ok")
        b.push(b"x", **kwargs)
    assert rows(task) == 0 and task.depth() == 0 and delayed(task) == {}


def test_delayed_job_does_not_start_early(make_task: TaskFactory) -> None:
    started: dict[int, datetime] = {}
    task = make_task(job_func=lambda job: started.setdefault(job.id, datetime.now(timezone.utc)))
    task.start()
    ids = [task.push(b"%d" % i, delay=0.3 * i) for i in range(4)]
    for job_id in ids:
        wait_status(task, job_id, Status.DONE)
    for job_id in ids:
        assert started[job_id] >= record(task, job_id).run_at


def test_recovery_puts_delayed_jobs_back_in_the_delayed_set(make_task: TaskFactory) -> None:
    clock = Clock()
    task = make_task(clock=clock)
    assert task.reaper.run_once().recovered == 0
    later = task.push(b"later", delay=600, priority="low")
    now = task.push(b"now", priority="high")
    t = task.transport
    task.redis.delete(t.epoch_key, t.delayed_key, *t.queue_keys.values())
    assert task.reaper.run_once().recovered == 2
    assert queue(task, "high") == [(now, 0)]
    assert delayed(task) == {b"%d:0:low" % later: record(task, later).run_at.timestamp()}
    clock.advance(601)
    assert task.promoter.run_once()[0] == 1
    assert queue(task, "low") == [(later, 0)]


# -- retry backoff ---------------------------------------------------------------------


def test_retries_wait_for_their_backoff(make_task: TaskFactory) -> None:
    clock = Clock()
    runs: list[Job] = []

    def handler(job: Job) -> None:
        runs.append(job)
        raise RuntimeError("always")

    task = make_task(job_func=handler, clock=clock, retry_backoff=[60, 600], max_failed_times=3)
    job_id = task.push(b"flaky")
    task.start()
    for attempt, wait in ((1, 60), (2, 600)):
        rec = wait_for(
            lambda a=attempt: (r := record(task, job_id)).failed_times == a and r,  # type: ignore[misc]
            message=f"failure {attempt}",
        )
        assert rec.status is Status.TODO
        gap = (rec.run_at - rec.updated_at).total_seconds()
        assert wait - 1 < gap <= wait, gap
        assert len(runs) == attempt and task.depths()["delayed"] == 1
        clock.advance(wait - 5)  # not yet due: the promoter leaves it
        assert task.promoter.run_once()[0] == 0
        assert len(runs) == attempt
        clock.advance(5)
    rec = wait_status(task, job_id, Status.FAILED)
    assert rec.failed_times == 3 and len(runs) == 3


def test_retry_backoff_zero_retries_at_once(make_task: TaskFactory) -> None:
    seen: list[int] = []

    def handler(job: Job) -> None:
        seen.append(job.failed_times)
        if job.failed_times < 2:
            raise RuntimeError("not yet")

    task = make_task(job_func=handler, retry_backoff=0)
    job_id = task.push(b"x")
    task.start()
    assert wait_status(task, job_id, Status.DONE).failed_times == 2
    assert seen == [0, 1, 2]


# -- unique keys -----------------------------------------------------------------------


def test_unique_key_returns_the_unfinished_job(make_task: TaskFactory) -> None:
    task = make_task()
    first = task.push(b"invoice", key="invoice-2026-11")
    assert task.push(b"again", key="invoice-2026-11") == first
    assert rows(task) == 1 and queue(task) == [(first, 0)]
    other = task.push(b"other", key="invoice-2026-12")
    assert other != first

    # running (doing) still holds the key
    (job,) = task.ledger.claim(
        task.task_id,
        [(first, 0)],
        lease=timedelta(seconds=60),
        worker="w",
    )
    assert task.push(b"again", key="invoice-2026-11") == first
    task.commit(first, Status.DONE, commit_id=job.commit_id)
    # finished: the key is free again
    second = task.push(b"again", key="invoice-2026-11")
    assert second != first
    assert task.ledger.unique_holder(task.task_id, "invoice-2026-11") == second
    assert rows(task) == 3


def test_unique_for_keeps_the_key_after_completion(make_task: TaskFactory) -> None:
    clock = Clock()
    task = make_task(clock=clock)
    first = task.push(b"x", key="k", unique_for=300)
    (job,) = task.ledger.claim(
        task.task_id,
        [(first, 0)],
        now=clock(),
        lease=timedelta(seconds=60),
        worker="w",
    )
    task.commit(first, Status.FAILED, commit_id=job.commit_id)
    assert task.push(b"x", key="k") == first
    clock.advance(290)  # 10 s short of unique_for: real time also passes on a loaded host
    assert task.push(b"x", key="k") == first
    clock.advance(11)
    second = task.push(b"x", key="k")
    assert second != first and rows(task) == 2


def _concurrent_writers(task: Task) -> None:
    if task.engine.dialect.name == "sqlite":
        pytest.skip("SQLite has one writer at a time: no other writer inside a transaction")


def _set_status(task: Task, job_id: int, status: Status) -> None:
    with task.engine.begin() as conn:
        t = task.ledger.table
        conn.execute(t.update().where(t.c.id == job_id).values(status=status.value))


def _unfinished_with_key(task: Task, key: str) -> int:
    with task.engine.connect() as conn:
        t, u = task.ledger.table, task.ledger.unique
        return int(
            conn.execute(
                select(func.count())
                .select_from(t.join(u, u.c.job_id == t.c.id))
                .where(u.c.task_id == task.task_id, u.c.key == key)
                .where(t.c.status.in_(["todo", "doing"]))
            ).scalar_one()
        )


def test_unique_key_push_in_a_transaction_sees_the_holder_finish(
    make_task: TaskFactory,
) -> None:
    """push(key=..., connection=conn) inside a transaction whose snapshot predates the
    holder's completion: the key is free, a new job is written (MySQL's REPEATABLE READ
    snapshot must not hide the completion)."""
    task = make_task()
    _concurrent_writers(task)
    first = task.push(b"a", key="k")
    with task.engine.connect() as conn:
        conn.execute(select(func.count()).select_from(task.ledger.table))  # the snapshot
        _set_status(task, first, Status.DONE)
        second = task.push(b"b", key="k", connection=conn)
        conn.commit()
    assert second != first
    assert task.ledger.unique_holder(task.task_id, "k") == second
    assert record(task, second).status is Status.TODO


def test_unique_key_push_in_a_transaction_sees_the_holder_repushed(
    make_task: TaskFactory,
) -> None:
    """The reverse: the finished holder is repushed after the caller's snapshot; the
    push returns it and writes nothing, so one key never has two unfinished jobs."""
    task = make_task()
    _concurrent_writers(task)
    first = task.push(b"a", key="k")
    _set_status(task, first, Status.DONE)
    with task.engine.connect() as conn:
        conn.execute(select(func.count()).select_from(task.ledger.table))  # the snapshot
        task.repush(first)
        again = task.push(b"b", key="k", connection=conn)
        conn.commit()
    assert again == first
    assert _unfinished_with_key(task, "k") == 1 and rows(task) == 1


def test_unique_key_race_between_pushers(make_task: TaskFactory, db_url: str) -> None:
    """Eight pushers (own Task, own pooled connection) race on five keys: one job each."""
    task_id = unique_task_id("uniq")
    pushers = [make_task(task_id) for _ in range(8)]
    keys = [f"key-{k}" for k in range(5)]
    barrier = threading.Barrier(len(pushers))
    got: dict[str, list[int]] = {k: [] for k in keys}
    errors: list[BaseException] = []

    def push(task: Task) -> None:
        try:
            for key in keys:
                barrier.wait(timeout=30)
                got[key].append(task.push(b"race", key=key))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=push, args=(t,)) for t in pushers]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    for key in keys:
        assert len(got[key]) == len(pushers)
        assert len(set(got[key])) == 1, (key, got[key])
    assert rows(pushers[0]) == len(keys)
    assert Counter(queue(pushers[0])) == Counter({(got[k][0], 0): 1 for k in keys})


# -- priorities ------------------------------------------------------------------------


def test_consumers_take_the_first_non_empty_queue(make_task: TaskFactory) -> None:
    order: list[bytes] = []
    task = make_task(job_func=lambda job: order.append(job.payload), parallel_num=1, prefetch=0)
    for i in range(3):
        task.push(b"low%d" % i, priority="low")
        task.push(b"default%d" % i)
        task.push(b"high%d" % i, priority="high")
    assert task.depths() == {"high": 3, "default": 3, "low": 3, "delayed": 0}
    task.start()
    wait_for(lambda: len(order) == 9, message="all nine jobs")
    assert order == [b"%s%d" % (p, i) for p in (b"high", b"default", b"low") for i in range(3)]


def test_custom_priorities(make_task: TaskFactory) -> None:
    task = make_task(priorities=["critical", "bulk"])
    assert task.default_priority == "critical"
    bulk = task.push(b"b", priority="bulk")
    crit = task.push(b"c")
    assert record(task, bulk).priority == "bulk" and record(task, crit).priority == "critical"
    assert task.depths() == {"critical": 1, "bulk": 1, "delayed": 0}
    with pytest.raises(ValueError, match="critical, bulk"):
        task.push(b"x", priority="default")
    named = make_task(priorities=["a", "b", "c"], default_priority="c")
    assert record(named, named.push(b"x")).priority == "c"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"priorities": []}, "non-empty list"),
        ({"priorities": "high"}, "non-empty list"),
        ({"priorities": ["a", "a"]}, "listed twice"),
        ({"priorities": ["a b"]}, "invalid priority"),
        ({"priorities": ["a", "b"], "default_priority": "c"}, "default_priority"),
        ({"retry_backoff": "fast"}, "retry_backoff"),
    ],
)
def test_bad_priority_options(db_url: str, redis_url: str, kwargs: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Task(unique_task_id(), db=db_url, redis=redis_url, **kwargs)


def test_retries_reaping_and_repush_keep_the_priority(make_task: TaskFactory) -> None:
    clock = Clock()
    task = make_task(clock=clock, retry_backoff=0)
    job_id = task.push(b"x", priority="low")
    task.redis.delete(task.transport.key_for("low"))
    (job,) = task.ledger.claim(
        task.task_id,
        [(job_id, 0)],
        now=clock(),
        lease=timedelta(seconds=60),
        worker="w",
    )
    assert job.priority == "low"
    clock.advance(120)
    assert task.reaper.run_once(reap=True).requeued == 1  # expired lease: back to low
    assert queue(task, "low") == [(job_id, job.commit_id + 1)]
    task.redis.delete(task.transport.key_for("low"))
    assert task.repush(job_id) == job.commit_id + 2
    assert queue(task, "low") == [(job_id, job.commit_id + 2)] and queue(task) == []


# -- batches ---------------------------------------------------------------------------


def test_batch_commits_once_and_dispatches_after(make_task: TaskFactory) -> None:
    task = make_task()
    with task.batch() as b:
        b.push(b"a")
        b.push(b"b", delay=60)
        b.push(b"c", priority="high")
        b.push(b"d", key="only-once")
        b.push_many([b"e", b"f"])
        assert rows(task) == 0 and task.depth() == 0  # nothing before the block ends
    assert len(b.ids) == 6 and len(set(b.ids)) == 6
    a, later, high, d, e, f = b.ids
    assert queue(task) == [(a, 0), (d, 0), (e, 0), (f, 0)]
    assert queue(task, "high") == [(high, 0)]
    assert list(delayed(task)) == [b"%d:0:default" % later]
    assert [record(task, i).payload for i in b.ids] == [b"a", b"b", b"c", b"d", b"e", b"f"]


def test_batch_rolls_back_on_exception(make_task: TaskFactory) -> None:
    task = make_task()
    with pytest.raises(RuntimeError, match="changed my mind"), task.batch() as b:
        b.push(b"a")
        b.push(b"b", delay=5)
        raise RuntimeError("changed my mind")
    assert b.ids == [] and rows(task) == 0 and task.depth() == 0 and delayed(task) == {}
    with pytest.raises(RuntimeError, match="inside its with block"):
        b.push(b"late")


def test_batch_joins_a_connection(make_task: TaskFactory) -> None:
    task = make_task()
    assert task.reaper.run_once().recovered == 0  # the reaper knows the epoch
    with task.engine.connect() as conn:
        with task.batch(connection=conn) as b:
            b.push(b"a")
            b.push(b"b")
        assert len(b.ids) == 2
        conn.rollback()
    assert rows(task) == 0
    with task.engine.connect() as conn:
        with task.batch(connection=conn) as b:
            b.push(b"a")
        conn.commit()
    assert rows(task) == 1 and task.depth() == 0  # the sweep dispatches it
    assert task.reaper.run_once().swept == 1
    assert queue(task) == [(b.ids[0], 1)]


def test_batch_joins_a_session(make_task: TaskFactory) -> None:
    task = make_task()
    with Session(task.engine) as session:
        with task.batch(connection=session) as b:
            b.push(b"a", priority="high")
            b.push(b"b")
        assert task.depth() == 0
        session.commit()
    assert queue(task, "high") == [(b.ids[0], 0)] and queue(task) == [(b.ids[1], 0)]
    with pytest.raises(TypeError, match="Connection or Session"):
        task.batch(connection="nope")


def test_unique_key_inside_a_callers_transaction(make_task: TaskFactory) -> None:
    task = make_task()
    with task.engine.connect() as conn:
        first = task.push(b"a", key="tx-key", connection=conn)
        assert task.push(b"b", key="tx-key", connection=conn) == first
        conn.rollback()
    assert rows(task) == 0 and task.ledger.unique_holder(task.task_id, "tx-key") is None
    with Session(task.engine) as session:
        first = task.push(b"a", key="tx-key", connection=session)
        assert task.push(b"b", key="tx-key", connection=session) == first
        session.commit()
    assert rows(task) == 1 and queue(task) == [(first, 0)]
    assert task.push(b"c", key="tx-key") == first  # still unfinished
