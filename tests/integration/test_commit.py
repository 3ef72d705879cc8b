"""Auto and manual commit, and their fencing, on SQLite, MariaDB, PostgreSQL."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from datetime import timedelta

import pytest
from support.helpers import Clock, record, wait_for, wait_status

from meepo import (
    CommitModeError,
    Job,
    JobNotFoundError,
    LedgerUnavailableError,
    MeepoError,
    NotRunningHereError,
    StaleCommitError,
    Status,
    Task,
)

pytestmark = pytest.mark.timeout(120)

TaskFactory = Callable[..., Task]


# -- auto commit -----------------------------------------------------------------------


def test_auto_commit_return_is_done(make_task: TaskFactory) -> None:
    seen: list[Job] = []
    task = make_task(job_func=seen.append)
    job_id = task.push(b"ok")
    task.start()
    rec = wait_status(task, job_id, Status.DONE)
    assert (rec.failed_times, rec.last_error, rec.expires_at) == (0, None, None)
    assert [j.commit_id + 1 for j in seen] == [rec.commit_id]  # the claim's, plus the commit's 1


def test_auto_commit_raise_retries_then_succeeds(make_task: TaskFactory) -> None:
    attempts: list[int] = []

    def flaky(job: Job) -> None:
        attempts.append(job.failed_times)
        if job.failed_times < 2:
            raise ValueError(f"attempt {job.failed_times} failed")

    task = make_task(job_func=flaky, max_failed_times=3, retry_backoff=0)
    job_id = task.push(b"flaky")
    task.start()
    rec = wait_status(task, job_id, Status.DONE)
    assert attempts == [0, 1, 2]
    assert rec.failed_times == 2
    assert rec.last_error == "ValueError: attempt 1 failed"  # the latest failure's summary


def test_auto_commit_failure_goes_back_to_todo(make_task: TaskFactory) -> None:
    gate = threading.Event()
    calls: list[int] = []

    def fail_then_wait(job: Job) -> None:
        calls.append(job.failed_times)
        if job.failed_times == 0:
            raise RuntimeError("first try")
        gate.wait(30)

    task = make_task(job_func=fail_then_wait, max_failed_times=5, parallel_num=1)
    job_id = task.push(b"requeue")
    task.start()
    try:
        # the second run has started: the failure was committed as todo and re-queued
        wait_for(lambda: len(calls) == 2, message="the job to run again")
        rec = record(task, job_id)
        assert rec.status is Status.DOING
        assert rec.failed_times == 1
        assert rec.last_error == "RuntimeError: first try"
        assert rec.commit_id > 2  # claim, todo commit, claim (a claim steps 1 to 2**31)
    finally:
        gate.set()
    rec = wait_status(task, job_id, Status.DONE)
    assert rec.failed_times == 1


def test_auto_commit_fails_after_max_failed_times(make_task: TaskFactory) -> None:
    attempts: list[int] = []

    def always(job: Job) -> None:
        attempts.append(job.failed_times)
        raise RuntimeError(f"boom {job.failed_times}\nsecond line")

    task = make_task(job_func=always, max_failed_times=3, retry_backoff=0)
    job_id = task.push(b"doomed")
    task.start()
    rec = wait_status(task, job_id, Status.FAILED)
    assert attempts == [0, 1, 2]
    assert rec.failed_times == 3
    assert rec.last_error is not None
    assert rec.last_error == "RuntimeError: boom 2"  # the summary: first line only
    assert "boom 2" in rec.last_error and "second line" not in rec.last_error
    assert rec.expires_at is None
    sentinel = task.push(b"after")  # the consumer is still alive
    wait_status(task, sentinel, Status.FAILED)
    assert attempts.count(0) == 2


def test_max_failed_times_one_fails_at_once(make_task: TaskFactory) -> None:
    def bad(job: Job) -> None:
        raise RuntimeError("no")

    task = make_task(job_func=bad, max_failed_times=1)
    job_id = task.push(b"once")
    task.start()
    rec = wait_status(task, job_id, Status.FAILED)
    assert rec.failed_times == 1


def test_base_exceptions_in_handlers_are_failures(make_task: TaskFactory) -> None:
    def exits(job: Job) -> None:
        raise SystemExit(3)

    task = make_task(job_func=exits, max_failed_times=1)
    job_id = task.push(b"exit")
    task.start()
    rec = wait_status(task, job_id, Status.FAILED)
    assert rec.last_error is not None and rec.last_error.startswith("SystemExit")
    assert task.consumer is not None and task.consumer.running


def test_commit_in_auto_mode_is_an_error(make_task: TaskFactory) -> None:
    errors: queue.Queue[BaseException | None] = queue.Queue()

    def handler(job: Job) -> None:
        try:
            task.commit(job.id, Status.DONE)
        except CommitModeError as exc:
            errors.put(exc)
        else:
            errors.put(None)

    task = make_task(job_func=handler)
    job_id = task.push(b"auto")
    with pytest.raises(CommitModeError, match="auto_commit"):
        task.commit(job_id, Status.DONE, commit_id=0)
    task.start()
    assert isinstance(errors.get(timeout=15), CommitModeError)
    rec = wait_status(task, job_id, Status.DONE)  # the return was still the commit
    assert rec.failed_times == 0


# -- manual commit ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "failed_times"), [(Status.DONE, 0), (Status.FAILED, 1), ("done", 0)]
)
def test_manual_commit_from_handler(
    make_task: TaskFactory, status: Status | str, failed_times: int
) -> None:
    def handler(job: Job) -> None:
        task.commit(job.id, status, error="gave up" if status is Status.FAILED else None)

    task = make_task(job_func=handler, auto_commit=False)
    job_id = task.push(b"manual")
    task.start()
    rec = wait_status(task, job_id, Status.parse(status))
    assert rec.failed_times == failed_times
    assert rec.commit_id >= 2
    if status is Status.FAILED:
        assert rec.last_error == "gave up"


def test_manual_commit_todo_runs_again(make_task: TaskFactory) -> None:
    seen: list[tuple[int, int]] = []

    def handler(job: Job) -> None:
        seen.append((job.failed_times, job.commit_id))
        task.commit(job.id, Status.TODO if job.failed_times < 2 else Status.DONE)

    task = make_task(job_func=handler, auto_commit=False)
    job_id = task.push(b"again")
    task.start()
    rec = wait_status(task, job_id, Status.DONE)
    assert [f for f, _ in seen] == [0, 1, 2]
    tokens = [c for _, c in seen]
    assert tokens == sorted(set(tokens)) and tokens[0] > 0  # each claim a new, larger token
    assert rec.failed_times == 2
    assert rec.commit_id == tokens[-1] + 1


def test_manual_commit_doing_is_rejected(make_task: TaskFactory) -> None:
    producer = make_task()
    job_id = producer.push(b"x")
    with pytest.raises(ValueError, match="doing"):
        producer.commit(job_id, Status.DOING, commit_id=0)
    with pytest.raises(ValueError, match="unknown status"):
        producer.commit(job_id, "finished", commit_id=0)


def test_stale_commit_from_handler_changes_nothing(make_task: TaskFactory) -> None:
    """The job is repushed while its first run is in progress: that run's commit is
    stale and rejected, the repushed run's commit counts."""
    gate = threading.Event()
    first_started = threading.Event()
    results: list[tuple[int, str]] = []
    first: list[int] = []

    def handler(job: Job) -> None:
        if not first_started.is_set():  # the first claim
            first.append(job.commit_id)
            first_started.set()
            gate.wait(30)
            try:
                task.commit(job.id, Status.FAILED, error="from the stale run")
            except StaleCommitError as exc:
                results.append((job.commit_id, f"stale: {exc}"))
            else:
                results.append((job.commit_id, "committed"))
        else:
            task.commit(job.id, Status.DONE)
            results.append((job.commit_id, "committed"))

    task = make_task(job_func=handler, auto_commit=False, parallel_num=2)
    producer = make_task()
    job_id = task.push(b"contended")
    task.start()
    try:
        assert first_started.wait(15)
        assert producer.repush(job_id) == first[0] + 1
        wait_for(lambda: len(results) == 1, message="the repushed run to commit")
    finally:
        gate.set()
    wait_for(lambda: len(results) == 2, message="the stale run to try its commit")
    assert results[0][0] > first[0] + 1 and results[0][1] == "committed"
    assert results[1][0] == first[0] and results[1][1].startswith("stale")
    rec = record(task, job_id)
    # the stale FAILED commit left no trace: done, no failure counted, no error
    assert (rec.status, rec.failed_times, rec.last_error, rec.commit_id) == (
        Status.DONE,
        0,
        None,
        results[0][0] + 1,
    )


def test_commit_from_elsewhere_with_commit_id(make_task: TaskFactory) -> None:
    claims: queue.Queue[Job] = queue.Queue()
    task = make_task(job_func=claims.put, auto_commit=False)
    outside = make_task()  # another service: a producer-only Task
    ids = outside.push_many([b"a", b"b"])
    task.start()
    jobs = {j.id: j for j in (claims.get(timeout=15), claims.get(timeout=15))}
    assert set(jobs) == set(ids)
    a, b = jobs[ids[0]], jobs[ids[1]]

    # the handler returned without committing: its start is recorded (synchronously)
    wait_for(lambda: record(outside, a.id).started_at is not None, message="start mark")
    before = record(outside, a.id)
    assert before.status is Status.DOING
    with pytest.raises(StaleCommitError) as info:
        outside.commit(a.id, Status.DONE, commit_id=a.commit_id + 1)
    assert info.value.job_id == a.id
    with pytest.raises(StaleCommitError):
        outside.commit(a.id, Status.DONE, commit_id=a.commit_id - 1)
    assert record(outside, a.id) == before  # nothing changed

    with pytest.raises(NotRunningHereError):
        outside.commit(a.id, Status.DONE)  # no claim here and no commit_id
    with pytest.raises(JobNotFoundError):
        outside.commit(10**15, Status.DONE, commit_id=1)

    outside.commit(a.id, Status.DONE, commit_id=a.commit_id)
    assert record(outside, a.id).status is Status.DONE
    with pytest.raises(StaleCommitError):  # a second commit of the same claim
        outside.commit(a.id, Status.FAILED, commit_id=a.commit_id)
    assert record(outside, a.id).status is Status.DONE

    outside.commit(b.id, Status.TODO, commit_id=b.commit_id)  # back on the queue
    again = claims.get(timeout=15)
    assert (again.id, again.failed_times) == (b.id, 1) and again.commit_id > b.commit_id + 1
    outside.commit(b.id, Status.DONE, commit_id=again.commit_id)
    assert record(outside, b.id).status is Status.DONE


def test_commit_of_another_tasks_job_is_not_found(make_task: TaskFactory) -> None:
    mine = make_task()
    theirs = make_task("other_" + mine.task_id[:50])
    foreign = theirs.push(b"theirs")
    with pytest.raises(JobNotFoundError):
        mine.commit(foreign, Status.DONE, commit_id=0)
    assert record(theirs, foreign).status is Status.TODO


def test_commit_with_delay_requeues_later(make_task: TaskFactory) -> None:
    clock = Clock()
    producer = make_task(clock=clock)
    job_id = producer.push(b"later")
    producer.redis.delete(producer.transport.queue_key)  # a consumer popped it
    (job,) = producer.ledger.claim(
        producer.task_id,
        [(job_id, 0)],
        now=clock(),
        lease=timedelta(seconds=60),
        worker="w",
    )
    producer.commit(job_id, Status.TODO, commit_id=job.commit_id, delay=3600)
    rec = record(producer, job_id)
    assert rec.status is Status.TODO and rec.failed_times == 1
    assert rec.run_at > clock() + timedelta(seconds=3000)
    assert producer.depth() == 0  # not dispatched before it is due
    assert producer.reaper.run_once(reap=True).swept == 0
    clock.advance(3600 * 2)
    assert producer.reaper.run_once(reap=True).swept == 1  # due now: dispatched
    assert producer.depth() == 1


def test_handler_returning_without_commit_leaves_job_to_the_reaper(
    make_task: TaskFactory,
) -> None:
    runs: list[Job] = []

    def handler(job: Job) -> None:
        runs.append(job)
        if job.failed_times > 0:
            task.commit(job.id, Status.DONE)
        # the first run forgets to commit

    task = make_task(job_func=handler, auto_commit=False, lease=30.0)
    clock = Clock()
    watcher = make_task(clock=clock, lease=30.0)
    job_id = task.push(b"forgotten")
    task.start()
    wait_for(lambda: len(runs) == 1, message="the first run")
    wait_for(lambda: not task.consumer.held, message="the consumer to let go")  # type: ignore[union-attr]
    rec = record(task, job_id)
    assert rec.status is Status.DOING and rec.commit_id > 0
    assert watcher.reaper.run_once(reap=True).requeued == 0  # lease still alive
    clock.advance(60)
    assert watcher.reaper.run_once(reap=True).requeued == 1  # zombie_dst_status todo
    rec = wait_status(task, job_id, Status.DONE)
    assert [j.failed_times for j in runs] == [0, 1]
    assert rec.failed_times == 1
    assert rec.last_error is not None and "lease expired" in rec.last_error


def test_manual_commit_inside_the_handler_works_during_a_graceful_stop(
    make_task: TaskFactory,
) -> None:
    """A stop (SIGTERM, deploy, --max-jobs recycle) lets running handlers finish; their
    in-handler commit without commit_id is accepted during the grace period."""
    started, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def handler(job: Job) -> None:
        started.set()
        release.wait(30)
        try:
            task.commit(job.id, Status.DONE)
        except BaseException as exc:
            errors.append(exc)
            raise

    task = make_task(job_func=handler, auto_commit=False)
    job_id = task.push(b"graceful")
    task.start()
    assert started.wait(15)
    stopped: list[bool] = []
    stopper = threading.Thread(target=lambda: stopped.append(task.stop(grace=20)))
    stopper.start()
    wait_for(lambda: task.stopping, message="stop to begin")
    release.set()
    stopper.join(30)
    assert stopped == [True] and errors == []
    assert record(task, job_id).status is Status.DONE
    assert task.consumer is None


def test_a_stop_during_a_delayed_start_starts_nothing(make_task: TaskFactory) -> None:
    """start() while the database is unreachable waits in the background; a stop() that
    has begun wins, even when the database answers before the stop has finished."""
    task = make_task(job_func=lambda job: None)
    gate, entered = threading.Event(), threading.Event()
    real_check = task._check_ledger
    calls = {"n": 0}

    def check() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise LedgerUnavailableError("down (test)")
        entered.set()
        gate.wait(15)  # the database answers... while stop() runs
        real_check()

    class LastStep(threading.Event):
        """stop()'s last step: let the delayed start go on first."""

        def set(self) -> None:
            gate.set()
            assert task._starter is not None
            task._starter.join(15)
            super().set()

    task._check_ledger = check  # type: ignore[method-assign]
    task._stopped = LastStep()
    task.start()
    assert entered.wait(20)
    task.stop(wait=True, grace=1)
    assert task._starter is not None and not task._starter.is_alive()
    assert task.consumer is None and not task.reaper.running


def test_an_unexpected_error_in_a_delayed_start_is_reported(make_task: TaskFactory) -> None:
    """A delayed start that fails with something other than a meepo error does not leave
    a silent dead thread: run() returns and raises it."""
    task = make_task(job_func=lambda job: None)
    calls = {"n": 0}

    def check() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise LedgerUnavailableError("down (test)")
        raise RuntimeError("boom (test)")

    task._check_ledger = check  # type: ignore[method-assign]
    with pytest.raises(MeepoError, match="boom"):
        task.run()  # not from the main thread: no signal handlers, returns on the error


def test_a_commit_after_the_committer_has_finished_does_not_hang(
    make_task: TaskFactory,
) -> None:
    """A handler's commit that arrives after a stopping consumer's committer has finished
    goes to the ledger directly instead of waiting forever for it."""
    started, go = threading.Event(), threading.Event()
    done: list[bool] = []

    def handler(job: Job) -> None:
        started.set()
        go.wait(30)
        task.commit(job.id, Status.DONE)
        done.append(True)

    task = make_task(job_func=handler, auto_commit=False)
    job_id = task.push(b"late")
    task.start()
    assert started.wait(15)
    consumer = task.consumer
    assert consumer is not None
    consumer.committer.request_stop()  # the committer's end, as at the end of a stop
    assert consumer.committer.join(15)
    go.set()
    wait_for(lambda: done == [True], message="the handler's commit to return")
    assert record(task, job_id).status is Status.DONE
