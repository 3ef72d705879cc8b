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
from sqlalchemy import Engine, event, update
from support.backends import backend_url, unique_task_id

from meepo.connect import engine_for
from meepo.errors import ConfigError, JobNotFoundError, LedgerUnavailableError, StaleCommitError
from meepo.ledger import NEVER_DISPATCHED, ROWS_PER_STATEMENT, Ledger, Outcome
from meepo.ledger.bounds import Bounds
from meepo.ledger.clock import host_now, read_db_now
from meepo.ledger.drivers import DRIVERS
from meepo.ledger.engine import make_engine
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


def db_now(engine: Engine) -> datetime:
    with engine.connect() as conn:
        return read_db_now(conn)


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
            .values(status="todo", commit_id=0, expires_at=before.expires_at, worker=None)
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
    (later,) = push(ledger, task_id, run_at=db_now(ledger.engine) + timedelta(seconds=60))
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


def test_claim_and_heartbeat_set_the_lease_by_the_database_clock(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    (job_id,) = push(ledger, task_id)
    before = db_now(ledger.engine)
    (pair,) = claim(ledger, task_id, [job_id])
    after = db_now(ledger.engine)
    rec = ledger.get(job_id)
    assert rec is not None and rec.expires_at is not None
    assert before + LEASE <= rec.expires_at <= after + LEASE
    before = db_now(ledger.engine)
    assert ledger.heartbeat([pair], lease=2 * LEASE).renewed == {pair}
    after = db_now(ledger.engine)
    rec = ledger.get(job_id)
    assert rec is not None and rec.expires_at is not None
    assert before + 2 * LEASE <= rec.expires_at <= after + 2 * LEASE
    assert ledger.expired_leases(task_id, limit=10) == []
    late = rec.expires_at + timedelta(seconds=1)
    assert [z.id for z in ledger.expired_leases(task_id, limit=10, now=late)] == [job_id]


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
    before = db_now(ledger.engine)
    assert ledger.start([pair]) == 1
    after = db_now(ledger.engine)
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
    assert rc.expires_at == retry_at + TIMEOUT
    assert (rd.status, rd.commit_id) == (Status.DOING, pd[1])
    assert (re_.status, re_.commit_id) == (Status.TODO, 0)
    # the same commit again is stale as a whole
    assert ledger.finish([Outcome(*pa, Status.DONE)], now=now, redispatch_timeout=TIMEOUT) == set()


def test_release_puts_unstarted_claims_back_uncharged(ledger: Ledger) -> None:
    task_id = unique_task_id("cf")
    a, b = push(ledger, task_id, 2)
    pa, pb = claim(ledger, task_id, [a, b])
    now = host_now()
    won = ledger.release([pa, (b, pb[1] + 1)], now=now, expires_at=now + TIMEOUT)
    assert won == {pa}
    rec = ledger.get(a)
    assert rec is not None and (rec.status, rec.commit_id, rec.failed_times) == (
        Status.TODO,
        pa[1] + 1,
        0,
    )
    assert state(ledger, b) == (Status.DOING, pb[1])


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
    assert rs.expires_at == late + TIMEOUT


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
    assert rec is not None and rec.expires_at == now + TIMEOUT
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
