"""Every SQL statement meepo runs against the jobs table, one method per transition.

Each transition is a compare-and-set on ``commit_id`` that increments it (docs/design.md,
invariant 2): it names its precondition (``status`` and ``commit_id``) in the WHERE
clause, and a row that does not match is left alone and reported back as lost.
Batches share round trips but never the check: ``(id, commit_id) IN (…)`` keeps the
per-job compare-and-set, ``id IN (…)`` in front of it keeps the primary key in use.
On PostgreSQL and on MariaDB/MySQL through PyMySQL the hot statements take
server-specific forms with the same checks and fewer round trips (``fastpath.py``);
the forms here are the portable ones (SQLite, other drivers, a caller's transaction).

Statements, by caller:

* producer: :meth:`insert` (one row or a multi-row INSERT … RETURNING; a job with a
  unique key also takes or hands over its key in ``<table>_unique``)
* consumer: :meth:`claim` (todo → doing), :meth:`heartbeat` (lease renewal, no
  transition), :meth:`start` (start marks, no transition), :meth:`finish`
  (doing → done | failed | todo), :meth:`release`
  (doing → todo, unstarted jobs at shutdown)
* reaper: :meth:`expired_leases` + :meth:`reap` (doing → todo | done | failed),
  :meth:`sweep` (todo past its dispatch deadline → todo with a new commit_id),
  :meth:`todo_page` (read-only, for re-dispatch after Redis lost its data)
* admin: :meth:`commit_one`, :meth:`repush`, :meth:`get`, :meth:`stats`, :meth:`find`
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection,
    CursorResult,
    Engine,
    Row,
    Table,
    and_,
    func,
    insert,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from ..errors import JobNotFoundError, LedgerUnavailableError, StaleCommitError
from ..records import DEFAULT_PRIORITY, Job, JobRecord, Message, NewJob, Status
from .clock import ServerClock, host_now, now_sql, read_db_now
from .engine import translate_errors
from .fastpath import (
    CHUNK,
    PLUS_ONE,
    Coalesce,
    MySQLScript,
    PgForms,
    packet_budget,
    sa_values,
)
from .schema import jobs_table, unique_table
from .types import UTC

Pair = tuple[int, int]
"""``(job id, commit_id)``: one claim of one job, the unit every transition checks."""

Group = tuple[Sequence[Pair], Iterable[Status], dict[str, Any]]

#: ``expires_at`` of a todo row whose message was never sent: before any cutoff.
NEVER_DISPATCHED = datetime(1970, 1, 1, tzinfo=UTC)
#: A generous size of a row's SQL text besides its payload (MySQL/MariaDB packets).
ROW_TEXT = 512


@dataclass(frozen=True)
class Outcome:
    """A consumer's verdict on one claimed job, for :meth:`Ledger.finish`."""

    job_id: int
    commit_id: int
    status: Status
    error: str | None = None
    run_at: datetime | None = None  # when a todo outcome is due again (backoff)
    priority: str = DEFAULT_PRIORITY  # where a todo outcome is re-dispatched


@dataclass(frozen=True)
class Zombie:
    """A doing row whose lease expired; ``started``: its handler's start was recorded
    (``started_at`` set), so the lost claim was a run, a failed attempt."""

    id: int
    commit_id: int
    failed_times: int
    priority: str = DEFAULT_PRIORITY
    started: bool = True


class Reaped(NamedTuple):
    """What :meth:`Ledger.reap` did: the messages of the jobs it put back in ``todo``
    (to send; started ones charged a failed attempt, unstarted ones not), how many it
    closed (done or failed by the zombie policy), and how many of the requeued ones had
    never started (requeued uncharged, ``orphaned_claims`` + 1)."""

    requeued: list[Message]
    closed: int
    unstarted: int


@dataclass(frozen=True)
class Inserted:
    """One pushed job: its id, and whether this push created it (False: a unique key's
    existing unfinished job, nothing written)."""

    id: int
    created: bool


class Claimed(list[Job]):
    """The jobs a claim won (a list, by id), and beside them :attr:`early`: messages
    of current jobs the claim refused because their ``run_at`` is after the time it
    judged by (:attr:`now`, the database's clock); they are to be delayed again."""

    def __init__(
        self,
        jobs: Iterable[Job] = (),
        early: Sequence[Message] = (),
        now: datetime | None = None,
    ) -> None:
        super().__init__(jobs)
        self.early: list[Message] = list(early)
        self.now = now


@dataclass
class Renewal:
    """What a heartbeat did: leases ``renewed``, leases ``skipped`` (the row was locked
    by another transaction; not renewed this time, but still ours), leases ``lost``
    (reaped, repushed or finished: no longer doing under that commit_id)."""

    renewed: set[Pair] = field(default_factory=set)
    skipped: set[Pair] = field(default_factory=set)
    lost: set[Pair] = field(default_factory=set)


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


@dataclass
class TaskStats:
    task_id: str
    counts: dict[Status, int] = field(default_factory=dict)
    oldest_todo: datetime | None = None


class _Mismatch(Exception):
    """Internal: a batched compare-and-set hit fewer rows than it named."""


def _inserted_id(result: CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def _error_text(error: str | None) -> str | None:
    if error is None:
        return None
    return error if len(error) <= 4000 else error[:3997] + "..."


class Ledger:
    """The jobs table of one ledger (shared by many tasks), behind named transitions."""

    def __init__(self, engine: Engine, table_name: str) -> None:
        self.engine = engine
        self.table: Table = jobs_table(table_name)
        self.unique: Table = unique_table(table_name)
        self.table_name = table_name
        self.url = engine.url.render_as_string(hide_password=True)
        #: The database's time as this host estimates it (see clock.py).
        self.clock = ServerClock(engine)
        # The hot statements' server-specific forms (see fastpath.py); SQLite and other
        # drivers use the portable ones below.
        dialect = engine.dialect.name
        self._pg = PgForms(self.table, engine) if PgForms.usable(engine) else None
        self._my = MySQLScript(self.table, engine) if dialect == "mysql" else None
        self._scripts: bool | None = None  # does the engine's driver run scripts?
        # PostgreSQL: a single-statement transition needs no BEGIN/COMMIT around it.
        self._autocommit = (
            engine.execution_options(isolation_level="AUTOCOMMIT") if self._pg else None
        )

    # -- plumbing ---------------------------------------------------------------------

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction on a pooled connection, errors translated to meepo's."""
        with translate_errors(self.url, self.table_name), self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _one_statement(self) -> Iterator[Connection]:
        """A connection for exactly one statement, which is its own transaction:
        autocommit on PostgreSQL (no BEGIN and COMMIT round trips), a transaction
        elsewhere."""
        if self._autocommit is None:
            with self.begin() as conn:
                yield conn
            return
        with translate_errors(self.url, self.table_name), self._autocommit.connect() as conn:
            yield conn

    @contextlib.contextmanager
    def _script(self) -> Iterator[Connection | None]:
        """A connection that runs one-packet scripts (MariaDB/MySQL through PyMySQL
        with multi-statements), or None."""
        if self._my is None or self._scripts is False:
            yield None
            return
        with translate_errors(self.url, self.table_name), self.engine.connect() as conn:
            if self._scripts is None:
                self._scripts = MySQLScript.usable(conn)
            yield conn if self._scripts else None

    def _pairs_where(self, pairs: Sequence[Pair]) -> ColumnElement[bool]:
        t = self.table
        ids = [p[0] for p in pairs]
        if len(pairs) == 1:
            return and_(t.c.id == pairs[0][0], t.c.commit_id == pairs[0][1])
        return and_(t.c.id.in_(ids), tuple_(t.c.id, t.c.commit_id).in_(list(pairs)))

    def _cas(
        self,
        conn: Connection,
        pairs: Sequence[Pair],
        from_status: Iterable[Status],
        values: dict[str, Any],
    ) -> int:
        t = self.table
        statuses = [s.value for s in from_status]
        cond = t.c.status == statuses[0] if len(statuses) == 1 else t.c.status.in_(statuses)
        stmt = (
            update(t)
            .where(self._pairs_where(pairs), cond)
            .values(commit_id=t.c.commit_id + 1, **sa_values(t, values))
        )
        return int(conn.execute(stmt).rowcount)

    def _transition(
        self,
        groups: Sequence[tuple[Sequence[Pair], Iterable[Status], dict[str, Any]]],
        conn: Connection | None = None,
    ) -> set[Pair]:
        """Apply compare-and-set groups; return the pairs that won.

        PostgreSQL: one ``UPDATE … RETURNING`` per group, which names its winners.
        MariaDB/MySQL: one script (see fastpath.py). Otherwise one UPDATE per group in
        one transaction; when every row matched, all won, and if not (someone else
        moved a job meanwhile) the transaction is rolled back and redone one row at a
        time, so exactly the winners change.
        """
        groups = [(sorted(set(p)), list(s), v) for p, s, v in groups if p]
        if not groups:
            return set()
        if conn is not None:
            return self._transition_rows(conn, groups)
        if self._pg is not None:
            chunks = [
                (pairs[i : i + CHUNK], statuses, values)
                for pairs, statuses, values in groups
                for i in range(0, len(pairs), CHUNK)
            ]
            # one statement needs no transaction around it; several share one
            opener = self._one_statement if len(chunks) == 1 else self.begin
            with opener() as c:
                return {w for pairs, st, v in chunks for w in self._pg.transition(c, pairs, st, v)}
        if sum(len(p) for p, _, _ in groups) <= CHUNK:
            with self._script() as sc:
                if sc is not None and self._my is not None:
                    return self._my.transition(sc, groups)
        try:
            with self.begin() as c:
                for pairs, statuses, values in groups:
                    for i in range(0, len(pairs), CHUNK):
                        chunk = pairs[i : i + CHUNK]
                        if self._cas(c, chunk, statuses, values) != len(chunk):
                            raise _Mismatch
        except _Mismatch:
            with self.begin() as c:
                return self._transition_rows(c, groups)
        return {p for pairs, _, _ in groups for p in pairs}

    def _transition_rows(
        self,
        conn: Connection,
        groups: Sequence[tuple[Sequence[Pair], Iterable[Status], dict[str, Any]]],
    ) -> set[Pair]:
        won: set[Pair] = set()
        for pairs, statuses, values in groups:
            for pair in pairs:
                if self._cas(conn, [pair], statuses, values) == 1:
                    won.add(pair)
        return won

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

        A row's dispatch deadline (``expires_at``) is ``redispatch_timeout`` after it is
        due; ``never_dispatched`` makes it due for the dispatch sweep instead (for rows
        whose commit meepo cannot observe). A job with a ``key`` whose key is held by an
        unfinished job (or one finished less than ``unique_for`` ago) writes nothing and
        comes back as that job, ``created=False``.

        With ``conn`` the rows join the caller's transaction; otherwise they are
        committed before this returns.
        """
        if conn is None:
            plain = bool(jobs) and all(j.key is None for j in jobs)
            if plain and self._my is not None:
                with self._script() as sc:
                    if sc is not None and sc.dialect.insert_returning:  # MariaDB 10.5+
                        rows = [
                            self._row(task_id, j, now, redispatch_timeout, never_dispatched)
                            for j in jobs
                        ]
                        return [Inserted(i, True) for i in self._my.insert_many(sc, rows)]
            # one statement (PostgreSQL: up to CHUNK rows) needs no transaction around it
            one = len(jobs) <= (CHUNK if self._pg is not None else 1)
            with self._one_statement() if plain and one else self.begin() as c:
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
        timeout: timedelta,
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
            "expires_at": NEVER_DISPATCHED if never_dispatched else max(due, now) + timeout,
            "priority": job.priority,
        }

    def _insert(
        self,
        conn: Connection,
        task_id: str,
        jobs: Sequence[NewJob],
        now: datetime,
        timeout: timedelta,
        never_dispatched: bool,
    ) -> list[Inserted]:
        out: list[Inserted | None] = [None] * len(jobs)
        plain = [i for i, j in enumerate(jobs) if j.key is None]
        rows = [self._row(task_id, jobs[i], now, timeout, never_dispatched) for i in plain]
        for i, job_id in zip(plain, self._insert_rows(conn, rows), strict=True):
            out[i] = Inserted(job_id, True)
        for i, job in enumerate(jobs):
            if job.key is not None:
                row = self._row(task_id, job, now, timeout, never_dispatched)
                out[i] = self._insert_keyed(conn, task_id, job, row, now)
        return [x for x in out if x is not None]

    def _insert_rows(self, conn: Connection, rows: list[dict[str, Any]]) -> list[int]:
        t = self.table
        if not rows:
            return []
        ids: list[int] = []
        if self._pg is not None:
            task_id, now = rows[0]["task_id"], rows[0]["created_at"]
            for i in range(0, len(rows), CHUNK):
                ids.extend(self._pg.insert(conn, task_id, now, rows[i : i + CHUNK]))
            return ids
        dialect = conn.dialect
        if len(rows) == 1:
            if dialect.insert_returning:
                return [int(conn.execute(insert(t).returning(t.c.id), rows[0]).scalar_one())]
            return [_inserted_id(conn.execute(insert(t), rows[0]))]
        if dialect.insert_executemany_returning_sort_by_parameter_order:
            stmt = insert(t).returning(t.c.id, sort_by_parameter_order=True)
            for chunk in self._chunks(conn, rows):
                ids.extend(int(x) for x in conn.execute(stmt, chunk).scalars())
            return ids
        for row in rows:  # MySQL (not MariaDB): no INSERT … RETURNING
            ids.append(_inserted_id(conn.execute(insert(t), row)))
        return ids

    def _chunks(
        self, conn: Connection, rows: list[dict[str, Any]]
    ) -> Iterator[list[dict[str, Any]]]:
        """``rows`` in slices of at most CHUNK rows; on MySQL/MariaDB also small enough
        for one packet (SQLAlchemy sends each slice as one statement, payloads as hex)."""
        if conn.dialect.name != "mysql":
            for i in range(0, len(rows), CHUNK):
                yield rows[i : i + CHUNK]
            return
        budget = packet_budget(conn)
        chunk: list[dict[str, Any]] = []
        size = 0
        for row in rows:
            one = 2 * len(row["payload"]) + ROW_TEXT
            if chunk and (len(chunk) == CHUNK or size + one > budget):
                yield chunk
                chunk, size = [], 0
            chunk.append(row)
            size += one
        if chunk:
            yield chunk

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
        u = self.unique
        t = self.table
        assert job.key is not None
        hold_ms = round(job.unique_for * 1000)
        for _ in range(10):
            savepoint = conn.begin_nested()
            try:
                job_id = self._insert_rows(conn, [row])[0]
                conn.execute(
                    insert(u).values(
                        task_id=task_id,
                        key=job.key,
                        job_id=job_id,
                        hold_ms=hold_ms,
                        created_at=now,
                        updated_at=now,
                    )
                )
                savepoint.commit()
                return Inserted(job_id, True)
            except IntegrityError:
                savepoint.rollback()
            holder = conn.execute(
                select(u.c.job_id, u.c.hold_ms)
                .where(u.c.task_id == task_id, u.c.key == job.key)
                .with_for_update()
            ).first()
            if holder is None:
                continue  # deleted meanwhile: try to insert again
            # A locking read: the holder's latest committed state, not the caller's
            # snapshot (MySQL's REPEATABLE READ would show a finished holder as running,
            # or a repushed one as finished). KEY SHARE on PostgreSQL does not block the
            # holder's own transitions.
            held = conn.execute(
                select(t.c.status, t.c.updated_at)
                .where(t.c.id == holder.job_id)
                .with_for_update(read=True, key_share=True)
            ).first()
            if held is not None and (
                not Status(held.status).terminal
                or now < held.updated_at + timedelta(milliseconds=holder.hold_ms)
            ):
                return Inserted(int(holder.job_id), False)
            job_id = self._insert_rows(conn, [row])[0]
            n = conn.execute(
                update(u)
                .where(u.c.task_id == task_id, u.c.key == job.key, u.c.job_id == holder.job_id)
                .values(job_id=job_id, hold_ms=hold_ms, updated_at=now)
            ).rowcount
            if n == 1:
                return Inserted(job_id, True)
            raise LedgerUnavailableError(  # the row is locked: cannot happen
                f"unique key {job.key!r} of task {task_id!r} changed under a lock"
            )
        raise LedgerUnavailableError(
            f"unique key {job.key!r} of task {task_id!r} kept changing; try again"
        )

    def unique_holder(self, task_id: str, key: str) -> int | None:
        """The id of the job holding ``key`` (finished or not), if any."""
        u = self.unique
        with self.begin() as conn:
            got = conn.execute(
                select(u.c.job_id).where(u.c.task_id == task_id, u.c.key == key)
            ).scalar()
        return None if got is None else int(got)

    def mark_due(self, pairs: Sequence[Pair]) -> None:
        """Mark todo rows as never dispatched (their message was not sent), so the next
        dispatch sweep sends them."""
        if not pairs:
            return
        t = self.table
        with self.begin() as conn:
            for i in range(0, len(pairs), CHUNK):
                chunk = sorted(set(pairs[i : i + CHUNK]))
                conn.execute(
                    update(t)
                    .where(self._pairs_where(chunk), t.c.status == Status.TODO.value)
                    .values(expires_at=NEVER_DISPATCHED)
                )

    # -- consumer ---------------------------------------------------------------------

    def _now_expr(self, now: datetime | None) -> Any:
        """``now``, or the database's current time as a SQL expression (the host's on
        SQLite)."""
        if now is not None:
            return now
        sql = now_sql(self.engine.dialect.name)
        return host_now() if sql is None else literal_column(sql, type_=self.table.c.run_at.type)

    def _resolve_now(self, conn: Connection, now: datetime | None) -> datetime:
        return now if now is not None else read_db_now(conn)

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
        foreign messages simply do not come back. PostgreSQL and SQLite do it in one
        ``UPDATE … RETURNING`` (PostgreSQL: in autocommit, one round trip);
        MySQL/MariaDB lock the rows with ``SELECT … FOR UPDATE`` and update the winners
        (through PyMySQL: one script, one round trip).
        """
        want = sorted(set(pairs))
        if not want:
            return Claimed()
        step = claim_step()
        if self._pg is not None:
            with self._one_statement() as conn:
                return Claimed(
                    *self._pg.claim(
                        conn, task_id, want, now=now, lease=lease, step=step, worker=worker
                    )
                )
        with self._script() as sc:
            if sc is not None and self._my is not None:
                return Claimed(
                    *self._my.claim(
                        sc, task_id, want, now=now, lease=lease, step=step, worker=worker
                    )
                )
        t = self.table
        ids = sorted({p[0] for p in want})
        with self.begin() as conn:
            at = self._resolve_now(conn, now)
            values = {
                "status": Status.DOING.value,
                "commit_id": t.c.commit_id + step,
                "updated_at": at,
                "expires_at": at + lease,
                "worker": worker,
                "started_at": None,  # an attempt is a run: this claim has not started
            }
            if conn.dialect.update_returning:
                stmt = (
                    update(t)
                    .where(
                        self._pairs_where(want),
                        t.c.status == Status.TODO.value,
                        t.c.task_id == task_id,
                        t.c.run_at <= at,
                    )
                    .values(**values)
                    .returning(
                        t.c.id,
                        t.c.commit_id,
                        t.c.failed_times,
                        t.c.payload,
                        t.c.priority,
                        t.c.orphaned_claims,
                    )
                )
                rows: Sequence[Row[Any]] = conn.execute(stmt).all()
                early: list[Message] = []
                if len(rows) < len(want):
                    early = [
                        Message(r.id, r.commit_id, r.priority, r.run_at)
                        for r in conn.execute(
                            select(t.c.id, t.c.commit_id, t.c.priority, t.c.run_at).where(
                                self._pairs_where(want),
                                t.c.status == Status.TODO.value,
                                t.c.task_id == task_id,
                                t.c.run_at > at,
                            )
                        )
                    ]
                jobs = sorted(
                    (
                        Job(
                            r.id,
                            task_id,
                            bytes(r.payload),
                            r.failed_times,
                            r.commit_id,
                            r.priority,
                            r.orphaned_claims,
                        )
                        for r in rows
                    ),
                    key=lambda j: j.id,
                )
                return Claimed(jobs, sorted(early, key=lambda m: m.job_id), at)
            locked = conn.execute(
                select(
                    t.c.id,
                    t.c.commit_id,
                    t.c.status,
                    t.c.failed_times,
                    t.c.payload,
                    t.c.priority,
                    t.c.run_at,
                    t.c.orphaned_claims,
                )
                .with_hint(t, "FORCE INDEX (PRIMARY)", "mysql")  # lock only these rows
                .where(t.c.id.in_(ids), t.c.task_id == task_id)
                .order_by(t.c.id)
                .with_for_update()
            ).all()
            wanted = set(want)
            current = [
                r for r in locked if r.status == Status.TODO.value and (r.id, r.commit_id) in wanted
            ]
            winners = [r for r in current if r.run_at <= at]
            early = [
                Message(r.id, r.commit_id, r.priority, r.run_at) for r in current if r.run_at > at
            ]
            if winners:
                win_pairs = [(r.id, r.commit_id) for r in winners]
                conn.execute(
                    update(t)
                    .where(self._pairs_where(win_pairs), t.c.status == Status.TODO.value)
                    .values(**values)
                )
            jobs = [
                Job(
                    r.id,
                    task_id,
                    bytes(r.payload),
                    r.failed_times,
                    r.commit_id + step,
                    r.priority,
                    r.orphaned_claims,
                )
                for r in winners
            ]
            return Claimed(jobs, early, at)

    def heartbeat(
        self, pairs: Sequence[Pair], *, lease: timedelta, now: datetime | None = None
    ) -> Renewal:
        """Extend the leases of running jobs to ``lease`` after the database's time
        (``now`` replaces it, for tests).

        Not a transition: commit_id is checked, not incremented. Renewal never waits on
        another transaction's lock of a row (``FOR UPDATE SKIP LOCKED`` on PostgreSQL and
        MariaDB/MySQL): a locked row's lease is reported skipped, neither renewed nor
        lost (the next beat retries it). A row no longer doing under that commit_id is
        lost.
        """
        want = sorted(set(pairs))
        out = Renewal()
        if not want:
            return out
        t = self.table
        if self._pg is not None:
            with self.begin() as conn:
                for i in range(0, len(want), CHUNK):
                    chunk = want[i : i + CHUNK]
                    renewed, skipped = self._pg.heartbeat(conn, chunk, now, lease)
                    out.renewed |= renewed
                    out.skipped |= skipped
                    out.lost.update(p for p in chunk if p not in renewed and p not in skipped)
            return out
        dialect = self.engine.dialect.name
        locks = dialect != "sqlite"  # SQLite has no row locks to wait on
        with self.begin() as conn:
            at = now if now is not None or dialect == "mysql" else read_db_now(conn)
            end = at + lease if at is not None else self._lease_end_sql(lease)
            for i in range(0, len(want), CHUNK):
                chunk = want[i : i + CHUNK]
                mine = chunk
                if locks:
                    got = {
                        (r.id, r.commit_id)
                        for r in conn.execute(
                            select(t.c.id, t.c.commit_id)
                            .with_hint(t, "FORCE INDEX (PRIMARY)", "mysql")
                            .where(self._pairs_where(chunk), t.c.status == Status.DOING.value)
                            .with_for_update(skip_locked=True)
                        )
                    }
                    mine = [p for p in chunk if p in got]
                n = 0
                if mine:
                    n = conn.execute(
                        update(t)
                        .with_hint("FORCE INDEX (PRIMARY)", dialect_name="mysql")
                        .where(self._pairs_where(mine), t.c.status == Status.DOING.value)
                        .values(expires_at=end)
                    ).rowcount
                if n == len(chunk):
                    out.renewed.update(chunk)
                    continue
                if locks:
                    out.renewed.update(mine)
                    rest = [p for p in chunk if p not in set(mine)]
                else:
                    rest = chunk
                current = {
                    (r.id, r.commit_id)
                    for r in conn.execute(  # a plain read: it waits on no lock
                        select(t.c.id, t.c.commit_id).where(
                            t.c.id.in_([p[0] for p in rest]), t.c.status == Status.DOING.value
                        )
                    )
                }
                for p in rest:
                    if p not in current:
                        out.lost.add(p)
                    elif locks:
                        out.skipped.add(p)
                    else:
                        out.renewed.add(p)
        return out

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
        t = self.table
        marked = 0
        with self._one_statement() if len(want) <= CHUNK else self.begin() as conn:
            for i in range(0, len(want), CHUNK):
                chunk = want[i : i + CHUNK]
                at = self._now_expr(now)
                marked += int(
                    conn.execute(
                        update(t)
                        .where(
                            self._pairs_where(chunk),
                            t.c.status == Status.DOING.value,
                            t.c.started_at.is_(None),
                            t.c.expires_at > at,
                        )
                        .values(started_at=at)
                    ).rowcount
                )
        return marked

    def _lease_end_sql(self, lease: timedelta) -> Any:
        """The database's time plus ``lease`` (MariaDB/MySQL)."""
        micros = round(lease / timedelta(microseconds=1))
        return literal_column(
            f"UTC_TIMESTAMP(6) + INTERVAL {int(micros)} MICROSECOND",
            type_=self.table.c.expires_at.type,
        )

    def _outcome_values(self, o: Outcome, now: datetime, lease: timedelta) -> dict[str, Any]:
        # A commit ends a run: it records the start if the consumer's mark did not.
        values: dict[str, Any] = {
            "status": o.status.value,
            "updated_at": now,
            "started_at": Coalesce(now),
        }
        if o.status is Status.DONE:
            values["expires_at"] = None
        elif o.status is Status.FAILED:
            values["expires_at"] = None
            values["failed_times"] = PLUS_ONE
            values["last_error"] = _error_text(o.error)
        else:  # TODO: back on the queue, due at run_at
            due = o.run_at or now
            values["failed_times"] = PLUS_ONE
            values["last_error"] = _error_text(o.error)
            values["run_at"] = due
            # The caller sends it (to the delayed set if due later); the sweep re-sends
            # it if it is still unclaimed ``lease`` after it was due.
            values["expires_at"] = max(due, now) + lease
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
        """
        groups: dict[tuple[Any, ...], tuple[list[Pair], dict[str, Any]]] = {}
        # Outcomes of one status, error and due time share an UPDATE.
        for o in outcomes:
            key = (o.status, o.error, o.run_at)
            if key not in groups:
                groups[key] = ([], self._outcome_values(o, now, redispatch_timeout))
            groups[key][0].append((o.job_id, o.commit_id))
        return self._transition([(p, [Status.DOING], v) for p, v in groups.values()])

    def release(self, pairs: Sequence[Pair], *, now: datetime, expires_at: datetime) -> set[Pair]:
        """doing → todo without counting a failure: claimed jobs that never started
        (the consumer is shutting down). Returns the pairs that took effect."""
        values = {"status": Status.TODO.value, "updated_at": now, "expires_at": expires_at}
        return self._transition([(pairs, [Status.DOING], values)])

    # -- reaper -----------------------------------------------------------------------

    def expired_leases(
        self, task_id: str, *, limit: int, now: datetime | None = None
    ) -> list[Zombie]:
        """doing rows whose lease ran out (their consumer died or froze), by the
        database's clock (``now`` replaces it, for tests)."""
        t = self.table
        with self.begin() as conn:
            rows = conn.execute(
                select(t.c.id, t.c.commit_id, t.c.failed_times, t.c.priority, t.c.started_at)
                .where(
                    t.c.task_id == task_id,
                    t.c.status == Status.DOING.value,
                    t.c.expires_at < self._now_expr(now),
                )
                .order_by(t.c.expires_at)
                .limit(limit)
            ).all()
        return [
            Zombie(r.id, r.commit_id, r.failed_times, r.priority, r.started_at is not None)
            for r in rows
        ]

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
        has expired, so an unstarted zombie stays unstarted.) Returns a :class:`Reaped`.
        """
        error = "lease expired: the consumer stopped heartbeating (died, froze or lost)"
        requeue: list[Pair] = []
        orphans: list[Pair] = []
        close: dict[Status, list[Pair]] = {}
        final: Status
        for z in zombies:
            if not z.started:
                orphans.append((z.id, z.commit_id))
            elif dst is Status.TODO and z.failed_times + 1 < max_failed_times:
                requeue.append((z.id, z.commit_id))
            else:
                final = Status.FAILED if dst is Status.TODO else dst
                close.setdefault(final, []).append((z.id, z.commit_id))

        def build(now: datetime) -> list[Group]:
            groups: list[Group] = []
            if orphans:
                groups.append(
                    (
                        orphans,
                        [Status.DOING],
                        {
                            "status": Status.TODO.value,
                            "orphaned_claims": PLUS_ONE,
                            "updated_at": now,
                            "expires_at": now + redispatch_timeout,
                        },
                    )
                )
            if requeue:
                groups.append(
                    (
                        requeue,
                        [Status.DOING],
                        {
                            "status": Status.TODO.value,
                            "failed_times": PLUS_ONE,
                            "last_error": error,
                            "updated_at": now,
                            "expires_at": now + redispatch_timeout,
                        },
                    )
                )
            for final, pairs in close.items():
                groups.append(
                    (
                        pairs,
                        [Status.DOING],
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

        def recheck(row: Any, at: datetime) -> bool:
            # still expired, and started as the scan saw it (a lease renewed since the
            # scan may have been marked started, and then have expired again)
            expires = row.expires_at
            same = (row.started_at is not None) == started.get(row.id)
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
        ``SELECT … FOR UPDATE SKIP LOCKED`` by primary key (MariaDB/MySQL, PostgreSQL;
        record locks only, no gap locks), and only those are updated. A consumer frozen
        inside its claim transaction (SIGSTOP between its ``FOR UPDATE`` and its commit)
        then delays its own rows only, not every other zombie of the task. SQLite has no
        row locks: its ``BEGIN IMMEDIATE`` write lock makes the transaction atomic.

        The groups are built (``build``) for the time the transaction judges by: ``now``,
        or the database's clock read in it; ``recheck(expires_at, that time)`` is a
        condition the locked rows must still meet (the reaper: the lease is still
        expired), checked on the locked read (in Python: the statement, and its plan by
        primary key, stay as they are); ``recheck`` gets the locked row (``id``,
        ``commit_id``, ``expires_at``, ``started_at``).
        """
        groups = [(sorted(set(p)), list(s), v) for p, s, v in build(host_now()) if p]
        if not groups:
            return set()
        t = self.table
        # InnoDB locks every row a statement scans, and on a small table it prefers a
        # full scan to a range of primary keys: force the primary key, so that both
        # statements touch only the rows they name.
        pk = "FORCE INDEX (PRIMARY)"
        ids = sorted({i for pairs, _, _ in groups for i, _ in pairs})
        won: set[Pair] = set()
        with self.begin() as conn:
            at = self._resolve_now(conn, now)
            groups = [(sorted(set(p)), list(s), v) for p, s, v in build(at) if p]
            current: set[Pair] = set()
            for i in range(0, len(ids), CHUNK):
                current.update(
                    (r.id, r.commit_id)
                    for r in conn.execute(
                        select(t.c.id, t.c.commit_id, t.c.expires_at, t.c.started_at)
                        .with_hint(t, pk, "mysql")
                        .where(t.c.id.in_(ids[i : i + CHUNK]), t.c.status == status.value)
                        .with_for_update(skip_locked=True)
                    )
                    if recheck is None or recheck(r, at)
                )
            for pairs, statuses, values in groups:
                mine = [p for p in pairs if p in current]
                cond = t.c.status.in_([s.value for s in statuses])
                for i in range(0, len(mine), CHUNK):
                    chunk = mine[i : i + CHUNK]
                    stmt = (
                        update(t)
                        .with_hint(pk, dialect_name="mysql")
                        .where(self._pairs_where(chunk), cond)
                        .values(commit_id=t.c.commit_id + 1, **sa_values(t, values))
                    )
                    if conn.execute(stmt).rowcount != len(chunk):  # we hold their locks
                        raise RuntimeError("a locked row changed under its lock")
                    won.update(chunk)
        return won

    def dispatch_deadlines(self, pairs: Sequence[Pair]) -> dict[Pair, datetime]:
        """The dispatch deadline of each todo row whose current claim is in ``pairs``."""
        want = sorted(set(pairs))
        if not want:
            return {}
        t = self.table
        with self.begin() as conn:
            rows = conn.execute(
                select(t.c.id, t.c.commit_id, t.c.expires_at).where(
                    self._pairs_where(want), t.c.status == Status.TODO.value
                )
            ).all()
        return {(r.id, r.commit_id): r.expires_at for r in rows if r.expires_at is not None}

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
        t = self.table
        cond: ColumnElement[bool]
        if len(set(cutoffs.values())) == 1:
            cond = t.c.expires_at < next(iter(cutoffs.values()))
        else:
            others = [p for p in cutoffs if p != default_priority]
            cond = or_(
                *(and_(t.c.priority == p, t.c.expires_at < cutoffs[p]) for p in others),
                and_(
                    t.c.priority.not_in(others),
                    t.c.expires_at < cutoffs[default_priority],
                ),
            )
        with self.begin() as conn:
            rows = conn.execute(
                select(t.c.id, t.c.commit_id, t.c.priority)
                .where(
                    t.c.task_id == task_id,
                    t.c.status == Status.TODO.value,
                    t.c.expires_at < max(cutoffs.values()),
                    cond,
                    t.c.run_at <= now,
                )
                .order_by(t.c.expires_at)
                .limit(limit)
            ).all()
        pairs = [(r.id, r.commit_id) for r in rows]
        prio = {r.id: r.priority for r in rows}
        values = {"updated_at": now, "expires_at": now + redispatch_timeout}
        latest = max(cutoffs.values())
        won = self._transition_unlocked(
            lambda _: [(pairs, [Status.TODO], values)],
            Status.TODO,
            now=now,
            # not dispatched since the scan
            recheck=lambda row, _: row.expires_at is not None and row.expires_at < latest,
        )
        return [Message(i, c + 1, prio[i]) for i, c in sorted(won)]

    def todo_page(
        self, task_id: str, *, after: tuple[datetime, int] | None, limit: int
    ) -> list[tuple[Message, datetime]]:
        """A page of todo rows (due or not) in index order, as messages with their due
        time, each with its ``expires_at`` (the page cursor), for re-dispatch after Redis
        lost its data. Read-only: a message carrying the current commit_id is always
        safe to send again."""
        t = self.table
        cond = [
            t.c.task_id == task_id,
            t.c.status == Status.TODO.value,
            t.c.expires_at.is_not(None),
        ]
        if after is not None:
            exp, last_id = after
            cond.append(or_(t.c.expires_at > exp, and_(t.c.expires_at == exp, t.c.id > last_id)))
        with self.begin() as conn:
            rows = conn.execute(
                select(t.c.id, t.c.commit_id, t.c.priority, t.c.run_at, t.c.expires_at)
                .where(*cond)
                .order_by(t.c.expires_at, t.c.id)
                .limit(limit)
            ).all()
        return [(Message(r.id, r.commit_id, r.priority, r.run_at), r.expires_at) for r in rows]

    def priorities(self, ids: Sequence[int]) -> dict[int, str]:
        """The priority of each of ``ids`` (for re-dispatch from admin paths)."""
        t = self.table
        out: dict[int, str] = {}
        with self.begin() as conn:
            for i in range(0, len(ids), CHUNK):
                chunk = list(ids[i : i + CHUNK])
                for r in conn.execute(select(t.c.id, t.c.priority).where(t.c.id.in_(chunk))):
                    out[int(r.id)] = str(r.priority)
        return out

    # -- admin ------------------------------------------------------------------------

    def _record(self, r: Row[Any]) -> JobRecord:
        return JobRecord(
            id=r.id,
            task_id=r.task_id,
            status=Status(r.status),
            payload=bytes(r.payload),
            failed_times=r.failed_times,
            commit_id=r.commit_id,
            created_at=r.created_at,
            updated_at=r.updated_at,
            run_at=r.run_at,
            expires_at=r.expires_at,
            worker=r.worker,
            last_error=r.last_error,
            priority=r.priority,
            started_at=r.started_at,
            orphaned_claims=r.orphaned_claims,
        )

    def get(self, job_id: int, task_id: str | None = None) -> JobRecord | None:
        t = self.table
        stmt = select(t).where(t.c.id == job_id)
        if task_id is not None:
            stmt = stmt.where(t.c.task_id == task_id)
        with self.begin() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else self._record(row)

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
        t = self.table
        values = self._outcome_values(outcome, now, redispatch_timeout)
        pair = (outcome.job_id, outcome.commit_id)
        with self.begin() as conn:
            n = conn.execute(
                update(t)
                .where(
                    self._pairs_where([pair]),
                    t.c.status == Status.DOING.value,
                    t.c.task_id == task_id,
                )
                .values(commit_id=t.c.commit_id + 1, **sa_values(t, values))
            ).rowcount
            if n == 1:
                prio = conn.execute(select(t.c.priority).where(t.c.id == outcome.job_id)).scalar()
                return outcome.commit_id + 1, str(prio)
            row = conn.execute(
                select(t.c.status, t.c.commit_id).where(
                    t.c.id == outcome.job_id, t.c.task_id == task_id
                )
            ).first()
        if row is None:
            raise JobNotFoundError(f"task {task_id!r} has no job {outcome.job_id}")
        raise StaleCommitError(
            outcome.job_id,
            outcome.commit_id,
            f"job {outcome.job_id}: commit_id {outcome.commit_id} is stale (the job is "
            f"{row.status} at commit_id {row.commit_id}); nothing was changed",
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
        t = self.table
        cond: list[ColumnElement[bool]] = []
        if task_id is not None:
            cond.append(t.c.task_id == task_id)
        if ids is not None:
            cond.append(t.c.id.in_(list(ids)))
        if status is not None:
            cond.append(t.c.status == status.value)
        if since is not None:
            cond.append(t.c.updated_at >= since)
        if until is not None:
            cond.append(t.c.updated_at < until)
        if after_id is not None:
            cond.append(t.c.id > after_id)
        stmt = select(t.c.id, t.c.task_id, t.c.commit_id, t.c.status).where(*cond).order_by(t.c.id)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.begin() as conn:
            return [(r.id, r.task_id, r.commit_id, Status(r.status)) for r in conn.execute(stmt)]

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
            "expires_at": now + redispatch_timeout,
        }
        won = self._transition([(pairs, list(Status), values)])
        prio = self.priorities([i for i, _ in won])
        return [Message(i, c + 1, prio.get(i, DEFAULT_PRIORITY)) for i, c in sorted(won)]

    def stats(self, task_id: str | None = None) -> list[TaskStats]:
        """Counts by status and the oldest due todo, per task."""
        t = self.table
        counts = select(t.c.task_id, t.c.status, func.count()).group_by(t.c.task_id, t.c.status)
        oldest = (
            select(t.c.task_id, func.min(t.c.run_at))
            .where(t.c.status == Status.TODO.value)
            .group_by(t.c.task_id)
        )
        if task_id is not None:
            counts = counts.where(t.c.task_id == task_id)
            oldest = oldest.where(t.c.task_id == task_id)
        out: dict[str, TaskStats] = {}
        with self.begin() as conn:
            for tid, status, n in conn.execute(counts):
                out.setdefault(tid, TaskStats(tid)).counts[Status(status)] = int(n)
            for tid, when in conn.execute(oldest):
                out.setdefault(tid, TaskStats(tid)).oldest_todo = when
        return [out[k] for k in sorted(out)]
