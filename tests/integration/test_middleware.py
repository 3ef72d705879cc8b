"""Middleware hooks fire with the right arguments and in a job's order, a raising hook
never loses a job, and Task's options are validated naming the parameter; on SQLite,
MariaDB and PostgreSQL with a real Redis."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import pytest
from support import ROOT
from support.helpers import Clock, record, wait_for, wait_status

from meepo import Job, Middleware, MiddlewareError, RunInfo, Status, Task
from meepo.ledger import Outcome
from meepo.records import NewJob

pytestmark = pytest.mark.timeout(120)

TaskFactory = Callable[..., Task]


class Recorder(Middleware):
    """Every hook call, as (name, task id, arguments), in the order they came."""

    def __init__(self, name: str = "rec", log: list[tuple[Any, ...]] | None = None) -> None:
        self.name = name
        self.events: list[tuple[Any, ...]] = [] if log is None else log
        self.lock = threading.Lock()

    def _add(self, *event: Any) -> None:
        with self.lock:
            self.events.append(event)

    def on_start(self, task: Any) -> None:
        self._add(self.name, "on_start", task.task_id)

    def on_stop(self, task: Any) -> None:
        self._add(self.name, "on_stop", task.task_id)

    def before_push(self, task: Any, jobs: Sequence[NewJob]) -> None:
        self._add(self.name, "before_push", [j.payload for j in jobs])

    def after_push(self, task: Any, jobs: Sequence[NewJob], ids: Sequence[int]) -> None:
        self._add(self.name, "after_push", [j.payload for j in jobs], list(ids))

    def after_claim(self, task: Any, jobs: Sequence[Job]) -> None:
        for j in jobs:
            self._add(self.name, "after_claim", j.id, j.commit_id)

    def before_run(self, task: Any, job: Job) -> None:
        self._add(self.name, "before_run", job.id, job.commit_id)

    def after_run(self, task: Any, job: Job, run: RunInfo) -> None:
        self._add(self.name, "after_run", job.id, job.commit_id, run)

    def after_commit(self, task: Any, outcome: Outcome, accepted: bool) -> None:
        self._add(
            self.name, "after_commit", outcome.job_id, outcome.commit_id, outcome.status, accepted
        )

    def after_retry(self, task: Any, outcome: Outcome) -> None:
        self._add(self.name, "after_retry", outcome.job_id, outcome.commit_id, outcome.error)

    def after_reap(self, task: Any, requeued: Sequence[int], closed: int) -> None:
        self._add(self.name, "after_reap", list(requeued), closed)

    def after_recovery(self, task: Any, count: int, lost: bool) -> None:
        self._add(self.name, "after_recovery", count, lost)

    def of(self, job_id: int) -> list[str]:
        """The hooks that concerned one job, in order."""
        with self.lock:
            return [e[1] for e in self.events if len(e) > 2 and e[2] == job_id]

    def attempts(self, job_id: int) -> list[list[str]]:
        """The hooks that concerned each claim of one job (by commit_id), in order: the
        next attempt's claim may come before the previous commit's hooks, as the commit
        re-dispatches the job before its hooks run."""
        with self.lock:
            claims: dict[int, list[str]] = {}
            for e in self.events:
                if len(e) > 3 and e[2] == job_id:
                    claims.setdefault(e[3], []).append(e[1])
            return [claims[c] for c in sorted(claims)]


# -- a job's path ----------------------------------------------------------------------


def test_hooks_follow_a_job_from_push_to_commit(make_task: TaskFactory) -> None:
    rec = Recorder()

    def handler(job: Job) -> None:
        if job.payload == b"bad":
            raise ValueError("boom")

    task = make_task(
        job_func=handler, middleware=[rec], max_failed_times=2, retry_backoff=0, parallel_num=2
    )
    good = task.push(b"good")
    bad = task.push(b"bad")
    assert rec.events[:4] == [
        ("rec", "before_push", [b"good"]),
        ("rec", "after_push", [b"good"], [good]),
        ("rec", "before_push", [b"bad"]),
        ("rec", "after_push", [b"bad"], [bad]),
    ]
    task.start()
    wait_status(task, good, Status.DONE)
    wait_status(task, bad, Status.FAILED)
    wait_for(lambda: rec.of(bad).count("after_commit") == 2, message="the second commit")
    task.stop()

    assert rec.attempts(good) == [["after_claim", "before_run", "after_run", "after_commit"]]
    assert rec.attempts(bad) == [
        ["after_claim", "before_run", "after_run", "after_commit", "after_retry"],
        ["after_claim", "before_run", "after_run", "after_commit"],
    ]
    events = {(e[1], e[2]): e for e in rec.events if len(e) > 2 and isinstance(e[2], int)}
    run: RunInfo = events[("after_run", good)][4]
    assert run.ok and run.error is None and run.exception is None and run.duration >= 0
    assert events[("after_commit", good)][4:] == (Status.DONE, True)
    failed_runs = [e[4] for e in rec.events if e[1] == "after_run" and e[2] == bad]
    assert [r.error for r in failed_runs] == ["ValueError: boom"] * 2
    assert all(isinstance(r.exception, ValueError) for r in failed_runs)
    bad_commits = [e[4:] for e in rec.events if e[1] == "after_commit" and e[2] == bad]
    assert bad_commits == [(Status.TODO, True), (Status.FAILED, True)]
    (retry,) = [e for e in rec.events if e[1] == "after_retry"]
    assert retry[2] == bad and retry[4] == "ValueError: boom"
    assert [e[1] for e in rec.events if e[1] in ("on_start", "on_stop")] == [
        "on_start",
        "on_stop",
    ]
    assert rec.events[-1] == ("rec", "on_stop", task.task_id)


def test_before_hooks_run_in_list_order_and_after_hooks_in_reverse(
    make_task: TaskFactory,
) -> None:
    shared: list[tuple[Any, ...]] = []
    a, b = Recorder("a", shared), Recorder("b", shared)
    task = make_task(middleware=[a, b])
    job_id = task.push(b"x")
    assert [(e[0], e[1]) for e in shared] == [
        ("a", "before_push"),
        ("b", "before_push"),
        ("b", "after_push"),
        ("a", "after_push"),
    ]
    assert shared[-1][3] == [job_id]


def test_manual_commit_from_another_process_fires_after_commit(make_task: TaskFactory) -> None:
    started = threading.Event()
    claims: list[Job] = []

    def handler(job: Job) -> None:
        claims.append(job)
        started.set()

    worker = make_task(job_func=handler, auto_commit=False, zombie_timeout=30)
    job_id = worker.push(b"manual")
    worker.start()
    assert started.wait(15)
    worker.stop()
    rec = Recorder()
    producer = make_task(middleware=[rec])
    producer.commit(job_id, Status.DONE, commit_id=claims[0].commit_id)
    assert record(producer, job_id).status is Status.DONE
    (event,) = [e for e in rec.events if e[1] == "after_commit"]
    assert event[2:] == (job_id, claims[0].commit_id, Status.DONE, True)


def test_after_reap_names_the_requeued_jobs(make_task: TaskFactory) -> None:
    clock = Clock()
    rec = Recorder()
    task = make_task(clock=clock, zombie_timeout=5.0, middleware=[rec])
    job_id = task.push(b"orphan")
    task.redis.delete(task.transport.queue_key)
    (job,) = task.ledger.claim(
        task.task_id, [(job_id, 0)], now=clock(), lease=timedelta(seconds=5), worker="dead:1"
    )
    task.ledger.start([(job.id, job.commit_id)], now=clock())
    clock.advance(6)
    report = task.reaper.run_once(reap=True)
    assert report.requeued == 1
    assert ("rec", "after_reap", [job_id], 0) in rec.events


def test_after_recovery_counts_the_redispatched_jobs(make_task: TaskFactory) -> None:
    rec = Recorder()
    task = make_task(middleware=[rec], zombie_timeout=600.0)
    task.push_many([b"1", b"2", b"3"])
    assert task.reaper.run_once().recovered == 0  # learns the epoch
    task.redis.delete(task.transport.queue_key, task.transport.epoch_key)
    assert task.reaper.run_once().recovered == 3
    assert ("rec", "after_recovery", 3, True) in rec.events


# -- a raising middleware --------------------------------------------------------------


class Refuse(Middleware):
    def before_push(self, task: Any, jobs: Sequence[NewJob]) -> None:
        raise PermissionError("quota exceeded")


def test_before_push_raising_refuses_the_push_and_writes_nothing(
    make_task: TaskFactory,
) -> None:
    task = make_task(middleware=[Refuse()])
    with pytest.raises(MiddlewareError, match=r"Refuse\.before_push raised PermissionError: quota"):
        task.push(b"x")
    with pytest.raises(MiddlewareError, match="nothing was pushed"):
        task.push_many([b"a", b"b"])
    with pytest.raises(MiddlewareError), task.batch() as b:
        b.push(b"c")
    assert task.ledger.find(task_id=task.task_id) == []
    assert task.depth() == 0


class Broken(Middleware):
    """Raises in every hook whose error is only logged."""

    def after_push(self, task: Any, jobs: Sequence[NewJob], ids: Sequence[int]) -> None:
        raise RuntimeError("after_push bug")

    def after_claim(self, task: Any, jobs: Sequence[Job]) -> None:
        raise RuntimeError("after_claim bug")

    def after_run(self, task: Any, job: Job, run: RunInfo) -> None:
        raise RuntimeError("after_run bug")

    def after_commit(self, task: Any, outcome: Outcome, accepted: bool) -> None:
        raise RuntimeError("after_commit bug")


def test_a_raising_after_hook_is_logged_and_the_job_still_commits(
    make_task: TaskFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="meepo.middleware")
    rec = Recorder()
    task = make_task(job_func=lambda job: None, middleware=[rec, Broken()])
    job_id = task.push(b"x")  # after_push raised: the id still comes back
    task.start()
    wait_status(task, job_id, Status.DONE)
    # the other middleware's hooks still ran, after the broken one's
    wait_for(lambda: "after_commit" in rec.of(job_id), message="the recorder's after_commit")
    for hook in ("after_push", "after_claim", "after_run", "after_commit"):
        assert f"middleware Broken.{hook} raised" in caplog.text


class Exits(Middleware):
    def after_run(self, task: Any, job: Job, run: RunInfo) -> None:
        raise SystemExit(3)


def test_a_hook_raising_system_exit_does_not_end_the_executor(make_task: TaskFactory) -> None:
    task = make_task(job_func=lambda job: None, middleware=[Exits()], parallel_num=1)
    first = task.push(b"1")
    task.start()
    wait_status(task, first, Status.DONE)
    second = task.push(b"2")  # the one executor thread is still there to run it
    wait_status(task, second, Status.DONE)


class FirstRunRefused(Middleware):
    def __init__(self) -> None:
        self.calls = 0

    def before_run(self, task: Any, job: Job) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("tracer not ready")


def test_before_run_raising_fails_the_attempt_and_the_job_is_retried(
    make_task: TaskFactory,
) -> None:
    ran: list[int] = []
    task = make_task(
        job_func=lambda job: ran.append(job.failed_times),
        middleware=[FirstRunRefused()],
        retry_backoff=0,
        parallel_num=1,
    )
    job_id = task.push(b"x")
    task.start()
    rec = wait_status(task, job_id, Status.DONE)
    assert ran == [1]  # the handler ran once, on the retry
    assert rec.failed_times == 1
    assert rec.last_error is not None
    assert "MiddlewareError" in rec.last_error
    assert "FirstRunRefused.before_run raised RuntimeError: tracer not ready" in rec.last_error


# -- no middleware ---------------------------------------------------------------------


def test_without_middleware_there_are_no_hooks_to_call(make_task: TaskFactory) -> None:
    task = make_task(job_func=lambda job: None)
    assert task.hooks is None
    job_id = task.push(b"x")
    task.start()
    wait_status(task, job_id, Status.DONE)
    assert task.consumer is not None and task.consumer.hooks is None
    assert task.reaper.hooks is None


def test_only_overridden_hooks_are_collected(make_task: TaskFactory) -> None:
    task = make_task(middleware=[Refuse()])
    assert task.hooks is not None
    collected = {name for name, found in task.hooks._by_hook.items() if found}
    assert collected == {"before_push"}


# -- the documented example ------------------------------------------------------------


def _documented_example() -> dict[str, Any]:
    text = (ROOT / "docs" / "middleware.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class Counter" in b]
    namespace: dict[str, Any] = {}
    exec(compile(block, "docs/middleware.md", "exec"), namespace)
    return namespace


def test_the_documented_counter_and_timing_log_work(
    make_task: TaskFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.timing")
    example = _documented_example()
    counter = example["Counter"]()

    def handler(job: Job) -> None:
        if job.payload == b"bad":
            raise ValueError("nope")

    task = make_task(
        job_func=handler,
        middleware=[counter, example["TimingLog"](slow=60)],
        max_failed_times=1,
    )
    ok, bad = task.push(b"ok"), task.push(b"bad")
    task.start()
    wait_status(task, ok, Status.DONE)
    wait_status(task, bad, Status.FAILED)
    wait_for(
        lambda: counter.counts["failed"] == counter.counts["done"] == 1,
        message="both commits counted",
    )
    assert {k: counter.counts[k] for k in ("pushed", "ran", "raised", "done", "failed")} == {
        "pushed": 2,
        "ran": 1,
        "raised": 1,
        "done": 1,
        "failed": 1,
    }
    assert f"job {ok} ran" in caplog.text
    assert f"job {bad} ran" in caplog.text and "ValueError: nope" in caplog.text
