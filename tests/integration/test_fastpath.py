"""The server drivers' statement forms of the hot path (meepo/ledger/drivers/): the
same results as the portable forms, errors that leave nothing half-done, and the
fallback when a driver cannot run them.

The forms themselves run under every other test too (claims, commits, the model test);
this file covers what is theirs alone.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, event, insert, select
from support.backends import backend_url, unique_task_id
from support.helpers import record, wait_for

from meepo import Job, LedgerUnavailableError, Status, Task
from meepo.ledger import Ledger, make_engine
from meepo.ledger.drivers import MySQLDriver
from meepo.ledger.drivers.postgres import pair_params
from meepo.ledger.ledger import Outcome
from meepo.ledger.types import UTC
from meepo.records import NewJob

pytestmark = pytest.mark.timeout(120)

TaskFactory = Callable[..., Task]
LEASE = timedelta(seconds=30)


@pytest.fixture
def mariadb_url(sqlite_url: str) -> str:
    return backend_url("mariadb", sqlite_url)


@pytest.fixture
def postgres_url(sqlite_url: str) -> str:
    return backend_url("postgres", sqlite_url)


def now() -> datetime:
    return datetime.now(UTC)


def new_rows(ledger: Ledger, task_id: str, *payloads: bytes) -> list[int]:
    """Plain todo rows, committed; their ids."""
    jobs = [NewJob(p) for p in payloads]
    return [r.id for r in ledger.insert(task_id, jobs, now=now(), redispatch_timeout=LEASE)]


def test_a_batch_past_one_statement_keeps_every_job_in_order(make_task: TaskFactory) -> None:
    """2,500 jobs (three INSERT statements of up to 1,000 rows) with mixed priorities and
    due times: every id is its own payload's, in push order."""
    task = make_task(priorities=["high", "default", "low"])
    prios = ["high", "default", "low"]
    with task.batch() as b:
        for i in range(2500):
            b.push(b"job-%04d" % i, priority=prios[i % 3], delay=3600 if i % 7 == 0 else None)
    ids = b.ids
    assert len(ids) == len(set(ids)) == 2500 and ids == sorted(ids)
    rows = {r.id: r for r in (task.get(i) for i in ids[::97] + ids[-3:]) if r is not None}
    for k, job_id in enumerate(ids):
        if job_id in rows:
            rec = rows[job_id]
            assert rec.payload == b"job-%04d" % k
            assert rec.priority == prios[k % 3]
            assert (rec.run_at > rec.created_at + timedelta(seconds=3000)) == (k % 7 == 0)
    due = [prios[k % 3] for k in range(2500) if k % 7]
    want = {p: due.count(p) for p in prios}
    assert task.depths() == {**want, "delayed": 2500 - len(due)}


def test_payloads_of_any_bytes_round_trip_through_every_insert_form(
    make_task: TaskFactory,
) -> None:
    """Quotes, backslashes, NUL, "%" and format markers, non-UTF-8: through a single push
    and a batch (MariaDB writes a batch's values into the statement's text)."""
    task = make_task()
    tricky = [b"100%", b"%s %(x)s %%", b"'\\\x00\"`;--", bytes(range(256)), b"", b"\xff\xfe"]
    ids = task.push_many(tricky) + [task.push(p) for p in tricky]
    for job_id, payload in zip(ids, tricky + tricky, strict=True):
        rec = task.get(job_id)
        assert rec is not None and rec.payload == payload


def test_mariadb_error_inside_a_script_rolls_all_of_it_back(mariadb_url: str) -> None:
    """The claim's UPDATE fails after its SELECT … FOR UPDATE locked the rows (a worker
    name too long for its column): nothing changes, no lock stays behind, and the pooled
    connection serves the next claim."""
    engine = make_engine(mariadb_url, pool_size=1, max_overflow=0)
    ledger = Ledger(engine, "meepo_jobs")
    task_id = unique_task_id("fp")
    ids = new_rows(ledger, task_id, b"a", b"b")
    pairs = [(i, 0) for i in ids]
    with pytest.raises(LedgerUnavailableError, match="worker"):
        ledger.claim(task_id, pairs, lease=LEASE, worker="w" * 500)
    for i in ids:
        rec = ledger.get(i)
        assert rec is not None and (rec.status, rec.commit_id) == (Status.TODO, 0)
    other = create_engine(mariadb_url)
    try:
        t = ledger.table
        with other.connect() as conn:  # no lock left: NOWAIT would fail on one
            conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 1")
            locked = conn.execute(
                select(t.c.id).where(t.c.id.in_(ids)).with_for_update(nowait=True)
            ).all()
            assert sorted(r.id for r in locked) == ids
            conn.rollback()
    finally:
        other.dispose()
    got = ledger.claim(task_id, pairs, lease=LEASE, worker="w")
    assert [j.id for j in got] == ids
    engine.dispose()


def test_mariadb_transition_script_error_changes_no_group(mariadb_url: str) -> None:
    engine = make_engine(mariadb_url)
    ledger = Ledger(engine, "meepo_jobs")
    assert isinstance(ledger.driver, MySQLDriver)
    task_id = unique_task_id("fp")
    t0 = now()
    ids = new_rows(ledger, task_id, b"a", b"b")
    claimed = ledger.claim(task_id, [(i, 0) for i in ids], lease=LEASE, worker="w")
    (a, ca), (b, cb) = [(j.id, j.commit_id) for j in claimed]
    with pytest.raises(LedgerUnavailableError):  # the second UPDATE: status too long
        ledger._transition(
            [
                ([(a, ca)], [Status.DOING], {"status": "done", "updated_at": t0}),
                ([(b, cb)], [Status.DOING], {"status": "x" * 40, "updated_at": t0}),
            ]
        )
    for i in ids:
        rec = ledger.get(i)
        assert rec is not None and rec.status is Status.DOING and rec.commit_id > 0
    engine.dispose()


def test_mariadb_engine_without_multi_statements_uses_the_portable_forms(
    mariadb_url: str, redis_url: str
) -> None:
    """A caller's own Engine (no multi-statements flag): every job still runs once."""
    engine = create_engine(mariadb_url)
    runs: list[Job] = []
    task = Task(unique_task_id("fp"), db=engine, redis=redis_url, job_func=runs.append)
    try:
        driver = task.ledger.driver
        assert isinstance(driver, MySQLDriver)
        ids = task.push_many([b"%d" % i for i in range(50)])
        task.start()
        wait_for(lambda: all(record(task, i).status is Status.DONE for i in ids), timeout=30)
        assert sorted(j.id for j in runs) == ids
        assert driver.scripts is False
    finally:
        task.stop(wait=True, grace=5)
        engine.dispose()


def test_postgres_autocommit_claims_leave_transactions_working(postgres_url: str) -> None:
    """The claim runs in autocommit on a pooled connection; the same connection, checked
    out again, is transactional: a rolled-back INSERT leaves nothing."""
    engine = make_engine(postgres_url, pool_size=1, max_overflow=0)
    ledger = Ledger(engine, "meepo_jobs")
    task_id = unique_task_id("fp")
    t0 = now()
    (job_id,) = new_rows(ledger, task_id, b"a")
    got = ledger.claim(task_id, [(job_id, 0)], lease=LEASE, worker="w")
    assert [j.id for j in got] == [job_id]
    t = ledger.table
    with engine.connect() as conn:
        new_id = conn.execute(
            insert(t).returning(t.c.id),
            {
                "task_id": task_id,
                "status": "todo",
                "payload": b"x",
                "failed_times": 0,
                "commit_id": 0,
                "created_at": t0,
                "updated_at": t0,
                "run_at": t0,
                "dispatch_deadline": t0,
            },
        ).scalar_one()
        conn.rollback()
    assert ledger.get(new_id) is None
    engine.dispose()


def test_a_push_on_a_callers_connection_is_that_transactions(
    db_url: str, make_task: TaskFactory
) -> None:
    """A push (one job or a batch) on a Connection that has not begun a transaction yet:
    the caller's rollback takes the rows away, its commit keeps them, and the pooled
    connection comes back clean (one connection in the pool: every push reuses it)."""
    engine = make_engine(db_url, pool_size=1, max_overflow=0)
    task = make_task(db=engine)
    try:
        with engine.connect() as conn:
            gone = [
                task.push(b"a", connection=conn),
                *task.push_many([b"b", b"c"], connection=conn),
            ]
            conn.rollback()
        assert [task.get(i) for i in gone] == [None, None, None]
        with engine.connect() as conn:
            kept = [
                task.push(b"d", connection=conn),
                *task.push_many([b"e", b"f"], connection=conn),
            ]
            conn.commit()
        assert [record(task, i).payload for i in kept] == [b"d", b"e", b"f"]
        after = task.push(b"g")  # on the same pooled connection
        assert record(task, after).status is Status.TODO
    finally:
        engine.dispose()


def test_postgres_hot_statements_are_never_prepared(postgres_url: str) -> None:
    """On a caller's own Engine, psycopg would prepare a statement after its fifth run
    (a generic plan, blind to how many ids an array holds): the claims, heartbeats and
    commits of the hot path ask it not to."""
    engine = create_engine(postgres_url, pool_size=1, max_overflow=0)  # prepare_threshold 5
    ledger = Ledger(engine, "meepo_jobs")
    task_id = unique_task_id("fp")
    for _ in range(8):
        t0 = now()
        ids = new_rows(ledger, task_id, b"a", b"b")
        jobs = ledger.claim(task_id, [(i, 0) for i in ids], lease=LEASE, worker="w")
        assert ledger.heartbeat([(j.id, j.commit_id) for j in jobs], lease=LEASE).lost == set()
        won = ledger.finish(
            [Outcome(j.id, j.commit_id, Status.DONE) for j in jobs],
            now=t0,
            redispatch_timeout=LEASE,
        )
        assert won == {(j.id, j.commit_id) for j in jobs}
    with engine.connect() as conn:
        prepared = conn.exec_driver_sql(
            "SELECT statement FROM pg_prepared_statements WHERE statement LIKE '%%ANY(%%'"
        ).all()
    assert prepared == []
    engine.dispose()


def test_postgres_claim_of_every_message_reads_each_row_once(postgres_url: str) -> None:
    """The claim's second read (of the jobs not due yet) is skipped when its UPDATE took
    every message: the claimed rows are scanned by primary key once, not twice."""
    engine = make_engine(postgres_url)
    ledger = Ledger(engine, "meepo_jobs")
    task_id = unique_task_id("fp")
    seen: list[tuple[str, dict[str, object]]] = []

    def listener(_c: object, _cur: object, statement: str, params: object, *_a: object) -> None:
        if isinstance(params, dict) and "step" in params:
            seen.append((statement, dict(params)))

    event.listen(engine, "before_cursor_execute", listener)
    try:
        first = new_rows(ledger, task_id, b"a", b"b")
        assert len(ledger.claim(task_id, [(i, 0) for i in first], lease=LEASE, worker="w")) == 2
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    (statement, params), *_ = seen
    fresh = new_rows(ledger, task_id, b"c", b"d", b"e")
    params.update(pair_params([(i, 0) for i in fresh]))
    with engine.connect() as conn:
        (plan,) = conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params
        ).scalar_one()
        conn.rollback()
    scans: list[int] = []

    def walk(node: dict[str, Any]) -> None:
        if node.get("Relation Name") == "meepo_jobs" and "Scan" in node["Node Type"]:
            scans.append(int(node.get("Actual Loops", 0)))
        for child in node.get("Plans", []):
            walk(child)

    walk(plan["Plan"])
    assert len(scans) == 2  # the UPDATE's read and the second read, in the plan
    assert sorted(scans) == [0, 1], scans  # only the first one ran
    assert {r.status for r in map(ledger.get, fresh) if r is not None} == {Status.TODO}
    engine.dispose()
