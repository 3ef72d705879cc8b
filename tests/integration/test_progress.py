"""Progress: ``Job.progress`` reports reach the ledger (``JobRecord.progress``), fenced by
the claim, coalesced onto the heartbeat, on SQLite, MariaDB and PostgreSQL with a real
Redis."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event
from support.helpers import record, wait_for, wait_status

from meepo import Job, Status, Task

pytestmark = pytest.mark.timeout(120)

TaskFactory = Callable[..., Task]

#: The progress statement: an UPDATE whose SET list starts with ``progress`` (a claim
#: or a repush also clears it, after ``status``).
PROGRESS_UPDATE = re.compile(r"^\s*UPDATE\b.*\bSET\s+progress\s*=", re.IGNORECASE | re.DOTALL)


@pytest.fixture
def progress_statements() -> Iterator[list[str]]:
    """Every progress UPDATE any engine sends while the test runs."""
    seen: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if PROGRESS_UPDATE.match(statement):
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", before)


def test_a_running_jobs_progress_is_read_back_from_the_ledger(make_task: TaskFactory) -> None:
    go = threading.Event()

    def handler(job: Job) -> None:
        job.progress(0.5, note="half way")
        assert go.wait(30)

    task = make_task(job_func=handler)
    job_id = task.push(b"x")
    rec = record(task, job_id)
    assert (rec.progress, rec.progress_note) == (None, None)  # never reported
    task.start()
    # written within PROGRESS_DELAY, long before the next heartbeat (lease 20 s)
    wait_for(lambda: record(task, job_id).progress == 0.5, message="the progress report")
    rec = record(task, job_id)
    assert (rec.status, rec.progress_note) == (Status.DOING, "half way")
    go.set()
    rec = wait_status(task, job_id, Status.DONE)
    assert (rec.progress, rec.progress_note) == (0.5, "half way")


def test_progress_in_a_tight_loop_costs_a_couple_of_statements(
    make_task: TaskFactory, progress_statements: list[str]
) -> None:
    def handler(job: Job) -> None:
        for i in range(10_000):
            job.progress(i / 9_999, note=f"step {i}")

    task = make_task(job_func=handler)
    job_id = task.push(b"x")
    task.start()
    rec = wait_status(task, job_id, Status.DONE)
    assert (rec.progress, rec.progress_note) == (1.0, "step 9999")  # the last report
    assert 1 <= len(progress_statements) <= 2


def test_a_stale_claims_progress_changes_nothing(make_task: TaskFactory) -> None:
    task = make_task()
    job_id = task.push(b"x")
    ((_, _, commit_id, _),) = task.ledger.find(task_id=task.task_id, ids=[job_id])
    (job,) = task.ledger.claim(
        task.task_id, [(job_id, commit_id)], lease=task.dispatcher.redispatch_timeout, worker="w"
    )
    current = (job.id, job.commit_id)
    stale = (job.id, job.commit_id - 1)
    assert task.dispatcher.progress([(stale, 0.9, "stale")]) == set()
    assert (record(task, job_id).progress, record(task, job_id).progress_note) == (None, None)
    assert task.dispatcher.progress([(current, 0.3, None)]) == {current}
    assert record(task, job_id).progress == 0.3
    task.repush(job_id)  # the claim is gone: its later reports are stale
    assert task.dispatcher.progress([(current, 0.8, "late")]) == set()
    rec = record(task, job_id)
    assert (rec.status, rec.progress) == (Status.TODO, None)


@pytest.mark.parametrize(
    ("fraction", "note", "message"),
    [
        (1.5, None, r"from 0 to 1, not 1\.5"),
        (-0.01, None, r"from 0 to 1, not -0\.01"),
        (float("nan"), None, r"from 0 to 1, not nan"),
        ("half", None, r"a number from 0 to 1, not str"),
        (True, None, r"a number from 0 to 1, not bool"),
        (0.5, 7, r"note must be a str or None, not int"),
        (0.5, "x" * 256, r"note has 256 characters, more than 255"),
    ],
)
def test_bad_progress_is_a_value_error_naming_the_problem(
    fraction: Any, note: Any, message: str
) -> None:
    job = Job(1, "t", b"", 0, 1)
    with pytest.raises(ValueError, match=message):
        job.progress(fraction, note)
    assert job.control.latest is None  # nothing half-written


def test_a_handler_whose_progress_call_is_bad_fails_with_the_error(
    make_task: TaskFactory,
) -> None:
    task = make_task(job_func=lambda job: job.progress(2), max_failed_times=1)
    job_id = task.push(b"x")
    task.start()
    rec = wait_status(task, job_id, Status.FAILED)
    assert rec.last_error == "ValueError: progress fraction must be from 0 to 1, not 2"
    assert rec.progress is None
