"""Consuming: claims, duplicate/stale messages, heartbeats and graceful stop, on
SQLite, MariaDB and PostgreSQL."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest
from support.backends import unique_task_id
from support.helpers import Clock, record, wait_for

from meepo import Job, Status, Task

pytestmark = pytest.mark.timeout(120)

TaskFactory = Callable[..., Task]


class Recorder:
    """A handler that records each run; optionally blocks until released."""

    def __init__(self, block: bool = False) -> None:
        self.lock = threading.Lock()
        self.runs: list[Job] = []
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        if not block:
            self.release.set()

    def __call__(self, job: Job) -> None:
        with self.lock:
            self.runs.append(job)
        self.started.release()
        assert self.release.wait(30), "the test never released the handler"

    def count(self) -> Counter[int]:
        with self.lock:
            return Counter(j.id for j in self.runs)

    def ran(self, job_id: int) -> int:
        return self.count()[job_id]


def status(task: Task, job_id: int) -> Status | None:
    rec = task.get(job_id)
    return None if rec is None else rec.status


def wait_done(task: Task, ids: list[int], what: str = "jobs to be done") -> None:
    wait_for(lambda: all(status(task, i) is Status.DONE for i in ids), message=what)


# -- claim -----------------------------------------------------------------------------


def test_each_job_runs_once(make_task: TaskFactory) -> None:
    rec = Recorder()
    task = make_task(job_func=rec, parallel_num=4)
    ids = task.push_many([b"%d" % i for i in range(40)])
    task.start()
    wait_done(task, ids)
    assert rec.count() == Counter({i: 1 for i in ids})
    for i in ids:
        r = task.get(i)
        assert r is not None
        assert (r.status, r.failed_times, r.expires_at) == (Status.DONE, 0, None)
        (run,) = [j for j in rec.runs if j.id == i]
        assert r.commit_id == run.commit_id + 1  # the claim's token, plus the commit's 1
    assert {j.task_id for j in rec.runs} == {task.task_id}
    assert sorted(j.payload for j in rec.runs) == sorted(b"%d" % i for i in range(40))
    assert all(j.commit_id >= 1 and j.failed_times == 0 for j in rec.runs)


def test_duplicate_messages_run_once(make_task: TaskFactory) -> None:
    rec = Recorder()
    task = make_task(job_func=rec, parallel_num=2)
    job_id = task.push(b"dup")
    task.transport.send_pairs([(job_id, 0), (job_id, 0)])  # duplicates in the same batch
    task.start()
    wait_done(task, [job_id])
    task.transport.send_pairs([(job_id, 0)])  # a duplicate arriving after the job is done
    sentinel = task.push(b"sentinel")  # FIFO: popped after the duplicate
    wait_done(task, [sentinel])
    wait_for(lambda: task.depth() == 0, message="queue to drain")
    assert rec.ran(job_id) == 1
    (run,) = [j for j in rec.runs if j.id == job_id]
    assert task.get(job_id).commit_id == run.commit_id + 1  # type: ignore[union-attr]


def test_stale_message_is_dropped(make_task: TaskFactory) -> None:
    rec = Recorder()
    task = make_task(job_func=rec, parallel_num=2)
    job_id = task.push(b"stale")
    new_commit_id = task.repush(job_id)  # the (id, 0) message in the queue is now stale
    assert new_commit_id == 1
    task.start()
    wait_done(task, [job_id])
    dropped_before = task.consumer.counters.dropped  # type: ignore[union-attr]
    task.transport.send_pairs([(job_id, 0), (job_id, 1)])  # both old claims by now
    sentinel = task.push(b"sentinel")
    wait_done(task, [sentinel])
    assert rec.ran(job_id) == 1
    assert task.consumer.counters.dropped > dropped_before  # type: ignore[union-attr]
    (run,) = [j for j in rec.runs if j.id == job_id]
    assert run.commit_id > 1  # repush (+1), claim (a random step)
    assert task.get(job_id).commit_id == run.commit_id + 1  # type: ignore[union-attr]


def test_garbage_and_foreign_messages_are_dropped(make_task: TaskFactory) -> None:
    rec = Recorder()
    task = make_task(job_func=rec, parallel_num=2)
    other = make_task(unique_task_id("other"))
    foreign = other.push(b"not yours")
    task.redis.rpush(task.transport.queue_key, b"garbage", b"12:ab", b":", b"-1:0", b"")
    task.transport.send_pairs([(foreign, 0)])
    task.start()
    first = task.push(b"after garbage")
    wait_done(task, [first])
    task.redis.rpush(task.transport.queue_key, b"\xff\xfe", b"99999999999999999999:0")
    second = task.push(b"still running")
    wait_done(task, [second])
    assert task.consumer is not None and task.consumer.running
    assert set(rec.count()) == {first, second}
    r = other.get(foreign)
    assert r is not None and (r.status, r.commit_id) == (Status.TODO, 0)
    assert task.consumer.counters.dropped >= 1


def test_two_consumers_never_run_a_job_at_once(make_task: TaskFactory) -> None:
    lock = threading.Lock()
    running: set[int] = set()
    overlaps: list[int] = []
    runs: Counter[int] = Counter()

    def handler(job: Job) -> None:
        with lock:
            if job.id in running:
                overlaps.append(job.id)
            running.add(job.id)
            runs[job.id] += 1
        time.sleep(0.005)  # widen the window in which a second run would overlap
        with lock:
            running.discard(job.id)

    a = make_task(job_func=handler, parallel_num=3)
    b = make_task(job_func=handler, parallel_num=3)
    assert a.task_id == b.task_id
    ids = a.push_many([b"%d" % i for i in range(60)])
    # every job announced three times: both consumers race for each of them
    a.transport.send_pairs([(i, 0) for i in ids] * 2)
    a.start()
    b.start()
    wait_done(a, ids)
    wait_for(lambda: a.depth() == 0, message="duplicates to drain")
    assert overlaps == []
    assert runs == Counter({i: 1 for i in ids})
    workers = a.consumer.counters.claimed + b.consumer.counters.claimed  # type: ignore[union-attr]
    assert workers == len(ids)


# -- heartbeat -------------------------------------------------------------------------


def test_slow_job_is_not_reaped_while_heartbeating(make_task: TaskFactory) -> None:
    rec = Recorder(block=True)
    task = make_task(job_func=rec, parallel_num=1, lease=1.0, zombie_period=0.2)
    watcher = make_task(lease=1.0)  # another process's reaper, forced to reap
    job_id = task.push(b"slow")
    try:
        task.start()
        assert rec.started.acquire(timeout=15)
        first = task.get(job_id)
        assert first is not None and first.status is Status.DOING and first.expires_at
        # run the other reaper for more than three leases while the handler is blocked
        until = first.expires_at.timestamp() + 2.2
        while datetime.now(timezone.utc).timestamp() < until:
            report = watcher.reaper.run_once(reap=True)
            assert (report.requeued, report.closed) == (0, 0)
            time.sleep(0.1)
        now = task.get(job_id)
        assert now is not None
        assert (now.status, now.commit_id) == (Status.DOING, first.commit_id)
        assert now.expires_at is not None and now.expires_at > first.expires_at  # renewed
    finally:
        rec.release.set()
    wait_done(task, [job_id])
    r = task.get(job_id)
    assert r is not None and (r.failed_times, r.last_error) == (0, None)
    assert rec.ran(job_id) == 1


def test_heartbeat_reports_lost_claims(make_task: TaskFactory) -> None:
    rec = Recorder(block=True)
    task = make_task(job_func=rec, parallel_num=1, prefetch=0, lease=30.0)
    producer = make_task()
    job_id = task.push(b"repushed under it")
    try:
        task.start()
        assert rec.started.acquire(timeout=15)
        consumer = task.consumer
        assert consumer is not None and job_id in consumer.held
        producer.repush(job_id)  # the running claim is now stale
        lost = consumer.heartbeat_once()
        assert {i for i, _ in lost} == {job_id}
    finally:
        rec.release.set()
    # the repushed job runs again; the first run's auto commit is rejected as stale
    wait_for(lambda: rec.ran(job_id) == 2, message="the repushed job to run again")
    wait_done(task, [job_id])
    assert task.get(job_id).failed_times == 0  # type: ignore[union-attr]


def test_returned_jobs_free_their_slot_but_stay_leased_until_committed(
    make_task: TaskFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler's return frees its executor slot before the group commit is written;
    the job stays held (its lease renewed) until then, and stop still commits it."""
    clock = Clock()
    rec = Recorder()
    task = make_task(job_func=rec, parallel_num=1, prefetch=0, lease=30.0, clock=clock)
    gate = threading.Event()
    real_finish = task.service_dispatcher.finish

    def gated_finish(outcomes: Any) -> Any:  # the real commit, held back until the gate
        assert gate.wait(30), "the test never opened the gate"
        return real_finish(outcomes)

    monkeypatch.setattr(task.service_dispatcher, "finish", gated_finish)
    ids = task.push_many([b"1", b"2"])
    task.start()
    # one slot, yet both ran: the first return freed it while its commit waited (the
    # claims held awaiting commit are bounded apart, at twice the capacity)
    wait_for(lambda: sum(rec.count().values()) == 2, message="both handlers to return")
    consumer = task.consumer
    assert consumer is not None
    assert set(consumer.held) == set(ids)
    assert all(status(task, i) is Status.DOING for i in ids)
    before = {i: record(task, i).expires_at for i in ids}
    clock.advance(10)
    assert consumer.heartbeat_once() == set()  # awaiting commit: still heartbeated
    for i in ids:
        after = record(task, i).expires_at
        earlier = before[i]
        assert after is not None and earlier is not None and after > earlier
    result: list[bool] = []
    stopper = threading.Thread(target=lambda: result.append(task.stop(wait=True, grace=30)))
    stopper.start()
    gate.set()
    stopper.join(30)
    assert result == [True]
    assert all(status(task, i) is Status.DONE for i in ids)
    assert rec.count() == Counter({i: 1 for i in ids})


# -- graceful stop ---------------------------------------------------------------------


def test_stop_waits_for_running_handlers_and_commits(make_task: TaskFactory) -> None:
    rec = Recorder(block=True)
    task = make_task(job_func=rec, parallel_num=2, prefetch=0)
    ids = task.push_many([b"a", b"b"])
    task.start()
    assert rec.started.acquire(timeout=15) and rec.started.acquire(timeout=15)
    result: list[bool] = []
    stopper = threading.Thread(target=lambda: result.append(task.stop(wait=True, grace=30)))
    stopper.start()
    try:
        wait_for(lambda: task.stopping, message="stop to begin")
        assert stopper.is_alive()  # it waits for the handlers
        assert all(status(task, i) is Status.DOING for i in ids)
    finally:
        rec.release.set()
    stopper.join(30)
    assert result == [True]
    assert all(status(task, i) is Status.DONE for i in ids)
    assert sum(rec.count().values()) == 2


def test_stop_releases_claimed_but_unstarted_jobs(make_task: TaskFactory) -> None:
    rec = Recorder(block=True)
    task = make_task(job_func=rec, parallel_num=1, prefetch=5)
    ids = task.push_many([b"1", b"2", b"3", b"4"])
    task.start()
    assert rec.started.acquire(timeout=15)
    wait_for(
        lambda: all(status(task, i) is Status.DOING for i in ids),
        message="the prefetched jobs to be claimed",
    )
    result: list[bool] = []
    stopper = threading.Thread(target=lambda: result.append(task.stop(wait=True, grace=30)))
    stopper.start()
    running = rec.runs[0].id
    released = [i for i in ids if i != running]
    try:
        wait_for(
            lambda: all(status(task, i) is Status.TODO for i in released),
            message="stop to release the unstarted jobs",
        )
        assert stopper.is_alive()  # still waiting for the running handler
        assert status(task, running) is Status.DOING
    finally:
        rec.release.set()
    stopper.join(30)
    assert result == [True]
    assert len(rec.runs) == 1
    assert status(task, running) is Status.DONE
    for i in released:
        r = task.get(i)
        assert r is not None
        assert (r.status, r.failed_times) == (Status.TODO, 0) and r.commit_id >= 2
    # they are back on the queue: a new consumer runs them
    again = make_task(job_func=Recorder())
    again.start()
    wait_done(again, ids)
    assert len(rec.runs) == 1


def test_a_claim_left_with_little_lease_is_given_back_not_started(
    make_task: TaskFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Heartbeats fail while claimed jobs wait behind a long handler. When the executor
    frees up, a job with less than a third of its lease left is not started (its lease
    may have expired and another process may be running it); the next heartbeat that
    works gives it back, and it runs under a new claim."""
    caplog.set_level(logging.WARNING, logger="meepo")
    rec = Recorder(block=True)
    task = make_task(job_func=rec, parallel_num=1, prefetch=5, lease=1.5, zombie_period=60)
    ids = task.push_many([b"1", b"2", b"3"])
    task.start()
    consumer = task.consumer
    assert consumer is not None
    renew = consumer.heartbeat.run_once
    consumer.heartbeat.run_once = lambda: set()  # type: ignore[method-assign]  # heartbeats fail
    assert rec.started.acquire(timeout=15)
    running = rec.runs[0]
    waiting = [i for i in ids if i != running.id]
    wait_for(lambda: set(consumer.held) == set(ids), message="the prefetch to claim the rest")
    wait_for(
        lambda: all(
            getattr(consumer.claims.held.get(i), "lease_end", 0) - time.monotonic() < 1.5 / 3
            for i in waiting
        ),
        message="the waiting claims' leases to run low",
    )
    rec.release.set()  # the running handler returns; the executor takes the next job
    wait_for(
        lambda: caplog.text.count("not started: less than a third of its lease") >= 2,
        message="both waiting jobs to be set aside",
    )
    assert [j.id for j in rec.runs] == [running.id]  # neither ran under its first claim
    consumer.heartbeat.run_once = renew  # type: ignore[method-assign]  # heartbeats work again
    wait_done(task, ids, "the given-back jobs to run under new claims")
    for i in waiting:
        runs = [j for j in rec.runs if j.id == i]
        assert len(runs) == 1 and runs[0].commit_id > 2  # claim -> released (+1) -> claim
        r = task.get(i)
        assert r is not None and r.failed_times == 0


def test_stop_without_handler_running_is_clean_and_restartable(make_task: TaskFactory) -> None:
    rec = Recorder()
    task = make_task(job_func=rec)
    task.start()
    task.start()  # idempotent
    assert task.stop(wait=True) is True
    assert task.stop(wait=True) is True  # idempotent
    job_id = task.push(b"later")
    task.start()
    wait_done(task, [job_id])
    assert rec.ran(job_id) == 1


def test_automatic_prefetch_claims_further_ahead_for_short_handlers(
    make_task: TaskFactory,
) -> None:
    slow_gate = threading.Event()

    def handler(job: Job) -> None:
        if job.payload == b"slow":
            slow_gate.wait(0.3)

    auto = make_task(job_func=handler, parallel_num=2)
    fixed = make_task(unique_task_id("fixed"), job_func=handler, parallel_num=2, prefetch=3)
    for task in (auto, fixed):
        assert task.options.prefetch_auto is (task is auto)
        task.start()
        consumer = task.consumer
        assert consumer is not None
        assert consumer.current_capacity() == consumer.capacity  # nothing measured yet
        ids = task.push_many([b"fast"] * 50)
        wait_done(task, ids)
    assert auto.consumer is not None and fixed.consumer is not None
    assert auto.consumer.capacity == 2 + 8 and fixed.consumer.capacity == 2 + 3
    # short handlers: up to 30 claims per thread ahead; an explicit prefetch stays put
    assert auto.consumer.current_capacity() > auto.consumer.capacity
    assert auto.consumer.current_capacity() <= 2 + 60
    assert fixed.consumer.current_capacity() == fixed.consumer.capacity
    # long handlers bring it back down to the floor of 4 per thread
    slow = auto.push_many([b"slow"] * 12)
    wait_done(auto, slow)
    assert auto.consumer.current_capacity() == auto.consumer.capacity
