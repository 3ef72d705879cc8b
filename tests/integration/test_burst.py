"""Burst mode: ``task.run(burst=True)`` and ``meepo worker --burst`` consume until no job
of the task is due or in hand, then stop gracefully and return (exit 0). On SQLite,
MariaDB and PostgreSQL."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest
from support.helpers import child_env, record

from meepo import Job, Status, Task

pytestmark = pytest.mark.timeout(120)

TaskFactory = Callable[..., Task]


def test_burst_run_returns_once_the_queue_is_drained_and_a_delayed_job_has_run(
    make_task: TaskFactory,
) -> None:
    holder: dict[str, datetime] = {}
    ran: list[bytes] = []

    def handler(job: Job) -> None:
        ran.append(job.payload)
        if job.payload == b"first":
            # In hand while the queue is empty and the delayed job is not due yet: the
            # burst must go on, and run the delayed job once it falls due.
            deadline = time.monotonic() + 30
            while datetime.now(timezone.utc) <= holder["due"] and time.monotonic() < deadline:
                time.sleep(0.02)

    task = make_task(job_func=handler, parallel_num=2)
    first = task.push(b"first")
    others = task.push_many([b"a", b"b", b"c"])
    later = task.push(b"later", delay=0.8)
    holder["due"] = record(task, later).run_at
    task.run(burst=True)
    for job_id in [first, *others, later]:
        assert record(task, job_id).status is Status.DONE
    assert sorted(ran) == sorted([b"first", b"a", b"b", b"c", b"later"])
    assert task.consumer is None  # stopped
    assert task.wait_stopped(0)


def test_burst_run_on_an_empty_queue_returns(make_task: TaskFactory) -> None:
    task = make_task(job_func=lambda job: None)
    task.run(burst=True)
    assert task.wait_stopped(0)


def test_burst_run_leaves_jobs_that_are_not_due(make_task: TaskFactory) -> None:
    task = make_task(job_func=lambda job: None)
    now = task.push(b"now")
    later = task.push(b"later", delay=3600)
    task.run(burst=True)
    assert record(task, now).status is Status.DONE
    assert record(task, later).status is Status.TODO


@pytest.mark.parametrize("backoff", [0, 3600])
def test_burst_run_runs_retries_due_now_and_leaves_those_backing_off(
    make_task: TaskFactory, backoff: int
) -> None:
    def flaky(job: Job) -> None:
        if job.failed_times == 0:
            raise ValueError("first attempt fails")

    task = make_task(job_func=flaky, retry_backoff=backoff, max_failed_times=3)
    job_id = task.push(b"x")
    task.run(burst=True)
    rec = record(task, job_id)
    assert rec.failed_times == 1
    assert rec.status is (Status.DONE if backoff == 0 else Status.TODO)


def test_burst_run_waits_for_a_retry_due_within_a_second(make_task: TaskFactory) -> None:
    """A retry due in half a second is waited for and run (a job due within the slack
    counts as due), while one backing off for an hour is left (above)."""

    def flaky(job: Job) -> None:
        if job.failed_times == 0:
            raise ValueError("first attempt fails")

    task = make_task(job_func=flaky, retry_backoff=0.5, max_failed_times=3)
    job_id = task.push(b"x")
    task.run(burst=True)
    rec = record(task, job_id)
    assert (rec.status, rec.failed_times) == (Status.DONE, 1)


def test_burst_run_with_an_async_handler(make_task: TaskFactory) -> None:
    async def handler(job: Job) -> None:
        await asyncio.sleep(0.01)

    task = make_task(job_func=handler, parallel_num=10)
    ids = task.push_many([b"x"] * 30)
    task.run(burst=True)
    assert all(record(task, i).status is Status.DONE for i in ids)


def test_burst_run_follows_jobs_that_handlers_push(make_task: TaskFactory) -> None:
    """A handler pushing the next job of a chain keeps the burst going: the new job is
    due before the one that pushed it is committed."""
    holder: dict[str, Task] = {}
    chain: list[int] = []

    def handler(job: Job) -> None:
        n = int(job.payload)
        chain.append(n)
        if n < 5:
            holder["task"].push(b"%d" % (n + 1))

    task = make_task(job_func=handler)
    holder["task"] = task
    task.push(b"1")
    task.run(burst=True)
    assert chain == [1, 2, 3, 4, 5]


APP = """
import os
from meepo import Task

def handle(job):
    if job.payload == b"boom":
        raise RuntimeError("boom")

task = Task(os.environ["BURST_TASK"], job_func=handle, max_failed_times=1)
"""


def test_cli_worker_burst_exits_0_once_drained(
    make_task: TaskFactory, db_url: str, redis_url: str, tmp_path: Path
) -> None:
    producer = make_task()
    ids = producer.push_many([b"a", b"b", b"boom"])
    (tmp_path / "burst_app.py").write_text(APP)
    proc = subprocess.run(
        [sys.executable, "-m", "meepo", "worker", "burst_app:task", "--burst"],
        cwd=tmp_path,
        env=child_env(MEEPO_DB_URL=db_url, MEEPO_REDIS_URL=redis_url, BURST_TASK=producer.task_id),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "stopped (burst: nothing left to do): finished 3 job(s)" in proc.stderr
    assert [record(producer, i).status for i in ids] == [Status.DONE, Status.DONE, Status.FAILED]
