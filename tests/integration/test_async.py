"""asyncio handlers and the async producer API, on SQLite, MariaDB and PostgreSQL.

An ``async def`` handler runs on one event loop per consumer, up to parallel_num at
once, through the same claim / start-mark / commit path as a thread handler;
job_timeout cancels it; a handler blocking the loop is logged. ``push_async`` and its
kin run the sync producer calls off the caller's loop."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from support.helpers import child_env, record, wait_for, wait_status

from meepo import Job, Middleware, StaleCommitError, Status, Task
from meepo.middleware import RunInfo

pytestmark = pytest.mark.timeout(120)

TaskFactory = Callable[..., Task]


class Gate:
    """N handlers block on an asyncio.Event that the N-th of them sets: they finish
    only if N of them run at once on the loop."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.event: asyncio.Event | None = None
        self.running = 0
        self.most = 0
        self.threads: set[int] = set()
        self.seen: list[int] = []

    async def __call__(self, job: Job) -> str:
        if self.event is None:  # made on the consumer's loop, by its first handler
            self.event = asyncio.Event()
        self.threads.add(threading.get_ident())
        self.seen.append(job.id)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            if len(self.seen) == self.n:
                self.event.set()
            await asyncio.wait_for(self.event.wait(), 30)
        finally:
            self.running -= 1
        return "ok"


def test_async_handlers_run_concurrently_up_to_parallel_num_on_one_loop(
    make_task: TaskFactory,
) -> None:
    n = 8
    gate = Gate(n)
    task = make_task(job_func=gate, parallel_num=n)
    ids = task.push_many([b"x"] * (n + 4))  # 4 more than fit: they run after the first n
    task.start()
    for job_id in ids:
        rec = wait_status(task, job_id, Status.DONE)
        assert rec.failed_times == 0
        assert rec.started_at is not None  # the start was marked, as for threads
    assert gate.most == n  # n at once, never more
    assert len(gate.threads) == 1  # one event loop thread for the consumer
    assert task.consumer is not None
    assert type(task.consumer.executor).__name__ == "AsyncioExecutor"


def test_an_async_handler_that_raises_is_a_failed_attempt_then_retried(
    make_task: TaskFactory,
) -> None:
    async def flaky(job: Job) -> None:
        await asyncio.sleep(0)
        if job.failed_times == 0:
            raise ValueError("first attempt fails")

    task = make_task(job_func=flaky, max_failed_times=3)
    task.start()
    job_id = task.push(b"x")
    rec = wait_status(task, job_id, Status.DONE)
    assert rec.failed_times == 1
    assert rec.last_error is not None and rec.last_error.startswith("ValueError: first attempt")


def test_job_timeout_cancels_the_coroutine_and_fails_the_attempt(
    make_task: TaskFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="meepo.consumer")
    cancelled: list[int] = []

    async def slow(job: Job) -> None:
        if job.payload == b"quick":
            return
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(job.id)
            raise

    task = make_task(job_func=slow, parallel_num=1, job_timeout=0.3, max_failed_times=1)
    task.start()
    stuck = task.push(b"stuck")
    rec = wait_status(task, stuck, Status.FAILED)
    assert rec.last_error == "JobTimeout: timed out after 0.3s (job_timeout)"
    assert rec.failed_times == 1
    wait_for(lambda: cancelled == [stuck], message="the handler saw CancelledError")
    # the slot was replaced: the next job runs on the single slot
    quick = task.push(b"quick")
    wait_status(task, quick, Status.DONE)
    assert task.consumer is not None
    wait_for(lambda: task.consumer is not None and task.consumer.abandoned == 0)
    # the cancelled handler's end is expected, not reported as a late outcome
    assert not [r for r in caplog.records if "outcome is ignored" in r.getMessage()]
    assert [r for r in caplog.records if "coroutine is cancelled" in r.getMessage()]


def test_a_handler_blocking_the_loop_is_logged_with_task_and_job_id(
    make_task: TaskFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="meepo.consumer")

    async def blocking(job: Job) -> None:
        time.sleep(0.6)  # the bug: a sync call inside async def

    task = make_task(job_func=blocking)
    task.start()
    job_id = task.push(b"x")
    wait_status(task, job_id, Status.DONE)  # it still runs: blocking is logged, not fatal

    def found() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if "blocked the event loop" in r.getMessage()
            and f"job {job_id} " in r.getMessage()
            and task.task_id in r.getMessage()
        ]

    lines = wait_for(found, message="the loop-blocking warning")
    assert any("so far" in line for line in lines)  # seen while it blocked


@pytest.mark.parametrize("how", ["done", "failed"])
def test_manual_commit_from_an_async_handler(make_task: TaskFactory, how: str) -> None:
    errors: list[BaseException] = []
    holder: dict[str, Task] = {}

    async def handler(job: Job) -> None:
        await asyncio.sleep(0)
        task = holder["task"]
        if how == "done":
            task.commit(job.id, Status.DONE)
        else:
            task.commit(job.id, Status.FAILED, error="gave up")
        try:
            task.commit(job.id, Status.DONE)  # a second commit of the same claim
        except StaleCommitError as exc:
            errors.append(exc)

    task = make_task(job_func=handler, auto_commit=False)
    holder["task"] = task
    task.start()
    job_id = task.push(b"x")
    rec = wait_status(task, job_id, Status.DONE if how == "done" else Status.FAILED)
    if how == "failed":
        assert rec.last_error == "gave up"
    wait_for(lambda: len(errors) == 1, message="the second commit rejected")


def test_commit_async_lets_the_other_handlers_run_while_it_waits(make_task: TaskFactory) -> None:
    """Job a's commit is held in the committer (its after_commit waits) until job b's
    handler has run: that happens only if a's await does not hold the loop."""
    holder: dict[str, Any] = {}
    released = threading.Event()
    waited: list[bool] = []

    class HoldCommit(Middleware):
        def after_commit(self, task: Any, outcome: Any, accepted: bool) -> None:
            if outcome.job_id == holder.get("a"):
                waited.append(released.wait(10))

    async def handler(job: Job) -> None:
        if "committing" not in holder:
            holder["committing"] = asyncio.Event()
        if job.payload == b"a":
            holder["committing"].set()
            await holder["task"].commit_async(job.id, Status.DONE)
        else:
            await holder["committing"].wait()
            released.set()
            await holder["task"].commit_async(job.id, Status.DONE)

    task = make_task(job_func=handler, auto_commit=False, parallel_num=2, middleware=[HoldCommit()])
    holder["task"] = task
    a, b = task.push_many([b"a", b"b"])
    holder["a"] = a
    task.start()
    wait_status(task, a, Status.DONE)
    wait_status(task, b, Status.DONE)
    # after_commit runs once the rows are written: a's may still be on its way
    wait_for(lambda: waited, message="job a's after_commit")
    assert waited == [True]


def test_commit_async_of_a_stale_claim_raises(make_task: TaskFactory) -> None:
    errors: list[BaseException] = []
    holder: dict[str, Task] = {}

    async def handler(job: Job) -> None:
        await holder["task"].commit_async(job.id, Status.DONE)
        try:
            await holder["task"].commit_async(job.id, Status.DONE, commit_id=job.commit_id)
        except StaleCommitError as exc:
            errors.append(exc)

    task = make_task(job_func=handler, auto_commit=False)
    holder["task"] = task
    task.start()
    job_id = task.push(b"x")
    wait_status(task, job_id, Status.DONE)
    wait_for(lambda: len(errors) == 1, message="the second commit rejected")


def test_commit_async_from_outside_a_worker(make_task: TaskFactory) -> None:
    """A producer finishing a claimed job by its commit_id, from async code."""
    started = threading.Event()
    seen: dict[str, int] = {}

    async def handler(job: Job) -> None:
        seen["commit_id"] = job.commit_id
        started.set()  # returns without committing: the job stays doing

    worker = make_task(job_func=handler, auto_commit=False)
    outsider = make_task(task_id=worker.task_id)
    worker.start()
    job_id = worker.push(b"x")
    assert started.wait(15)
    wait_for(lambda: worker.consumer is not None and job_id not in worker.consumer.held)

    async def main() -> None:
        await outsider.commit_async(job_id, "failed", commit_id=seen["commit_id"], error="no")
        with pytest.raises(StaleCommitError):
            await outsider.commit_async(job_id, "done", commit_id=seen["commit_id"])

    asyncio.run(main())
    rec = record(worker, job_id)
    assert rec.status is Status.FAILED and rec.last_error == "no"


def test_an_async_handler_that_does_not_commit_in_manual_mode_is_left_to_the_reaper(
    make_task: TaskFactory,
) -> None:
    ran = threading.Event()

    async def forgetful(job: Job) -> None:
        ran.set()

    task = make_task(job_func=forgetful, auto_commit=False)
    task.start()
    job_id = task.push(b"x")
    assert ran.wait(15)
    assert task.consumer is not None
    wait_for(lambda: task.consumer is not None and job_id not in task.consumer.held)
    rec = record(task, job_id)
    assert rec.status is Status.DOING  # not committed: the lease expires, the reaper acts
    assert rec.started_at is not None  # its start is recorded, so the reap charges it


def test_an_orphaned_claim_has_its_start_recorded_before_the_async_handler_runs(
    make_task: TaskFactory,
) -> None:
    """A job whose earlier claim expired unstarted (its worker died with it prefetched)
    is marked started synchronously before its handler runs, as in a thread."""
    seen: list[tuple[int, bool]] = []
    holder: dict[str, Task] = {}

    async def handler(job: Job) -> None:
        rec = await holder["task"].get_async(job.id)
        seen.append((job.orphaned_claims, rec is not None and rec.started_at is not None))

    task = make_task(job_func=handler)
    holder["task"] = task
    job_id = task.push(b"x")
    # a worker that claimed it and died before starting it
    (claimed,) = task.ledger.claim(
        task.task_id, [(job_id, 0)], lease=timedelta(seconds=0.2), worker="dead:1"
    )
    assert claimed.id == job_id

    def reaped() -> bool:
        task.reaper.run_once(reap=True)
        return record(task, job_id).orphaned_claims == 1

    wait_for(reaped, message="the expired unstarted claim reaped")
    task.start()
    rec = wait_status(task, job_id, Status.DONE)
    assert seen == [(1, True)]
    assert rec.failed_times == 0  # an orphaned claim is not a failed attempt


def test_middleware_hooks_run_around_async_handlers(make_task: TaskFactory) -> None:
    calls: list[tuple[str, int, Any]] = []

    class Spy(Middleware):
        def before_run(self, task: Any, job: Job) -> None:
            calls.append(("before_run", job.id, None))

        def after_run(self, task: Any, job: Job, run: RunInfo) -> None:
            calls.append(("after_run", job.id, run.error))

    async def handler(job: Job) -> None:
        calls.append(("handler", job.id, None))
        if job.payload == b"bad":
            raise RuntimeError("bad payload")

    task = make_task(job_func=handler, middleware=[Spy()], max_failed_times=1, parallel_num=1)
    task.start()
    good = task.push(b"good")
    wait_status(task, good, Status.DONE)
    bad = task.push(b"bad")
    wait_status(task, bad, Status.FAILED)
    assert calls == [
        ("before_run", good, None),
        ("handler", good, None),
        ("after_run", good, None),
        ("before_run", bad, None),
        ("handler", bad, None),
        ("after_run", bad, "RuntimeError: bad payload"),
    ]


def test_stop_waits_for_running_async_handlers_and_commits_them(
    make_task: TaskFactory,
) -> None:
    started = threading.Event()

    async def slowish(job: Job) -> None:
        started.set()
        await asyncio.sleep(0.3)

    task = make_task(job_func=slowish, shutdown_grace=30)
    task.start()
    job_id = task.push(b"x")
    assert started.wait(15)
    assert task.stop() is True  # the handler finished within the grace
    assert record(task, job_id).status is Status.DONE


def test_stop_leaves_an_async_handler_past_the_grace_to_the_reaper(
    make_task: TaskFactory,
) -> None:
    started = threading.Event()
    release: dict[str, asyncio.Event] = {}

    async def stuck(job: Job) -> None:
        release["event"] = asyncio.Event()
        started.set()
        await asyncio.wait_for(release["event"].wait(), 60)

    task = make_task(job_func=stuck)
    task.start()
    job_id = task.push(b"x")
    assert started.wait(15)
    assert task.stop(grace=0.2) is False  # still running when the grace ran out
    rec = record(task, job_id)
    assert rec.status is Status.DOING  # left to the reaper, its start recorded
    assert rec.started_at is not None


# -- the async producer API ---------------------------------------------------------------


def test_async_producer_calls_inside_a_running_loop(make_task: TaskFactory) -> None:
    pushed_in: set[int] = set()

    class Where(Middleware):
        def before_push(self, task: Any, jobs: Any) -> None:
            pushed_in.add(threading.get_ident())

    task = make_task(middleware=[Where()])

    async def main() -> tuple[int, list[int], list[int], list[int], Any]:
        loop_thread = threading.get_ident()
        one = await task.push_async(b"one", priority=None)
        many = await task.push_many_async([b"a", b"b", b"c"])
        concurrent = await asyncio.gather(*(task.push_async(b"c%d" % i) for i in range(50)))
        async with task.batch() as b:
            b.push(b"batched 1")
            b.push(b"batched 2", delay=60)
        rec = await task.get_async(one)
        assert loop_thread not in pushed_in  # every write ran off the loop's thread
        return one, many, list(concurrent), b.ids, rec

    one, many, concurrent, batched, rec = asyncio.run(main())
    assert rec is not None and rec.id == one and rec.payload == b"one"
    ids = [one, *many, *concurrent, *batched]
    assert len(set(ids)) == 1 + 3 + 50 + 2
    for job_id in ids:
        r = record(task, job_id)
        assert r.status is Status.TODO
    assert record(task, batched[1]).run_at > record(task, batched[0]).run_at
    assert task.depth() == len(ids) - 1  # the delayed one waits in the delayed set


def test_async_producer_errors_reach_the_awaiting_coroutine(make_task: TaskFactory) -> None:
    task = make_task()

    async def main() -> list[BaseException]:
        seen: list[BaseException] = []
        for call in (
            task.push_async("not bytes"),  # type: ignore[arg-type]
            task.push_many_async(b"one payload"),  # type: ignore[arg-type]
            task.push_async(b"x", priority="no-such-priority"),
        ):
            try:
                await call
            except (TypeError, ValueError) as exc:
                seen.append(exc)
        with pytest.raises(RuntimeError, match="push to a batch inside its with block"):
            b = task.batch()
            b.push(b"outside")
        async with task.batch() as b:
            b.push(b"x")
        assert len(b.ids) == 1
        return seen

    seen = asyncio.run(main())
    assert [type(e).__name__ for e in seen][:2] == ["TypeError", "TypeError"]
    assert len(seen) == 3


def test_an_async_batch_that_raises_writes_nothing(make_task: TaskFactory) -> None:
    task = make_task()

    async def main() -> None:
        with pytest.raises(KeyError):
            async with task.batch() as b:
                b.push(b"x")
                raise KeyError("abort")

    asyncio.run(main())
    assert task.depth() == 0
    assert task.ledger.find(task_id=task.task_id) == []


def test_async_producer_and_async_consumer_end_to_end(make_task: TaskFactory) -> None:
    got: list[bytes] = []

    async def handler(job: Job) -> None:
        await asyncio.sleep(0.01)
        got.append(job.payload)

    worker = make_task(job_func=handler, parallel_num=20)
    producer = make_task(task_id=worker.task_id)
    worker.start()

    async def main() -> list[int]:
        return list(await asyncio.gather(*(producer.push_async(b"%d" % i) for i in range(40))))

    ids = asyncio.run(main())
    for job_id in ids:
        wait_status(worker, job_id, Status.DONE)
    assert sorted(got) == sorted(b"%d" % i for i in range(40))


# -- imports ------------------------------------------------------------------------------

PROBE = """
import sys, time
from meepo import Task, Status

{handler}

task = Task(sys.argv[1], db=sys.argv[2], redis=sys.argv[3], job_func=handle)
job_id = task.push(b"x")
task.start()
deadline = time.monotonic() + 60
while task.get(job_id).status is not Status.DONE and time.monotonic() < deadline:
    time.sleep(0.05)
task.stop()
print(task.get(job_id).status.value, "meepo.runtime.aio" in sys.modules)
"""


@pytest.mark.parametrize(
    ("handler", "loaded"),
    [("def handle(job):\n    pass", False), ("async def handle(job):\n    pass", True)],
)
def test_only_an_async_handler_loads_the_asyncio_executor(
    sqlite_url: str, redis_url: str, tmp_path: Path, handler: str, loaded: bool
) -> None:
    from support.backends import backend_url, unique_task_id

    url = backend_url("sqlite", sqlite_url)
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(PROBE).format(handler=handler))
    out = subprocess.run(
        [sys.executable, str(script), unique_task_id(), url, redis_url],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["done", str(loaded)]
