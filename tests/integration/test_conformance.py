"""The ledger drivers' conformance suite: the same cases against every driver on every
server it supports (``portable`` on SQLite, MariaDB and PostgreSQL; ``postgres`` on
PostgreSQL; ``mysql`` on MariaDB). A new driver joins by adding itself to ``DRIVERS``
below; it is conformant when every case passes (see docs/drivers.md).

The cases drive :class:`~meepo.ledger.Ledger` (the rules) on top of the driver under
test, with real servers, and hold other sessions' row locks where a case is about
locks. Every wait has a deadline; no assertion is about how long something took.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pytest
from sqlalchemy import event, update
from support.backends import backend_url, unique_task_id

from meepo.connect import engine_for
from meepo.errors import ConfigError, JobNotFoundError, LedgerUnavailableError, StaleCommitError
from meepo.ledger import NEVER_DISPATCHED, ROWS_PER_STATEMENT, Ledger, Outcome
from meepo.ledger.bounds import Bounds
from meepo.ledger.clock import host_now
from meepo.ledger.drivers import DRIVERS
from meepo.ledger.drivers.mysql import OPTIMISTIC_PAIRS
from meepo.ledger.engine import make_engine
from meepo.ledger.retention import JobFilter, Retention
from meepo.ledger.schedules import Schedules
from meepo.records import NewJob, Pair, Status
from meepo.schedule import Spec

pytestmark = pytest.mark.timeout(120)

#: (driver, backend): every driver on every server it supports.
SUPPORTED = [
    ("portable", "sqlite"),
    ("portable", "mariadb"),
    ("portable", "postgres"),
    ("postgres", "postgres"),
    ("mysql", "mariadb"),
]
WITH_ROW_LOCKS = [c for c in SUPPORTED if c[1] != "sqlite"]
LEASE = timedelta(seconds=6)
TIMEOUT = timedelta(seconds=20)
DEADLINE = 30.0  # seconds a call that must not wait on a lock gets before it fails

T = TypeVar("T")


def _id(case: tuple[str, str]) -> str:
    return f"{case[0]}-{case[1]}"


def _ledger(case: tuple[str, str], sqlite_url: str) -> Ledger:
    driver, backend = case
    ledger = Ledger(engine_for(backend_url(backend, sqlite_url)), "meepo_jobs", driver=driver)
    assert ledger.driver.name == driver
    return ledger


@pytest.fixture(params=SUPPORTED, ids=_id)
def ledger(request: pytest.FixtureRequest, sqlite_url: str) -> Ledger:
    return _ledger(request.param, sqlite_url)


@pytest.fixture(params=WITH_ROW_LOCKS, ids=_id)
def locking(request: pytest.FixtureRequest, sqlite_url: str) -> Ledger:
    """A ledger on a server with row locks."""
    return _ledger(request.param, sqlite_url)


def test_every_driver_is_in_the_suite() -> None:
    assert {d for d, _ in SUPPORTED} == set(DRIVERS)


def test_an_unknown_driver_is_refused_by_name(sqlite_url: str) -> None:
    with pytest.raises(ConfigError, match=r"unknown ledger driver 'oracle'.*portable"):
        Ledger(engine_for(sqlite_url), "meepo_jobs", driver="oracle")


# -- helpers ------------------------------------------------------------------------------


def db_now(ledger: Ledger) -> datetime:
    """The database's time, by the driver under test's statement."""
    with ledger.engine.connect() as conn:
        return ledger.driver.db_now(conn)


def push(ledger: Ledger, task_id: str, n: int = 1, **job: Any) -> list[int]:
    """n committed todo rows (``job``: NewJob fields); their ids."""
    jobs = [NewJob(b"p%d" % i, **job) for i in range(n)]
    got = ledger.insert(task_id, jobs, now=host_now(), redispatch_timeout=TIMEOUT)
    return [r.id for r in got]


def claim(ledger: Ledger, task_id: str, ids: Sequence[int], **kw: Any) -> list[Pair]:
    """Claim fresh rows; their new pairs, by id."""
    got = ledger.claim(task_id, [(i, 0) for i in ids], lease=LEASE, worker="w", **kw)
    assert [j.id for j in got] == sorted(ids)
    return [(j.id, j.commit_id) for j in got]


def state(ledger: Ledger, job_id: int) -> tuple[Status, int]:
    rec = ledger.get(job_id)
    assert rec is not None
    return rec.status, rec.commit_id


@contextlib.contextmanager
def row_locked(ledger: Ledger, *ids: int) -> Iterator[None]:
    """Another session holds these rows' locks (a slow commit, an admin's transaction)."""
    t = ledger.table
    conn = ledger.engine.connect()
    trans = conn.begin()
    try:
        conn.execute(t.select().where(t.c.id.in_(ids)).with_for_update()).all()
        yield
    finally:
        trans.rollback()
        conn.close()


def within_deadline(call: Callable[[], T], what: str) -> T:
    """``call()`` in a thread; fails the test if it has not returned by DEADLINE (it
    waited on a lock it must not wait on)."""
    out: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            out.append(call())
        except BaseException as exc:  # re-raised below
            out.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(DEADLINE), f"{what} waited on a row lock"
    if isinstance(out[0], BaseException):
        raise out[0]
    result: T = out[0]
    return result


# -- insert -------------------------------------------------------------------------------


def test_insert_one_and_a_batch_past_one_statement_keep_their_order(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    (one,) = push(ledger, task_id)
    n = ROWS_PER_STATEMENT + 7
    jobs = [NewJob(b"job-%05d" % i, priority=("high", "default")[i % 2]) for i in range(n)]
    ids = [r.id for r in ledger.insert(task_id, jobs, now=host_now(), redispatch_timeout=TIMEOUT)]
    assert len(set(ids)) == n and ids == sorted(ids) and ids[0] > one
    for k in (0, 1, ROWS_PER_STATEMENT, n - 1):
        rec = ledger.get(ids[k])
        assert rec is not None and rec.payload == b"job-%05d" % k
        assert (rec.status, rec.commit_id, rec.priority) == (Status.TODO, 0, jobs[k].priority)


def test_insert_on_a_callers_transaction_is_rolled_back_with_it(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    with ledger.engine.connect() as conn:
        got = ledger.insert(
            task_id,
            [NewJob(b"a"), NewJob(b"b")],
            now=host_now(),
            redispatch_timeout=TIMEOUT,
            conn=conn,
        )
        conn.rollback()
    assert [ledger.get(r.id) for r in got] == [None, None]


def test_payloads_of_any_bytes_round_trip(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    tricky = [b"100%", b"%s %(x)s %%", b"'\\\x00\"`;--", bytes(range(256)), b""]
    for jobs in ([NewJob(p) for p in tricky], [NewJob(tricky[3])]):
        got = ledger.insert(task_id, jobs, now=host_now(), redispatch_timeout=TIMEOUT)
        for r, j in zip(got, jobs, strict=True):
            rec = ledger.get(r.id)
            assert rec is not None and rec.payload == j.payload


# -- unique keys --------------------------------------------------------------------------


def test_a_unique_key_is_held_by_an_unfinished_job_and_handed_over_when_it_ends(
    ledger: Ledger,
) -> None:
    task_id = unique_task_id("cf")
    now = host_now()
    (first,) = ledger.insert(task_id, [NewJob(b"a", key="k")], now=now, redispatch_timeout=TIMEOUT)
    assert first.created
    (again,) = ledger.insert(task_id, [NewJob(b"b", key="k")], now=now, redispatch_timeout=TIMEOUT)
    assert again == type(first)(first.id, False)
    assert ledger.unique_holder(task_id, "k") == first.id
    (pair,) = claim(ledger, task_id, [first.id])
    assert ledger.finish([Outcome(*pair, Status.DONE)], now=now, redispatch_timeout=TIMEOUT)
    (third,) = ledger.insert(task_id, [NewJob(b"c", key="k")], now=now, redispatch_timeout=TIMEOUT)
    assert third.created and third.id != first.id
    assert ledger.unique_holder(task_id, "k") == third.id


def test_a_finished_holder_keeps_its_key_for_unique_for(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    now = host_now()
    job = NewJob(b"a", key="k", unique_for=60.0)
    (first,) = ledger.insert(task_id, [job], now=now, redispatch_timeout=TIMEOUT)
    (pair,) = claim(ledger, task_id, [first.id])
    ledger.finish([Outcome(*pair, Status.DONE)], now=now, redispatch_timeout=TIMEOUT)
    soon = now + timedelta(seconds=30)
    (held,) = ledger.insert(task_id, [job], now=soon, redispatch_timeout=TIMEOUT)
    assert (held.id, held.created) == (first.id, False)
    later = now + timedelta(seconds=61)
    (new,) = ledger.insert(task_id, [job], now=later, redispatch_timeout=TIMEOUT)
    assert new.created and ledger.unique_holder(task_id, "k") == new.id


def test_keyed_and_plain_jobs_in_one_batch_come_back_in_order(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    jobs = [NewJob(b"a"), NewJob(b"b", key="x"), NewJob(b"c"), NewJob(b"d", key="x")]
    got = ledger.insert(task_id, jobs, now=host_now(), redispatch_timeout=TIMEOUT)
    assert [r.created for r in got] == [True, True, True, False]
    assert got[3].id == got[1].id
    payloads = [ledger.get(r.id).payload for r in got[:3]]  # type: ignore[union-attr]
    assert payloads == [b"a", b"b", b"c"]


def _push_racing_an_uncommitted_push(ledger: Ledger, task_id: str, job: NewJob) -> tuple[Any, Any]:
    """Push ``job`` in a transaction left open, push it again from another session, then
    commit the first: what each push returned."""
    first = ledger.engine.connect()
    try:
        trans = first.begin()
        (mine,) = ledger.insert(
            task_id, [job], now=host_now(), redispatch_timeout=TIMEOUT, conn=first
        )
        results: list[Any] = []

        def other() -> None:
            results.extend(
                ledger.insert(task_id, [job], now=host_now(), redispatch_timeout=TIMEOUT)
            )

        thread = threading.Thread(target=other, daemon=True)
        thread.start()
        trans.commit()
        thread.join(DEADLINE)
        assert len(results) == 1, "the second push did not return"
        return mine, results[0]
    finally:
        first.close()


def test_two_sessions_pushing_one_key_make_one_job(locking: Ledger) -> None:
    task_id = unique_task_id("cf")
    mine, theirs = _push_racing_an_uncommitted_push(locking, task_id, NewJob(b"a", key="k"))
    assert mine.created and (theirs.id, theirs.created) == (mine.id, False)
    assert locking.unique_holder(task_id, "k") == mine.id


def test_two_sessions_taking_over_a_finished_key_make_one_job(locking: Ledger) -> None:
    ledger = locking
    task_id = unique_task_id("cf")
    now = host_now()
    (old,) = ledger.insert(task_id, [NewJob(b"a", key="k")], now=now, redispatch_timeout=TIMEOUT)
    (pair,) = claim(ledger, task_id, [old.id])
    ledger.finish([Outcome(*pair, Status.DONE)], now=now, redispatch_timeout=TIMEOUT)
    mine, theirs = _push_racing_an_uncommitted_push(ledger, task_id, NewJob(b"b", key="k"))
    assert mine.created and mine.id != old.id
    assert (theirs.id, theirs.created) == (mine.id, False)
    assert ledger.unique_holder(task_id, "k") == mine.id


# -- claim --------------------------------------------------------------------------------


def test_claim_wins_current_messages_and_drops_stale_duplicate_and_foreign_ones(
    ledger: Ledger,
) -> None:
    task_id, other = unique_task_id("cf"), unique_task_id("cf_other")
    a, b, c = push(ledger, task_id, 3)
    (foreign,) = push(ledger, other)
    got = ledger.claim(
        task_id, [(a, 0), (b, 0), (b, 0), (c, 5), (foreign, 0)], lease=LEASE, worker="w"
    )
    assert [(j.id, j.payload, j.task_id) for j in got] == [(a, b"p0", task_id), (b, b"p1", task_id)]
    assert got.early == []
    assert all(j.commit_id > 0 for j in got)
    assert state(ledger, c) == (Status.TODO, 0)
    assert state(ledger, foreign) == (Status.TODO, 0)
    # the same messages again: stale now, a second claimer loses
    assert ledger.claim(task_id, [(a, 0), (b, 0)], lease=LEASE, worker="w2") == []
    rec = ledger.get(a)
    assert rec is not None and rec.worker == "w" and rec.started_at is None


@pytest.mark.parametrize("claims", [1, 3, 6])
def test_a_commit_of_many_claims_wins_exactly_the_current_pairs(
    ledger: Ledger, claims: int
) -> None:
    """A batch commit whose pairs come from one, a few or many claims (as many distinct
    commit_ids), with stale pairs among them (an older commit_id of a claimed job, a
    job already done): exactly the current pairs win; every other row keeps its state.
    Twice: below and above the MySQL driver's optimistic batch size."""
    task_id = unique_task_id("cf")
    for per_claim in (2, OPTIMISTIC_PAIRS // claims + 1):
        ids = push(ledger, task_id, claims * per_claim + 1)
        pairs: list[Pair] = []
        for k in range(claims):  # one claim each: its own commit_id
            pairs += claim(ledger, task_id, ids[k * per_claim : (k + 1) * per_claim])
        (done,) = claim(ledger, task_id, ids[-1:])
        now = host_now()
        assert ledger.finish([Outcome(*done, Status.DONE)], now=now, redispatch_timeout=TIMEOUT)
        (older_id, older_cid) = pairs[0]
        stale = [(older_id, older_cid - 1), done]
        outcomes = [Outcome(*p, Status.DONE) for p in [*stale, *pairs[1:]]]
        won = ledger.finish(outcomes, now=now, redispatch_timeout=TIMEOUT)
        assert won == set(pairs[1:])
        assert state(ledger, older_id) == (Status.DOING, older_cid)
        assert state(ledger, done[0]) == (Status.DONE, done[1] + 1)
        assert all(state(ledger, i) == (Status.DONE, c + 1) for i, c in pairs[1:])


def test_a_claim_repeated_after_a_lost_commit_gets_another_token(ledger: Ledger) -> None:
    """A failover loses a claim's commit (the row is back at its pre-claim state) and a
    duplicate message is claimed again: the tokens differ, the first one is fenced."""
    task_id = unique_task_id("cf")
    (job_id,) = push(ledger, task_id)
    before = ledger.get(job_id)
    assert before is not None
    ((_, first),) = claim(ledger, task_id, [job_id])
    t = ledger.table
    with ledger.engine.begin() as conn:
        conn.execute(
            update(t)
            .where(t.c.id == job_id)
            .values(
                status="todo",
                commit_id=0,
                expires_at=None,
                dispatch_deadline=before.dispatch_deadline,
                worker=None,
            )
        )
    ((_, second),) = claim(ledger, task_id, [job_id])
    assert first != second
    now = host_now()
    assert (
        ledger.finish([Outcome(job_id, first, Status.DONE)], now=now, redispatch_timeout=TIMEOUT)
        == set()
    )
    assert ledger.heartbeat([(job_id, first)], lease=LEASE).lost == {(job_id, first)}
    won = ledger.finish([Outcome(job_id, second, Status.DONE)], now=now, redispatch_timeout=TIMEOUT)
    assert won == {(job_id, second)}


def test_claim_refuses_a_job_before_its_run_at(ledger: Ledger) -> None:
    """A current message of a job not due yet by the database's clock comes back as
    early (its run_at, the time judged), the row untouched."""
    task_id = unique_task_id("cf")
    (later,) = push(ledger, task_id, run_at=db_now(ledger) + timedelta(seconds=60))
    (due,) = push(ledger, task_id)
    got = ledger.claim(task_id, [(later, 0), (due, 0)], lease=LEASE, worker="w")
    assert [j.id for j in got] == [due]
    assert [(m.job_id, m.commit_id) for m in got.early] == [(later, 0)]
    rec = ledger.get(later)
    assert rec is not None and (rec.status, rec.commit_id) == (Status.TODO, 0)
    assert got.early[0].run_at == rec.run_at
    assert got.now is not None and got.now < rec.run_at
    (job,) = ledger.claim(
        task_id, [(later, 0)], lease=LEASE, worker="w", now=rec.run_at + timedelta(seconds=1)
    )
    assert job.id == later


@pytest.mark.parametrize("size", [4, OPTIMISTIC_PAIRS + 4])
def test_a_batch_claim_wins_exactly_the_current_due_pairs(ledger: Ledger, size: int) -> None:
    """A claim of many messages (below and above the MySQL driver's optimistic batch
    size): first all current and due, every job won with its payload, failure count,
    priority and a new commit_id; then with a stale, a duplicate, a foreign and a not-due
    message among them: exactly the current due jobs are won, the rest left as they were."""
    task_id, other = unique_task_id("cf"), unique_task_id("cf_other")
    ids = push(ledger, task_id, size, priority="default")
    got = ledger.claim(task_id, [(i, 0) for i in ids], lease=LEASE, worker="w")
    assert [(j.id, j.payload, j.failed_times, j.priority) for j in got] == [
        (i, b"p%d" % k, 0, "default") for k, i in enumerate(ids)
    ]
    assert got.early == [] and all(state(ledger, j.id) == (Status.DOING, j.commit_id) for j in got)
    fresh = push(ledger, task_id, size)
    (later,) = push(ledger, task_id, run_at=db_now(ledger) + timedelta(seconds=60))
    (foreign,) = push(ledger, other)
    stale = [(ids[0], 0), (fresh[0], 7)]
    batch = [(i, 0) for i in fresh[1:]] + [(fresh[1], 0), (later, 0), (foreign, 0), *stale]
    got = ledger.claim(task_id, batch, lease=LEASE, worker="w")
    assert [j.id for j in got] == fresh[1:]
    assert [(m.job_id, m.commit_id) for m in got.early] == [(later, 0)]
    assert all(state(ledger, j.id) == (Status.DOING, j.commit_id) for j in got)
    for job_id, want in [(fresh[0], 0), (later, 0), (foreign, 0)]:
        assert state(ledger, job_id) == (Status.TODO, want)


def test_claim_and_heartbeat_set_the_lease_by_the_database_clock(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    (job_id,) = push(ledger, task_id)
    before = db_now(ledger)
    (pair,) = claim(ledger, task_id, [job_id])
    after = db_now(ledger)
    rec = ledger.get(job_id)
    assert rec is not None and rec.expires_at is not None
    assert before + LEASE <= rec.expires_at <= after + LEASE
    before = db_now(ledger)
    assert ledger.heartbeat([pair], lease=2 * LEASE).renewed == {pair}
    after = db_now(ledger)
    rec = ledger.get(job_id)
    assert rec is not None and rec.expires_at is not None
    assert before + 2 * LEASE <= rec.expires_at <= after + 2 * LEASE
    assert ledger.expired_leases(task_id, limit=10) == []
    late = rec.expires_at + timedelta(seconds=1)
    assert [z.id for z in ledger.expired_leases(task_id, limit=10, now=late)] == [job_id]


# -- the two deadlines ---------------------------------------------------------------


def deadlines(ledger: Ledger, job_id: int) -> tuple[Status, bool, bool]:
    """A row's status and which deadlines it has: (lease end, dispatch deadline)."""
    rec = ledger.get(job_id)
    assert rec is not None
    return rec.status, rec.expires_at is not None, rec.dispatch_deadline is not None


#: What each status holds: a lease end while doing, a dispatch deadline while todo,
#: neither once finished.
HOLDS = {
    Status.TODO: (Status.TODO, False, True),
    Status.DOING: (Status.DOING, True, False),
    Status.DONE: (Status.DONE, False, False),
    Status.FAILED: (Status.FAILED, False, False),
}


def test_a_lease_is_held_only_while_doing_and_a_dispatch_deadline_only_while_todo(
    ledger: Ledger,
) -> None:
    """Every transition leaves a row with the deadline of its new status only: push,
    claim, heartbeat, a retry's commit, release, the reaper's requeue and close, the
    sweep, repush, and the final commits."""
    task_id = unique_task_id("cf")
    a, b, c = push(ledger, task_id, 3)
    now = host_now()
    assert deadlines(ledger, a) == HOLDS[Status.TODO]
    pa, pb, pc = claim(ledger, task_id, [a, b, c], now=now)
    assert deadlines(ledger, a) == HOLDS[Status.DOING]
    ledger.heartbeat([pa], lease=LEASE)
    assert deadlines(ledger, a) == HOLDS[Status.DOING]
    won = ledger.finish(
        [Outcome(*pa, Status.TODO, "again", run_at=now)], now=now, redispatch_timeout=TIMEOUT
    )
    assert won == {pa} and deadlines(ledger, a) == HOLDS[Status.TODO]
    assert ledger.release([pb], now=now, dispatch_deadline=now + TIMEOUT) == {pb}
    assert deadlines(ledger, b) == HOLDS[Status.TODO]
    late = now + LEASE + timedelta(seconds=1)
    ledger.start([pc], now=now)
    (zombie,) = ledger.expired_leases(task_id, limit=10, now=late)
    reaped = ledger.reap(
        [zombie], dst=Status.TODO, max_failed_times=5, redispatch_timeout=TIMEOUT, now=late
    )
    assert [m.job_id for m in reaped.requeued] == [c]
    assert deadlines(ledger, c) == HOLDS[Status.TODO]
    ledger.mark_due([(c, pc[1] + 1)])
    swept = ledger.sweep(
        task_id, now=late, cutoffs={"default": late}, limit=10, redispatch_timeout=TIMEOUT
    )
    assert [m.job_id for m in swept] == [c] and deadlines(ledger, c) == HOLDS[Status.TODO]
    pairs = claim_current(ledger, task_id, [a, b, c], now=late)
    ledger.start([pairs[2]], now=late)
    later = late + LEASE + timedelta(seconds=1)
    (zombie,) = [z for z in ledger.expired_leases(task_id, limit=10, now=later) if z.id == c]
    reaped = ledger.reap(
        [zombie], dst=Status.TODO, max_failed_times=1, redispatch_timeout=TIMEOUT, now=later
    )
    assert reaped.closed == 1 and deadlines(ledger, c) == HOLDS[Status.FAILED]
    won = ledger.finish(
        [Outcome(*pairs[0], Status.DONE), Outcome(*pairs[1], Status.FAILED, "x")],
        now=later,
        redispatch_timeout=TIMEOUT,
    )
    assert won == set(pairs[:2])
    assert deadlines(ledger, a) == HOLDS[Status.DONE]
    assert deadlines(ledger, b) == HOLDS[Status.FAILED]
    current = [(r[0], r[2]) for r in ledger.find(task_id=task_id)]
    moved = ledger.repush(current, now=later, redispatch_timeout=TIMEOUT)
    assert sorted(m.job_id for m in moved) == [a, b, c]
    assert {deadlines(ledger, i) for i in (a, b, c)} == {HOLDS[Status.TODO]}


def claim_current(ledger: Ledger, task_id: str, ids: Sequence[int], **kw: Any) -> list[Pair]:
    """Claim rows at their current commit_id; their new pairs, by id."""
    pairs = [(r[0], r[2]) for r in ledger.find(task_id=task_id, ids=ids)]
    got = ledger.claim(task_id, pairs, lease=LEASE, worker="w", **kw)
    assert [j.id for j in got] == sorted(ids)
    return [(j.id, j.commit_id) for j in got]


def test_the_reaper_reads_leases_only_and_the_sweep_dispatch_deadlines_only(
    ledger: Ledger,
) -> None:
    """A todo row whose dispatch deadline passed is no zombie, and a doing row whose
    lease expired is not swept: each scan reads its own column."""
    task_id = unique_task_id("cf")
    todo, doing = push(ledger, task_id, 2)
    now = host_now()
    ledger.mark_due([(todo, 0)])  # overdue since the epoch
    (pd,) = claim(ledger, task_id, [doing], now=now)
    late = now + LEASE + TIMEOUT + timedelta(seconds=1)
    assert [z.id for z in ledger.expired_leases(task_id, limit=10, now=late)] == [doing]
    swept = ledger.sweep(
        task_id, now=late, cutoffs={"default": late}, limit=10, redispatch_timeout=TIMEOUT
    )
    assert [m.job_id for m in swept] == [todo]
    assert state(ledger, doing) == (Status.DOING, pd[1])
    assert ledger.dispatch_deadlines([pd]) == {}
    page = ledger.todo_page(task_id, after=None, limit=10)
    assert [m.job_id for m, _ in page] == [todo]


# -- heartbeat and start marks ------------------------------------------------------------


def test_heartbeat_renews_current_claims_and_reports_the_others_lost(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    a, b, c = push(ledger, task_id, 3)
    pa, pb, pc = claim(ledger, task_id, [a, b, c])
    now = host_now()
    ledger.finish([Outcome(*pc, Status.DONE)], now=now, redispatch_timeout=TIMEOUT)
    stale = (b, pb[1] + 1)
    renewal = ledger.heartbeat([pa, stale, pc], lease=LEASE)
    assert (renewal.renewed, renewal.skipped, renewal.lost) == ({pa}, set(), {stale, pc})
    assert state(ledger, b) == (Status.DOING, pb[1])  # not a transition: unchanged


def test_heartbeat_skips_a_locked_row_and_renews_the_others(locking: Ledger) -> None:
    ledger = locking
    task_id = unique_task_id("cf")
    a, b = push(ledger, task_id, 2)
    pa, pb = claim(ledger, task_id, [a, b])
    with row_locked(ledger, a):
        renewal = within_deadline(lambda: ledger.heartbeat([pa, pb], lease=LEASE), "heartbeat")
    assert (renewal.renewed, renewal.skipped, renewal.lost) == ({pb}, {pa}, set())


def test_start_marks_current_unmarked_unexpired_claims_only(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    a, b, c = push(ledger, task_id, 3)
    t0 = host_now()
    pa, pb, pc = claim(ledger, task_id, [a, b, c], now=t0)
    assert ledger.start([pa, (b, pb[1] + 1)], now=t0) == 1  # b: stale commit_id
    assert ledger.start([pa], now=t0) == 0  # already marked
    assert ledger.start([pc], now=t0 + LEASE + timedelta(seconds=1)) == 0  # lease expired
    recs = [ledger.get(i) for i in (a, b, c)]
    assert [r is not None and r.started_at is not None for r in recs] == [True, False, False]
    assert [state(ledger, i)[1] for i in (a, b, c)] == [pa[1], pb[1], pc[1]]  # no transition
    # a commit records the start if the mark did not, and keeps a mark that was written
    later = t0 + timedelta(seconds=2)
    ledger.finish(
        [Outcome(*pa, Status.DONE), Outcome(*pb, Status.DONE)],
        now=later,
        redispatch_timeout=TIMEOUT,
    )
    ra, rb = ledger.get(a), ledger.get(b)
    assert ra is not None and rb is not None
    assert ra.started_at == recs[0].started_at  # type: ignore[union-attr]
    assert rb.started_at == later


def test_start_marks_by_the_database_clock(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    (job_id,) = push(ledger, task_id)
    (pair,) = claim(ledger, task_id, [job_id])
    before = db_now(ledger)
    assert ledger.start([pair]) == 1
    after = db_now(ledger)
    rec = ledger.get(job_id)
    assert rec is not None and rec.started_at is not None
    assert before <= rec.started_at <= after


# -- finish (group commit) and release ----------------------------------------------------


def test_group_commit_applies_exactly_the_current_outcomes(ledger: Ledger) -> None:
    """Outcomes of every status in one call, with a stale member and one not doing: the
    winners change (failed attempts counted), the others are untouched."""
    task_id = unique_task_id("cf")
    a, b, c, d, e = push(ledger, task_id, 5)
    pa, pb, pc, pd = claim(ledger, task_id, [a, b, c, d])
    now = host_now()
    retry_at = now + timedelta(seconds=30)
    won = ledger.finish(
        [
            Outcome(*pa, Status.DONE),
            Outcome(*pb, Status.FAILED, "boom"),
            Outcome(*pc, Status.TODO, "again", run_at=retry_at),
            Outcome(d, pd[1] + 7, Status.DONE),  # stale
            Outcome(e, 0, Status.DONE),  # not doing
        ],
        now=now,
        redispatch_timeout=TIMEOUT,
    )
    assert won == {pa, pb, pc}
    ra, rb, rc, rd, re_ = (ledger.get(i) for i in (a, b, c, d, e))
    assert ra is not None and rb is not None and rc is not None and rd is not None
    assert re_ is not None
    assert (ra.status, ra.commit_id, ra.failed_times, ra.expires_at) == (
        Status.DONE,
        pa[1] + 1,
        0,
        None,
    )
    assert (rb.status, rb.failed_times, rb.last_error) == (Status.FAILED, 1, "boom")
    assert (rc.status, rc.failed_times, rc.last_error, rc.run_at) == (
        Status.TODO,
        1,
        "again",
        retry_at,
    )
    assert (rc.expires_at, rc.dispatch_deadline) == (None, retry_at + TIMEOUT)
    assert (rd.status, rd.commit_id) == (Status.DOING, pd[1])
    assert (re_.status, re_.commit_id) == (Status.TODO, 0)
    # the same commit again is stale as a whole
    assert ledger.finish([Outcome(*pa, Status.DONE)], now=now, redispatch_timeout=TIMEOUT) == set()


def test_release_puts_unstarted_claims_back_uncharged(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    a, b = push(ledger, task_id, 2)
    pa, pb = claim(ledger, task_id, [a, b])
    now = host_now()
    won = ledger.release([pa, (b, pb[1] + 1)], now=now, dispatch_deadline=now + TIMEOUT)
    assert won == {pa}
    rec = ledger.get(a)
    assert rec is not None and (rec.status, rec.commit_id, rec.failed_times) == (
        Status.TODO,
        pa[1] + 1,
        0,
    )
    assert state(ledger, b) == (Status.DOING, pb[1])


def test_outstanding_counts_due_todo_and_this_workers_doing_rows(ledger: Ledger) -> None:
    """What a burst worker waits for: todo rows due by ``now`` and doing rows claimed
    by this worker; not delayed ones, nor another worker's claims, nor finished rows."""
    task_id = unique_task_id("cf")
    now = host_now()
    assert ledger.outstanding(task_id, "w", now=now) == 0
    a, b, _ = push(ledger, task_id, 3)
    push(ledger, task_id, 1, run_at=now + timedelta(hours=1))  # not due
    assert ledger.outstanding(task_id, "w", now=now + timedelta(seconds=1)) == 3
    assert ledger.outstanding(task_id, "w", now=now + timedelta(hours=2)) == 4
    (pa,) = claim(ledger, task_id, [a])  # doing, claimed by "w"
    got = ledger.claim(task_id, [(b, 0)], lease=LEASE, worker="other")
    assert [j.id for j in got] == [b]
    later = now + timedelta(seconds=1)
    assert ledger.outstanding(task_id, "w", now=later) == 2  # a (mine) and c (due)
    assert ledger.outstanding(task_id, "other", now=later) == 2  # b and c
    ledger.finish([Outcome(a, pa[1], Status.DONE)], now=host_now(), redispatch_timeout=TIMEOUT)
    assert ledger.outstanding(task_id, "w", now=later) == 1  # c
    assert ledger.outstanding(unique_task_id("cf"), "w", now=later) == 0  # per task


def test_a_commit_waits_on_a_locked_row_only_as_long_as_its_bounds_allow(
    locking: Ledger,
) -> None:
    """The service engine's bounds: a commit of a row another session holds locked fails
    with a lock timeout (meepo's error) instead of waiting for it."""
    ledger = locking
    task_id = unique_task_id("cf")
    (job_id,) = push(ledger, task_id)
    (pair,) = claim(ledger, task_id, [job_id])
    bounded = make_engine(
        ledger.engine.url.render_as_string(hide_password=False), bounds=Bounds.from_lease(3.0)
    )
    try:
        service = Ledger(bounded, "meepo_jobs", driver=ledger.driver.name)
        now = host_now()
        with row_locked(ledger, job_id), pytest.raises(LedgerUnavailableError):
            within_deadline(
                lambda: service.finish(
                    [Outcome(*pair, Status.DONE)], now=now, redispatch_timeout=TIMEOUT
                ),
                "the bounded commit",
            )
        assert state(ledger, job_id) == (Status.DOING, pair[1])
        won = service.finish([Outcome(*pair, Status.DONE)], now=now, redispatch_timeout=TIMEOUT)
        assert won == {pair}
    finally:
        bounded.dispose()


# -- reap ---------------------------------------------------------------------------------


def test_reap_applies_the_zombie_policy(ledger: Ledger) -> None:
    """Started zombies are charged a failed attempt (requeued, or failed at the limit);
    an unstarted one goes back uncharged, orphaned_claims + 1."""
    task_id = unique_task_id("cf")
    ids = push(ledger, task_id, 3)
    t0 = host_now()
    pairs = claim(ledger, task_id, ids, now=t0)
    started, unstarted, at_limit = pairs
    assert ledger.start([started, at_limit], now=t0) == 2
    t = ledger.table
    with ledger.engine.begin() as conn:
        conn.execute(update(t).where(t.c.id == at_limit[0]).values(failed_times=2))
    late = t0 + LEASE + timedelta(seconds=1)
    zombies = ledger.expired_leases(task_id, limit=10, now=late)
    assert sorted(z.id for z in zombies) == ids
    assert {z.id: z.started for z in zombies} == {ids[0]: True, ids[1]: False, ids[2]: True}
    reaped = ledger.reap(
        zombies, dst=Status.TODO, max_failed_times=3, redispatch_timeout=TIMEOUT, now=late
    )
    assert sorted((m.job_id, m.commit_id) for m in reaped.requeued) == [
        (started[0], started[1] + 1),
        (unstarted[0], unstarted[1] + 1),
    ]
    assert (reaped.closed, reaped.unstarted) == (1, 1)
    rs, ru, rl = (ledger.get(i) for i in ids)
    assert rs is not None and ru is not None and rl is not None
    assert (rs.status, rs.failed_times, rs.orphaned_claims) == (Status.TODO, 1, 0)
    assert (ru.status, ru.failed_times, ru.orphaned_claims) == (Status.TODO, 0, 1)
    assert (rl.status, rl.failed_times) == (Status.FAILED, 3)
    assert (rs.expires_at, rs.dispatch_deadline) == (None, late + TIMEOUT)
    assert (rl.expires_at, rl.dispatch_deadline) == (None, None)


def test_reap_rechecks_the_lease_under_its_lock(ledger: Ledger) -> None:
    """A heartbeat between the expired-lease scan and the locked step keeps the lease,
    and the worker's commit is accepted."""
    task_id = unique_task_id("cf")
    (job_id,) = push(ledger, task_id)
    t0 = host_now()
    (pair,) = claim(ledger, task_id, [job_id], now=t0)
    late = t0 + LEASE + timedelta(seconds=1)
    zombies = ledger.expired_leases(task_id, limit=10, now=late)
    assert [z.id for z in zombies] == [job_id]
    assert ledger.heartbeat([pair], lease=LEASE, now=late).renewed == {pair}
    reaped = ledger.reap(
        zombies, dst=Status.TODO, max_failed_times=3, redispatch_timeout=TIMEOUT, now=late
    )
    assert (reaped.requeued, reaped.closed) == ([], 0)
    assert state(ledger, job_id) == (Status.DOING, pair[1])
    won = ledger.finish([Outcome(*pair, Status.DONE)], now=late, redispatch_timeout=TIMEOUT)
    assert won == {pair}


def test_reap_rechecks_that_an_unstarted_zombie_did_not_start_since_the_scan(
    ledger: Ledger,
) -> None:
    """The scan saw an unstarted claim; it was marked started and expired again before
    the locked step: the locked step leaves it (a later scan judges it afresh)."""
    task_id = unique_task_id("cf")
    (job_id,) = push(ledger, task_id)
    t0 = host_now()
    (pair,) = claim(ledger, task_id, [job_id], now=t0)
    late = t0 + LEASE + timedelta(seconds=1)
    zombies = ledger.expired_leases(task_id, limit=10, now=late)
    assert [z.started for z in zombies] == [False]
    assert ledger.start([pair], now=t0) == 1
    reaped = ledger.reap(
        zombies, dst=Status.TODO, max_failed_times=3, redispatch_timeout=TIMEOUT, now=late
    )
    assert (reaped.requeued, reaped.closed) == ([], 0)
    assert state(ledger, job_id) == (Status.DOING, pair[1])


def test_reap_skips_a_locked_row_and_reaps_the_others(locking: Ledger) -> None:
    ledger = locking
    task_id = unique_task_id("cf")
    a, b = push(ledger, task_id, 2)
    t0 = host_now()
    pa, pb = claim(ledger, task_id, [a, b], now=t0)
    ledger.start([pa, pb], now=t0)
    late = t0 + LEASE + timedelta(seconds=1)
    zombies = ledger.expired_leases(task_id, limit=10, now=late)
    with row_locked(ledger, a):
        reaped = within_deadline(
            lambda: ledger.reap(
                zombies, dst=Status.TODO, max_failed_times=3, redispatch_timeout=TIMEOUT, now=late
            ),
            "the reaper",
        )
    assert [(m.job_id, m.commit_id) for m in reaped.requeued] == [(b, pb[1] + 1)]
    assert state(ledger, a) == (Status.DOING, pa[1])
    again = ledger.expired_leases(task_id, limit=10, now=late)
    reaped = ledger.reap(
        again, dst=Status.TODO, max_failed_times=3, redispatch_timeout=TIMEOUT, now=late
    )
    assert [(m.job_id, m.commit_id) for m in reaped.requeued] == [(a, pa[1] + 1)]


def test_reap_judges_by_the_database_clock(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    (job_id,) = push(ledger, task_id)
    (pair,) = claim(ledger, task_id, [job_id])
    zombies = ledger.expired_leases(task_id, limit=10, now=host_now() + 2 * LEASE)
    assert [z.id for z in zombies] == [job_id]
    # judged by the database's clock now, the lease has not expired: nothing is reaped
    reaped = ledger.reap(zombies, dst=Status.TODO, max_failed_times=3, redispatch_timeout=TIMEOUT)
    assert (reaped.requeued, reaped.closed) == ([], 0)
    assert state(ledger, job_id) == (Status.DOING, pair[1])


# -- sweep and recovery -------------------------------------------------------------------


def test_sweep_redispatches_todo_rows_past_their_deadline_only(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    now = host_now()
    lost = [
        r.id
        for r in ledger.insert(
            task_id,
            [NewJob(b"a"), NewJob(b"b", priority="high")],
            now=now,
            redispatch_timeout=TIMEOUT,
            never_dispatched=True,
        )
    ]
    (waiting,) = push(ledger, task_id)  # its message is in a queue: deadline ahead
    (later,) = ledger.insert(
        task_id,
        [NewJob(b"c", run_at=now + timedelta(hours=1))],
        now=now,
        redispatch_timeout=TIMEOUT,
        never_dispatched=True,
    )
    got = ledger.sweep(
        task_id,
        now=now,
        cutoffs={"default": now, "high": now},
        limit=10,
        redispatch_timeout=TIMEOUT,
    )
    assert sorted((m.job_id, m.commit_id, m.priority) for m in got) == [
        (lost[0], 1, "default"),
        (lost[1], 1, "high"),
    ]
    assert state(ledger, waiting) == (Status.TODO, 0)
    assert state(ledger, later.id) == (Status.TODO, 0)
    rec = ledger.get(lost[0])
    assert rec is not None and (rec.expires_at, rec.dispatch_deadline) == (None, now + TIMEOUT)
    # swept rows have a deadline again: a second sweep leaves them
    assert (
        ledger.sweep(
            task_id, now=now, cutoffs={"default": now}, limit=10, redispatch_timeout=TIMEOUT
        )
        == []
    )


def test_sweep_cutoffs_apply_per_priority(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    now = host_now()
    jobs = [NewJob(b"a"), NewJob(b"b", priority="high"), NewJob(b"c", priority="other")]
    ids = [r.id for r in ledger.insert(task_id, jobs, now=now, redispatch_timeout=TIMEOUT)]
    # only "high" judges every deadline before now + 2 * TIMEOUT as lost; "other" is not
    # listed and uses the default's cutoff
    got = ledger.sweep(
        task_id,
        now=now,
        cutoffs={"default": now, "high": now + 2 * TIMEOUT},
        limit=10,
        redispatch_timeout=TIMEOUT,
    )
    assert [m.job_id for m in got] == [ids[1]]


def test_sweep_skips_a_locked_row(locking: Ledger) -> None:
    ledger = locking
    task_id = unique_task_id("cf")
    now = host_now()
    a, b = (
        r.id
        for r in ledger.insert(
            task_id,
            [NewJob(b"a"), NewJob(b"b")],
            now=now,
            redispatch_timeout=TIMEOUT,
            never_dispatched=True,
        )
    )
    with row_locked(ledger, a):
        got = within_deadline(
            lambda: ledger.sweep(
                task_id, now=now, cutoffs={"default": now}, limit=10, redispatch_timeout=TIMEOUT
            ),
            "the sweep",
        )
    assert [m.job_id for m in got] == [b]
    assert state(ledger, a) == (Status.TODO, 0)


def test_mark_due_and_dispatch_deadlines(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    a, b = push(ledger, task_id, 2)
    before = ledger.dispatch_deadlines([(a, 0), (b, 0), (b, 9)])
    assert set(before) == {(a, 0), (b, 0)} and before[(a, 0)] > NEVER_DISPATCHED
    ledger.mark_due([(a, 0), (b, 9)])
    after = ledger.dispatch_deadlines([(a, 0), (b, 0)])
    assert after == {(a, 0): NEVER_DISPATCHED, (b, 0): before[(b, 0)]}


def test_recovery_pages_through_every_todo_row_read_only(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    ids = push(ledger, task_id, 5)
    (doing,) = claim(ledger, task_id, [ids[2]])
    seen: list[int] = []
    after: tuple[datetime, int] | None = None
    while True:
        page = ledger.todo_page(task_id, after=after, limit=2)
        if not page:
            break
        seen.extend(m.job_id for m, _ in page)
        last, exp = page[-1]
        after = (exp, last.job_id)
    assert sorted(seen) == sorted(set(ids) - {doing[0]}) and len(seen) == 4
    assert all(state(ledger, i) == (Status.TODO, 0) for i in seen)


# -- admin --------------------------------------------------------------------------------


def test_repush_moves_any_status_to_todo_and_skips_moved_jobs(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    a, b, c = push(ledger, task_id, 3, priority="high")
    pa, pb = claim(ledger, task_id, [a, b])
    now = host_now()
    ledger.finish([Outcome(*pa, Status.FAILED, "x")], now=now, redispatch_timeout=TIMEOUT)
    got = ledger.repush([(a, pa[1] + 1), (b, pb[1]), (c, 3)], now=now, redispatch_timeout=TIMEOUT)
    assert [(m.job_id, m.commit_id, m.priority) for m in got] == [
        (a, pa[1] + 2, "high"),
        (b, pb[1] + 1, "high"),
    ]
    rec = ledger.get(a)
    assert rec is not None and (rec.status, rec.failed_times, rec.run_at) == (Status.TODO, 0, now)
    assert state(ledger, c) == (Status.TODO, 0)


def test_commit_one_is_fenced_and_names_what_it_found(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    (job_id,) = push(ledger, task_id, priority="high")
    (pair,) = claim(ledger, task_id, [job_id])
    now = host_now()
    with pytest.raises(StaleCommitError, match="stale"):
        ledger.commit_one(
            task_id, Outcome(job_id, pair[1] + 1, Status.DONE), now=now, redispatch_timeout=TIMEOUT
        )
    with pytest.raises(JobNotFoundError):
        ledger.commit_one(
            "no_such_task", Outcome(*pair, Status.DONE), now=now, redispatch_timeout=TIMEOUT
        )
    got = ledger.commit_one(
        task_id, Outcome(*pair, Status.DONE), now=now, redispatch_timeout=TIMEOUT
    )
    assert got == (pair[1] + 1, "high")
    assert state(ledger, job_id) == (Status.DONE, pair[1] + 1)


def test_admin_reads(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    a, b, c = push(ledger, task_id, 3)
    (pa,) = claim(ledger, task_id, [a])
    assert ledger.get(a, task_id) is not None and ledger.get(a, "other") is None
    assert ledger.find(task_id=task_id) == [
        (a, task_id, pa[1], Status.DOING),
        (b, task_id, 0, Status.TODO),
        (c, task_id, 0, Status.TODO),
    ]
    assert [r[0] for r in ledger.find(task_id=task_id, status=Status.TODO, limit=1)] == [b]
    assert [r[0] for r in ledger.find(ids=[c, a], after_id=a)] == [c]
    (stats,) = ledger.stats(task_id)
    assert stats.counts == {Status.DOING: 1, Status.TODO: 2}
    assert stats.oldest_todo is not None
    assert ledger.priorities([a, b]) == {a: "default", b: "default"}


# -- schedule fire ------------------------------------------------------------------------


def _schedule(ledger: Ledger) -> tuple[Any, dict[str, Any]]:
    task_id = unique_task_id("cf")
    now = host_now()
    rec, _ = Schedules(ledger.engine, "meepo_jobs").declare(
        task_id, Spec.every("tick", 60, b"p", "default"), now
    )
    assert rec.next_fire_at is not None
    values = {
        "next_fire_at": rec.next_fire_at + timedelta(seconds=60),
        "last_fire_at": rec.next_fire_at,
        "updated_at": max(now, rec.updated_at + timedelta(microseconds=1)),
    }
    return rec, values


def test_schedule_declarations_are_keyed_and_redeclared_by_compare_and_set(
    ledger: Ledger,
) -> None:
    """A second declaration of one (task, name) is refused by the key; a redeclaration
    wins only against the row as it was read (its updated_at); get, list and delete."""
    d = ledger.driver
    task_id = unique_task_id("cf")
    now = host_now()
    row = {
        "task_id": task_id, "name": "tick", "kind": "every", "expr": "60", "tz": "UTC",
        "payload": b"p", "priority": "default", "start_at": None, "until_at": None,
        "misfire": "one", "next_fire_at": now, "last_fire_at": None, "created_at": now,
        "updated_at": now,
    }  # fmt: skip
    assert d.insert_schedule(row) is True
    assert d.insert_schedule({**row, "expr": "30"}) is False
    rec = d.get_schedule(task_id, "tick")
    assert rec is not None and (rec.expr, rec.updated_at) == ("60", now)
    later = now + timedelta(seconds=1)
    stale = now - timedelta(seconds=1)
    assert d.redeclare_schedule(task_id, "tick", stale, {"expr": "5", "updated_at": later}) is False
    assert d.redeclare_schedule(task_id, "tick", now, {"expr": "30", "updated_at": later}) is True
    assert d.redeclare_schedule(task_id, "tick", now, {"expr": "5", "updated_at": later}) is False
    assert d.insert_schedule({**row, "name": "tock"}) is True
    got = [(r.name, r.expr) for r in d.list_schedules(task_id)]
    assert got == [("tick", "30"), ("tock", "60")]
    assert any(r.task_id == task_id for r in d.list_schedules(None))
    assert d.delete_schedule(task_id, "tick") is True
    assert d.delete_schedule(task_id, "tick") is False
    assert d.get_schedule(task_id, "tick") is None


def test_a_schedule_fire_time_is_won_once(ledger: Ledger) -> None:
    rec, values = _schedule(ledger)
    with ledger.begin() as conn:
        assert ledger.driver.fire_schedule(conn, rec, values)
    with ledger.begin() as conn:
        assert not ledger.driver.fire_schedule(conn, rec, values)
    due = ledger.driver.due_schedules(rec.task_id, values["next_fire_at"], 10)
    assert [(r.name, r.next_fire_at) for r in due] == [("tick", values["next_fire_at"])]
    assert ledger.driver.next_schedule_due(rec.task_id) == values["next_fire_at"]


def test_a_schedule_fire_racing_an_uncommitted_winner_loses(locking: Ledger) -> None:
    """Two schedulers read the same row; the first one's fire is not committed yet when
    the second fires: the second waits for it, re-checks and loses."""
    ledger = locking
    rec, values = _schedule(ledger)
    first = ledger.engine.connect()
    trans = first.begin()
    try:
        assert ledger.driver.fire_schedule(first, rec, values)
        results: list[bool] = []

        def second() -> None:
            with ledger.begin() as conn:
                results.append(ledger.driver.fire_schedule(conn, rec, values))

        thread = threading.Thread(target=second, daemon=True)
        thread.start()
        trans.commit()
        thread.join(DEADLINE)
        assert results == [False]
    finally:
        first.close()


# -- the drivers' own forms ---------------------------------------------------------------

#: A mark of each driver's claim statement(s): the form under test is the driver's own.
CLAIM_FORM = {"portable": None, "postgres": "ANY(", "mysql": "FORCE INDEX (PRIMARY)"}


def test_each_driver_runs_its_own_claim_form(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    ids = push(ledger, task_id, 2)
    seen: list[str] = []

    def record(_conn: Any, _cur: Any, statement: str, *_rest: Any) -> None:
        seen.append(statement)

    event.listen(ledger.engine, "before_cursor_execute", record)
    try:
        claim(ledger, task_id, ids)
    finally:
        event.remove(ledger.engine, "before_cursor_execute", record)
    mark = CLAIM_FORM[ledger.driver.name]
    if mark is None:  # portable: SQLAlchemy's own statements, no server hints
        assert not any("FORCE INDEX" in s or "ANY(" in s for s in seen), seen
    else:
        assert any(mark in s for s in seen), seen


# -- round trips of the hot path (MariaDB) ----------------------------------------------


@contextlib.contextmanager
def mysql_round_trips() -> Iterator[list[int]]:
    """Counts the commands PyMySQL sends (each a round trip: a query or a script,
    COMMIT, ROLLBACK, a ping), by wrapping the method that sends them."""
    from pymysql.connections import Connection as PyMySQLConnection

    sent = [0]
    original = PyMySQLConnection._execute_command

    def counted(self: Any, command: int, sql: Any) -> Any:
        sent[0] += 1
        return original(self, command, sql)

    PyMySQLConnection._execute_command = counted
    try:
        yield sent
    finally:
        PyMySQLConnection._execute_command = original


def test_the_mysql_drivers_hot_path_is_one_round_trip_each(sqlite_url: str) -> None:
    """claim, heartbeat (renewed, skipped and lost leases alike), start and commit each
    send one packet on MariaDB."""
    ledger = _ledger(("mysql", "mariadb"), sqlite_url)
    task_id = unique_task_id("cf")
    ids = push(ledger, task_id, 4)
    ledger.claim(task_id, [(ids[0], 0)], lease=LEASE, worker="w")  # a warm connection
    with mysql_round_trips() as sent:
        jobs = ledger.claim(task_id, [(i, 0) for i in ids[1:]], lease=LEASE, worker="w")
    assert (len(jobs), sent[0]) == (3, 1)
    pa, pb, pc = [(j.id, j.commit_id) for j in jobs]
    ledger.finish([Outcome(*pc, Status.DONE)], now=host_now(), redispatch_timeout=TIMEOUT)
    with row_locked(ledger, pb[0]):
        ledger.heartbeat([pa], lease=LEASE)  # a second pooled connection, warm
        with mysql_round_trips() as sent:
            renewal = within_deadline(lambda: ledger.heartbeat([pa, pb, pc], lease=LEASE), "beat")
    assert (renewal.renewed, renewal.skipped, renewal.lost, sent[0]) == ({pa}, {pb}, {pc}, 1)
    with mysql_round_trips() as sent:
        assert ledger.start([pa, pb], now=None) == 2
    assert sent[0] == 1
    with mysql_round_trips() as sent:
        won = ledger.finish(
            [Outcome(*pa, Status.DONE), Outcome(*pb, Status.FAILED, "x")],
            now=host_now(),
            redispatch_timeout=TIMEOUT,
        )
    assert (won, sent[0]) == ({pa, pb}, 1)


def test_a_mysql_batch_commit_is_its_updates_then_commit(sqlite_url: str) -> None:
    """From OPTIMISTIC_PAIRS pairs on, a commit sends its UPDATEs, then COMMIT once every
    pair won (two packets, no locked read). With one stale pair among them the UPDATEs
    are rolled back and the locked script runs (two packets too): exactly the current
    pairs win, and the stale pair's job is left as it was."""
    ledger = _ledger(("mysql", "mariadb"), sqlite_url)
    task_id = unique_task_id("cf")
    n = OPTIMISTIC_PAIRS
    pairs = claim(ledger, task_id, push(ledger, task_id, 2 * n))
    first, second = pairs[:n], pairs[n:]

    def finish(batch: Sequence[Pair]) -> set[Pair]:
        outcomes = [Outcome(*p, Status.DONE) for p in batch]
        return ledger.finish(outcomes, now=host_now(), redispatch_timeout=TIMEOUT)

    with mysql_round_trips() as sent:
        won = finish(first)
    assert (won, sent[0]) == (set(first), 2)
    stale = second[0]
    ledger.release([stale], now=host_now(), dispatch_deadline=host_now() + TIMEOUT)  # requeued
    with mysql_round_trips() as sent:
        won = finish(second)
    assert (won, sent[0]) == (set(second[1:]), 2)
    for job_id, commit_id in second:
        rec = ledger.get(job_id)
        assert rec is not None
        want = (Status.TODO, commit_id + 1) if job_id == stale[0] else (Status.DONE, commit_id + 1)
        assert (rec.status, rec.commit_id) == want


def test_a_mysql_batch_claim_is_its_update_then_the_read(sqlite_url: str) -> None:
    """From OPTIMISTIC_PAIRS pairs on, a claim sends its UPDATE, then a plain read of the
    rows and COMMIT (two packets, no locked read); a batch with a stale pair rolls the
    UPDATE back and runs the locked script (two packets too)."""
    ledger = _ledger(("mysql", "mariadb"), sqlite_url)
    task_id = unique_task_id("cf")
    n = OPTIMISTIC_PAIRS
    ids = push(ledger, task_id, 2 * n)
    ledger.claim(task_id, [(ids[0], 0)], lease=LEASE, worker="w")  # a warm connection
    with mysql_round_trips() as sent:
        got = ledger.claim(task_id, [(i, 0) for i in ids[1 : n + 1]], lease=LEASE, worker="w")
    assert (len(got), sent[0]) == (n, 2)
    with mysql_round_trips() as sent:
        got = ledger.claim(task_id, [(i, 0) for i in ids[: n + 1]], lease=LEASE, worker="w")
    assert (len(got), sent[0]) == (0, 2)  # all stale: claimed above
    with mysql_round_trips() as sent:
        got = ledger.claim(task_id, [(i, 0) for i in ids[n:]], lease=LEASE, worker="w")
    assert ([j.id for j in got], sent[0]) == (ids[n + 1 :], 2)


def test_a_mysql_heartbeat_renews_exactly_the_rows_it_locked(sqlite_url: str) -> None:
    """The renewal names only the rows its locking read took: a skipped row keeps its
    lease end, a renewed one gets the new one, and a heartbeat of nothing current
    changes nothing."""
    ledger = _ledger(("mysql", "mariadb"), sqlite_url)
    task_id = unique_task_id("cf")
    pa, pb = claim(ledger, task_id, push(ledger, task_id, 2))
    before = {p: ledger.get(p[0]).expires_at for p in (pa, pb)}  # type: ignore[union-attr]
    with row_locked(ledger, pb[0]):
        renewal = within_deadline(lambda: ledger.heartbeat([pa, pb], lease=10 * LEASE), "heartbeat")
    assert (renewal.renewed, renewal.skipped) == ({pa}, {pb})
    after = {p: ledger.get(p[0]).expires_at for p in (pa, pb)}  # type: ignore[union-attr]
    assert after[pb] == before[pb]
    renewed_end, old_end = after[pa], before[pa]
    assert renewed_end is not None and old_end is not None and renewed_end > old_end
    stale = [(pa[0], pa[1] + 1), (pb[0], pb[1] + 1)]
    assert ledger.heartbeat(stale, lease=LEASE).lost == set(stale)
    assert {p: ledger.get(p[0]).expires_at for p in (pa, pb)} == after  # type: ignore[union-attr]


# -- cancellation and progress ------------------------------------------------------------


def test_cancel_closes_a_todo_job_and_its_old_message_is_not_claimed(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    a, b = push(ledger, task_id, 2)
    got = ledger.cancel([(a, 0)], [], now=host_now())
    assert (got.cancelled, got.requested, got.already) == ({(a, 0)}, set(), set())
    rec = ledger.get(a)
    assert rec is not None
    assert (rec.status, rec.commit_id, rec.cancel_requested) == (Status.CANCELLED, 1, True)
    assert rec.expires_at is None and rec.failed_times == 0
    claimed = ledger.claim(task_id, [(a, 0), (a, 1), (b, 0)], lease=LEASE, worker="w")
    assert [j.id for j in claimed] == [b]
    # a second cancel of the same claim loses (it moved), and changes nothing
    again = ledger.cancel([(a, 0)], [], now=host_now())
    assert again.cancelled == set() and state(ledger, a) == (Status.CANCELLED, 1)


def test_cancel_of_a_doing_job_flags_it_and_only_cancelled_ends_it(ledger: Ledger) -> None:
    """The flag is no transition (the claim stays current, the heartbeat reports it);
    the run's done outcome and a release lose to it; closing it makes it cancelled."""
    task_id = unique_task_id("cf")
    a, b = push(ledger, task_id, 2)
    pa, pb = claim(ledger, task_id, [a, b])
    got = ledger.cancel([], [pa], now=host_now())
    assert (got.cancelled, got.requested) == (set(), {pa})
    assert ledger.cancel([], [pa], now=host_now()).already == {pa}
    assert state(ledger, a) == (Status.DOING, pa[1])
    renewal = ledger.heartbeat([pa, pb], lease=LEASE)
    assert renewal.renewed == {pa, pb} and renewal.cancel == {pa}
    now = host_now()
    outcomes = [Outcome(*pa, Status.DONE), Outcome(*pb, Status.DONE)]
    assert ledger.finish(outcomes, now=now, redispatch_timeout=TIMEOUT) == {pb}
    assert ledger.release([pa], now=now, dispatch_deadline=now + TIMEOUT) == set()
    assert ledger.close_cancelled([pa, (b, pb[1] + 1)], now=now) == {pa}
    rec = ledger.get(a)
    assert rec is not None
    assert (rec.status, rec.commit_id, rec.failed_times) == (Status.CANCELLED, pa[1] + 1, 0)
    assert rec.expires_at is None


def test_a_cancelled_outcome_wins_and_a_todo_outcome_of_a_flagged_job_loses(
    ledger: Ledger,
) -> None:
    task_id = unique_task_id("cf")
    a, b = push(ledger, task_id, 2)
    pa, pb = claim(ledger, task_id, [a, b])
    ledger.cancel([], [pa, pb], now=host_now())
    now = host_now()
    outcomes = [
        Outcome(*pa, Status.CANCELLED, "ValueError: stopped early"),
        Outcome(*pb, Status.TODO, "RuntimeError: boom"),
    ]
    assert ledger.finish(outcomes, now=now, redispatch_timeout=TIMEOUT) == {pa}
    rec = ledger.get(a)
    assert rec is not None and rec.status is Status.CANCELLED and rec.failed_times == 0
    assert rec.last_error == "ValueError: stopped early"
    assert state(ledger, b) == (Status.DOING, pb[1])


def test_a_manual_commit_racing_a_cancel_exactly_one_wins(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    a, b = push(ledger, task_id, 2)
    pa, pb = claim(ledger, task_id, [a, b])
    now = host_now()
    # cancel first: the commit raises and the job is cancelled
    assert ledger.cancel([], [pa], now=now).requested == {pa}
    with pytest.raises(StaleCommitError, match="cancelled"):
        ledger.commit_one(task_id, Outcome(*pa, Status.DONE), now=now, redispatch_timeout=TIMEOUT)
    assert state(ledger, a) == (Status.CANCELLED, pa[1] + 1)
    # commit first: the cancel finds nothing to do
    ledger.commit_one(task_id, Outcome(*pb, Status.DONE), now=now, redispatch_timeout=TIMEOUT)
    got = ledger.cancel([], [pb], now=now)
    assert (got.cancelled, got.requested, got.already) == (set(), set(), set())
    assert state(ledger, b) == (Status.DONE, pb[1] + 1)


def test_reap_closes_a_cancel_requested_zombie_as_cancelled(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    a, b = push(ledger, task_id, 2)
    t0 = host_now()
    pa, pb = claim(ledger, task_id, [a, b], now=t0)
    assert ledger.start([pa, pb], now=t0) == 2
    ledger.cancel([], [pa], now=t0)
    late = t0 + LEASE + timedelta(seconds=1)
    zombies = ledger.expired_leases(task_id, limit=10, now=late)
    assert {z.id: z.cancel_requested for z in zombies} == {a: True, b: False}
    reaped = ledger.reap(
        zombies, dst=Status.TODO, max_failed_times=3, redispatch_timeout=TIMEOUT, now=late
    )
    assert [m.job_id for m in reaped.requeued] == [b] and reaped.closed == 1
    rec = ledger.get(a)
    assert rec is not None
    assert (rec.status, rec.failed_times) == (Status.CANCELLED, 0)


def test_reap_leaves_a_zombie_cancelled_since_the_scan_for_the_next_tick(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    (a,) = push(ledger, task_id)
    t0 = host_now()
    (pa,) = claim(ledger, task_id, [a], now=t0)
    late = t0 + LEASE + timedelta(seconds=1)
    zombies = ledger.expired_leases(task_id, limit=10, now=late)
    ledger.cancel([], [pa], now=t0)
    reaped = ledger.reap(
        zombies, dst=Status.TODO, max_failed_times=3, redispatch_timeout=TIMEOUT, now=late
    )
    assert (reaped.requeued, reaped.closed) == ([], 0)
    zombies = ledger.expired_leases(task_id, limit=10, now=late)
    reaped = ledger.reap(
        zombies, dst=Status.TODO, max_failed_times=3, redispatch_timeout=TIMEOUT, now=late
    )
    assert reaped.closed == 1 and state(ledger, a) == (Status.CANCELLED, pa[1] + 1)


def test_repush_of_a_cancelled_job_clears_the_cancel_and_the_progress(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    (a,) = push(ledger, task_id)
    (pa,) = claim(ledger, task_id, [a])
    assert ledger.progress([(pa, 0.5, "half")]) == {pa}
    ledger.cancel([], [pa], now=host_now())
    ledger.close_cancelled([pa], now=host_now())
    (msg,) = ledger.repush([(a, pa[1] + 1)], now=host_now(), redispatch_timeout=TIMEOUT)
    rec = ledger.get(a)
    assert rec is not None
    assert (rec.status, rec.commit_id, rec.cancel_requested) == (Status.TODO, msg.commit_id, False)
    assert (rec.progress, rec.progress_note) == (None, None)
    assert [j.id for j in ledger.claim(task_id, [(a, msg.commit_id)], lease=LEASE, worker="w")] == [
        a
    ]


def test_progress_is_fenced_by_the_claim(ledger: Ledger) -> None:
    """A current claim's report is written; a stale claim's changes nothing; a new claim
    starts with no progress."""
    task_id = unique_task_id("cf")
    a, b = push(ledger, task_id, 2)
    pa, pb = claim(ledger, task_id, [a, b])
    rec = ledger.get(a)
    assert rec is not None and (rec.progress, rec.progress_note) == (None, None)
    stale = (b, pb[1] - 1)
    assert ledger.progress([(pa, 0.25, "a quarter"), (stale, 0.9, "stale")]) == {pa}
    rec, other = ledger.get(a), ledger.get(b)
    assert rec is not None and other is not None
    assert (rec.progress, rec.progress_note) == (0.25, "a quarter")
    assert (other.progress, other.progress_note) == (None, None)
    assert state(ledger, a) == (Status.DOING, pa[1])  # not a transition
    now = host_now()
    ledger.finish([Outcome(*pa, Status.TODO, "E: again")], now=now, redispatch_timeout=TIMEOUT)
    assert ledger.progress([(pa, 1.0, None)]) == set()  # finished: stale
    ledger.claim(task_id, [(a, pa[1] + 1)], lease=LEASE, worker="w")
    rec = ledger.get(a)
    assert rec is not None and rec.status is Status.DOING
    assert (rec.progress, rec.progress_note) == (None, None)


# -- job management and retention ---------------------------------------------------------


def _retention(ledger: Ledger) -> Retention:
    """The job management and retention operations on the driver under test."""
    store = Retention(ledger.engine, "meepo_jobs", driver=ledger.driver.name)
    assert store.driver.name == ledger.driver.name
    return store


def finished(
    ledger: Ledger, task_id: str, status: Status, at: datetime, n: int, **job: Any
) -> list[int]:
    """``n`` jobs of ``task_id`` run and finished as ``status`` at ``at``; their ids."""
    ids = push(ledger, task_id, n, **job)
    pairs = claim(ledger, task_id, ids)
    outcomes = [
        Outcome(*p, status, error="boom" if status is Status.FAILED else None) for p in pairs
    ]
    assert ledger.finish(outcomes, now=at, redispatch_timeout=TIMEOUT) == set(pairs)
    return ids


def test_jobs_are_listed_and_matched_by_every_filter(ledger: Ledger) -> None:
    store = _retention(ledger)
    task_id = unique_task_id("jl")
    now = db_now(ledger)
    done = finished(ledger, task_id, Status.DONE, now - timedelta(hours=2), 2)
    failed = finished(ledger, task_id, Status.FAILED, now - timedelta(hours=1), 1)
    (keyed,) = push(ledger, task_id, key="k%", priority="high")
    todo = push(ledger, task_id, 2)
    every = sorted([*done, *failed, keyed, *todo])

    def listed(**f: Any) -> list[int]:
        got = store.list_jobs(JobFilter(task_id=task_id, **f), limit=100)
        assert got == sorted(got, key=lambda r: r.id)
        return [r.id for r in got]

    assert listed() == every
    assert listed(statuses=(Status.DONE, Status.FAILED)) == sorted([*done, *failed])
    assert listed(priority="high") == [keyed]
    assert listed(key="k%") == [keyed] and listed(key="k") == []
    assert listed(error_contains="BOO") == failed
    assert listed(since=now - timedelta(minutes=90), until=now - timedelta(minutes=30)) == failed
    assert listed(ids=(done[0], keyed, 10**12)) == sorted([done[0], keyed])
    page = store.list_jobs(JobFilter(task_id=task_id), limit=2, after_id=every[1])
    assert [r.id for r in page] == every[2:4]
    (rec,) = store.list_jobs(JobFilter(ids=(failed[0],)), limit=10)
    assert (rec.task_id, rec.status, rec.last_error, rec.payload) == (
        task_id, Status.FAILED, "boom", b"p0",
    )  # fmt: skip
    found = store.matching(JobFilter(task_id=task_id, statuses=(Status.TODO,)), after_id=keyed)
    assert found == [(i, task_id, 0, Status.TODO) for i in todo]
    (first,) = store.list_jobs(JobFilter(task_id=task_id), limit=1)
    assert store.matching(JobFilter(task_id=task_id), limit=1) == [
        (every[0], task_id, first.commit_id, Status.DONE)
    ]


def test_a_delete_is_a_compare_and_set_and_releases_the_keys(ledger: Ledger) -> None:
    store = _retention(ledger)
    task_id = unique_task_id("jd")
    (keyed,) = push(ledger, task_id, key="k")
    moved, kept = push(ledger, task_id, 2)
    found = store.matching(JobFilter(task_id=task_id))
    claim(ledger, task_id, [moved])  # moves since it was read
    assert store.delete(found) == sorted([keyed, kept])
    assert [r[0] for r in store.matching(JobFilter(task_id=task_id))] == [moved]
    assert ledger.unique_holder(task_id, "k") is None
    assert store.delete(found) == []


def test_a_retention_policy_is_stored_per_task_and_replaced(ledger: Ledger) -> None:
    store = _retention(ledger)
    a, b = unique_task_id("rp"), unique_task_id("rp")
    store.save_policy(a, {Status.DONE: 60.0, Status.FAILED: 0.5})
    store.save_policy(b, {Status.CANCELLED: 3600.0})
    assert store.policy(a) == {Status.DONE: 60.0, Status.FAILED: 0.5}
    store.save_policy(a, {Status.FAILED: 1.25})
    assert store.policy(a) == {Status.FAILED: 1.25}
    every = store.policies()
    assert (every[a], every[b]) == ({Status.FAILED: 1.25}, {Status.CANCELLED: 3600.0})
    store.save_policy(a, {})
    assert store.policy(a) == {} and a not in store.policies()


def test_the_purge_statements_take_old_finished_rows_only(ledger: Ledger) -> None:
    """count_finished, finished_page (order, cursor), key_holds and remove_finished:
    only finished rows of the status, task and age asked for, in (updated_at, id)
    order; a row that left its status since the read is not removed; archiving copies
    every column."""
    store = _retention(ledger)
    d = store.driver
    task_id, other = unique_task_id("pg"), unique_task_id("pg")
    now = db_now(ledger)
    cutoff = now - timedelta(hours=1)
    older = finished(ledger, task_id, Status.DONE, now - timedelta(hours=3), 2)
    old = finished(ledger, task_id, Status.DONE, now - timedelta(hours=2), 2)
    (holder,) = finished(
        ledger, task_id, Status.DONE, now - timedelta(hours=2), 1, key="k", unique_for=10**6
    )
    finished(ledger, task_id, Status.DONE, now, 1)  # too recent
    finished(ledger, task_id, Status.FAILED, now - timedelta(hours=3), 1)
    finished(ledger, other, Status.DONE, now - timedelta(hours=3), 1)
    push(ledger, task_id, 1)  # todo
    claim(ledger, task_id, push(ledger, task_id, 1))  # doing
    assert d.count_finished(task_id, Status.DONE, cutoff) == 5
    assert d.count_finished(task_id, Status.FAILED, cutoff) == 1
    assert d.count_finished(task_id, Status.CANCELLED, cutoff) == 0
    with d.begin_read_committed() as conn:
        page = d.finished_page(conn, task_id, Status.DONE, cutoff, after=None, limit=3)
        assert [i for i, _ in page] == [*older, old[0]]
        assert [at for _, at in page] == sorted(at for _, at in page)
        cursor = (page[-1][1], page[-1][0])
        rest = d.finished_page(conn, task_id, Status.DONE, cutoff, after=cursor, limit=10)
        assert [i for i, _ in rest] == [old[1], holder]
        assert d.key_holds(conn, task_id, [*older, *old, holder]) == [(holder, 10**9)]
    with ledger.begin() as conn:
        conn.execute(
            update(ledger.table).where(ledger.table.c.id == old[0]).values(status="failed")
        )
    with d.begin_read_committed() as conn:
        removed = d.remove_finished(
            conn, task_id, Status.DONE, cutoff, [*older, old[0]], archived_at=now
        )
        assert removed == 2
        removed = d.remove_finished(conn, task_id, Status.DONE, cutoff, [old[1]], archived_at=None)
        assert removed == 1
    assert d.count_finished(task_id, Status.DONE, cutoff) == 1
    a = store.archive
    with ledger.engine.connect() as conn:
        rows = conn.execute(a.select().where(a.c.id.in_(older)).order_by(a.c.id)).all()
        assert [(r.id, r.status, r.task_id, r.archived_at) for r in rows] == [
            (i, "done", task_id, now) for i in older
        ]
        assert conn.execute(a.select().where(a.c.id == old[1])).first() is None
    d.release_keys([task_id], [holder])
    assert ledger.unique_holder(task_id, "k") is None


def test_a_purge_page_skips_rows_another_session_holds_locked(locking: Ledger) -> None:
    store = _retention(locking)
    d = store.driver
    task_id = unique_task_id("pl")
    now = db_now(locking)
    ids = finished(locking, task_id, Status.DONE, now - timedelta(hours=2), 3)

    def page() -> list[int]:
        with d.begin_read_committed() as conn:
            rows = d.finished_page(conn, task_id, Status.DONE, now, after=None, limit=10)
            return [i for i, _ in rows]

    with row_locked(locking, ids[1]):
        assert within_deadline(page, "a purge page") == [ids[0], ids[2]]
    chunk = store.purge_chunk(task_id, Status.DONE, now)
    assert (chunk.removed, chunk.held, chunk.cursor) == (3, 0, None)


def test_the_database_clock_is_read_by_the_driver(ledger: Ledger) -> None:
    before = host_now()
    with ledger.engine.connect() as conn:
        got = ledger.driver.db_now(conn)
    assert got.tzinfo is not None and got.utcoffset() == timedelta(0)
    assert abs((got - before).total_seconds()) < 60  # the test's servers run on this host
    assert abs((_retention(ledger).db_now() - got).total_seconds()) < 60
