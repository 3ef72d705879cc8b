"""Start marks, on SQLite, MariaDB and PostgreSQL.

An attempt is a run, not a claim: a claim clears ``started_at``, the consumer's start
mark or the commit sets it, and the reaper charges an expired lease only when the job
had started. An expired claim that never started goes back to ``todo`` uncharged
(``orphaned_claims`` + 1), whatever ``zombie_dst_status``. A handler that forks: the
child exits, it never runs the consumer's loops. (Worker processes that are SIGKILLed:
tests/test_faults.py.)
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import Counter
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from support.backends import TaskFactory
from support.helpers import Clock, record, wait_for

from meepo import Job, Status, Task
from meepo.errors import LedgerUnavailableError
from meepo.ledger import Outcome

pytestmark = pytest.mark.timeout(120)

LEASE = timedelta(seconds=5)
TIMEOUT = timedelta(seconds=5)


def started(task: Task, job_id: int) -> bool:
    return record(task, job_id).started_at is not None


def done(task: Task, job_id: int) -> bool:
    return record(task, job_id).status is Status.DONE


def claim(task: Task, ids: list[int], lease: float = 5.0) -> list[Job]:
    """Claim the jobs as a consumer would (and then die or forget them)."""
    task.redis.delete(task.transport.queue_key)
    rows = {r[0]: r[2] for r in task.ledger.find(task_id=task.task_id, ids=ids)}
    jobs = task.ledger.claim(
        task.task_id,
        [(i, rows[i]) for i in ids],
        now=task.clock(),
        lease=timedelta(seconds=lease),
        worker="dead-host:1",
    )
    assert sorted(j.id for j in jobs) == sorted(ids)
    return list(jobs)


# -- the ledger ---------------------------------------------------------------------------


def test_claim_clears_the_start_and_a_mark_or_commit_records_it(make_task: TaskFactory) -> None:
    clock = Clock()
    task = make_task(clock=clock)
    a, b = task.push_many([b"marked", b"committed"])
    ja, jb = claim(task, [a, b])
    assert record(task, a).started_at is None and record(task, b).started_at is None
    now = clock()
    assert task.ledger.start([(a, ja.commit_id), (b, jb.commit_id + 1)], now=now) == 1
    marked = record(task, a).started_at
    assert marked == now
    assert task.ledger.start([(a, ja.commit_id)], now=clock()) == 0  # marked once
    clock.advance(1)
    now = clock()
    won = task.ledger.finish(
        [Outcome(a, ja.commit_id, Status.TODO, "boom"), Outcome(b, jb.commit_id, Status.DONE)],
        now=now,
        redispatch_timeout=TIMEOUT,
    )
    assert won == {(a, ja.commit_id), (b, jb.commit_id)}
    assert record(task, a).started_at == marked  # the mark is kept
    assert record(task, b).started_at == now  # the commit recorded the start
    (again,) = claim(task, [a])
    assert record(task, a).started_at is None  # a new claim: not started
    assert again.orphaned_claims == 0


def test_no_start_mark_once_the_lease_expired(make_task: TaskFactory) -> None:
    clock = Clock()
    task = make_task(clock=clock)
    job_id = task.push(b"late")
    (job,) = claim(task, [job_id], lease=2.0)
    clock.advance(3)
    assert task.ledger.start([(job_id, job.commit_id)], now=clock()) == 0
    assert record(task, job_id).started_at is None


@pytest.mark.parametrize("dst", ["todo", "done", "failed"])
def test_an_unstarted_expired_claim_is_requeued_uncharged(make_task: TaskFactory, dst: str) -> None:
    """A claim that expired before its job started (the worker died with it prefetched,
    or lost it) goes back to todo whatever the zombie policy; a started one beside it
    follows the policy."""
    clock = Clock()
    task = make_task(clock=clock, zombie_dst_status=dst, zombie_timeout=2.0, max_failed_times=1)
    started, prefetched = task.push_many([b"started", b"prefetched"])
    js, jp = claim(task, [started, prefetched], lease=2.0)
    assert task.ledger.start([(started, js.commit_id)], now=clock()) == 1
    clock.advance(3)
    report = task.reaper.run_once(reap=True)
    assert (report.requeued, report.closed, report.unstarted) == (1, 1, 1)
    rec = record(task, prefetched)
    assert (rec.status, rec.failed_times, rec.orphaned_claims) == (Status.TODO, 0, 1)
    assert rec.commit_id == jp.commit_id + 1 and rec.last_error is None
    closed = record(task, started)
    assert (closed.status, closed.failed_times) == (
        Status.FAILED if dst == "todo" else Status(dst),
        1,
    )
    assert task.reaper.run_once(reap=True).requeued == 0  # handled once

    runs: list[Job] = []
    consumer = make_task(job_func=runs.append)
    consumer.start()
    wait_for(lambda: record(consumer, prefetched).status is Status.DONE, message="the rerun")
    assert [(j.id, j.failed_times, j.orphaned_claims) for j in runs] == [(prefetched, 0, 1)]
    done = record(consumer, prefetched)
    assert done.started_at is not None and done.orphaned_claims == 1


# -- the consumer -------------------------------------------------------------------------


def test_running_jobs_are_marked_started(make_task: TaskFactory) -> None:
    """The starter records the start of a running handler (a batched UPDATE shortly
    after it began), so that its lease, if it expires, is charged."""
    go = threading.Event()
    task = make_task(job_func=lambda job: go.wait(30), parallel_num=2)
    ids = task.push_many([b"a", b"b"])
    task.start()
    try:
        for i in ids:
            wait_for(partial(started, task, i), message="start marks")
        assert all(record(task, i).status is Status.DOING for i in ids)
    finally:
        go.set()
    for i in ids:
        wait_for(partial(done, task, i), message="the commits")


def test_release_failing_at_shutdown_leaves_unstarted_jobs_uncharged(
    make_task: TaskFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopping consumer that cannot give its prefetched jobs back forgets them: their
    claims expire unstarted and they are requeued without a failed attempt."""
    clock = Clock()
    go = threading.Event()
    ran: list[int] = []

    def handler(job: Job) -> None:
        ran.append(job.id)
        go.wait(30)

    task = make_task(
        clock=clock,
        job_func=handler,
        parallel_num=1,
        prefetch=5,
        max_failed_times=1,
        zombie_timeout=2.0,
        lease=2.0,
    )
    ids = task.push_many([b"%d" % i for i in range(6)])
    task.start()
    wait_for(
        lambda: ran and all(record(task, i).status is Status.DOING for i in ids),
        message="every job claimed",
    )
    running = ran[0]
    wait_for(lambda: record(task, running).started_at is not None, message="the start mark")

    def release(*args: Any, **kwargs: Any) -> Any:
        go.set()  # the running job finishes once the release has failed
        raise LedgerUnavailableError("injected: the database is unreachable")

    consumer = task.consumer
    assert consumer is not None
    monkeypatch.setattr(consumer.d.ledger, "release", release)  # the consumer's own ledger
    assert task.stop(wait=True, grace=10)
    assert ran == [running]
    prefetched = [i for i in ids if i != running]
    assert record(task, running).status is Status.DONE
    assert all(record(task, i).status is Status.DOING for i in prefetched)
    assert all(record(task, i).started_at is None for i in prefetched)

    clock.advance(3)
    reaper = make_task(clock=clock, max_failed_times=1, zombie_timeout=2.0)
    report = reaper.reaper.run_once(reap=True)
    assert (report.requeued, report.closed, report.unstarted) == (5, 0, 5)
    for i in prefetched:
        rec = record(reaper, i)
        assert (rec.status, rec.failed_times, rec.orphaned_claims) == (Status.TODO, 0, 1)


def test_a_handler_that_forks_runs_each_job_once(make_task: TaskFactory, tmp_path: Path) -> None:
    """The child of a handler that forks returns (or exits) through meepo's
    executor; it must exit there, never run the parent's prefetched jobs or commit."""
    log = tmp_path / "runs.log"
    children: list[int] = []

    def note(line: str) -> None:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def handler(job: Job) -> None:
        note(f"run {job.id} {os.getpid()}")
        kind = job.payload.decode()
        if kind == "plain":
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fork() in a process with threads
            pid = os.fork()
        if pid != 0:
            children.append(pid)
            return
        note(f"child {job.id} {os.getpid()}")
        if kind == "exit":
            raise SystemExit(0)
        if kind == "raise":
            raise RuntimeError("raised in the child")
        # "return": the child returns normally

    task = make_task(job_func=handler, parallel_num=1, prefetch=5)
    ids = task.push_many([b"exit", b"plain", b"return", b"plain", b"raise", b"plain"])
    task.start()
    for i in ids:
        wait_for(partial(done, task, i), message=f"job {i} done")
    statuses: dict[int, int] = {}

    def reaped() -> bool:
        for pid in children:
            if pid not in statuses:
                got, status = os.waitpid(pid, os.WNOHANG)
                if got == pid:
                    statuses[pid] = os.waitstatus_to_exitcode(status)
        return len(statuses) == len(children) == 3

    try:
        wait_for(reaped, message="the forked children to exit")
    finally:
        for pid in children:  # the old code left them running the consumer's loop
            if pid not in statuses:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
    lines = log.read_text().split()
    runs = Counter(int(lines[i + 1]) for i in range(0, len(lines), 3) if lines[i] == "run")
    assert runs == Counter({i: 1 for i in ids})
    assert sorted(statuses[pid] for pid in children) == [0, 0, 1]
    assert all(record(task, i).failed_times == 0 for i in ids)
