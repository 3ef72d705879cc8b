"""The portable driver: every statement as SQLAlchemy Core, correct on any supported
dialect (SQLite, PostgreSQL, MariaDB/MySQL, through any DB-API driver).

It is the reference the server drivers (``postgres.py``, ``mysql.py``) are measured
against: they override the hot statements with faster forms of the same checks, and
inherit the rest. Capabilities are read from the dialect once, at construction
(row locks, ``UPDATE … RETURNING``, multi-row ``INSERT … RETURNING``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    CursorResult,
    Engine,
    Row,
    Select,
    Table,
    Update,
    and_,
    bindparam,
    delete,
    false,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    true,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from ...records import Job, JobRecord, Message, Pair, ScheduleRecord, Status
from ..clock import UTC, host_now, now_sql
from ..driver import (
    ROWS_PER_STATEMENT,
    Claimed,
    CommitOne,
    Cursor,
    Found,
    FromStatus,
    Group,
    JobFilter,
    Progress,
    Renewal,
    TaskStats,
    Zombie,
    from_statuses,
    sa_values,
)
from ..engine import translate_errors
from ..schema import archive_table, jobs_table, retention_table, schedules_table, unique_table


class _Mismatch(Exception):
    """Internal: a batched compare-and-set hit fewer rows than it named."""


def _inserted_id(result: CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def job_record(r: Row[Any]) -> JobRecord:
    """A jobs-table row as a :class:`JobRecord`."""
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
        dispatch_deadline=r.dispatch_deadline,
        cancel_requested=bool(r.cancel_requested),
        progress=r.progress,
        progress_note=r.progress_note,
        result=None if r.result is None else bytes(r.result),
        data=bytes(r.payload),
    )


def schedule_record(row: Row[Any]) -> ScheduleRecord:
    """A schedules-table row as a :class:`ScheduleRecord`."""
    return ScheduleRecord(
        task_id=row.task_id,
        name=row.name,
        kind=row.kind,
        expr=row.expr,
        tz=row.tz,
        payload=bytes(row.payload),
        priority=row.priority,
        start_at=row.start_at,
        until_at=row.until_at,
        misfire=row.misfire,
        next_fire_at=row.next_fire_at,
        last_fire_at=row.last_fire_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


@functools.lru_cache(maxsize=64)
def _tables(table_name: str) -> tuple[Table, Table, Table, Table, Table]:
    """One ledger's tables (jobs, unique keys, schedules, retention, archive), described
    once per process: a Task's five drivers (two engines) share them, as statements only
    read them."""
    return (
        jobs_table(table_name),
        unique_table(table_name),
        schedules_table(table_name),
        retention_table(table_name),
        archive_table(table_name),
    )


class PortableDriver:
    """Every statement of one ledger as SQLAlchemy Core (see the module docstring)."""

    name = "portable"

    def __init__(self, engine: Engine, table_name: str) -> None:
        self.engine = engine
        self.table_name = table_name
        self.table, self.unique, self.schedules, self.retention, self.archive = _tables(table_name)
        #: The jobs table the cleaner's statements read (the MySQL driver's has the
        #: generated columns of the finished rows' index).
        self.scanned: Table = self.table
        self.url = engine.url.render_as_string(hide_password=True)
        dialect = engine.dialect
        #: The server has row locks to wait on (and to skip): not SQLite.
        self.row_locks = dialect.name != "sqlite"
        self._dialect = dialect
        self._now_sql = now_sql(dialect.name)

    # The dialect's capabilities are read when used: MariaDB's are known only once the
    # first connection told the server's version.

    @property
    def update_returning(self) -> bool:
        """The dialect has ``UPDATE … RETURNING``."""
        return bool(self._dialect.update_returning)

    @property
    def insert_returning(self) -> bool:
        """The dialect has ``INSERT … RETURNING``."""
        return bool(self._dialect.insert_returning)

    @property
    def many_returning(self) -> bool:
        """The dialect returns executemany's ids in parameter order."""
        return bool(self._dialect.insert_executemany_returning_sort_by_parameter_order)

    # -- plumbing -----------------------------------------------------------------------

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction on a pooled connection, errors translated to meepo's."""
        with translate_errors(self.url, self.table_name), self.engine.begin() as conn:
            yield conn

    def one_statement(self) -> contextlib.AbstractContextManager[Connection]:
        """A connection for exactly one statement (here: a transaction)."""
        return self.begin()

    def pairs_where(self, pairs: Sequence[Pair]) -> ColumnElement[bool]:
        """The compare-and-set on ``(id, commit_id)``; ``id IN (…)`` in front keeps the
        primary key in use."""
        t = self.table
        if len(pairs) == 1:
            return and_(t.c.id == pairs[0][0], t.c.commit_id == pairs[0][1])
        ids = [p[0] for p in pairs]
        return and_(t.c.id.in_(ids), tuple_(t.c.id, t.c.commit_id).in_(list(pairs)))

    def by_primary_key(self, stmt: Select[Any]) -> Select[Any]:
        """A locking read that must touch only the rows it names (a hook: the MySQL
        driver forces the primary key)."""
        return stmt

    def update_by_primary_key(self, stmt: Update) -> Update:
        """An UPDATE that must touch only the rows it names (see :meth:`by_primary_key`)."""
        return stmt

    def now_expr(self, now: datetime | None) -> Any:
        """``now``, or the database's current time as a SQL expression (the host's on
        SQLite)."""
        if now is not None:
            return now
        if self._now_sql is None:
            return host_now()
        return literal_column(self._now_sql, type_=self.table.c.run_at.type)

    def db_now(self, conn: Connection) -> datetime:
        """``SELECT statement_timestamp()`` (PostgreSQL), ``SELECT UTC_TIMESTAMP(6)``
        (MariaDB/MySQL): the database's current time, read in ``conn``, as an aware
        UTC datetime; the host's on SQLite (embedded: its clock is the host's)."""
        if self._now_sql is None:
            return host_now()
        value = conn.execute(text(f"SELECT {self._now_sql}")).scalar_one()
        if isinstance(value, str):  # pragma: no cover - drivers return datetimes
            value = datetime.fromisoformat(value)
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def status_cond(self, from_status: Iterable[FromStatus]) -> ColumnElement[bool]:
        """``status IN (…)``, and ``cancel_requested`` as ``LIVE`` or
        ``CANCEL_REQUESTED`` say."""
        t = self.table
        statuses, flag = from_statuses(from_status)
        cond = t.c.status == statuses[0] if len(statuses) == 1 else t.c.status.in_(statuses)
        if flag is None:
            return cond
        return and_(cond, t.c.cancel_requested == (true() if flag else false()))

    def cas(
        self,
        conn: Connection,
        pairs: Sequence[Pair],
        from_status: Iterable[FromStatus],
        values: dict[str, Any],
    ) -> int:
        """One compare-and-set UPDATE (commit_id + 1); rows changed."""
        t = self.table
        cond = self.status_cond(from_status)
        stmt = (
            update(t)
            .where(self.pairs_where(pairs), cond)
            .values(commit_id=t.c.commit_id + 1, **sa_values(t, values))
        )
        return int(conn.execute(stmt).rowcount)

    # -- producer -----------------------------------------------------------------------

    def chunks(
        self, conn: Connection, rows: list[dict[str, Any]]
    ) -> Iterator[list[dict[str, Any]]]:
        """``rows`` in slices that one statement carries."""
        for i in range(0, len(rows), ROWS_PER_STATEMENT):
            yield rows[i : i + ROWS_PER_STATEMENT]

    def insert_rows(self, conn: Connection, rows: list[dict[str, Any]]) -> list[int]:
        """INSERT todo rows in the caller's transaction: one row with RETURNING (or the
        driver's last id), a batch as executemany RETURNING in order, else row by row."""
        t = self.table
        if not rows:
            return []
        if len(rows) == 1:
            if self.insert_returning:
                return [int(conn.execute(insert(t).returning(t.c.id), rows[0]).scalar_one())]
            return [_inserted_id(conn.execute(insert(t), rows[0]))]
        ids: list[int] = []
        if self.many_returning:
            stmt = insert(t).returning(t.c.id, sort_by_parameter_order=True)
            for chunk in self.chunks(conn, rows):
                ids.extend(int(x) for x in conn.execute(stmt, chunk).scalars())
            return ids
        for row in rows:  # MySQL (not MariaDB): no INSERT … RETURNING
            ids.append(_inserted_id(conn.execute(insert(t), row)))
        return ids

    def push(self, rows: list[dict[str, Any]]) -> list[int]:
        """INSERT todo rows and commit them."""
        with self.begin() as conn:
            return self.insert_rows(conn, rows)

    def insert_key(
        self, conn: Connection, task_id: str, key: str, job_id: int, hold_ms: int, now: datetime
    ) -> None:
        """INSERT a unique key's row naming its job (IntegrityError when it exists)."""
        conn.execute(
            insert(self.unique).values(
                task_id=task_id,
                key=key,
                job_id=job_id,
                hold_ms=hold_ms,
                created_at=now,
                updated_at=now,
            )
        )

    def lock_key(self, conn: Connection, task_id: str, key: str) -> tuple[int, int] | None:
        """The key's holder (job id, hold in ms), its row locked."""
        u = self.unique
        row = conn.execute(
            select(u.c.job_id, u.c.hold_ms)
            .where(u.c.task_id == task_id, u.c.key == key)
            .with_for_update()
        ).first()
        return None if row is None else (int(row.job_id), int(row.hold_ms))

    def holder_state(self, conn: Connection, job_id: int) -> tuple[str, datetime] | None:
        """The holder's latest committed status and updated_at: a locking read (MySQL's
        REPEATABLE READ snapshot would show a finished holder as running); KEY SHARE on
        PostgreSQL does not block the holder's own transitions."""
        t = self.table
        row = conn.execute(
            select(t.c.status, t.c.updated_at)
            .where(t.c.id == job_id)
            .with_for_update(read=True, key_share=True)
        ).first()
        return None if row is None else (str(row.status), row.updated_at)

    def hand_over_key(
        self,
        conn: Connection,
        task_id: str,
        key: str,
        *,
        old_job: int,
        new_job: int,
        hold_ms: int,
        now: datetime,
    ) -> bool:
        """Compare-and-set of a key's job_id from ``old_job`` to ``new_job``."""
        u = self.unique
        n = conn.execute(
            update(u)
            .where(u.c.task_id == task_id, u.c.key == key, u.c.job_id == old_job)
            .values(job_id=new_job, hold_ms=hold_ms, updated_at=now)
        ).rowcount
        return int(n) == 1

    def key_holder(self, task_id: str, key: str) -> int | None:
        """The id of the job holding ``key``, if any."""
        u = self.unique
        with self.begin() as conn:
            got = conn.execute(
                select(u.c.job_id).where(u.c.task_id == task_id, u.c.key == key)
            ).scalar()
        return None if got is None else int(got)

    def mark_due(self, pairs: Sequence[Pair], never: datetime) -> None:
        """Set ``dispatch_deadline`` of current todo rows to ``never``."""
        t = self.table
        with self.begin() as conn:
            for i in range(0, len(pairs), ROWS_PER_STATEMENT):
                chunk = sorted(set(pairs[i : i + ROWS_PER_STATEMENT]))
                conn.execute(
                    update(t)
                    .where(self.pairs_where(chunk), t.c.status == Status.TODO.value)
                    .values(dispatch_deadline=never)
                )

    # -- consumer -----------------------------------------------------------------------

    def claim(
        self,
        task_id: str,
        pairs: Sequence[Pair],
        *,
        now: datetime | None,
        lease: timedelta,
        step: int,
        worker: str,
    ) -> Claimed:
        """todo → doing: ``UPDATE … RETURNING`` where the dialect has it (and a read of
        the not-yet-due rows when some did not win), else ``SELECT … FOR UPDATE`` of the
        rows and an UPDATE of the winners."""
        with self.begin() as conn:
            at = now if now is not None else self.db_now(conn)
            t = self.table
            values = {
                "status": Status.DOING.value,
                "commit_id": t.c.commit_id + step,
                "updated_at": at,
                "expires_at": at + lease,
                "dispatch_deadline": None,  # a doing row has a lease, not a deadline
                "worker": worker,
                "started_at": None,  # an attempt is a run: this claim has not started
                "progress": None,  # a run reports its own progress
                "progress_note": None,
            }
            if self.update_returning:
                return self._claim_returning(conn, task_id, pairs, at, values)
            return self._claim_locked(conn, task_id, pairs, at, values, step)

    def _claim_returning(
        self,
        conn: Connection,
        task_id: str,
        want: Sequence[Pair],
        at: datetime,
        values: dict[str, Any],
    ) -> Claimed:
        """The claim as one ``UPDATE … RETURNING`` (PostgreSQL, SQLite)."""
        t = self.table
        stmt = (
            update(t)
            .where(
                self.pairs_where(want),
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
                        self.pairs_where(want),
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

    def _claim_locked(
        self,
        conn: Connection,
        task_id: str,
        want: Sequence[Pair],
        at: datetime,
        values: dict[str, Any],
        step: int,
    ) -> Claimed:
        """The claim as ``SELECT … FOR UPDATE`` and an UPDATE of the winners (MariaDB)."""
        t = self.table
        ids = sorted({p[0] for p in want})
        locked = conn.execute(
            self.by_primary_key(
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
                .where(t.c.id.in_(ids), t.c.task_id == task_id)
                .order_by(t.c.id)
                .with_for_update()
            )
        ).all()
        wanted = set(want)
        current = [
            r for r in locked if r.status == Status.TODO.value and (r.id, r.commit_id) in wanted
        ]
        winners = [r for r in current if r.run_at <= at]
        early = [Message(r.id, r.commit_id, r.priority, r.run_at) for r in current if r.run_at > at]
        if winners:
            win_pairs = [(r.id, r.commit_id) for r in winners]
            conn.execute(
                update(t)
                .where(self.pairs_where(win_pairs), t.c.status == Status.TODO.value)
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

    def lease_end(self, conn: Connection, now: datetime | None, lease: timedelta) -> Any:
        """When a lease renewed now ends: ``now`` (or the database's time) + ``lease``."""
        return (now if now is not None else self.db_now(conn)) + lease

    def heartbeat(
        self, pairs: Sequence[Pair], *, lease: timedelta, now: datetime | None
    ) -> Renewal:
        """Per chunk: lock the current rows SKIP LOCKED (servers), extend their leases,
        then a plain read tells the skipped (still ours, locked) from the lost."""
        t = self.table
        out = Renewal()
        locks = self.row_locks
        with self.begin() as conn:
            end = self.lease_end(conn, now, lease)
            for i in range(0, len(pairs), ROWS_PER_STATEMENT):
                chunk = pairs[i : i + ROWS_PER_STATEMENT]
                mine = chunk
                if locks:  # the locked read tells the cancel requests too
                    got = {
                        (r.id, r.commit_id): bool(r.cancel_requested)
                        for r in conn.execute(
                            self.by_primary_key(
                                select(t.c.id, t.c.commit_id, t.c.cancel_requested)
                                .where(self.pairs_where(chunk), t.c.status == Status.DOING.value)
                                .with_for_update(skip_locked=True)
                            )
                        )
                    }
                    mine = [p for p in chunk if p in got]
                    out.cancel.update(p for p, flagged in got.items() if flagged)
                n = 0
                if mine:
                    renew = self.update_by_primary_key(
                        update(t)
                        .where(self.pairs_where(mine), t.c.status == Status.DOING.value)
                        .values(expires_at=end)
                    )
                    if locks:
                        n = conn.execute(renew).rowcount
                    elif self.update_returning:  # SQLite: the flags come back with it
                        rows = conn.execute(
                            renew.returning(t.c.id, t.c.commit_id, t.c.cancel_requested)
                        ).all()
                        n = len(rows)
                        out.cancel.update((r.id, r.commit_id) for r in rows if r.cancel_requested)
                    else:
                        n = conn.execute(renew).rowcount
                        out.cancel.update(
                            (r.id, r.commit_id)
                            for r in conn.execute(
                                select(t.c.id, t.c.commit_id).where(
                                    self.pairs_where(mine), t.c.cancel_requested == true()
                                )
                            )
                        )
                if n == len(chunk):
                    out.renewed.update(chunk)
                    continue
                rest: Sequence[Pair] = chunk
                if locks:
                    out.renewed.update(mine)
                    held = set(mine)
                    rest = [p for p in chunk if p not in held]
                current = {
                    (r.id, r.commit_id): bool(r.cancel_requested)
                    for r in conn.execute(  # a plain read: it waits on no lock
                        select(t.c.id, t.c.commit_id, t.c.cancel_requested).where(
                            t.c.id.in_([p[0] for p in rest]), t.c.status == Status.DOING.value
                        )
                    )
                }
                for p in rest:
                    if p not in current:
                        out.lost.add(p)
                        continue
                    if current[p]:
                        out.cancel.add(p)
                    if locks:
                        out.skipped.add(p)
                    else:
                        out.renewed.add(p)
        return out

    def start(self, pairs: Sequence[Pair], *, now: datetime | None) -> int:
        """One UPDATE per chunk: ``started_at`` = now for doing rows under these
        commit_ids, unmarked, whose lease has not expired."""
        t = self.table
        marked = 0
        with self.one_statement() if len(pairs) <= ROWS_PER_STATEMENT else self.begin() as conn:
            for i in range(0, len(pairs), ROWS_PER_STATEMENT):
                chunk = pairs[i : i + ROWS_PER_STATEMENT]
                at = self.now_expr(now)
                marked += int(
                    conn.execute(
                        update(t)
                        .where(
                            self.pairs_where(chunk),
                            t.c.status == Status.DOING.value,
                            t.c.started_at.is_(None),
                            t.c.expires_at > at,
                        )
                        .values(started_at=at)
                    ).rowcount
                )
        return marked

    def progress(self, reports: Sequence[Progress]) -> set[Pair]:
        """One UPDATE per report (the reports of one consumer's running jobs since its
        last write), in one transaction (a single one in one statement)."""
        t = self.table
        stmt = update(t).where(
            t.c.id == bindparam("b_id"),
            t.c.commit_id == bindparam("b_commit_id"),
            t.c.status == Status.DOING.value,
        )
        stmt = self.update_by_primary_key(
            stmt.values(progress=bindparam("b_progress"), progress_note=bindparam("b_note"))
        )
        written: set[Pair] = set()
        with self.one_statement() if len(reports) == 1 else self.begin() as conn:
            for (job_id, commit_id), fraction, note in reports:
                n = conn.execute(
                    stmt,
                    {
                        "b_id": job_id,
                        "b_commit_id": commit_id,
                        "b_progress": fraction,
                        "b_note": note,
                    },
                ).rowcount
                if n == 1:
                    written.add((job_id, commit_id))
        return written

    def request_cancel(self, pairs: Sequence[Pair]) -> set[Pair]:
        """``cancel_requested`` = true for doing rows under these commit_ids not flagged
        yet: one UPDATE per chunk; if some did not match, redone row by row."""
        t = self.table

        def flag(conn: Connection, chunk: Sequence[Pair]) -> int:
            return int(
                conn.execute(
                    self.update_by_primary_key(
                        update(t)
                        .where(
                            self.pairs_where(chunk),
                            t.c.status == Status.DOING.value,
                            t.c.cancel_requested == false(),
                        )
                        .values(cancel_requested=True)
                    )
                ).rowcount
            )

        try:
            with self.begin() as conn:
                for i in range(0, len(pairs), ROWS_PER_STATEMENT):
                    chunk = pairs[i : i + ROWS_PER_STATEMENT]
                    if flag(conn, chunk) != len(chunk):
                        raise _Mismatch
        except _Mismatch:
            with self.begin() as conn:
                return {p for p in pairs if flag(conn, [p]) == 1}
        return set(pairs)

    def transition(self, groups: Sequence[Group]) -> set[Pair]:
        """One UPDATE per group chunk in one transaction; when every row matched, all
        won; if not (someone moved a job meanwhile) the transaction is rolled back and
        redone one row at a time, so exactly the winners change."""
        try:
            with self.begin() as conn:
                for pairs, statuses, values in groups:
                    for i in range(0, len(pairs), ROWS_PER_STATEMENT):
                        chunk = pairs[i : i + ROWS_PER_STATEMENT]
                        if self.cas(conn, chunk, statuses, values) != len(chunk):
                            raise _Mismatch
        except _Mismatch:
            with self.begin() as conn:
                return self.transition_rows(conn, groups)
        return {p for pairs, _, _ in groups for p in pairs}

    def transition_rows(self, conn: Connection, groups: Sequence[Group]) -> set[Pair]:
        """Every group's compare-and-set one row at a time, in ``conn``: the winners."""
        won: set[Pair] = set()
        for pairs, statuses, values in groups:
            for pair in pairs:
                if self.cas(conn, [pair], statuses, values) == 1:
                    won.add(pair)
        return won

    # -- reaper -------------------------------------------------------------------------

    def expired_leases(self, task_id: str, *, limit: int, now: datetime | None) -> list[Zombie]:
        """doing rows of the task whose lease ended, oldest first."""
        t = self.table
        with self.begin() as conn:
            rows = conn.execute(
                select(
                    t.c.id,
                    t.c.commit_id,
                    t.c.failed_times,
                    t.c.priority,
                    t.c.started_at,
                    t.c.cancel_requested,
                )
                .where(
                    t.c.task_id == task_id,
                    t.c.status == Status.DOING.value,
                    t.c.expires_at < self.now_expr(now),
                )
                .order_by(t.c.expires_at)
                .limit(limit)
            ).all()
        return [
            Zombie(
                r.id,
                r.commit_id,
                r.failed_times,
                r.priority,
                r.started_at is not None,
                bool(r.cancel_requested),
            )
            for r in rows
        ]

    def lock_current(self, conn: Connection, ids: Sequence[int], status: Status) -> list[Row[Any]]:
        """``SELECT … FOR UPDATE SKIP LOCKED`` of the rows still in ``status``, by primary
        key (SQLite: its write lock already holds the table)."""
        t = self.table
        out: list[Row[Any]] = []
        for i in range(0, len(ids), ROWS_PER_STATEMENT):
            out.extend(
                conn.execute(
                    self.by_primary_key(
                        select(
                            t.c.id,
                            t.c.commit_id,
                            t.c.expires_at,
                            t.c.dispatch_deadline,
                            t.c.started_at,
                            t.c.started_at,
                            t.c.cancel_requested,
                        )
                        .where(
                            t.c.id.in_(ids[i : i + ROWS_PER_STATEMENT]), t.c.status == status.value
                        )
                        .with_for_update(skip_locked=True)
                    )
                )
            )
        return out

    def update_locked(
        self,
        conn: Connection,
        pairs: Sequence[Pair],
        statuses: Iterable[FromStatus],
        values: dict[str, Any],
    ) -> int:
        """The compare-and-set of locked rows, by primary key; rows changed."""
        t = self.table
        cond = self.status_cond(statuses)
        n = 0
        for i in range(0, len(pairs), ROWS_PER_STATEMENT):
            chunk = pairs[i : i + ROWS_PER_STATEMENT]
            n += int(
                conn.execute(
                    self.update_by_primary_key(
                        update(t)
                        .where(self.pairs_where(chunk), cond)
                        .values(commit_id=t.c.commit_id + 1, **sa_values(t, values))
                    )
                ).rowcount
            )
        return n

    def sweep_scan(
        self,
        task_id: str,
        *,
        now: datetime,
        cutoffs: dict[str, datetime],
        default_priority: str,
        limit: int,
    ) -> list[tuple[int, int, str]]:
        """Due todo rows past their priority's cutoff, earliest deadline first (a todo
        row has no lease: ``expires_at IS NULL`` puts the deadline next in the task
        index)."""
        t = self.table
        deadline = t.c.dispatch_deadline
        cond: ColumnElement[bool]
        if len(set(cutoffs.values())) == 1:
            cond = deadline < next(iter(cutoffs.values()))
        else:
            others = [p for p in cutoffs if p != default_priority]
            cond = or_(
                *(and_(t.c.priority == p, deadline < cutoffs[p]) for p in others),
                and_(
                    t.c.priority.not_in(others),
                    deadline < cutoffs[default_priority],
                ),
            )
        with self.begin() as conn:
            rows = conn.execute(
                select(t.c.id, t.c.commit_id, t.c.priority)
                .where(
                    t.c.task_id == task_id,
                    t.c.status == Status.TODO.value,
                    t.c.expires_at.is_(None),
                    deadline < max(cutoffs.values()),
                    cond,
                    t.c.run_at <= now,
                )
                .order_by(deadline)
                .limit(limit)
            ).all()
        return [(int(r.id), int(r.commit_id), str(r.priority)) for r in rows]

    def dispatch_deadlines(self, pairs: Sequence[Pair]) -> dict[Pair, datetime]:
        """The dispatch deadline of each current todo pair."""
        t = self.table
        with self.begin() as conn:
            rows = conn.execute(
                select(t.c.id, t.c.commit_id, t.c.dispatch_deadline).where(
                    self.pairs_where(pairs), t.c.status == Status.TODO.value
                )
            ).all()
        return {
            (r.id, r.commit_id): r.dispatch_deadline
            for r in rows
            if r.dispatch_deadline is not None
        }

    def todo_page(
        self, task_id: str, *, after: tuple[datetime, int] | None, limit: int
    ) -> list[tuple[Message, datetime]]:
        """Recovery: a page of todo rows in (dispatch_deadline, id) order, read-only."""
        t = self.table
        deadline = t.c.dispatch_deadline
        cond = [
            t.c.task_id == task_id,
            t.c.status == Status.TODO.value,
            t.c.expires_at.is_(None),
            deadline.is_not(None),
        ]
        if after is not None:
            last, last_id = after
            # ``deadline >= last`` is implied by the OR, and starts the index scan at
            # the cursor (PostgreSQL reads the OR as a filter: every page would walk the
            # backlog from its start).
            cond.append(deadline >= last)
            cond.append(or_(deadline > last, and_(deadline == last, t.c.id > last_id)))
        with self.begin() as conn:
            rows = conn.execute(
                select(t.c.id, t.c.commit_id, t.c.priority, t.c.run_at, deadline)
                .where(*cond)
                .order_by(deadline, t.c.id)
                .limit(limit)
            ).all()
        return [
            (Message(r.id, r.commit_id, r.priority, r.run_at), r.dispatch_deadline) for r in rows
        ]

    # -- admin --------------------------------------------------------------------------

    def priorities(self, ids: Sequence[int]) -> dict[int, str]:
        """The priority of each of ``ids``."""
        t = self.table
        out: dict[int, str] = {}
        with self.begin() as conn:
            for i in range(0, len(ids), ROWS_PER_STATEMENT):
                chunk = list(ids[i : i + ROWS_PER_STATEMENT])
                for r in conn.execute(select(t.c.id, t.c.priority).where(t.c.id.in_(chunk))):
                    out[int(r.id)] = str(r.priority)
        return out

    def get(self, job_id: int, task_id: str | None) -> JobRecord | None:
        """One row."""
        t = self.table
        stmt = select(t).where(t.c.id == job_id)
        if task_id is not None:
            stmt = stmt.where(t.c.task_id == task_id)
        with self.begin() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else job_record(row)

    def cancel_states(self, pairs: Sequence[Pair]) -> dict[Pair, tuple[Status, bool]]:
        """Status and ``cancel_requested`` of the rows still at these commit_ids."""
        t = self.table
        out: dict[Pair, tuple[Status, bool]] = {}
        with self.begin() as conn:
            for i in range(0, len(pairs), ROWS_PER_STATEMENT):
                chunk = pairs[i : i + ROWS_PER_STATEMENT]
                for r in conn.execute(
                    select(t.c.id, t.c.commit_id, t.c.status, t.c.cancel_requested).where(
                        self.pairs_where(chunk)
                    )
                ):
                    out[(r.id, r.commit_id)] = (Status(r.status), bool(r.cancel_requested))
        return out

    def find(
        self,
        *,
        task_id: str | None,
        ids: Sequence[int] | None,
        status: Status | None,
        since: datetime | None,
        until: datetime | None,
        limit: int | None,
        after_id: int | None,
    ) -> list[tuple[int, str, int, Status]]:
        """(id, task_id, commit_id, status) of the rows matching every filter, by id."""
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

    def stats(self, task_id: str | None) -> list[TaskStats]:
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

    def outstanding(self, task_id: str, worker: str, now: datetime) -> int:
        """One COUNT over the task's todo and doing rows (the status index)."""
        t = self.table
        todo = and_(t.c.status == Status.TODO.value, t.c.run_at <= now)
        mine = and_(t.c.status == Status.DOING.value, t.c.worker == worker)
        query = select(func.count()).where(t.c.task_id == task_id, or_(todo, mine))
        with self.begin() as conn:
            return int(conn.execute(query).scalar() or 0)

    def commit_one(self, task_id: str, pair: Pair, values: dict[str, Any]) -> CommitOne:
        """The fenced UPDATE (doing, no cancel requested); then the job's priority (won)
        or its state (lost)."""
        t = self.table
        job_id = pair[0]
        with self.begin() as conn:
            n = conn.execute(
                update(t)
                .where(
                    self.pairs_where([pair]),
                    t.c.status == Status.DOING.value,
                    t.c.cancel_requested == false(),
                    t.c.task_id == task_id,
                )
                .values(commit_id=t.c.commit_id + 1, **sa_values(t, values))
            ).rowcount
            if n == 1:
                prio = conn.execute(select(t.c.priority).where(t.c.id == job_id)).scalar()
                return CommitOne(True, str(prio), None, None)
            row = conn.execute(
                select(t.c.status, t.c.commit_id, t.c.cancel_requested).where(
                    t.c.id == job_id, t.c.task_id == task_id
                )
            ).first()
        if row is None:
            return CommitOne(False, None, None, None)
        return CommitOne(
            False, None, str(row.status), int(row.commit_id), bool(row.cancel_requested)
        )

    # -- schedules ----------------------------------------------------------------------

    def due_schedules(self, task_id: str, now: datetime, limit: int) -> list[ScheduleRecord]:
        """Schedules of the task due at ``now``, earliest first (the scheduler's scan, on
        the ``(task_id, next_fire_at)`` index)."""
        s = self.schedules
        stmt = (
            select(s)
            .where(s.c.task_id == task_id, s.c.next_fire_at <= now)
            .order_by(s.c.next_fire_at)
            .limit(limit)
        )
        with self.begin() as conn:
            return [schedule_record(r) for r in conn.execute(stmt)]

    def next_schedule_due(self, task_id: str) -> datetime | None:
        """The earliest ``next_fire_at`` of the task's schedules (None: nothing left)."""
        s = self.schedules
        stmt = (
            select(s.c.next_fire_at)
            .where(s.c.task_id == task_id, s.c.next_fire_at.is_not(None))
            .order_by(s.c.next_fire_at)
            .limit(1)
        )
        with self.begin() as conn:
            value: datetime | None = conn.execute(stmt).scalar()
        return value

    def fire_schedule(self, conn: Connection, rec: ScheduleRecord, values: dict[str, Any]) -> bool:
        """``UPDATE … WHERE task_id, name AND next_fire_at = old AND updated_at = old``:
        of all the schedulers that read the same row only one matches (row locks make
        the others wait for its commit, then re-check the WHERE clause)."""
        s = self.schedules
        with translate_errors(self.url, self.schedules.name):
            result = conn.execute(
                update(s)
                .where(
                    s.c.task_id == rec.task_id,
                    s.c.name == rec.name,
                    s.c.next_fire_at == rec.next_fire_at,
                    s.c.updated_at == rec.updated_at,
                )
                .values(**values)
            )
        return int(result.rowcount) == 1

    def insert_schedule(self, row: dict[str, Any]) -> bool:
        """INSERT a schedule declaration; False when ``(task_id, name)`` exists (another
        process declared it first)."""
        with translate_errors(self.url, self.schedules.name):
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(self.schedules).values(**row))
            except IntegrityError:
                return False
        return True

    def redeclare_schedule(
        self, task_id: str, name: str, updated_at: datetime, values: dict[str, Any]
    ) -> bool:
        """Redeclaration: compare-and-set of a schedule row on ``updated_at`` as it was
        read; True if this call won."""
        s = self.schedules
        with self.begin() as conn:
            result = conn.execute(
                update(s)
                .where(s.c.task_id == task_id, s.c.name == name, s.c.updated_at == updated_at)
                .values(**values)
            )
        return int(result.rowcount) == 1

    def delete_schedule(self, task_id: str, name: str) -> bool:
        """DELETE one schedule; True if it existed."""
        s = self.schedules
        with self.begin() as conn:
            result = conn.execute(delete(s).where(s.c.task_id == task_id, s.c.name == name))
        return int(result.rowcount) > 0

    def get_schedule(self, task_id: str, name: str) -> ScheduleRecord | None:
        """One schedule, by its key."""
        s = self.schedules
        with self.begin() as conn:
            row = conn.execute(select(s).where(s.c.task_id == task_id, s.c.name == name)).first()
        return None if row is None else schedule_record(row)

    def list_schedules(self, task_id: str | None) -> list[ScheduleRecord]:
        """Every schedule of the table (or of one task), by task and name."""
        s = self.schedules
        stmt = select(s).order_by(s.c.task_id, s.c.name)
        if task_id is not None:
            stmt = stmt.where(s.c.task_id == task_id)
        with self.begin() as conn:
            return [schedule_record(r) for r in conn.execute(stmt)]

    # -- job management and retention ---------------------------------------------------

    @contextlib.contextmanager
    def begin_read_committed(self) -> Iterator[Connection]:
        """A transaction at READ COMMITTED on MariaDB/MySQL (no gap locks), as
        :meth:`begin` elsewhere (the others run at READ COMMITTED or have no row locks)."""
        with translate_errors(self.url, self.table_name), self.engine.connect() as conn:
            if self._dialect.name == "mysql":
                conn = conn.execution_options(isolation_level="READ COMMITTED")
            with conn.begin():
                yield conn

    def _filter(self, f: JobFilter, after_id: int | None) -> list[ColumnElement[bool]]:
        """The WHERE clause of :class:`JobFilter` ``f``, past ``after_id``."""
        t, u = self.table, self.unique
        cond: list[ColumnElement[bool]] = []
        if f.ids is not None:
            cond.append(t.c.id.in_(list(f.ids)))
        if f.task_id is not None:
            cond.append(t.c.task_id == f.task_id)
        if f.statuses:
            cond.append(t.c.status.in_([s.value for s in f.statuses]))
        if f.priority is not None:
            cond.append(t.c.priority == f.priority)
        if f.key is not None:
            holders = select(u.c.job_id).where(u.c.key == f.key)
            if f.task_id is not None:
                holders = holders.where(u.c.task_id == f.task_id)
            cond.append(t.c.id.in_(holders))
        if f.since is not None:
            cond.append(t.c.updated_at >= f.since)
        if f.until is not None:
            cond.append(t.c.updated_at < f.until)
        if f.error_contains is not None:
            cond.append(t.c.last_error.icontains(f.error_contains, autoescape=True))
        if after_id is not None:
            cond.append(t.c.id > after_id)
        return cond

    def list_jobs(self, f: JobFilter, *, limit: int, after_id: int | None) -> list[JobRecord]:
        """``SELECT *`` of the rows matching every filter, by id, past ``after_id``."""
        t = self.table
        stmt = select(t).where(*self._filter(f, after_id)).order_by(t.c.id).limit(limit)
        with self.begin() as conn:
            return [job_record(r) for r in conn.execute(stmt)]

    def matching(self, f: JobFilter, *, limit: int, after_id: int | None) -> list[Found]:
        """``SELECT id, task_id, commit_id, status`` of the rows matching every filter,
        by id, past ``after_id``."""
        t = self.table
        stmt = (
            select(t.c.id, t.c.task_id, t.c.commit_id, t.c.status)
            .where(*self._filter(f, after_id))
            .order_by(t.c.id)
            .limit(limit)
        )
        with self.begin() as conn:
            return [(r.id, r.task_id, r.commit_id, Status(r.status)) for r in conn.execute(stmt)]

    def delete_current(self, rows: Sequence[Found]) -> list[int]:
        """Per status: ``SELECT id … WHERE id IN (…) AND status AND (id, commit_id)
        pairs FOR UPDATE``, then ``DELETE … WHERE id IN (locked)``; one transaction."""
        t = self.table
        won: list[int] = []
        with self.begin() as conn:
            for status in {s for _, _, _, s in rows}:
                pairs = [(j, c) for j, _, c, s in rows if s is status]
                ids = [j for j, _ in pairs]
                match = or_(*(and_(t.c.id == j, t.c.commit_id == c) for j, c in pairs))
                lock = select(t.c.id).where(t.c.id.in_(ids), t.c.status == status.value, match)
                if self.row_locks:
                    lock = lock.with_for_update()
                locked = [int(r) for r in conn.execute(lock).scalars()]
                if locked:
                    conn.execute(delete(t).where(t.c.id.in_(locked)))
                    won.extend(locked)
        return won

    def release_keys(self, task_ids: Sequence[str], job_ids: Sequence[int]) -> None:
        """``DELETE FROM <table>_unique WHERE task_id IN (…) AND job_id IN (…)`` (a key
        handed over meanwhile names its new job and stays)."""
        if not job_ids:
            return
        u = self.unique
        with self.begin_read_committed() as conn:
            conn.execute(
                delete(u).where(u.c.task_id.in_(list(task_ids)), u.c.job_id.in_(list(job_ids)))
            )

    def save_policy(self, task_id: str, keep_ms: Mapping[Status, int]) -> None:
        """``DELETE`` the task's other statuses, then per status an ``UPDATE``, or an
        ``INSERT`` in a savepoint when it matched nothing (and the ``UPDATE`` again if
        another writer inserted it first)."""
        r = self.retention
        with self.begin_read_committed() as conn:
            now = self.db_now(conn)
            conn.execute(
                delete(r).where(
                    r.c.task_id == task_id, r.c.status.not_in([s.value for s in keep_ms])
                )
            )
            for status, ms in sorted(keep_ms.items()):
                values = {"keep_ms": ms, "updated_at": now}
                key = and_(r.c.task_id == task_id, r.c.status == status.value)
                if conn.execute(update(r).where(key).values(**values)).rowcount:
                    continue
                savepoint = conn.begin_nested()
                try:
                    conn.execute(insert(r).values(task_id=task_id, status=status.value, **values))
                    savepoint.commit()
                except IntegrityError:  # another process inserted it first: ours wins
                    savepoint.rollback()
                    conn.execute(update(r).where(key).values(**values))

    def policies(self, task_id: str | None) -> list[tuple[str, Status, int]]:
        """``SELECT task_id, status, keep_ms FROM <table>_retention`` (of one task)."""
        r = self.retention
        stmt = select(r.c.task_id, r.c.status, r.c.keep_ms)
        if task_id is not None:
            stmt = stmt.where(r.c.task_id == task_id)
        with self.begin() as conn:
            return [(t, Status(s), int(ms)) for t, s, ms in conn.execute(stmt)]

    # The finished rows, in the terms of the finished rows' index (schema.jobs_table):
    # here ``status`` and ``updated_at`` under the partial index's predicate; the MySQL
    # driver overrides these three hooks with its generated columns.

    def finished_where(
        self, task_id: str, status: Status, cutoff: datetime
    ) -> list[ColumnElement[bool]]:
        """The finished ``status`` rows of the task changed before ``cutoff``."""
        t = self.scanned
        return [
            t.c.task_id == task_id,
            t.c.status == status.value,
            t.c.expires_at.is_(None),  # the partial index's predicate (schema.FINISHED)
            t.c.dispatch_deadline.is_(None),
            t.c.updated_at < cutoff,
        ]

    def finished_at(self) -> ColumnElement[datetime]:
        """A finished row's ``updated_at`` as the finished rows' index holds it."""
        return self.scanned.c.updated_at

    def by_finished_index(self, stmt: Select[Any]) -> Select[Any]:
        """A read of finished rows that must go by their index (a hook: the MySQL
        driver forces it)."""
        return stmt

    def count_finished(self, task_id: str, status: Status, cutoff: datetime) -> int:
        """``SELECT count(*)`` of the finished rows before ``cutoff``."""
        stmt = (
            select(func.count())
            .select_from(self.scanned)
            .where(*self.finished_where(task_id, status, cutoff))
        )
        with self.begin() as conn:
            return int(conn.execute(self.by_finished_index(stmt)).scalar_one())

    def finished_page(
        self,
        conn: Connection,
        task_id: str,
        status: Status,
        cutoff: datetime,
        *,
        after: Cursor | None,
        limit: int,
    ) -> list[tuple[int, datetime]]:
        """``SELECT id, updated_at … ORDER BY updated_at, id LIMIT n FOR UPDATE SKIP
        LOCKED`` (no lock on SQLite)."""
        t = self.scanned
        at = self.finished_at()
        cond = self.finished_where(task_id, status, cutoff)
        if after is not None:
            last_at, last_id = after
            # ``at >= last_at`` is implied by the OR, and is there for the index: it
            # starts the scan at the cursor (PostgreSQL reads an OR as a filter, and
            # would walk every entry from the start, the purged ones included).
            cond.append(at >= last_at)
            cond.append(or_(at > last_at, and_(at == last_at, t.c.id > last_id)))
        pick = select(t.c.id, at.label("updated_at")).where(*cond).order_by(at, t.c.id)
        pick = self.by_finished_index(pick.limit(limit))
        if self.row_locks:
            pick = pick.with_for_update(skip_locked=True)
        return [(int(r.id), r.updated_at) for r in conn.execute(pick)]

    def key_holds(
        self, conn: Connection, task_id: str, job_ids: Sequence[int]
    ) -> list[tuple[int, int]]:
        """``SELECT job_id, hold_ms FROM <table>_unique WHERE task_id AND job_id IN``."""
        u = self.unique
        rows = conn.execute(
            select(u.c.job_id, u.c.hold_ms).where(
                u.c.task_id == task_id, u.c.job_id.in_(list(job_ids))
            )
        )
        return [(int(j), int(ms)) for j, ms in rows]

    def remove_finished(
        self,
        conn: Connection,
        task_id: str,
        status: Status,
        cutoff: datetime,
        ids: Sequence[int],
        *,
        archived_at: datetime | None,
    ) -> int:
        """``INSERT INTO <table>_archive … SELECT`` (archiving), then ``DELETE … WHERE id
        IN (…)``, both repeating the conditions (without row locks, on SQLite, a row may
        have moved since the read)."""
        t = self.scanned
        again = [t.c.id.in_(list(ids)), *self.finished_where(task_id, status, cutoff)]
        if archived_at is not None:
            # the jobs table's own columns (not the generated ones of MariaDB/MySQL)
            names = [c.name for c in self.table.columns]
            conn.execute(
                insert(self.archive).from_select(
                    [*names, "archived_at"],
                    select(
                        *(t.c[n] for n in names),
                        literal(archived_at, self.archive.c.archived_at.type),
                    ).where(*again),
                )
            )
        return int(conn.execute(delete(t).where(*again)).rowcount)
