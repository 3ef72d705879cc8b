"""Cancellation: ``Task.cancel`` of todo, delayed, batched and running jobs, its race
with a commit, the reaper, repush, Redis loss and ``meepo cancel``, on SQLite, MariaDB
and PostgreSQL with a real Redis."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine
from support.helpers import Clock, child_env, record, wait_for, wait_status

from meepo import Job, JobNotFoundError, StaleCommitError, Status, Task
from meepo.admin import Admin

pytestmark = pytest.mark.timeout(120)

TaskFactory = Callable[..., Task]
#: A short lease: heartbeats every second, so a running handler learns of a cancel soon.
LEASE = 3.0


def claim_and_die(task: Task, job_id: int, clock: Clock) -> Job:
    """What a consumer does before it is SIGKILLed: pop, claim, record the start."""
    task.redis.delete(task.transport.queue_key)
    ((_, _, commit_id, _),) = task.ledger.find(task_id=task.task_id, ids=[job_id])
    now = clock()
    (job,) = task.ledger.claim(
        task.task_id,
        [(job_id, commit_id)],
        now=now,
        lease=timedelta(seconds=5),
        worker="dead-host:1",
    )
    assert task.ledger.start([(job.id, job.commit_id)], now=now) == 1
    return job


def test_a_todo_job_is_cancelled_at_once_and_never_runs(make_task: TaskFactory) -> None:
    ran: list[bytes] = []
    task = make_task(job_func=lambda job: ran.append(job.payload))
    victim = task.push(b"victim")
    assert task.cancel(victim) is True
    rec = record(task, victim)
    assert (rec.status, rec.commit_id, rec.cancel_requested) == (Status.CANCELLED, 1, True)
    assert task.cancel(victim) is False  # finished: unchanged
    assert record(task, victim).commit_id == 1
    task.start()  # its message (commit_id 0) is popped and dropped
    marker = task.push(b"marker")
    wait_status(task, marker, Status.DONE)
    assert ran == [b"marker"]
    assert record(task, victim).status is Status.CANCELLED


def test_a_delayed_job_is_cancelled_and_its_message_dropped_when_due(
    make_task: TaskFactory,
) -> None:
    ran: list[bytes] = []
    task = make_task(job_func=lambda job: ran.append(job.payload), promote_interval=0.05)
    victim = task.push(b"later", delay=1.0)
    assert task.cancel(victim) is True
    assert record(task, victim).status is Status.CANCELLED
    task.start()
    # once the delayed message is due it is promoted, popped, and dropped as stale
    wait_for(lambda: task.redis.zcard(task.transport.delayed_key) == 0, message="promotion")
    marker = task.push(b"marker")
    wait_status(task, marker, Status.DONE)
    assert ran == [b"marker"]
    assert record(task, victim).status is Status.CANCELLED


def test_a_job_committed_in_a_batch_but_not_sent_yet_is_cancelled(
    make_task: TaskFactory, db_url: str
) -> None:
    ran: list[bytes] = []
    task = make_task(job_func=lambda job: ran.append(job.payload), poll_interval=0.1)
    engine = create_engine(db_url)
    with engine.connect() as conn:
        with task.batch(conn) as batch:
            batch.push(b"batched")
        conn.commit()  # committed; its message waits for the dispatch sweep
    engine.dispose()
    (victim,) = batch.ids
    assert task.cancel(victim) is True
    task.start()
    task.reaper.run_once()  # the sweep sends only todo rows
    marker = task.push(b"marker")
    wait_status(task, marker, Status.DONE)
    assert ran == [b"marker"]
    assert record(task, victim).status is Status.CANCELLED


def test_a_running_handler_sees_the_cancel_and_its_job_ends_cancelled(
    make_task: TaskFactory,
) -> None:
    """Returning normally after the cancel: the job is cancelled, not done."""
    started = threading.Event()
    seen: list[bool] = []

    def handler(job: Job) -> None:
        started.set()
        wait_for(lambda: job.cancel_requested, timeout=30, message="the cancel flag")
        seen.append(job.cancel_requested)

    task = make_task(job_func=handler, lease=LEASE)
    job_id = task.push(b"long")
    task.start()
    assert started.wait(30)
    assert record(task, job_id).status is Status.DOING
    assert task.cancel(job_id) is True
    assert task.cancel(job_id) is False  # already requested: nothing changes
    rec = wait_status(task, job_id, Status.CANCELLED)
    assert seen == [True]
    assert (rec.failed_times, rec.expires_at, rec.cancel_requested) == (0, None, True)
    consumer = task.consumer
    assert consumer is not None
    # the committer counts after its statement returned: the row may be read first
    wait_for(lambda: consumer.counters.cancelled == 1, message="the cancelled count")
    assert consumer.counters.done == 0


def test_a_running_async_handler_is_cancelled_and_its_job_ends_cancelled(
    make_task: TaskFactory,
) -> None:
    """An ``async def`` handler is not left to notice the flag: its coroutine is
    cancelled (it sees CancelledError) within a heartbeat, and the job is cancelled,
    not failed or retried."""
    import asyncio

    started = threading.Event()
    saw: list[str] = []

    async def handler(job: Job) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            saw.append("CancelledError")
            raise
        saw.append("slept")

    task = make_task(job_func=handler, lease=LEASE, max_failed_times=3)
    job_id = task.push(b"long")
    task.start()
    assert started.wait(30)
    assert task.cancel(job_id) is True
    rec = wait_status(task, job_id, Status.CANCELLED)
    assert saw == ["CancelledError"]
    assert (rec.failed_times, rec.expires_at) == (0, None)


def test_a_cancelled_job_whose_handler_raises_is_not_retried(make_task: TaskFactory) -> None:
    runs: list[int] = []
    started = threading.Event()

    def handler(job: Job) -> None:
        runs.append(job.failed_times)
        if job.payload == b"marker":
            return
        started.set()
        wait_for(lambda: job.cancel_requested, timeout=30, message="the cancel flag")
        raise RuntimeError("stopped because cancelled")

    task = make_task(job_func=handler, lease=LEASE, max_failed_times=5, retry_backoff=0)
    job_id = task.push(b"x")
    task.start()
    assert started.wait(30)
    assert task.cancel(job_id) is True
    rec = wait_status(task, job_id, Status.CANCELLED)
    assert rec.failed_times == 0
    assert rec.last_error == "RuntimeError: stopped because cancelled"
    marker = task.push(b"marker")  # the queue has moved on past any retry
    wait_status(task, marker, Status.DONE)
    assert runs == [0, 0]  # the job once, the marker once


def test_a_handler_that_ends_before_its_heartbeat_saw_the_cancel_still_ends_cancelled(
    make_task: TaskFactory,
) -> None:
    """The cancel lands while the handler runs, but the handler returns before any
    heartbeat: its done commit loses to the flag and the job is closed as cancelled."""
    go = threading.Event()
    started = threading.Event()

    def handler(job: Job) -> None:
        started.set()
        assert go.wait(30)

    task = make_task(job_func=handler, lease=60.0)  # no heartbeat during the test
    job_id = task.push(b"x")
    task.start()
    assert started.wait(30)
    assert task.cancel(job_id) is True
    go.set()
    wait_status(task, job_id, Status.CANCELLED)


@pytest.mark.parametrize("first", ["cancel", "commit"])
def test_a_cancel_racing_a_manual_commit_exactly_one_wins(
    make_task: TaskFactory, first: str
) -> None:
    go = threading.Event()
    started = threading.Event()
    outcome: list[object] = []
    task: Task

    def handler(job: Job) -> None:
        started.set()
        assert go.wait(30)
        try:
            task.commit(job.id, Status.DONE)
            outcome.append("committed")
        except StaleCommitError as exc:
            outcome.append(exc)

    task = make_task(job_func=handler, auto_commit=False, lease=60.0)
    job_id = task.push(b"x")
    task.start()
    assert started.wait(30)
    if first == "cancel":
        assert task.cancel(job_id) is True
        go.set()
        rec = wait_status(task, job_id, Status.CANCELLED)
        wait_for(lambda: outcome, message="the commit's outcome")
        (err,) = outcome
        assert isinstance(err, StaleCommitError) and "cancelled" in str(err)
    else:
        go.set()
        rec = wait_status(task, job_id, Status.DONE)
        assert task.cancel(job_id) is False
        wait_for(lambda: outcome, message="the commit's outcome")  # its return follows the row
        assert outcome == ["committed"]
        assert record(task, job_id).status is Status.DONE
    assert rec.failed_times == 0


def test_the_reaper_closes_a_dead_workers_cancelled_job_as_cancelled(
    make_task: TaskFactory,
) -> None:
    clock = Clock()
    producer = make_task(clock=clock, zombie_timeout=5.0)
    job_id = producer.push(b"orphan")
    claim_and_die(producer, job_id, clock)
    assert producer.cancel(job_id) is True
    assert record(producer, job_id).status is Status.DOING
    clock.advance(6)
    report = producer.reaper.run_once(reap=True)
    assert (report.requeued, report.closed) == (0, 1)
    rec = record(producer, job_id)
    assert (rec.status, rec.failed_times) == (Status.CANCELLED, 0)
    assert producer.reaper.run_once(reap=True).closed == 0  # handled once


def test_repush_of_a_cancelled_job_runs_it(make_task: TaskFactory) -> None:
    ran: list[bytes] = []
    task = make_task(job_func=lambda job: ran.append(job.payload))
    job_id = task.push(b"again")
    assert task.cancel(job_id) is True
    task.repush(job_id)
    rec = record(task, job_id)
    assert (rec.status, rec.cancel_requested) == (Status.TODO, False)
    task.start()
    wait_status(task, job_id, Status.DONE)
    assert ran == [b"again"]


def test_a_cancelled_job_is_not_brought_back_by_recovery_after_redis_loses_its_data(
    make_task: TaskFactory, redis_url: str
) -> None:
    ran: list[bytes] = []
    task = make_task(job_func=lambda job: ran.append(job.payload))
    victim = task.push(b"victim")
    kept = task.push(b"kept")
    assert task.cancel(victim) is True
    redis.Redis.from_url(redis_url).flushdb()  # the test's own Redis database
    task.start()  # finds no epoch token: re-dispatches every todo job from the ledger
    wait_status(task, kept, Status.DONE)
    marker = task.push(b"marker")
    wait_status(task, marker, Status.DONE)
    assert sorted(ran) == [b"kept", b"marker"]
    assert record(task, victim).status is Status.CANCELLED


def test_cancel_of_an_unknown_job_is_job_not_found(make_task: TaskFactory) -> None:
    task = make_task()
    task.push(b"x")
    with pytest.raises(JobNotFoundError, match="no job 999999999"):
        task.cancel(999_999_999)


def test_stats_count_cancelled_jobs(make_task: TaskFactory, db_url: str, redis_url: str) -> None:
    task = make_task()
    ids = task.push_many([b"a", b"b", b"c"])
    assert task.cancel(ids[0]) and task.cancel(ids[1])
    (summary,) = Admin(db_url, redis_url).stats(task.task_id)
    assert summary.counts[Status.CANCELLED] == 2 and summary.counts[Status.TODO] == 1
    assert summary.to_dict()["counts"]["cancelled"] == 2


def _meepo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meepo", *args],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_meepo_cancel_by_id_and_by_status(
    make_task: TaskFactory, db_url: str, redis_url: str, tmp_path: Path
) -> None:
    task = make_task()
    a, b, c, d = task.push_many([b"a", b"b", b"c", b"d"])
    conn = ["--db", db_url, "--redis", redis_url]

    got = _meepo("cancel", "--id", str(a), *conn, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert f"cancel job {a} (task {task.task_id}, was todo)" in got.stdout
    assert record(task, a).status is Status.CANCELLED

    got = _meepo(
        "cancel", "--task", task.task_id, "--status", "todo", "--dry-run", *conn, cwd=tmp_path
    )
    assert got.returncode == 0, got.stderr
    assert "would cancel 3 job(s) (dry run: nothing changed)" in got.stdout
    assert record(task, b).status is Status.TODO

    got = _meepo(
        "cancel", "--task", task.task_id, "--status", "todo", "--limit", "2", *conn, cwd=tmp_path
    )
    assert got.returncode == 0, got.stderr
    assert "cancelled 2 job(s)" in got.stdout
    assert [record(task, i).status for i in (b, c, d)] == [
        Status.CANCELLED,
        Status.CANCELLED,
        Status.TODO,
    ]

    got = _meepo("cancel", "--id", "999999999", *conn, cwd=tmp_path)
    assert got.returncode != 0 and "no job 999999999" in got.stderr
    assert len(got.stderr.splitlines()) == 1

    got = _meepo("cancel", "--status", "done", *conn, cwd=tmp_path)
    assert got.returncode == 2 and "expected one of todo, doing" in got.stderr

    got = _meepo("stats", "--task", task.task_id, "--json", *conn, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert '"cancelled": 3' in got.stdout


def test_a_claimed_job_cancelled_before_it_started_is_closed_when_given_back(
    make_task: TaskFactory,
) -> None:
    """A stopping worker gives back the jobs it claimed but never started: one that was
    cancelled meanwhile is closed as cancelled, not put back on the queue."""
    clock = Clock()
    task = make_task(clock=clock)
    job_id = task.push(b"prefetched")
    ((_, _, commit_id, _),) = task.ledger.find(task_id=task.task_id, ids=[job_id])
    (job,) = task.ledger.claim(
        task.task_id, [(job_id, commit_id)], lease=timedelta(seconds=30), worker="w"
    )
    assert task.cancel(job_id) is True
    moved = task.dispatcher.release([(job.id, job.commit_id, job.priority)])
    assert (moved.sent, moved.closed) == ([], 1)
    assert record(task, job_id).status is Status.CANCELLED
