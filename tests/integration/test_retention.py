"""Retention: the policy (``Task(retention=)``, stored per task), the purge statements
(chunks of at most 1,000 rows, unique keys held, racing cleaners, the archive) and the
cleaner service, on SQLite, MariaDB and PostgreSQL (``db_url``)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import func, insert, select, update
from support.backends import TaskFactory, unique_task_id

from meepo import Status
from meepo.connect import engine_for
from meepo.errors import LedgerUnavailableError
from meepo.ledger.retention import CHUNK, JobFilter, Retention
from meepo.runtime.cleaner import Cleaner

TABLE = "meepo_jobs"
OLD = timedelta(days=10)


@pytest.fixture
def store(db_url: str) -> Retention:
    return Retention(engine_for(db_url), TABLE)


def add_rows(store: Retention, task_id: str, n: int, status: Status, age: timedelta) -> list[int]:
    """``n`` rows of ``task_id`` in ``status``, last changed ``age`` ago (finished rows
    have neither deadline, as the ledger leaves them)."""
    t = store.jobs
    now = store.db_now()
    when = now - age
    rows = [
        {
            "task_id": task_id, "status": status.value, "payload": b"p%d" % i,
            "failed_times": 0, "commit_id": 1, "created_at": when, "updated_at": when,
            "run_at": when, "expires_at": now + OLD if status is Status.DOING else None,
            "dispatch_deadline": now + OLD if status is Status.TODO else None,
            "priority": "default",
        }
        for i in range(n)
    ]  # fmt: skip
    with store.engine.begin() as conn:
        for i in range(0, n, 500):
            conn.execute(insert(t), rows[i : i + 500])
        ids = conn.execute(
            select(t.c.id).where(t.c.task_id == task_id, t.c.updated_at == when)
        ).scalars()
        return sorted(int(i) for i in ids)


def count(store: Retention, task_id: str, status: Status | None = None) -> int:
    t = store.jobs
    stmt = select(func.count()).select_from(t).where(t.c.task_id == task_id)
    if status is not None:
        stmt = stmt.where(t.c.status == status.value)
    with store.engine.begin() as conn:
        return int(conn.execute(stmt).scalar_one())


def purge_all(
    store: Retention, task_id: str, status: Status, older: timedelta, archive: bool = False
) -> tuple[int, int, int]:
    """(removed, held, chunks) of a whole purge pass."""
    cutoff = store.db_now() - older
    removed = held = chunks = 0
    cursor = None
    while True:
        chunk = store.purge_chunk(task_id, status, cutoff, after=cursor, archive=archive)
        chunks += 1
        removed += chunk.removed
        held += chunk.held
        cursor = chunk.cursor
        if cursor is None:
            return removed, held, chunks


# -- the policy's values ------------------------------------------------------------------


# -- the stored policy --------------------------------------------------------------------


def test_policy_is_stored_per_task_and_replaced(store: Retention) -> None:
    a, b = unique_task_id("ra"), unique_task_id("rb")
    store.save_policy(a, {Status.DONE: 60.0, Status.FAILED: 120.0})
    store.save_policy(b, {Status.FAILED: 5.0})
    assert store.policy(a) == {Status.DONE: 60.0, Status.FAILED: 120.0}
    store.save_policy(a, {Status.DONE: 30.0})
    assert store.policy(a) == {Status.DONE: 30.0}
    assert store.policy(b) == {Status.FAILED: 5.0}
    assert store.policies()[a] == {Status.DONE: 30.0}
    store.save_policy(a, {})
    assert store.policy(a) == {}


def test_racing_policy_writers_leave_one_whole_policy(store: Retention) -> None:
    task_id = unique_task_id("rr")
    policies = [{Status.DONE: float(n), Status.FAILED: float(n)} for n in range(1, 7)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(policies))

    def write(p: dict[Status, float]) -> None:
        try:
            barrier.wait(10)
            for _ in range(5):
                store.save_policy(task_id, p)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in policies]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == []
    assert set(store.policy(task_id)) == {Status.DONE, Status.FAILED}


def test_a_worker_stores_its_retention_and_others_keep_it(make_task: TaskFactory) -> None:
    task = make_task(retention={"done": "1h"})
    report = task.cleaner.run_once()
    assert report.total == 0
    store = task.cleaner.store
    assert store.policy(task.task_id) == {Status.DONE: 3600.0}
    # A Task built without retention= (a producer, the CLI) leaves the stored one alone.
    other = make_task(task.task_id)
    other.cleaner.run_once()
    assert store.policy(task.task_id) == {Status.DONE: 3600.0}
    cleared = make_task(task.task_id, retention={})
    cleared.cleaner.run_once()
    assert store.policy(task.task_id) == {}


# -- purging ------------------------------------------------------------------------------


def test_purge_goes_in_chunks_of_at_most_1000_and_keeps_the_rest(store: Retention) -> None:
    task_id = unique_task_id("pc")
    old = add_rows(store, task_id, 2 * CHUNK + 300, Status.DONE, OLD)
    add_rows(store, task_id, 7, Status.DONE, timedelta(minutes=5))
    add_rows(store, task_id, 11, Status.FAILED, OLD)
    add_rows(store, task_id, 3, Status.TODO, OLD)
    other = unique_task_id("po")
    add_rows(store, other, 5, Status.DONE, OLD)

    cutoff = store.db_now() - timedelta(days=1)
    first = store.purge_chunk(task_id, Status.DONE, cutoff, limit=10 * CHUNK)
    assert first.removed == CHUNK and first.cursor is not None
    removed, held, chunks = purge_all(store, task_id, Status.DONE, timedelta(days=1))
    assert (removed, held) == (len(old) - CHUNK, 0)
    assert chunks == 2  # 1,000 then 300 (a short chunk ends the pass)
    assert count(store, task_id, Status.DONE) == 7  # the recent ones
    assert count(store, task_id, Status.FAILED) == 11
    assert count(store, task_id, Status.TODO) == 3
    assert count(store, other) == 5
    assert purge_all(store, task_id, Status.DONE, timedelta(days=1))[:2] == (0, 0)
    with pytest.raises(ValueError, match="only finished jobs"):
        store.purge_chunk(task_id, Status.TODO, cutoff)


def test_a_job_holding_its_unique_key_is_kept_until_the_hold_ends(
    make_task: TaskFactory,
) -> None:
    task = make_task()
    store = Retention(task.engine, task.table_name)
    held = task.push(b"h", key="report-1", unique_for=timedelta(days=1))
    free = task.push(b"f", key="report-2", unique_for=timedelta(minutes=1))
    t = store.jobs
    now = store.db_now()
    with store.engine.begin() as conn:  # both finished two hours ago
        conn.execute(
            update(t)
            .where(t.c.id.in_([held, free]))
            .values(
                status="done",
                expires_at=None,
                dispatch_deadline=None,
                updated_at=now - timedelta(hours=2),
            )
        )
    removed, kept, _ = purge_all(store, task.task_id, Status.DONE, timedelta(hours=1))
    assert (removed, kept) == (1, 1)
    assert task.get(held) is not None and task.get(free) is None
    # The free key's row went with its job; the held one still names its job.
    assert task.ledger.unique_holder(task.task_id, "report-2") is None
    assert task.ledger.unique_holder(task.task_id, "report-1") == held
    assert task.push(b"again", key="report-1") == held  # still held: nothing pushed
    with store.engine.begin() as conn:  # its hold is over
        conn.execute(update(t).where(t.c.id == held).values(updated_at=now - timedelta(days=2)))
    assert purge_all(store, task.task_id, Status.DONE, timedelta(hours=1))[:2] == (1, 0)
    assert task.get(held) is None
    new = task.push(b"new", key="report-1")
    assert new != held and task.ledger.unique_holder(task.task_id, "report-1") == new


def test_racing_cleaners_remove_each_row_once(store: Retention) -> None:
    task_id = unique_task_id("rc")
    ids = add_rows(store, task_id, 3 * CHUNK, Status.FAILED, OLD)
    results: list[tuple[int, int, int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def clean() -> None:
        try:
            barrier.wait(10)
            results.append(purge_all(store, task_id, Status.FAILED, timedelta(days=1)))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=clean) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert errors == []
    assert sum(r[0] for r in results) == len(ids)
    assert count(store, task_id) == 0


def test_racing_cleaner_services(make_task: TaskFactory) -> None:
    """Two workers' cleaners of one task at once: each row removed once, none left."""
    a = make_task(retention={"done": "1d"})
    b = make_task(a.task_id, retention={"done": "1d"})
    for c in (a.cleaner, b.cleaner):
        c.max_chunks = 1  # a pass of one chunk: they interleave
    ids = add_rows(a.cleaner.store, a.task_id, 2 * CHUNK + 10, Status.DONE, OLD)
    totals = [0, 0]
    errors: list[BaseException] = []

    def run(n: int, cleaner: Cleaner) -> None:
        try:
            while True:
                report = cleaner.run_once()
                totals[n] += report.total
                if not report.more:
                    return
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(n, c)) for n, c in enumerate((a.cleaner, b.cleaner))
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert errors == []
    assert sum(totals) == len(ids)
    assert count(a.cleaner.store, a.task_id) == 0


def test_archive_moves_rows_with_every_column(store: Retention) -> None:
    task_id = unique_task_id("ar")
    ids = add_rows(store, task_id, CHUNK + 5, Status.DONE, OLD)
    t, arch = store.jobs, store.archive
    with store.engine.begin() as conn:
        conn.execute(update(t).where(t.c.id == ids[0]).values(last_error="boom", worker="h:1"))
        before = conn.execute(select(t).where(t.c.id == ids[0])).one()._mapping
    removed, held, _ = purge_all(store, task_id, Status.DONE, timedelta(days=1), archive=True)
    assert (removed, held) == (len(ids), 0)
    assert count(store, task_id) == 0
    with store.engine.begin() as conn:
        got = conn.execute(
            select(arch.c.id).where(arch.c.task_id == task_id).order_by(arch.c.id)
        ).scalars()
        assert [int(i) for i in got] == ids
        row = conn.execute(select(arch).where(arch.c.id == ids[0])).one()._mapping
    for name, value in before.items():
        assert row[name] == value, name
    assert row["archived_at"] >= before["updated_at"]


def test_cleaner_applies_the_stored_policy(make_task: TaskFactory) -> None:
    task = make_task(retention={"done": "1d", "failed": "30d"})
    store = task.cleaner.store
    add_rows(store, task.task_id, 20, Status.DONE, timedelta(days=2))
    add_rows(store, task.task_id, 4, Status.DONE, timedelta(hours=2))
    add_rows(store, task.task_id, 6, Status.FAILED, timedelta(days=2))
    add_rows(store, task.task_id, 3, Status.FAILED, timedelta(days=40))
    report = task.cleaner.run_once()
    assert report.removed == {Status.DONE: 20, Status.FAILED: 3}
    assert not report.more
    assert count(store, task.task_id, Status.DONE) == 4
    assert count(store, task.task_id, Status.FAILED) == 6


def test_a_pass_stops_after_max_chunks_and_the_next_tick_goes_on(make_task: TaskFactory) -> None:
    task = make_task(retention={"done": 60})
    task.cleaner.max_chunks = 1
    add_rows(task.cleaner.store, task.task_id, CHUNK + 1, Status.DONE, OLD)
    first = task.cleaner.run_once()
    assert (first.total, first.more) == (CHUNK, True)
    assert task.cleaner.tick() == 60.0  # the last row, then the usual wait
    assert count(task.cleaner.store, task.task_id) == 0


def test_a_worker_runs_its_cleaner(make_task: TaskFactory) -> None:
    from support.helpers import wait_for

    task = make_task(job_func=lambda job: None, retention={"done": "1h"})
    add_rows(Retention(task.engine, task.table_name), task.task_id, 5, Status.DONE, OLD)
    task.start()
    assert task.cleaner.running
    wait_for(lambda: count(task.cleaner.store, task.task_id) == 0, timeout=30)
    task.stop()
    assert not task.cleaner.running


# -- listing and deleting -----------------------------------------------------------------


def test_list_pages_by_id_and_filters(store: Retention) -> None:
    task_id = unique_task_id("ls")
    ids = add_rows(store, task_id, 7, Status.FAILED, OLD)
    t = store.jobs
    with store.engine.begin() as conn:
        conn.execute(update(t).where(t.c.id == ids[2]).values(last_error="Timeout: 50%_done"))
    flt = JobFilter(task_id=task_id)
    page1 = store.list_jobs(flt, limit=3)
    page2 = store.list_jobs(flt, limit=3, after_id=page1[-1].id)
    page3 = store.list_jobs(flt, limit=3, after_id=page2[-1].id)
    assert [r.id for r in page1 + page2 + page3] == ids
    one = store.list_jobs(JobFilter(task_id=task_id, error_contains="timeout: 50%_"), limit=9)
    assert [r.id for r in one] == [ids[2]]
    assert store.list_jobs(JobFilter(task_id=task_id, error_contains="50%x"), limit=9) == []
    assert store.list_jobs(JobFilter(task_id=task_id, statuses=(Status.DONE,)), limit=9) == []
    now = store.db_now()
    assert store.list_jobs(JobFilter(task_id=task_id, since=now - timedelta(days=1)), limit=9) == []
    assert len(store.list_jobs(JobFilter(task_id=task_id, until=now), limit=9)) == 7


def test_delete_is_a_compare_and_set(store: Retention) -> None:
    task_id = unique_task_id("dl")
    ids = add_rows(store, task_id, 3, Status.DONE, OLD)
    rows = store.matching(JobFilter(task_id=task_id))
    t = store.jobs
    with store.engine.begin() as conn:  # one job repushed since it was read
        conn.execute(
            update(t).where(t.c.id == ids[1]).values(status="todo", commit_id=t.c.commit_id + 1)
        )
    assert store.delete(rows) == [ids[0], ids[2]]
    assert [r[0] for r in store.matching(JobFilter(task_id=task_id))] == [ids[1]]


def test_deleting_a_running_job_fences_its_consumer(make_task: TaskFactory) -> None:
    from meepo.errors import JobNotFoundError, StaleCommitError
    from meepo.ledger import Outcome

    task = make_task()
    job_id = task.push(b"x")
    claimed = task.ledger.claim(
        task.task_id, [(job_id, 0)], worker="w", lease=timedelta(seconds=30)
    )
    assert [j.id for j in claimed] == [job_id]
    store = Retention(task.engine, task.table_name)
    rows = store.matching(JobFilter(ids=(job_id,)))
    assert rows[0][3] is Status.DOING
    assert store.delete(rows) == [job_id]
    with pytest.raises((JobNotFoundError, StaleCommitError)):
        task.ledger.commit_one(
            task.task_id,
            Outcome(job_id, claimed[0].commit_id, Status.DONE),
            now=datetime.now(timezone.utc),
            redispatch_timeout=timedelta(seconds=20),
        )
    assert task.get(job_id) is None


def test_a_consumer_whose_running_job_is_deleted_goes_on(make_task: TaskFactory) -> None:
    """``jobs delete --force`` on a running job: its handler finishes, its commit changes
    nothing (the row stays gone), and the consumer runs the next job."""
    from support.helpers import wait_for

    started, release = threading.Event(), threading.Event()
    ran: list[bytes] = []

    def handler(job: object) -> None:
        payload = job.payload  # type: ignore[attr-defined]
        if payload == b"block":
            started.set()
            release.wait(30)
        ran.append(payload)

    task = make_task(job_func=handler, parallel_num=1)
    job_id = task.push(b"block")
    task.start()
    assert started.wait(30)
    store = Retention(task.engine, task.table_name)
    rows = store.matching(JobFilter(ids=(job_id,)))
    assert rows[0][3] is Status.DOING
    assert store.delete(rows) == [job_id]
    release.set()
    nxt = task.push(b"next")
    wait_for(lambda: (r := task.get(nxt)) is not None and r.status is Status.DONE, timeout=30)
    assert task.get(job_id) is None
    assert ran == [b"block", b"next"]


def test_a_purge_chunk_that_lost_a_deadlock_is_tried_again(
    store: Retention, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MariaDB may pick one of two racing cleaners as a deadlock's victim (seen in a
    parallel CI run): its chunk's transaction is rolled back whole, so the chunk is
    simply run again, and the caller never sees the deadlock."""
    task_id = unique_task_id("dl")
    ids = add_rows(store, task_id, 5, Status.DONE, OLD)
    real = store._purge_chunk
    lost: list[int] = []

    def first_loses(*args: Any, **kwargs: Any) -> Any:
        if not lost:
            lost.append(1)
            raise LedgerUnavailableError(
                "database error: (1213, 'Deadlock found when trying to get lock; try "
                "restarting transaction')"
            )
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "_purge_chunk", first_loses)
    chunk = store.purge_chunk(task_id, Status.DONE, store.db_now() - timedelta(days=1))
    assert (lost, chunk.removed) == ([1], len(ids))
    assert count(store, task_id) == 0
