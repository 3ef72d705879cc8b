"""The ledger's rules: every transition of the jobs table, one method each.

Each transition is a compare-and-set on ``commit_id`` that increments it (docs/design.md,
invariant 2): it names its precondition (``status`` and ``commit_id``) in the WHERE
clause, and a row that does not match is left alone and reported back as lost.
Batches share round trips but never the check: ``(id, commit_id) IN (…)`` keeps the
per-job compare-and-set.

This module decides *what* each transition checks and writes (the statuses it starts
from, the values, the zombie policy, the claim's random step, the unique key's
hand-over); the statements that do it are the driver's (:mod:`meepo.ledger.driver`,
one implementation per server in :mod:`meepo.ledger.drivers`), chosen once, at
construction. A driver only runs statements: it never decides who wins.

Statements, by caller:

* producer: :meth:`insert` (one row or a batch; a job with a unique key also takes or
  hands over its key in ``<table>_unique``)
* consumer: :meth:`claim` (todo → doing), :meth:`heartbeat` (lease renewal, no
  transition), :meth:`start` (start marks, no transition), :meth:`finish`
  (doing → done | failed | todo), :meth:`release`
  (doing → todo, unstarted jobs at shutdown)
* reaper: :meth:`expired_leases` + :meth:`reap` (doing → todo | done | failed),
  :meth:`sweep` (todo past its dispatch deadline → todo with a new commit_id),
  :meth:`todo_page` (read-only, for re-dispatch after Redis lost its data)
* admin: :meth:`commit_one`, :meth:`repush`, :meth:`cancel`, :meth:`get`, :meth:`stats`,
  :meth:`find`
* burst workers: :meth:`outstanding` (read-only)

Cancellation: a todo job is cancelled at once (todo → cancelled); a doing job is only
flagged (``cancel_requested``, not a transition: its runner's claim stays current). The
transitions that end a run as its consumer or the zombie policy decides (commit,
release, reaping) start from ``LIVE`` (doing, no cancel requested), so a flagged job
leaves ``doing`` only by :meth:`close_cancelled` (doing → cancelled, when its handler
ended, or by the reaper) or a repush: a cancel racing a commit is decided by the
row, exactly one of them wins.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Table
from sqlalchemy.exc import IntegrityError

from ..errors import JobNotFoundError, LedgerUnavailableError, StaleCommitError
from ..records import DEFAULT_PRIORITY, JobRecord, Message, NewJob, Pair, Status
from .clock import ServerClock, host_now
from .driver import (
    CANCEL_REQUESTED,
    LIVE,
    PLUS_ONE,
    Claimed,
    Coalesce,
    Group,
    Inserted,
    LedgerDriver,
    Outcome,
    PerRow,
    Progress,
    Reaped,
    Renewal,
    TaskStats,
    Zombie,
)
from .drivers import driver_for
from .engine import translate_errors
from .types import UTC

__all__ = [
    "CLAIM_STEP",
    "NEVER_DISPATCHED",
    "Cancelled",
    "Claimed",
    "Inserted",
    "Ledger",
    "Outcome",
    "Pair",
    "Reaped",
    "Renewal",
    "TaskStats",
    "Zombie",
    "claim_step",
]

#: ``dispatch_deadline`` of a todo row whose message was never sent (the epoch: before
#: any cutoff, so the next dispatch sweep sends it, whatever its queue holds).
NEVER_DISPATCHED = datetime(1970, 1, 1, tzinfo=UTC)

#: A claim adds a random step of 1 to CLAIM_STEP to commit_id (other transitions add 1).
CLAIM_STEP = 2**31


def claim_step() -> int:
    """The random step of one claim's commit_id: after a failover that lost recent
    commits, a second claim of the same row from the same (rolled back) commit_id draws
    another step, so two claims share a token with odds of 1 in 2**31. The step need not
    be secret, only different: ``random``'s generator (seeded from the OS at import and
    again in a forked child) draws it without the system call that ``secrets`` makes
    on every claim."""
    return random.randrange(CLAIM_STEP) + 1


def _error_text(error: str | None) -> str | None:
    if error is None:
        return None
    return error if len(error) <= 4000 else error[:3997] + "..."


@dataclass
class Cancelled:
    """What :meth:`Ledger.cancel` did: todo jobs it ``cancelled``, doing jobs whose
    cancel it ``requested``, doing jobs whose cancel was requested ``already``."""

    cancelled: set[Pair] = field(default_factory=set)
    requested: set[Pair] = field(default_factory=set)
    already: set[Pair] = field(default_factory=set)


def _normal(groups: Sequence[Group]) -> list[Group]:
    """Groups with their pairs sorted and unique, empty ones dropped."""
    return [(sorted(set(p)), list(s), v) for p, s, v in groups if p]


class Ledger:
    """The jobs table of one ledger (shared by many tasks), behind named transitions.

    ``driver`` names the statements' driver (``portable``, ``postgres``, ``mysql``);
    by default the one for the engine's server."""

    def __init__(self, engine: Engine, table_name: str, *, driver: str | None = None) -> None:
        self.engine = engine
        #: The statements (see meepo/ledger/drivers/), chosen once.
        self.driver: LedgerDriver = driver_for(engine, table_name, driver)
        self.table: Table = self.driver.table
        self.unique: Table = self.driver.unique
        self.table_name = table_name
        self.url = engine.url.render_as_string(hide_password=True)
        #: The database's time as this host estimates it (see clock.py).
        self.clock = ServerClock(engine, self.driver.db_now)

    # -- plumbing ---------------------------------------------------------------------

    def begin(self) -> contextlib.AbstractContextManager[Connection]:
        """A transaction on a pooled connection, errors translated to meepo's."""
        return self.driver.begin()

    def _transition(self, groups: Sequence[Group]) -> set[Pair]:
        """Apply compare-and-set groups; return the pairs that won (exactly)."""
        groups = _normal(groups)
        if not groups:
            return set()
        return self.driver.transition(groups)

    # -- producer ---------------------------------------------------------------------

    def insert(
        self,
        task_id: str,
        jobs: Sequence[NewJob],
        *,
        now: datetime,
        redispatch_timeout: timedelta,
        never_dispatched: bool = False,
        conn: Connection | None = None,
    ) -> list[Inserted]:
        """INSERT todo rows (commit_id 0), in ``jobs`` order.

        A row's ``dispatch_deadline`` is ``redispatch_timeout`` after it is
        due; ``never_dispatched`` makes it due for the dispatch sweep instead (for rows
        whose commit meepo cannot observe). A job with a ``key`` whose key is held by an
        unfinished job (or one finished less than ``unique_for`` ago) writes nothing and
        comes back as that job, ``created=False``.

        With ``conn`` the rows join the caller's transaction; otherwise they are
        committed before this returns.
        """
        if conn is None:
            if jobs and all(j.key is None for j in jobs):
                rows = [
                    self._row(task_id, j, now, redispatch_timeout, never_dispatched) for j in jobs
                ]
                return [Inserted(i, True) for i in self.driver.push(rows)]
            with self.begin() as c:
                return self._insert(c, task_id, jobs, now, redispatch_timeout, never_dispatched)
        with translate_errors(self.url, self.table_name):
            if not conn.in_transaction():
                # What an execute() would do (autobegin): the fast forms write on the
                # driver's cursor, and the caller's commit or rollback must cover them.
                conn.begin()
            return self._insert(conn, task_id, jobs, now, redispatch_timeout, never_dispatched)

    def _row(
        self,
        task_id: str,
        job: NewJob,
        now: datetime,
        redispatch_timeout: timedelta,
        never_dispatched: bool,
    ) -> dict[str, Any]:
        due = job.run_at or now
        return {
            "task_id": task_id,
            "status": Status.TODO.value,
            "payload": job.payload,
            "failed_times": 0,
            "commit_id": 0,
            "created_at": now,
            "updated_at": now,
            "run_at": due,
            "dispatch_deadline": (
                NEVER_DISPATCHED if never_dispatched else max(due, now) + redispatch_timeout
            ),
            "priority": job.priority,
        }

    def _insert(
        self,
        conn: Connection,
        task_id: str,
        jobs: Sequence[NewJob],
        now: datetime,
        redispatch_timeout: timedelta,
        never_dispatched: bool,
    ) -> list[Inserted]:
        out: list[Inserted | None] = [None] * len(jobs)
        plain = [i for i, j in enumerate(jobs) if j.key is None]
        rows = [
            self._row(task_id, jobs[i], now, redispatch_timeout, never_dispatched) for i in plain
        ]
        ids = self.driver.insert_rows(conn, rows) if rows else []
        for i, job_id in zip(plain, ids, strict=True):
            out[i] = Inserted(job_id, True)
        for i, job in enumerate(jobs):
            if job.key is not None:
                row = self._row(task_id, job, now, redispatch_timeout, never_dispatched)
                out[i] = self._insert_keyed(conn, task_id, job, row, now)
        return [x for x in out if x is not None]

    def _insert_keyed(
        self, conn: Connection, task_id: str, job: NewJob, row: dict[str, Any], now: datetime
    ) -> Inserted:
        """Insert a job that takes a unique key, or return the key's current holder.

        The key's row is inserted first (inside a savepoint): the primary key settles
        races between processes. On a conflict the holder is read with a locking read
        (the latest committed version, even under MySQL's REPEATABLE READ) and, if its
        job is finished and its hold has passed, handed over by a compare-and-set on
        ``job_id``.
        """
        d = self.driver
        key = job.key
        assert key is not None
        hold_ms = round(job.unique_for * 1000)
        for _ in range(10):
            savepoint = conn.begin_nested()
            try:
                job_id = d.insert_rows(conn, [row])[0]
                d.insert_key(conn, task_id, key, job_id, hold_ms, now)
                savepoint.commit()
                return Inserted(job_id, True)
            except IntegrityError:
                savepoint.rollback()
            holder = d.lock_key(conn, task_id, key)
            if holder is None:
                continue  # deleted meanwhile: try to insert again
            holder_id, holder_ms = holder
            held = d.holder_state(conn, holder_id)
            if held is not None and (
                not Status(held[0]).terminal or now < held[1] + timedelta(milliseconds=holder_ms)
            ):
                return Inserted(holder_id, False)
            job_id = d.insert_rows(conn, [row])[0]
            if d.hand_over_key(
                conn, task_id, key, old_job=holder_id, new_job=job_id, hold_ms=hold_ms, now=now
            ):
                return Inserted(job_id, True)
            raise LedgerUnavailableError(  # the row is locked: cannot happen
                f"unique key {key!r} of task {task_id!r} changed under a lock"
            )
        raise LedgerUnavailableError(
            f"unique key {key!r} of task {task_id!r} kept changing; try again"
        )

    def unique_holder(self, task_id: str, key: str) -> int | None:
        """The id of the job holding ``key`` (finished or not), if any."""
        return self.driver.key_holder(task_id, key)

    def mark_due(self, pairs: Sequence[Pair]) -> None:
        """Mark todo rows as never dispatched (their message was not sent), so the next
        dispatch sweep sends them."""
        if pairs:
            self.driver.mark_due(pairs, NEVER_DISPATCHED)

    # -- consumer ---------------------------------------------------------------------

    def claim(
        self,
        task_id: str,
        pairs: Sequence[Pair],
        *,
        lease: timedelta,
        worker: str,
        now: datetime | None = None,
    ) -> Claimed:
        """todo → doing for every ``(id, commit_id)`` that is still current and due.

        Time is judged by the database's clock (``now`` replaces it, for tests): the
        lease ends ``lease`` after it, and a current job whose ``run_at`` is after it is
        not claimed but comes back in :attr:`Claimed.early` (its message, with its
        run_at), to be delayed again. The claim adds a random step (1 to 2**31) to
        commit_id, so that a claim token cannot repeat after a database failover lost
        the commit of an earlier claim (docs/design.md, invariant 10).

        Returns the jobs this call won, with their new commit_id; stale, duplicate and
        foreign messages simply do not come back.
        """
        want = sorted(set(pairs))
        if not want:
            return Claimed()
        return self.driver.claim(
            task_id, want, now=now, lease=lease, step=claim_step(), worker=worker
        )

    def heartbeat(
        self, pairs: Sequence[Pair], *, lease: timedelta, now: datetime | None = None
    ) -> Renewal:
        """Extend the leases of running jobs to ``lease`` after the database's time
        (``now`` replaces it, for tests).

        Not a transition: commit_id is checked, not incremented. Renewal never waits on
        another transaction's lock of a row: a locked row's lease is reported skipped,
        neither renewed nor lost (the next beat retries it). A row no longer doing under
        that commit_id is lost.
        """
        want = sorted(set(pairs))
        if not want:
            return Renewal()
        return self.driver.heartbeat(want, lease=lease, now=now)

    def start(self, pairs: Sequence[Pair], *, now: datetime | None = None) -> int:
        """Record that the handlers of these claims began: ``started_at`` = the
        database's time (``now`` replaces it, for tests), in one UPDATE. Not a
        transition (commit_id is checked, not incremented). Only rows still doing under
        that commit_id, not marked yet and whose lease has not expired are marked: a
        claim the reaper may already judge unstarted stays so. Returns how many rows
        were marked (for one pair: 1 if the claim is still ours and now started).
        """
        want = sorted(set(pairs))
        if not want:
            return 0
        return self.driver.start(want, now=now)

    def _outcome_values(
        self, o: Outcome, now: datetime, redispatch_timeout: timedelta
    ) -> dict[str, Any]:
        # A commit ends a run: it records the start if the consumer's mark did not.
        # It ends the lease (expires_at); a doing row has no dispatch_deadline (the
        # claim cleared it), so only a todo outcome sets one.
        values: dict[str, Any] = {
            "status": o.status.value,
            "updated_at": now,
            "started_at": Coalesce(now),
            "expires_at": None,
        }
        if o.status is Status.FAILED:
            values["failed_times"] = PLUS_ONE
            values["last_error"] = _error_text(o.error)
        elif o.status is Status.CANCELLED:  # no attempt charged: it will not run again
            if o.error is not None:
                values["last_error"] = _error_text(o.error)
        elif o.status is Status.TODO:  # back on the queue, due at run_at
            due = o.run_at or now
            values["failed_times"] = PLUS_ONE
            values["last_error"] = _error_text(o.error)
            values["run_at"] = due
            # The caller sends it (to the delayed set if due later); the sweep re-sends
            # it if it is still unclaimed ``redispatch_timeout`` after it was due.
            values["dispatch_deadline"] = max(due, now) + redispatch_timeout
        return values

    def finish(
        self,
        outcomes: Sequence[Outcome],
        *,
        now: datetime,
        redispatch_timeout: timedelta,
    ) -> set[Pair]:
        """Group commit: doing → done | failed | todo for each outcome whose commit_id is
        current. Returns the ``(id, old commit_id)`` pairs that took effect.

        ``todo`` and ``failed`` count a failed attempt (failed_times + 1); a todo row is
        due again at ``run_at`` and expires for re-dispatch ``redispatch_timeout`` later.

        A job someone cancelled while it ran (``cancel_requested``) matches only a
        ``cancelled`` outcome: any other is lost here, and the caller closes such jobs
        with :meth:`close_cancelled`.

        A done outcome's ``result`` is written by the same UPDATE (a per-row value, see
        :class:`~meepo.ledger.driver.PerRow`); outcomes without one leave the column
        alone, and a batch without any writes the statement it always did.
        """
        groups: dict[tuple[Any, ...], tuple[list[Pair], dict[str, Any]]] = {}
        results: dict[tuple[Any, ...], dict[int, bytes]] = {}
        # Outcomes of one status, error and due time share an UPDATE.
        for o in outcomes:
            key = (o.status, o.error, o.run_at)
            if key not in groups:
                groups[key] = ([], self._outcome_values(o, now, redispatch_timeout))
            groups[key][0].append((o.job_id, o.commit_id))
            if o.result is not None:
                results.setdefault(key, {})[o.job_id] = o.result
        for key, per_row in results.items():
            groups[key][1]["result"] = PerRow(per_row)
        return self._transition(
            [
                (p, [Status.DOING] if v["status"] == Status.CANCELLED.value else [LIVE], v)
                for p, v in groups.values()
            ]
        )

    def close_cancelled(self, pairs: Sequence[Pair], *, now: datetime) -> set[Pair]:
        """doing → cancelled for the claims whose job someone cancelled while it ran
        (its handler ended, or its commit lost to the cancel); the pairs closed."""
        values = {"status": Status.CANCELLED.value, "updated_at": now, "expires_at": None}
        return self._transition([(pairs, [CANCEL_REQUESTED], values)])

    def progress(self, reports: Sequence[Progress]) -> set[Pair]:
        """Write the latest progress of running jobs, each fenced by its claim's
        commit_id (not a transition: the commit_id is checked, not changed); a stale
        claim's report changes nothing. Returns the pairs written."""
        if not reports:
            return set()
        return self.driver.progress(sorted(reports, key=lambda r: r[0]))

    def release(
        self, pairs: Sequence[Pair], *, now: datetime, dispatch_deadline: datetime
    ) -> set[Pair]:
        """doing → todo without counting a failure: claimed jobs that never started
        (the consumer is shutting down). Returns the pairs that took effect."""
        values = {
            "status": Status.TODO.value,
            "updated_at": now,
            "expires_at": None,
            "dispatch_deadline": dispatch_deadline,
        }
        return self._transition([(pairs, [LIVE], values)])

    # -- reaper -----------------------------------------------------------------------

    def expired_leases(
        self, task_id: str, *, limit: int, now: datetime | None = None
    ) -> list[Zombie]:
        """doing rows whose lease ran out (their consumer died or froze), by the
        database's clock (``now`` replaces it, for tests)."""
        return self.driver.expired_leases(task_id, limit=limit, now=now)

    def reap(
        self,
        zombies: Sequence[Zombie],
        *,
        dst: Status,
        max_failed_times: int,
        redispatch_timeout: timedelta,
        now: datetime | None = None,
    ) -> Reaped:
        """Apply the zombie policy to expired leases.

        The locked step re-reads the rows (``FOR UPDATE SKIP LOCKED``) and reaps only
        those still doing under the same commit_id whose lease is still expired by the
        database's clock (``now`` replaces it, for tests): a heartbeat that renewed a
        lease since :meth:`expired_leases` read it keeps it.

        An attempt is a run, not a claim. A lease whose job had started (its start mark
        or ``started_at`` set) counts as a failed attempt (so a job that kills its worker
        every time still ends): ``dst=todo`` re-queues it, or fails it once failed_times
        reaches max_failed_times; ``done``/``failed`` close it. A lease whose job never
        started (its worker died with it prefetched, or lost the claim's reply, or could
        not release it at shutdown) goes back to ``todo`` whatever ``dst``, failed_times
        unchanged, ``orphaned_claims`` + 1. (A start mark is never written once the lease
        has expired, so an unstarted zombie stays unstarted.) A lease whose job someone
        cancelled is closed as ``cancelled`` (no attempt charged), whatever ``dst``.
        Returns a :class:`Reaped`.
        """
        error = "lease expired: the consumer stopped heartbeating (died, froze or lost)"
        requeue: list[Pair] = []
        orphans: list[Pair] = []
        close: dict[Status, list[Pair]] = {}
        cancelled: list[Pair] = []
        final: Status
        for z in zombies:
            if z.cancel_requested:
                cancelled.append((z.id, z.commit_id))
            elif not z.started:
                orphans.append((z.id, z.commit_id))
            elif dst is Status.TODO and z.failed_times + 1 < max_failed_times:
                requeue.append((z.id, z.commit_id))
            else:
                final = Status.FAILED if dst is Status.TODO else dst
                close.setdefault(final, []).append((z.id, z.commit_id))

        def build(now: datetime) -> list[Group]:
            groups: list[Group] = []
            if cancelled:
                groups.append(
                    (
                        cancelled,
                        [CANCEL_REQUESTED],
                        {
                            "status": Status.CANCELLED.value,
                            "updated_at": now,
                            "expires_at": None,
                        },
                    )
                )
            if orphans:
                groups.append(
                    (
                        orphans,
                        [LIVE],
                        {
                            "status": Status.TODO.value,
                            "orphaned_claims": PLUS_ONE,
                            "updated_at": now,
                            "expires_at": None,
                            "dispatch_deadline": now + redispatch_timeout,
                        },
                    )
                )
            if requeue:
                groups.append(
                    (
                        requeue,
                        [LIVE],
                        {
                            "status": Status.TODO.value,
                            "failed_times": PLUS_ONE,
                            "last_error": error,
                            "updated_at": now,
                            "expires_at": None,
                            "dispatch_deadline": now + redispatch_timeout,
                        },
                    )
                )
            for final, pairs in close.items():
                groups.append(
                    (
                        pairs,
                        [LIVE],
                        {
                            "status": final.value,
                            "failed_times": PLUS_ONE,
                            "last_error": error,
                            "updated_at": now,
                            "expires_at": None,
                        },
                    )
                )
            return groups

        started = {z.id: z.started for z in zombies}
        flagged = {z.id: z.cancel_requested for z in zombies}

        def recheck(row: Any, at: datetime) -> bool:
            # still expired, and started and cancel-requested as the scan saw it (a lease
            # renewed since the scan may have been marked started, and then have expired
            # again; a cancel may have come meanwhile: left for the next tick)
            expires = row.expires_at
            same = (row.started_at is not None) == started.get(row.id) and bool(
                row.cancel_requested
            ) == flagged.get(row.id)
            return expires is not None and expires < at and same

        won = self._transition_unlocked(build, Status.DOING, now=now, recheck=recheck)
        prio = {z.id: z.priority for z in zombies}
        requeued = [Message(i, c + 1, prio[i]) for i, c in requeue + orphans if (i, c) in won]
        unstarted = sum(1 for p in orphans if p in won)
        return Reaped(requeued, len(won) - len(requeued), unstarted)

    def _transition_unlocked(
        self,
        build: Callable[[datetime], Sequence[Group]],
        status: Status,
        *,
        now: datetime | None,
        recheck: Callable[[Any, datetime], bool] | None = None,
    ) -> set[Pair]:
        """The reaper's and the sweep's compare-and-set: like :meth:`_transition`, but
        rows locked by another transaction are skipped, never waited for.

        In one transaction, the candidates still current in ``status`` are locked with
        ``SELECT … FOR UPDATE SKIP LOCKED`` by primary key (the driver's
        :meth:`~meepo.ledger.driver.LedgerDriver.lock_current`; record locks only, no gap
        locks), and only those are updated. A consumer frozen
        inside its claim transaction (SIGSTOP between its ``FOR UPDATE`` and its commit)
        then delays its own rows only, not every other zombie of the task. SQLite has no
        row locks: its ``BEGIN IMMEDIATE`` write lock makes the transaction atomic.

        The groups are built (``build``) for the time the transaction judges by: ``now``,
        or the database's clock read in it; ``recheck(expires_at, that time)`` is a
        condition the locked rows must still meet (the reaper: the lease is still
        expired), checked on the locked read (in Python: the statement, and its plan by
        primary key, stay as they are); ``recheck`` gets the locked row (``id``,
        ``commit_id``, ``expires_at``, ``dispatch_deadline``, ``started_at``).
        """
        first = _normal(build(host_now()))
        if not first:
            return set()
        d = self.driver
        ids = sorted({i for pairs, _, _ in first for i, _ in pairs})
        won: set[Pair] = set()
        with self.begin() as conn:
            at = now if now is not None else d.db_now(conn)
            current = {
                (r.id, r.commit_id)
                for r in d.lock_current(conn, ids, status)
                if recheck is None or recheck(r, at)
            }
            for pairs, statuses, values in _normal(build(at)):
                mine = [p for p in pairs if p in current]
                if not mine:
                    continue
                if d.update_locked(conn, mine, statuses, values) != len(mine):
                    # we hold their locks: cannot happen
                    raise RuntimeError("a locked row changed under its lock")
                won.update(mine)
        return won

    def dispatch_deadlines(self, pairs: Sequence[Pair]) -> dict[Pair, datetime]:
        """The dispatch deadline of each todo row whose current claim is in ``pairs``."""
        want = sorted(set(pairs))
        if not want:
            return {}
        return self.driver.dispatch_deadlines(want)

    def sweep(
        self,
        task_id: str,
        *,
        now: datetime,
        cutoffs: dict[str, datetime],
        default_priority: str = DEFAULT_PRIORITY,
        limit: int,
        redispatch_timeout: timedelta,
    ) -> list[Message]:
        """Due todo rows whose dispatch deadline is before their priority's cutoff (never
        dispatched, or their message was lost) get a new commit_id and are returned for
        re-dispatch; their old messages, if any, become stale.

        ``cutoffs`` maps each priority of the task to its cutoff; rows of a priority not
        listed use ``default_priority``'s (they are dispatched to its queue). The
        caller picks the cutoffs so that rows whose message is still waiting in a
        queue are left alone (see the reaper)."""
        rows = self.driver.sweep_scan(
            task_id, now=now, cutoffs=cutoffs, default_priority=default_priority, limit=limit
        )
        pairs = [(i, c) for i, c, _ in rows]
        prio = {i: p for i, _, p in rows}
        values = {"updated_at": now, "dispatch_deadline": now + redispatch_timeout}
        latest = max(cutoffs.values())
        won = self._transition_unlocked(
            lambda _: [(pairs, [Status.TODO], values)],
            Status.TODO,
            now=now,
            # not dispatched since the scan
            recheck=lambda row, _: (
                row.dispatch_deadline is not None and row.dispatch_deadline < latest
            ),
        )
        return [Message(i, c + 1, prio[i]) for i, c in sorted(won)]

    def todo_page(
        self, task_id: str, *, after: tuple[datetime, int] | None, limit: int
    ) -> list[tuple[Message, datetime]]:
        """A page of todo rows (due or not) in index order, as messages with their due
        time, each with its ``dispatch_deadline`` (the page cursor), for re-dispatch after Redis
        lost its data. Read-only: a message carrying the current commit_id is always
        safe to send again."""
        return self.driver.todo_page(task_id, after=after, limit=limit)

    def priorities(self, ids: Sequence[int]) -> dict[int, str]:
        """The priority of each of ``ids`` (for re-dispatch from admin paths)."""
        return self.driver.priorities(ids)

    # -- admin ------------------------------------------------------------------------

    def get(self, job_id: int, task_id: str | None = None) -> JobRecord | None:
        return self.driver.get(job_id, task_id)

    def commit_one(
        self,
        task_id: str,
        outcome: Outcome,
        *,
        now: datetime,
        redispatch_timeout: timedelta,
    ) -> tuple[int, str]:
        """One fenced commit from outside the consumer; returns the new commit_id and the
        job's priority.

        Raises JobNotFoundError for an unknown id, StaleCommitError when the commit_id
        is not the current claim's (nothing is changed then).
        """
        values = self._outcome_values(outcome, now, redispatch_timeout)
        if outcome.result is not None:
            values["result"] = outcome.result
        pair = (outcome.job_id, outcome.commit_id)
        got = self.driver.commit_one(task_id, pair, values)
        if got.won:
            return outcome.commit_id + 1, str(got.priority)
        if got.status is None:
            raise JobNotFoundError(f"task {task_id!r} has no job {outcome.job_id}")
        if (
            got.cancel_requested
            and got.status == Status.DOING.value
            and got.commit_id == outcome.commit_id
            and self.close_cancelled([pair], now=now)
        ):
            raise StaleCommitError(
                outcome.job_id,
                outcome.commit_id,
                f"job {outcome.job_id} was cancelled while it ran: it is now cancelled, "
                f"this commit ({outcome.status}) is ignored",
            )
        raise StaleCommitError(
            outcome.job_id,
            outcome.commit_id,
            f"job {outcome.job_id}: commit_id {outcome.commit_id} is stale (the job is "
            f"{got.status} at commit_id {got.commit_id}); nothing was changed",
        )

    def find(
        self,
        *,
        task_id: str | None = None,
        ids: Sequence[int] | None = None,
        status: Status | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
        after_id: int | None = None,
    ) -> list[tuple[int, str, int, Status]]:
        """``(id, task_id, commit_id, status)`` of the jobs matching every given filter,
        by id (``since``/``until`` bound ``updated_at``; ``after_id`` pages by id)."""
        return self.driver.find(
            task_id=task_id,
            ids=ids,
            status=status,
            since=since,
            until=until,
            limit=limit,
            after_id=after_id,
        )

    def repush(
        self,
        pairs: Sequence[Pair],
        *,
        now: datetime,
        redispatch_timeout: timedelta,
    ) -> list[Message]:
        """Any status → todo, due now, failed_times reset to 0 (an admin's fresh start).

        Returns the messages (new commit_id) of the jobs it moved; a job that moved
        since ``pairs`` was read is skipped (read it again and retry).
        """
        values = {
            "status": Status.TODO.value,
            "failed_times": 0,
            "updated_at": now,
            "run_at": now,
            "expires_at": None,
            "dispatch_deadline": now + redispatch_timeout,
            "cancel_requested": False,
            "progress": None,
            "progress_note": None,
            "result": None,  # a fresh start: the last run's result goes
        }
        won = self._transition([(pairs, list(Status), values)])
        prio = self.priorities([i for i, _ in won])
        return [Message(i, c + 1, prio.get(i, DEFAULT_PRIORITY)) for i, c in sorted(won)]

    def cancel(self, todo: Sequence[Pair], doing: Sequence[Pair], *, now: datetime) -> Cancelled:
        """Cancel jobs as they were read: ``todo`` claims become ``cancelled`` at once
        (a compare-and-set; their messages are then stale, dropped when popped);
        ``doing`` claims are flagged (``cancel_requested``; not a transition, the
        runner's claim stays current), and become cancelled when their handler ends.
        A pair that moved since it was read is in neither set of the result (read it
        again and retry); a doing one already flagged is in ``already``."""
        values = {
            "status": Status.CANCELLED.value,
            "cancel_requested": True,
            "updated_at": now,
            "expires_at": None,
            "dispatch_deadline": None,  # finished: neither deadline (the finished index)
        }
        out = Cancelled()
        out.cancelled = self._transition([(todo, [Status.TODO], values)])
        want = sorted(set(doing))
        if want:
            out.requested = self.driver.request_cancel(want)
            rest = [p for p in want if p not in out.requested]
            if rest:
                states = self.driver.cancel_states(rest)
                out.already = {p for p, (st, flag) in states.items() if st is Status.DOING and flag}
        return out

    def stats(self, task_id: str | None = None) -> list[TaskStats]:
        """Counts by status and the oldest due todo, per task."""
        return self.driver.stats(task_id)

    def outstanding(self, task_id: str, worker: str, *, now: datetime) -> int:
        """How many of the task's jobs are due by ``now`` (todo, whether their message
        waits in a queue, in the delayed set, or is lost) or claimed by ``worker`` and
        not committed yet (doing): zero means a burst worker has nothing left to do."""
        return self.driver.outstanding(task_id, worker, now)
