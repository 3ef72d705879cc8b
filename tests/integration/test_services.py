"""Each of the consumer's services driven one round at a time, without its thread.

A consumer is built on a real task (its ledger on SQLite, MariaDB and PostgreSQL, its
queue on the real Redis) with two controlled clocks: the task's (the database's time,
for the ledger's lease judgements) and the consumer's monotonic clock (its own view of
when leases end and how long handlers ran). Nothing is started: every test calls a
service's ``run_once()`` (or an executor step) and looks at the ledger and the book.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

import pytest
from support.backends import TaskFactory
from support.helpers import Clock, record

from meepo import Status, Task
from meepo.dispatch import Moved
from meepo.ledger import Outcome
from meepo.records import Job
from meepo.runtime.committer import Commit
from meepo.runtime.consumer import Consumer
from meepo.runtime.executor import Slot, ThreadExecutor

pytestmark = pytest.mark.timeout(120)

LEASE = 30.0


class Mono:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Rig:
    """A task, its controlled clocks and a consumer whose services are driven by hand."""

    def __init__(self, task: Task, clock: Clock, handler: Any = None) -> None:
        self.task, self.clock, self.mono = task, clock, Mono()
        self.ran: list[Job] = []
        self.consumer = Consumer(
            task.service_dispatcher,
            task.options,
            handler or self.ran.append,
            task.clock,
            task.retry_backoff,
            monotonic=self.mono,
        )
        self.claims = self.consumer.claims

    def claim(self, n: int) -> list[Job]:
        """One fetcher round; the jobs it handed to the executor."""
        popped = self.consumer.fetcher.run_once()
        assert popped is not None
        jobs = self.consumer.executor.drain()
        assert len(jobs) == len(popped.jobs) == n
        return jobs

    def admit(self, job: Job) -> Slot:
        slot = Slot()
        assert self.consumer.executor.admit(slot, job)
        return slot


@pytest.fixture
def rig(make_task: TaskFactory) -> Iterator[Rig]:
    clock = Clock()
    task = make_task(
        job_func=lambda job: None, parallel_num=2, prefetch=1, lease=LEASE, clock=clock
    )
    yield Rig(task, clock)


# -- fetcher ----------------------------------------------------------------------------


def test_fetcher_claims_up_to_its_capacity_then_pops_nothing(rig: Rig) -> None:
    """Flow control: a round takes at most the free capacity (parallel_num + prefetch);
    while the unreturned claims fill it the next round pops nothing, and a handler's
    return frees its slot for the next round."""
    ids = rig.task.push_many([b"%d" % i for i in range(5)])
    popped = rig.consumer.fetcher.run_once()
    assert popped is not None and len(popped.jobs) == 3  # capacity 2 + 1
    assert rig.claims.busy == 3 and set(rig.consumer.held) == set(ids[:3])
    assert all(c.lease_end == rig.mono() + LEASE for c in rig.claims.held.values())
    assert rig.consumer.fetcher.run_once() is None  # full: nothing popped
    assert rig.task.depth() == 2
    jobs = rig.consumer.executor.drain()
    slot = rig.admit(jobs[0])
    executor = rig.consumer.executor
    assert isinstance(executor, ThreadExecutor)
    assert executor.run(slot, jobs[0])  # its slot is free again
    assert rig.claims.busy == 2
    popped = rig.consumer.fetcher.run_once()
    assert popped is not None and [j.id for j in popped.jobs] == [ids[3]]
    assert all(record(rig.task, i).status is Status.DOING for i in ids[1:4])


def test_fetcher_drops_stale_and_malformed_messages(rig: Rig) -> None:
    """A message of a claim already taken and one that is not meepo's are dropped and
    counted; the current one is claimed."""
    (job_id,) = rig.task.push_many([b"x"])
    rig.claim(1)
    rig.task.transport.send_pairs([(job_id, 0)])  # the push's message again: stale now
    rig.task.redis.rpush(rig.task.transport.key_for(rig.task.default_priority), b"not-ours")
    popped = rig.consumer.fetcher.run_once()
    assert popped is not None and not popped.jobs
    assert popped.stale == 1 and popped.malformed == [b"not-ours"]
    assert rig.consumer.counters.dropped == 2 and rig.consumer.counters.claimed == 1


# -- executor and starter -----------------------------------------------------------------


def test_starter_marks_the_starts_of_admitted_jobs_in_one_round(rig: Rig) -> None:
    ids = rig.task.push_many([b"a", b"b"])
    jobs = rig.claim(2)
    for j in jobs:
        rig.admit(j)
    assert rig.claims.unmarked == {(j.id, j.commit_id) for j in jobs}
    assert all(record(rig.task, i).started_at is None for i in ids)
    assert rig.consumer.starter.run_once() == 2
    assert not rig.claims.unmarked
    assert all(record(rig.task, i).started_at is not None for i in ids)
    assert rig.consumer.starter.run_once() == 0  # nothing left to mark


def test_executor_gives_back_a_claim_whose_lease_ran_low(rig: Rig) -> None:
    """A claimed job that waited until less than a third of its lease was left (by the
    consumer's clock) is not started; the next heartbeat gives it back to the queue."""
    (job_id,) = rig.task.push_many([b"late"])
    (job,) = rig.claim(1)
    rig.mono.advance(LEASE * 2 / 3 + 0.1)
    assert not rig.consumer.executor.admit(Slot(), job)
    assert rig.claims.not_started == [job]
    rig.consumer.heartbeat.run_once()
    assert rig.claims.busy == 0 and not rig.consumer.held
    r = record(rig.task, job_id)
    assert r.status is Status.TODO and r.failed_times == 0
    assert rig.task.depth() == 1


def test_executor_run_hands_the_outcome_to_the_committer(rig: Rig) -> None:
    """A run's end frees its slot and queues its outcome; the committer writes it."""
    (job_id,) = rig.task.push_many([b"run"])
    (job,) = rig.claim(1)
    slot = rig.admit(job)
    executor = rig.consumer.executor
    assert isinstance(executor, ThreadExecutor)
    assert executor.run(slot, job)
    assert rig.ran == [job] and slot.job is None
    assert rig.consumer.counters.finished == 1 and rig.claims.busy == 0
    assert rig.consumer.held == {job_id: job.commit_id}  # held until committed
    assert rig.consumer.committer.run_once() == 1
    assert record(rig.task, job_id).status is Status.DONE and not rig.consumer.held


# -- committer ----------------------------------------------------------------------------


def test_committer_group_commit_with_a_stale_member(rig: Rig) -> None:
    """One group commit of three outcomes, one of them stale (repushed meanwhile): the
    two current ones take effect, the stale one is rejected alone."""
    ids = rig.task.push_many([b"1", b"2", b"3"])
    jobs = rig.claim(3)
    stale = jobs[1]
    rig.task.repush(stale.id)
    futures = []
    for j in jobs:
        fut: Future[bool] | None = None
        if j is stale:
            fut = Future()
            futures.append(fut)
        rig.consumer.committer.submit(Commit(Outcome(j.id, j.commit_id, Status.DONE), fut))
    assert rig.consumer.committer.run_once() == 3
    assert futures[0].result(timeout=0) is False
    counters = rig.consumer.counters
    assert (counters.done, counters.stale) == (2, 1)
    assert [record(rig.task, i).status for i in ids] == [Status.DONE, Status.TODO, Status.DONE]
    assert not rig.consumer.held


def test_committer_retry_outcome_is_redispatched(rig: Rig) -> None:
    """A failed attempt under max_failed_times goes back to todo and its queue."""
    (job_id,) = rig.task.push_many([b"r"])
    (job,) = rig.claim(1)
    rig.consumer.committer.submit(Commit(rig.consumer.committer.outcome(job, "Boom: x")))
    assert rig.consumer.committer.run_once() == 1
    r = record(rig.task, job_id)
    assert r.status is Status.TODO and r.failed_times == 1
    assert rig.consumer.counters.retried == 1
    assert sum(rig.task.depths().values()) == 1  # its queue, or the delayed set (backoff)


def test_committer_stops_at_its_end_marker_after_the_queued_work(rig: Rig) -> None:
    (job_id,) = rig.task.push_many([b"e"])
    (job,) = rig.claim(1)
    rig.consumer.committer.submit(Commit(Outcome(job.id, job.commit_id, Status.DONE)))
    rig.consumer.committer.request_stop()
    assert not rig.consumer.committer.stopping
    assert rig.consumer.committer.run_once() == 1
    assert rig.consumer.committer.stopping
    assert record(rig.task, job_id).status is Status.DONE


# -- heartbeat ----------------------------------------------------------------------------


def test_heartbeat_renews_held_leases_and_forgets_lost_ones(rig: Rig) -> None:
    """One beat renews every held lease (by the database's clock, here the task's; by
    the consumer's clock for its own view) and reports the claims it lost (repushed)."""
    ids = rig.task.push_many([b"keep", b"lose"])
    keep, lose = rig.claim(2)
    before = record(rig.task, keep.id).expires_at
    rig.task.repush(lose.id)
    rig.clock.advance(10)
    rig.mono.advance(10)
    assert rig.consumer.heartbeat.run_once() == {(lose.id, lose.commit_id)}
    assert rig.consumer.held == {keep.id: keep.commit_id}
    assert rig.claims.held[keep.id].lease_end == rig.mono() + LEASE
    after = record(rig.task, keep.id).expires_at
    assert before is not None and after is not None
    assert timedelta(seconds=10) <= after - before < timedelta(seconds=20)
    assert record(rig.task, ids[1]).status is Status.TODO


def test_heartbeat_with_nothing_held_writes_nothing(rig: Rig) -> None:
    assert rig.consumer.heartbeat.run_once() == set()


# -- watchdog -----------------------------------------------------------------------------


def test_watchdog_retires_a_timed_out_slot_and_fails_its_attempt(make_task: TaskFactory) -> None:
    """A handler past job_timeout (by the consumer's clock): its slot is retired and
    replaced, its attempt is committed as failed, and its late return is ignored."""
    clock = Clock()
    task = make_task(
        job_func=lambda job: None,
        parallel_num=1,
        prefetch=0,
        lease=LEASE,
        clock=clock,
        job_timeout=5,
    )
    rig = Rig(task, clock)
    (job_id,) = task.push_many([b"slow"])
    (job,) = rig.claim(1)
    ex = rig.consumer.executor
    ex.start()  # one real slot, idle: its thread waits for work
    try:
        (slot,) = ex.slots
        assert ex.admit(slot, job)
        rig.mono.advance(4)
        assert rig.consumer.watchdog.run_once() == []
        rig.mono.advance(2)
        assert rig.consumer.watchdog.run_once() == [job]
        assert slot.abandoned and slot in ex.abandoned
        assert len(ex.slots) == 1 and ex.slots[0] is not slot  # replaced
        assert rig.claims.timed_out == {(job.id, job.commit_id)}
        assert rig.consumer.counters.timed_out == 1
        assert rig.consumer.committer.run_once() == 1
        r = record(task, job_id)
        assert r.status is Status.TODO and r.failed_times == 1
        assert not ex.ended(slot, job, time.perf_counter())  # the late return is ignored
        assert not rig.claims.timed_out and slot not in ex.abandoned
    finally:
        slots = ex.shutdown()
        ex.submit(None)  # the abandoned slot's idle thread ends too
        assert ex.wait(slots, deadline=float("inf"))


# -- the dispatcher's one convention ------------------------------------------------------


def test_every_transition_returns_what_it_won_and_sent(rig: Rig) -> None:
    d = rig.task.service_dispatcher
    ids = rig.task.push_many([b"1", b"2", b"3"])
    jobs = rig.claim(3)
    a, b, c = jobs
    done = d.finish(
        [Outcome(a.id, a.commit_id, Status.DONE), Outcome(b.id, b.commit_id, Status.TODO)]
    )
    assert isinstance(done, Moved)
    assert done.won == {(a.id, a.commit_id), (b.id, b.commit_id)}
    assert [(m.job_id, m.commit_id) for m in done.sent] == [(b.id, b.commit_id + 1)]
    back = d.release([(c.id, c.commit_id, c.priority)])
    assert back.won == {(c.id, c.commit_id)}
    assert [(m.job_id, m.commit_id) for m in back.sent] == [(c.id, c.commit_id + 1)]
    again = d.repush([(a.id, record(rig.task, a.id).commit_id)])
    assert [m.job_id for m in again.sent] == [a.id] and len(again.won) == 1
    assert d.release([(c.id, c.commit_id, c.priority)]) == Moved()  # stale: nothing
    assert [record(rig.task, i).status for i in ids] == [Status.TODO] * 3


def test_the_threads_run_the_same_services(rig: Rig) -> None:
    """Started, the consumer runs those same rounds in its threads."""
    done = threading.Event()
    rig.consumer.handler = rig.consumer.executor.handler = lambda job: done.set()
    (job_id,) = rig.task.push_many([b"t"])
    rig.consumer.start()
    try:
        assert done.wait(30)
    finally:
        assert rig.consumer.stop(grace=10)
    assert record(rig.task, job_id).status is Status.DONE


# -- recovery -----------------------------------------------------------------------------


def test_recovery_redispatches_every_todo_job_once_redis_lost_its_data(rig: Rig) -> None:
    """The reaper's recovery step: the first round only learns the epoch; once Redis
    lost the task's keys (epoch included), one round sends every todo job again, and the
    next one has nothing owed."""
    rig.task.push_many([b"1", b"2"])
    recovery = rig.task.reaper.recovery
    assert recovery.run_once() == 0
    t = rig.task.transport
    rig.task.redis.delete(t.epoch_key, t.delayed_key, *t.queue_keys.values())
    assert rig.task.depth() == 0
    assert recovery.run_once() == 2
    assert rig.task.depth() == 2
    assert recovery.run_once() == 0
