"""Handlers that misbehave: hang past job_timeout, return a coroutine or a
generator, raise KeyboardInterrupt. Each is a failed attempt under the normal retry
policy and the worker keeps consuming. On SQLite, MariaDB and PostgreSQL."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support.helpers import record, wait_for, wait_status

from meepo import Job, StaleCommitError, Status, Task

pytestmark = pytest.mark.timeout(120)

TaskFactory = Callable[..., Task]


class Hang:
    """A handler whose first run of each job blocks until released; later runs return."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.runs: list[Job] = []
        self.lock = threading.Lock()
        self.after: Callable[[Job], None] | None = None  # runs in the hung thread on release
        self.errors: list[BaseException] = []
        self.finished = threading.Event()

    def __call__(self, job: Job) -> None:
        with self.lock:
            self.runs.append(job)
        if job.failed_times == 0:
            self.release.wait(60)
            try:
                if self.after is not None:
                    self.after(job)
            except BaseException as exc:
                self.errors.append(exc)
                raise
            finally:
                self.finished.set()


@pytest.fixture
def hang() -> Iterator[Hang]:
    h = Hang()
    yield h
    h.release.set()  # never leave a thread blocked behind the test


def test_hung_handler_times_out_and_is_retried_at_once(make_task: TaskFactory, hang: Hang) -> None:
    task = make_task(job_func=hang, parallel_num=1, prefetch=0, job_timeout=0.5)
    task.start()
    job_id = task.push(b"stuck")
    rec = wait_status(task, job_id, Status.DONE)  # the retry ran in a fresh executor
    assert rec.failed_times == 1
    assert rec.last_error == "JobTimeout: timed out after 0.5s (job_timeout)"
    first, second = hang.runs
    assert 1 <= first.commit_id < first.commit_id + 1 < second.commit_id  # claim, fail, claim
    consumer = task.consumer
    assert consumer is not None
    assert (consumer.counters.timed_out, consumer.abandoned) == (1, 1)
    other = task.push(b"next")  # the slot was replaced: jobs keep flowing
    wait_status(task, other, Status.DONE)

    hang.release.set()  # the hung handler returns now: its outcome is ignored
    wait_for(lambda: consumer.abandoned == 0, message="the abandoned thread to end")
    after = record(task, job_id)
    assert (after.status, after.failed_times) == (Status.DONE, 1)
    retry = [j for j in hang.runs if j.id == job_id][-1]
    assert after.commit_id == retry.commit_id + 1  # the retry's claim, then done
    assert consumer.counters.stale == 0  # not even sent to the ledger


def test_timeout_at_max_failed_times_fails_the_job(make_task: TaskFactory, hang: Hang) -> None:
    task = make_task(job_func=hang, parallel_num=2, max_failed_times=1, job_timeout=0.3)
    task.start()
    job_id = task.push(b"stuck")
    rec = wait_status(task, job_id, Status.FAILED)
    assert rec.failed_times == 1 and rec.last_error is not None
    assert "timed out after 0.3s" in rec.last_error
    consumer = task.consumer
    assert consumer is not None
    held = consumer.held  # the lease of the timed-out claim is no longer renewed
    assert job_id not in held
    assert consumer.heartbeat_once() == set()


def test_manual_commit_of_a_timed_out_handler_is_rejected(
    make_task: TaskFactory, hang: Hang
) -> None:
    task = make_task(
        job_func=hang, auto_commit=False, parallel_num=1, max_failed_times=1, job_timeout=0.3
    )
    hang.after = lambda job: task.commit(job.id, Status.DONE)
    task.start()
    job_id = task.push(b"late")
    rec = wait_status(task, job_id, Status.FAILED)
    assert rec.last_error == "JobTimeout: timed out after 0.3s (job_timeout)"
    hang.release.set()
    assert hang.finished.wait(10)
    assert len(hang.errors) == 1 and isinstance(hang.errors[0], StaleCommitError)
    assert "timed out" in str(hang.errors[0])
    after = record(task, job_id)
    assert (after.status, after.commit_id) == (Status.FAILED, rec.commit_id)


def test_manual_commit_with_commit_id_after_timeout_is_rejected(
    make_task: TaskFactory, hang: Hang
) -> None:
    task = make_task(job_func=hang, auto_commit=False, parallel_num=1, job_timeout=0.3)
    hang.after = lambda job: task.commit(job.id, Status.DONE, commit_id=job.commit_id)
    task.start()
    job_id = task.push(b"late")
    wait_for(lambda: record(task, job_id).failed_times == 1, message="the timeout")
    hang.release.set()
    assert hang.finished.wait(10)
    assert [type(e) for e in hang.errors] == [StaleCommitError]
    rec = record(task, job_id)
    assert rec.last_error is not None and "timed out" in rec.last_error


def test_abandoned_threads_beyond_the_bound_are_logged_loudly(
    make_task: TaskFactory, hang: Hang, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="meepo.consumer")
    task = make_task(job_func=hang, parallel_num=1, prefetch=0, job_timeout=0.3)
    task.start()
    ids = task.push_many([b"a", b"b"])
    for i in ids:
        wait_status(task, i, Status.DONE)
    consumer = task.consumer
    assert consumer is not None and consumer.abandoned == 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "piling up" in errors[0].getMessage()
    timeouts = [r.getMessage() for r in caplog.records if "timed out after" in r.getMessage()]
    assert len(timeouts) == 2


def test_stop_does_not_wait_for_an_abandoned_handler(make_task: TaskFactory, hang: Hang) -> None:
    task = make_task(job_func=hang, parallel_num=1, job_timeout=0.3, shutdown_grace=30)
    task.start()
    job_id = task.push(b"stuck")
    wait_status(task, job_id, Status.DONE)
    assert task.stop() is True  # returns without waiting for the hung thread


async def _never_runs(job: Job) -> None:
    raise AssertionError("never runs")


def async_handler(job: Job) -> Any:  # a plain function returning a coroutine
    return _never_runs(job)


def generator_handler(job: Job) -> Iterator[int]:
    yield 1


@pytest.mark.parametrize(
    ("handler", "kind"),
    [(async_handler, "a coroutine"), (generator_handler, "a generator")],
)
@pytest.mark.parametrize("auto_commit", [True, False])
def test_handler_returning_a_coroutine_or_generator_is_a_failed_attempt(
    make_task: TaskFactory,
    recwarn: pytest.WarningsRecorder,
    handler: Callable[[Job], Any],
    kind: str,
    auto_commit: bool,
) -> None:
    task = make_task(job_func=handler, auto_commit=auto_commit, max_failed_times=2)
    job_id = task.push(b"x")
    task.start()
    rec = wait_status(task, job_id, Status.FAILED)  # manual mode too: not left to the reaper
    assert rec.failed_times == 2
    assert rec.last_error is not None
    assert rec.last_error.startswith(f"HandlerError: the handler returned {kind}")
    import gc

    gc.collect()
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


@pytest.mark.parametrize("value", [None, 42, False, "text", b"bytes", [1], object()])
def test_any_ordinary_return_value_means_done(make_task: TaskFactory, value: object) -> None:
    task = make_task(job_func=lambda job: value)
    job_id = task.push(b"x")
    task.start()
    assert wait_status(task, job_id, Status.DONE).failed_times == 0


def test_keyboard_interrupt_in_a_job_fails_the_attempt_not_the_worker(
    make_task: TaskFactory,
) -> None:
    def handler(job: Job) -> None:
        if job.payload == b"interrupt" and job.failed_times == 0:
            raise KeyboardInterrupt

    task = make_task(job_func=handler, parallel_num=1)
    job_id = task.push(b"interrupt")
    task.start()
    rec = wait_status(task, job_id, Status.DONE)
    assert (rec.failed_times, rec.last_error) == (1, "KeyboardInterrupt")
    later = task.push(b"later")
    wait_status(task, later, Status.DONE)
    assert task.consumer is not None and task.consumer.running
