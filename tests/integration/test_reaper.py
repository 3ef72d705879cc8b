"""The reaper: expired leases, lost messages, Redis data loss, repush, on
SQLite, MariaDB and PostgreSQL.

Dead consumers are simulated in-process: a job is claimed through the ledger directly
(as a consumer would) and then nobody heartbeats it; the test moves a ``clock=`` past
the lease and drives ``task.reaper.run_once()``.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from datetime import timedelta

import pytest
from support.helpers import Clock, claim_and_die, queued, record, wait_for

from meepo import Job, JobNotFoundError, Status, Task
from meepo.runtime.reaper import ReapReport

pytestmark = pytest.mark.timeout(120)

TaskFactory = Callable[..., Task]


# -- expired leases --------------------------------------------------------------------


def test_dead_consumer_job_is_requeued_and_runs_later(make_task: TaskFactory) -> None:
    clock = Clock()
    producer = make_task(clock=clock, zombie_timeout=5.0)
    job_id = producer.push(b"orphan")
    (dead,) = claim_and_die(producer, [job_id], lease=5.0)

    assert producer.reaper.run_once(reap=True) == ReapReport()  # lease still alive
    assert record(producer, job_id).status is Status.DOING
    clock.advance(6)
    report = producer.reaper.run_once(reap=True)
    assert (report.requeued, report.closed) == (1, 0)
    rec = record(producer, job_id)
    assert (rec.status, rec.failed_times, rec.commit_id) == (Status.TODO, 1, dead.commit_id + 1)
    assert rec.last_error is not None and "lease expired" in rec.last_error
    assert queued(producer) == Counter({(job_id, dead.commit_id + 1): 1})
    assert producer.reaper.run_once(reap=True) == ReapReport()  # handled once

    runs: list[Job] = []
    consumer = make_task(job_func=runs.append)
    consumer.start()
    wait_for(lambda: record(consumer, job_id).status is Status.DONE, message="the rerun")
    assert [(j.id, j.failed_times, j.payload) for j in runs] == [(job_id, 1, b"orphan")]


@pytest.mark.parametrize("dst", [Status.DONE, Status.FAILED, "failed"])
def test_zombie_dst_status_closes(make_task: TaskFactory, dst: Status | str) -> None:
    clock = Clock()
    task = make_task(clock=clock, zombie_dst_status=dst, zombie_timeout=2.0)
    ids = task.push_many([b"a", b"b"])
    dead = {j.id: j.commit_id for j in claim_and_die(task, ids, lease=2.0)}
    clock.advance(3)
    report = task.reaper.run_once(reap=True)
    assert (report.requeued, report.closed) == (0, 2)
    for i in ids:
        rec = record(task, i)
        assert rec.status is Status.parse(dst)
        assert rec.failed_times == 1 and rec.expires_at is None
        assert rec.commit_id == dead[i] + 1
    assert task.depth() == 0
    assert task.reaper.run_once(reap=True) == ReapReport()


def test_reaping_respects_max_failed_times(make_task: TaskFactory) -> None:
    clock = Clock()
    task = make_task(clock=clock, max_failed_times=2, zombie_timeout=2.0)
    job_id = task.push(b"keeps dying")
    claim_and_die(task, [job_id], lease=2.0)
    clock.advance(3)
    assert task.reaper.run_once(reap=True).requeued == 1
    assert record(task, job_id).status is Status.TODO
    claim_and_die(task, [job_id], lease=2.0)  # dies again
    clock.advance(3)
    report = task.reaper.run_once(reap=True)
    assert (report.requeued, report.closed) == (0, 1)
    rec = record(task, job_id)
    assert (rec.status, rec.failed_times) == (Status.FAILED, 2)
    assert task.depth() == 0


def test_running_reaper_recovers_a_dead_consumers_job(make_task: TaskFactory) -> None:
    """No clock tricks: the task's own background reaper finds the expired lease."""
    runs: list[Job] = []
    task = make_task(job_func=runs.append, zombie_period=0.2, zombie_timeout=0.5, poll_interval=0.1)
    job_id = task.push(b"recovered in real time")
    claim_and_die(task, [job_id], lease=0.5)
    task.start()
    wait_for(lambda: record(task, job_id).status is Status.DONE, message="the reaped job")
    assert [(j.id, j.failed_times) for j in runs] == [(job_id, 1)]


def test_racing_reapers_handle_each_zombie_once(make_task: TaskFactory) -> None:
    clock = Clock()
    reapers = [make_task(clock=clock, zombie_timeout=5.0) for _ in range(4)]
    ids = reapers[0].push_many([b"%d" % i for i in range(30)])
    dead = {j.id: j.commit_id for j in claim_and_die(reapers[0], ids, lease=5.0)}
    clock.advance(10)
    barrier = threading.Barrier(len(reapers))
    reports: list[ReapReport] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def race(task: Task) -> None:
        try:
            barrier.wait(10)
            report = task.reaper.run_once(reap=True)
            with lock:
                reports.append(report)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(t,)) for t in reapers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sum(r.requeued for r in reports) == len(ids)
    assert sum(r.closed for r in reports) == 0
    for i in ids:
        rec = record(reapers[0], i)
        assert (rec.status, rec.failed_times, rec.commit_id) == (Status.TODO, 1, dead[i] + 1)
    assert queued(reapers[0]) == Counter({(i, dead[i] + 1): 1 for i in ids})  # one message each


def test_reap_reads_at_most_zombie_limit_rows(make_task: TaskFactory) -> None:
    clock = Clock()
    task = make_task(clock=clock, zombie_limit=2, zombie_timeout=2.0)
    ids = task.push_many([b"%d" % i for i in range(5)])
    claim_and_die(task, ids, lease=2.0)
    clock.advance(3)
    passes = [task.reaper.run_once(reap=True).requeued for _ in range(4)]
    assert passes == [2, 2, 1, 0]
    assert all(record(task, i).status is Status.TODO for i in ids)


def test_sweep_reads_at_most_zombie_limit_rows(make_task: TaskFactory) -> None:
    task = make_task(zombie_limit=2)
    with task.engine.begin() as conn:  # never dispatched: the sweep sends them
        ids = task.push_many([b"%d" % i for i in range(5)], connection=conn)
    assert [task.reaper.sweep() for _ in range(4)] == [2, 2, 1, 0]
    assert sorted(i for i, _ in queued(task)) == ids


def test_lost_message_is_swept_after_the_dispatch_deadline(make_task: TaskFactory) -> None:
    """A consumer popped the message and died before claiming: the todo row is sent
    again once its dispatch deadline passes. It is never closed by the zombie policy."""
    clock = Clock()
    task = make_task(clock=clock, zombie_timeout=5.0, zombie_dst_status=Status.FAILED)
    job_id = task.push(b"popped and lost")
    task.redis.delete(task.transport.queue_key)
    assert task.reaper.run_once(reap=True) == ReapReport()  # deadline not reached
    clock.advance(6)
    report = task.reaper.run_once(reap=True)
    assert (report.swept, report.closed) == (1, 0)
    rec = record(task, job_id)
    assert (rec.status, rec.commit_id, rec.failed_times) == (Status.TODO, 1, 0)
    assert queued(task) == Counter({(job_id, 1): 1})


def test_waiting_backlog_is_not_reshuffled(make_task: TaskFactory) -> None:
    """Rows whose messages still wait in the queue are left alone, however old."""
    clock = Clock()
    task = make_task(clock=clock, zombie_timeout=5.0)
    ids = task.push_many([b"%d" % i for i in range(5)])
    clock.advance(60)
    assert task.reaper.run_once(reap=True) == ReapReport()
    assert queued(task) == Counter({(i, 0): 1 for i in ids})


# -- Redis data loss -------------------------------------------------------------------


def test_redis_data_loss_redispatches_due_todo_jobs_at_once(make_task: TaskFactory) -> None:
    clock = Clock()
    a = make_task(clock=clock, zombie_timeout=600.0)
    b = make_task(clock=clock, zombie_timeout=600.0)
    todo = a.push_many([b"%d" % i for i in range(12)])
    running = a.push(b"running elsewhere")
    later = a.push(b"not due yet")
    (claimed,) = a.ledger.claim(
        a.task_id,
        [(running, 0)],
        now=clock(),
        lease=timedelta(seconds=600),
        worker="w",
    )
    (delayed,) = a.ledger.claim(
        a.task_id,
        [(later, 0)],
        now=clock(),
        lease=timedelta(seconds=600),
        worker="w",
    )
    a.commit(later, Status.TODO, commit_id=delayed.commit_id, delay=3600)
    assert a.reaper.run_once().recovered == 0  # both reapers learn the epoch
    assert b.reaper.run_once().recovered == 0

    # Redis loses the task's data (on the shared server: delete, never FLUSHALL)
    assert a.redis.zcard(a.transport.delayed_key) == 1
    a.redis.delete(a.transport.queue_key, a.transport.epoch_key, a.transport.delayed_key)
    report = a.reaper.run_once()
    assert report.recovered == len(todo) + 1  # no waiting for zombie_timeout
    assert b.reaper.run_once().recovered == 0  # one process re-dispatches per epoch
    assert queued(a) == Counter({(i, 0): 1 for i in todo})
    # the job due later is back in the delayed set, due when it was
    delayed_set: list[tuple[bytes, float]] = a.redis.zrange(  # type: ignore[assignment]
        a.transport.delayed_key, 0, -1, withscores=True
    )
    member, score = delayed_set[0]
    assert member == b"%d:%d:default" % (later, delayed.commit_id + 1)
    assert score == record(a, later).run_at.timestamp()
    assert record(a, running).commit_id == claimed.commit_id  # untouched

    runs: list[int] = []
    consumer = make_task(job_func=lambda job: runs.append(job.id))
    consumer.start()
    wait_for(
        lambda: all(record(a, i).status is Status.DONE for i in todo),
        message="the re-dispatched jobs",
    )
    assert Counter(runs) == Counter({i: 1 for i in todo})
    assert record(a, later).status is Status.TODO


def test_redis_data_loss_noticed_by_a_running_consumer(make_task: TaskFactory) -> None:
    runs: list[int] = []
    producer = make_task(zombie_timeout=600.0)
    consumer = make_task(
        job_func=lambda job: runs.append(job.id), poll_interval=0.1, zombie_timeout=600.0
    )
    consumer.start()
    wait_for(lambda: consumer.reaper.known_epoch is not None, message="the epoch")
    consumer.stop()
    ids = producer.push_many([b"%d" % i for i in range(5)])  # the messages wait...
    consumer.redis.delete(consumer.transport.queue_key, consumer.transport.epoch_key)
    consumer.start()  # ...and are gone when the consumer comes back
    wait_for(
        lambda: all(record(producer, i).status is Status.DONE for i in ids),
        message="recovery after the data loss",
    )
    assert Counter(runs) == Counter({i: 1 for i in ids})


# -- repush ----------------------------------------------------------------------------


def test_repush_failed_and_done_jobs_run_again(make_task: TaskFactory) -> None:
    runs: list[tuple[int, int]] = []

    def handler(job: Job) -> None:
        runs.append((job.id, job.failed_times))
        if job.payload == b"fail" and len([r for r in runs if r[0] == job.id]) == 1:
            raise RuntimeError("first run fails")

    task = make_task(job_func=handler, max_failed_times=1)
    failing, fine = task.push_many([b"fail", b"fine"])
    task.start()
    wait_for(lambda: record(task, failing).status is Status.FAILED, message="the failure")
    wait_for(lambda: record(task, fine).status is Status.DONE, message="the success")
    assert record(task, failing).failed_times == 1

    before = record(task, failing).commit_id
    assert task.repush(failing) == before + 1
    wait_for(lambda: record(task, failing).status is Status.DONE, message="the repushed job")
    assert record(task, failing).failed_times == 0  # reset by the repush
    task.repush(fine)
    wait_for(lambda: len(runs) == 4, message="the repushed done job")
    wait_for(lambda: record(task, fine).status is Status.DONE, message="it to finish")
    assert sorted(runs) == sorted([(failing, 0), (fine, 0), (failing, 0), (fine, 0)])
    with pytest.raises(JobNotFoundError):
        task.repush(10**15)


def test_repush_todo_job_makes_its_old_message_stale(make_task: TaskFactory) -> None:
    task = make_task()
    job_id = task.push(b"twice queued")
    assert task.repush(job_id) == 1
    assert queued(task) == Counter({(job_id, 0): 1, (job_id, 1): 1})
    rec = record(task, job_id)
    assert (rec.status, rec.commit_id, rec.failed_times) == (Status.TODO, 1, 0)
