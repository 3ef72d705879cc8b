"""Leases at the ledger level: the database's clock (docs/design.md invariant 8), the
reaper's locked step re-checking expiry, claim tokens that cannot repeat after a
failover (invariant 10), and heartbeats that never wait on another job's row lock
(invariant 9).

Real servers, no mocks; every wait has a deadline and no assertion is about how long
something took."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from conftest import SERVERS, backend_url, unique_task_id
from sqlalchemy import Engine, update

from meepo.connect import engine_for
from meepo.ledger import Ledger, Outcome
from meepo.ledger.clock import ServerClock, host_now, read_db_now
from meepo.records import NewJob, Status

LEASE = timedelta(seconds=6)
TIMEOUT = timedelta(seconds=20)


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    engine = engine_for(db_url)
    yield Ledger(engine, "meepo_jobs")


def db_now(engine: Engine) -> datetime:
    with engine.connect() as conn:
        return read_db_now(conn)


def push(ledger: Ledger, task_id: str, n: int = 1, *, delay: float = 0.0) -> list[int]:
    now = db_now(ledger.engine)
    jobs = [NewJob(b"x", run_at=now + timedelta(seconds=delay)) for _ in range(n)]
    return [r.id for r in ledger.insert(task_id, jobs, now=host_now(), redispatch_timeout=TIMEOUT)]


# -- #6: one clock ------------------------------------------------------------------------


def test_claim_and_heartbeat_set_the_lease_by_the_database_clock(ledger: Ledger) -> None:
    task_id = unique_task_id("lease")
    (job_id,) = push(ledger, task_id)
    before = db_now(ledger.engine)
    (job,) = ledger.claim(task_id, [(job_id, 0)], lease=LEASE, worker="w")
    after = db_now(ledger.engine)
    rec = ledger.get(job_id)
    assert rec is not None and rec.expires_at is not None
    assert before + LEASE <= rec.expires_at <= after + LEASE
    before = db_now(ledger.engine)
    renewal = ledger.heartbeat([(job_id, job.commit_id)], lease=2 * LEASE)
    after = db_now(ledger.engine)
    assert renewal.renewed == {(job_id, job.commit_id)} and not renewal.lost
    rec = ledger.get(job_id)
    assert rec is not None and rec.expires_at is not None
    assert before + 2 * LEASE <= rec.expires_at <= after + 2 * LEASE
    # not expired by the database's clock; expired for a reaper that is a lease ahead
    assert ledger.expired_leases(task_id, limit=10) == []
    later = rec.expires_at + timedelta(seconds=1)
    assert [z.id for z in ledger.expired_leases(task_id, limit=10, now=later)] == [job_id]


def test_claim_refuses_a_job_before_its_run_at(ledger: Ledger) -> None:
    """A current message of a job not due yet (promoted by a host whose clock runs
    ahead) is not claimed: it comes back as early, the row untouched."""
    task_id = unique_task_id("lease")
    (later,) = push(ledger, task_id, delay=60.0)
    (due,) = push(ledger, task_id)
    got = ledger.claim(task_id, [(later, 0), (due, 0)], lease=LEASE, worker="w")
    assert [j.id for j in got] == [due]
    assert [(m.job_id, m.commit_id) for m in got.early] == [(later, 0)]
    rec = ledger.get(later)
    assert rec is not None and (rec.status, rec.commit_id) == (Status.TODO, 0)
    assert got.early[0].run_at == rec.run_at
    assert got.now is not None and got.now < rec.run_at
    # once due (here: judged at an explicit time past it) it is claimed
    (job,) = ledger.claim(
        task_id, [(later, 0)], lease=LEASE, worker="w", now=rec.run_at + timedelta(seconds=1)
    )
    assert job.id == later


def test_server_clock_offset_is_measured(ledger: Ledger) -> None:
    clock = ServerClock(ledger.engine)
    offset = clock.measure()
    if clock.embedded:
        assert offset == 0.0
    else:
        assert clock.rtt is not None
        assert abs(offset) < 1.0  # the test's servers run on this host
    assert abs((clock.now() - host_now()).total_seconds() - offset) < 1.0


# -- #7: the reaper's locked step re-checks the lease --------------------------------------


def test_a_heartbeat_between_the_scan_and_the_locked_step_keeps_the_lease(
    ledger: Ledger,
) -> None:
    task_id = unique_task_id("lease")
    (job_id,) = push(ledger, task_id)
    t0 = host_now()
    (job,) = ledger.claim(task_id, [(job_id, 0)], lease=LEASE, worker="w", now=t0)
    late = t0 + LEASE + timedelta(seconds=1)
    zombies = ledger.expired_leases(task_id, limit=10, now=late)
    assert [z.id for z in zombies] == [job_id]
    # the consumer was only slow: its heartbeat lands before the reaper's locked step
    renewal = ledger.heartbeat([(job_id, job.commit_id)], lease=LEASE, now=late)
    assert renewal.renewed == {(job_id, job.commit_id)}
    requeued, closed, _ = ledger.reap(
        zombies, dst=Status.TODO, max_failed_times=3, redispatch_timeout=TIMEOUT, now=late
    )
    assert (requeued, closed) == ([], 0)
    rec = ledger.get(job_id)
    assert rec is not None and (rec.status, rec.commit_id) == (Status.DOING, job.commit_id)
    # the worker still holds it: its commit is accepted
    won = ledger.finish(
        [Outcome(job_id, job.commit_id, Status.DONE)], now=late, redispatch_timeout=TIMEOUT
    )
    assert won == {(job_id, job.commit_id)}


# -- #8: claim tokens after a failover ----------------------------------------------------


def test_a_claim_repeated_after_a_lost_commit_gets_another_token(ledger: Ledger) -> None:
    """A failover loses the commit of a claim (the row is back at its pre-claim state)
    and a duplicate message of the job is claimed again: the two claims' tokens differ,
    and the first worker's commit is rejected."""
    task_id = unique_task_id("lease")
    (job_id,) = push(ledger, task_id)
    before = ledger.get(job_id)
    assert before is not None
    (first,) = ledger.claim(task_id, [(job_id, 0)], lease=LEASE, worker="w1")
    t = ledger.table
    with ledger.engine.begin() as conn:  # the failover: the claim's commit is lost
        conn.execute(
            update(t)
            .where(t.c.id == job_id)
            .values(
                status=before.status.value,
                commit_id=before.commit_id,
                expires_at=before.expires_at,
                updated_at=before.updated_at,
                worker=None,
            )
        )
    (second,) = ledger.claim(task_id, [(job_id, 0)], lease=LEASE, worker="w2")
    assert first.commit_id != second.commit_id
    assert first.commit_id > 0 and second.commit_id > 0
    now = host_now()
    lost = ledger.finish(
        [Outcome(job_id, first.commit_id, Status.DONE)], now=now, redispatch_timeout=TIMEOUT
    )
    assert lost == set()
    assert ledger.heartbeat([(job_id, first.commit_id)], lease=LEASE).lost == {
        (job_id, first.commit_id)
    }
    won = ledger.finish(
        [Outcome(job_id, second.commit_id, Status.DONE)], now=now, redispatch_timeout=TIMEOUT
    )
    assert won == {(job_id, second.commit_id)}


# -- #4: a heartbeat never waits on another job's row lock --------------------------------


@pytest.fixture(params=SERVERS)
def server_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    return backend_url(request.param, sqlite_url)


def test_heartbeat_skips_a_locked_row_and_renews_the_others(server_url: str) -> None:
    engine = engine_for(server_url)
    ledger = Ledger(engine, "meepo_jobs")
    task_id = unique_task_id("lease")
    a, b = push(ledger, task_id, 2)
    ja, jb = ledger.claim(task_id, [(a, 0), (b, 0)], lease=LEASE, worker="w")
    t = ledger.table
    locker = engine.connect()
    locker.begin()
    # another session holds job a's row lock (a slow commit, an admin's transaction)
    locker.execute(t.select().where(t.c.id == a).with_for_update())
    result: list[object] = []
    done = threading.Event()

    def beat() -> None:
        try:
            result.append(
                ledger.heartbeat([(ja.id, ja.commit_id), (jb.id, jb.commit_id)], lease=LEASE)
            )
        except Exception as exc:  # reported below
            result.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=beat, daemon=True)
    before = ledger.get(b)
    try:
        thread.start()
        returned = done.wait(15)
    finally:
        locker.rollback()
        locker.close()
    thread.join(60)
    assert returned, "the heartbeat waited on another job's row lock"
    (renewal,) = result
    assert not isinstance(renewal, Exception), renewal
    assert renewal.renewed == {(jb.id, jb.commit_id)}  # type: ignore[attr-defined]
    assert renewal.skipped == {(ja.id, ja.commit_id)}  # type: ignore[attr-defined]
    assert renewal.lost == set()  # type: ignore[attr-defined]
    after = ledger.get(b)
    assert before is not None and after is not None
    assert after.expires_at is not None and before.expires_at is not None
    assert after.expires_at >= before.expires_at
    engine.dispose()
