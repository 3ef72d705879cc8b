"""Every SQL statement of job management and retention: listing and deleting jobs,
the per-task retention policy (``<table>_retention``), and purging finished rows past
their retention (deleted, or moved to ``<table>_archive``).

Statements, by caller:

* ``meepo jobs list``: :meth:`Retention.list_jobs` (read-only, keyset-paginated by id)
* ``meepo jobs delete``: :meth:`Retention.matching` then :meth:`Retention.delete` (a
  compare-and-set on ``(id, commit_id, status)`` per row: a job that moved since it
  was read is left alone)
* ``Task(retention=...)`` and the cleaner: :meth:`Retention.save_policy`,
  :meth:`Retention.policy`
* the cleaner and ``meepo purge``: :meth:`Retention.purge_chunk`,
  :meth:`Retention.count_older`

A purge chunk is one short transaction of at most :data:`CHUNK` rows: it reads the
candidates by the index of finished rows (``task_id, status``, both deadlines NULL,
``updated_at < cutoff``; on MariaDB/MySQL the same rows as ``task_id,
finished_status, finished_at < cutoff``, over the generated columns of migration 0008)
in ``(updated_at, id)`` order, locking
them ``FOR UPDATE SKIP LOCKED`` on PostgreSQL and MariaDB/MySQL (so racing cleaners
take different rows and none waits on another), leaves out every row that still holds
a unique key (finished less than its ``unique_for`` ago), optionally copies the rest
into the archive, and deletes them by primary key, repeating the conditions. On
MariaDB/MySQL the chunk runs at READ COMMITTED, so the range read takes no gap locks
that would hold up commits of other jobs. The ``<table>_unique`` rows of the deleted
jobs (their hold is over) are removed after, in a transaction of their own, so the
cleaner never holds a job's row lock while it waits for a key's (a push taking a key
over locks them the other way round).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.sql.elements import ColumnElement

from ..errors import LedgerUnavailableError
from ..records import JobRecord, Status
from .clock import read_db_now
from .driver import ROWS_PER_STATEMENT
from .engine import translate_errors
from .schema import archive_table, jobs_table, retention_table, unique_table

T = TypeVar("T")

#: Rows a purge chunk (one short transaction) and a delete statement handle at most.
CHUNK = min(1000, ROWS_PER_STATEMENT)
#: A row of :meth:`Retention.matching`: ``(id, task_id, commit_id, status)``.
Found = tuple[int, str, int, Status]
#: How many times a policy write or a purge chunk that lost a deadlock to another
#: writer (a racing cleaner) is tried.
DEADLOCK_RETRIES = 5
#: Where a purge pass has got to: the ``(updated_at, id)`` of the last row it read.
Cursor = tuple[datetime, int]

__all__ = ["CHUNK", "Cursor", "Found", "JobFilter", "PurgeChunk", "Retention"]


@dataclass(frozen=True)
class JobFilter:
    """The filters of ``meepo jobs list`` and ``meepo jobs delete``; every one given
    must match. ``since``/``until`` bound ``updated_at`` (the job's last change), as
    for ``meepo repush``; ``key`` is the unique key the job holds; ``error_contains``
    matches ``last_error`` without regard to case."""

    task_id: str | None = None
    statuses: tuple[Status, ...] = ()
    priority: str | None = None
    key: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    error_contains: str | None = None
    ids: tuple[int, ...] | None = None

    @property
    def empty(self) -> bool:
        return self == JobFilter()


@dataclass(frozen=True)
class PurgeChunk:
    """What one :meth:`Retention.purge_chunk` did: rows removed (deleted or
    archived), rows left because they still hold a unique key, and the cursor to pass
    on (None: nothing more to read)."""

    removed: int
    held: int
    cursor: Cursor | None


class Retention:
    """Job management and retention statements on the ledger table ``table``."""

    def __init__(self, engine: Engine, table: str) -> None:
        self.engine = engine
        self.table_name = table
        self.url = engine.url.render_as_string(hide_password=True)
        self.jobs = jobs_table(table)
        #: The jobs table with its dialect's own columns: on MariaDB/MySQL the generated
        #: ``finished_status`` and ``finished_at`` the finished rows' index is built on.
        self.scanned = jobs_table(table, dialect=engine.dialect.name)
        self.generated = engine.dialect.name == "mysql"
        self.unique = unique_table(table)
        self.archive = archive_table(table)
        self.retention = retention_table(table)

    @contextlib.contextmanager
    def begin(self, *, read_committed: bool = False) -> Iterator[Connection]:
        """A transaction, errors translated; ``read_committed`` on MariaDB/MySQL (no gap
        locks; the other servers already run at READ COMMITTED or have no row locks)."""
        with translate_errors(self.url, self.table_name), self.engine.connect() as conn:
            if read_committed and conn.dialect.name == "mysql":
                conn = conn.execution_options(isolation_level="READ COMMITTED")
            with conn.begin():
                yield conn

    @property
    def row_locks(self) -> bool:
        """Whether the server has row locks and SKIP LOCKED (not SQLite)."""
        return self.engine.dialect.name in ("postgresql", "mysql")

    # -- listing ----------------------------------------------------------------------

    def _where(self, f: JobFilter) -> list[ColumnElement[bool]]:
        t, u = self.jobs, self.unique
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
        return cond

    def list_jobs(
        self, f: JobFilter, *, limit: int, after_id: int | None = None
    ) -> list[JobRecord]:
        """Up to ``limit`` jobs matching ``f`` with ids above ``after_id``, by id."""
        t = self.jobs
        cond = self._where(f)
        if after_id is not None:
            cond.append(t.c.id > after_id)
        stmt = select(t).where(*cond).order_by(t.c.id).limit(limit)
        with self.begin() as conn:
            return [_record(r._mapping) for r in conn.execute(stmt)]

    def matching(
        self, f: JobFilter, *, limit: int = CHUNK, after_id: int | None = None
    ) -> list[Found]:
        """``(id, task_id, commit_id, status)`` of up to ``limit`` jobs matching ``f``
        with ids above ``after_id``, by id."""
        t = self.jobs
        cond = self._where(f)
        if after_id is not None:
            cond.append(t.c.id > after_id)
        stmt = (
            select(t.c.id, t.c.task_id, t.c.commit_id, t.c.status)
            .where(*cond)
            .order_by(t.c.id)
            .limit(limit)
        )
        with self.begin() as conn:
            return [(r.id, r.task_id, r.commit_id, Status(r.status)) for r in conn.execute(stmt)]

    # -- deleting ---------------------------------------------------------------------

    def delete(self, rows: Sequence[Found]) -> list[int]:
        """Delete each row if it is still at the ``(commit_id, status)`` it was read at
        (a compare-and-set: a job claimed, committed or repushed since is left alone);
        returns the ids deleted. Deleting a running job fences its consumer: its
        heartbeats and its commit match no row and change nothing. The unique keys the
        deleted jobs held are released."""
        t = self.jobs
        gone: list[int] = []
        for i in range(0, len(rows), CHUNK):
            chunk = rows[i : i + CHUNK]
            won: list[int] = []
            with self.begin() as conn:
                for status in {s for _, _, _, s in chunk}:
                    pairs = [(j, c) for j, _, c, s in chunk if s is status]
                    ids = [j for j, _ in pairs]
                    match = or_(*(and_(t.c.id == j, t.c.commit_id == c) for j, c in pairs))
                    lock = select(t.c.id).where(t.c.id.in_(ids), t.c.status == status.value, match)
                    if self.row_locks:
                        lock = lock.with_for_update()
                    locked = [int(r) for r in conn.execute(lock).scalars()]
                    if locked:
                        conn.execute(delete(t).where(t.c.id.in_(locked)))
                        won.extend(locked)
            self._release_keys(sorted({task for _, task, _, _ in chunk}), won)
            gone.extend(won)
        return sorted(gone)

    def _release_keys(self, task_ids: Sequence[str], ids: Sequence[int]) -> None:
        """Remove the ``<table>_unique`` rows naming jobs that no longer exist (a key
        handed over meanwhile names its new job and stays)."""
        if not ids:
            return
        u = self.unique
        with self.begin(read_committed=True) as conn:
            conn.execute(delete(u).where(u.c.task_id.in_(list(task_ids)), u.c.job_id.in_(ids)))

    # -- the retention policy ---------------------------------------------------------

    def save_policy(self, task_id: str, policy: Mapping[Status, float]) -> None:
        """Make ``policy`` (seconds to keep, per finished status) the task's; statuses
        not in it lose their retention (kept for ever). Safe to race: the last writer's
        policy is the one every cleaner reads (a deadlock between two writers is
        retried)."""
        _retrying_deadlocks(lambda: self._save_policy(task_id, policy))

    def _save_policy(self, task_id: str, policy: Mapping[Status, float]) -> None:
        r = self.retention
        with self.begin(read_committed=True) as conn:
            now = read_db_now(conn)
            conn.execute(
                delete(r).where(
                    r.c.task_id == task_id, r.c.status.not_in([s.value for s in policy])
                )
            )
            for status, secs in sorted(policy.items()):
                values = {"keep_ms": round(secs * 1000), "updated_at": now}
                n = conn.execute(
                    update(r)
                    .where(r.c.task_id == task_id, r.c.status == status.value)
                    .values(**values)
                ).rowcount
                if n == 0:
                    self._insert_policy(conn, task_id, status, values)

    def _insert_policy(
        self, conn: Connection, task_id: str, status: Status, values: dict[str, object]
    ) -> None:
        from sqlalchemy.exc import IntegrityError

        r = self.retention
        savepoint = conn.begin_nested()
        try:
            conn.execute(insert(r).values(task_id=task_id, status=status.value, **values))
            savepoint.commit()
        except IntegrityError:  # another process inserted it first: ours wins
            savepoint.rollback()
            conn.execute(
                update(r).where(r.c.task_id == task_id, r.c.status == status.value).values(**values)
            )

    def policy(self, task_id: str) -> dict[Status, float]:
        """The task's stored retention: seconds to keep, per finished status."""
        r = self.retention
        with self.begin() as conn:
            rows = conn.execute(select(r.c.status, r.c.keep_ms).where(r.c.task_id == task_id)).all()
        return {Status(s): ms / 1000 for s, ms in rows}

    def policies(self) -> dict[str, dict[Status, float]]:
        """Every task's stored retention."""
        r = self.retention
        out: dict[str, dict[Status, float]] = {}
        with self.begin() as conn:
            for task_id, s, ms in conn.execute(select(r.c.task_id, r.c.status, r.c.keep_ms)):
                out.setdefault(task_id, {})[Status(s)] = ms / 1000
        return out

    # -- purging ----------------------------------------------------------------------

    def db_now(self) -> datetime:
        """The database's clock (docs/design.md invariant 8): cutoffs are measured by it."""
        with self.begin() as conn:
            return read_db_now(conn)

    @property
    def _finished_hint(self) -> str:
        """MariaDB/MySQL's hint for the index of finished rows (see :meth:`purge_chunk`)."""
        return f"FORCE INDEX (ix_{self.table_name}_finished)"

    @property
    def _finished_at(self) -> ColumnElement[datetime]:
        """A finished row's ``updated_at``, as the finished rows' index holds it (the
        generated ``finished_at`` on MariaDB/MySQL)."""
        t = self.scanned
        return t.c.finished_at if self.generated else t.c.updated_at

    def _older(self, task_id: str, status: Status, cutoff: datetime) -> list[ColumnElement[bool]]:
        """The finished ``status`` rows of the task that last changed before ``cutoff``,
        in the terms of the finished rows' index (schema.jobs_table)."""
        t = self.scanned
        if self.generated:
            # NULL unless both deadlines are (schema.FINISHED): the same rows
            return [
                t.c.task_id == task_id,
                t.c.finished_status == status.value,
                t.c.finished_at < cutoff,
            ]
        return [
            t.c.task_id == task_id,
            t.c.status == status.value,
            t.c.expires_at.is_(None),  # the partial index's predicate (schema.FINISHED)
            t.c.dispatch_deadline.is_(None),
            t.c.updated_at < cutoff,
        ]

    def count_older(self, task_id: str, status: Status, cutoff: datetime) -> int:
        """How many ``status`` rows of the task last changed before ``cutoff``."""
        stmt = (
            select(func.count())
            .select_from(self.scanned)
            .where(*self._older(task_id, status, cutoff))
            .with_hint(self.scanned, self._finished_hint, "mysql")
        )
        with self.begin() as conn:
            return int(conn.execute(stmt).scalar_one())

    def purge_chunk(
        self,
        task_id: str,
        status: Status,
        cutoff: datetime,
        *,
        after: Cursor | None = None,
        archive: bool = False,
        limit: int = CHUNK,
    ) -> PurgeChunk:
        """Remove up to ``limit`` (at most :data:`CHUNK`) finished rows of the task that
        last changed before ``cutoff``, past ``after``; rows locked by another cleaner
        are skipped, rows still holding a unique key are kept. ``archive`` copies them
        into ``<table>_archive`` first, in the same transaction. A chunk that lost a
        deadlock to a racing cleaner (MariaDB) is rolled back and tried again."""
        return _retrying_deadlocks(
            lambda: self._purge_chunk(
                task_id, status, cutoff, after=after, archive=archive, limit=limit
            )
        )

    def _purge_chunk(
        self,
        task_id: str,
        status: Status,
        cutoff: datetime,
        *,
        after: Cursor | None = None,
        archive: bool = False,
        limit: int = CHUNK,
    ) -> PurgeChunk:
        if not status.terminal:
            raise ValueError(
                f"only finished jobs are purged (done, failed, cancelled), not {status}"
            )
        t, u = self.scanned, self.unique
        limit = max(1, min(limit, CHUNK))
        cond = self._older(task_id, status, cutoff)
        at_col = self._finished_at
        if after is not None:
            at, last = after
            cond.append(or_(at_col > at, and_(at_col == at, t.c.id > last)))
        pick = (
            select(t.c.id, at_col.label("updated_at"))
            .where(*cond)
            .order_by(at_col, t.c.id)
            .limit(limit)
        )
        # MariaDB/MySQL would rather read (task_id, status, NULL) in the task index and
        # sort every finished row: the index of finished rows is already in order.
        pick = pick.with_hint(t, self._finished_hint, "mysql")
        if self.row_locks:
            pick = pick.with_for_update(skip_locked=True)
        with self.begin(read_committed=True) as conn:
            rows = conn.execute(pick).all()
            if not rows:
                return PurgeChunk(0, 0, None)
            now = read_db_now(conn)
            changed = {int(r.id): r.updated_at for r in rows}
            holds = conn.execute(
                select(u.c.job_id, u.c.hold_ms).where(
                    u.c.task_id == task_id, u.c.job_id.in_(list(changed))
                )
            ).all()
            held = {
                int(j) for j, ms in holds if now < changed[int(j)] + timedelta(milliseconds=int(ms))
            }
            ids = [i for i in changed if i not in held]
            removed = 0
            if ids:
                # The conditions again: without row locks (SQLite) a row may have moved
                # since the read.
                again = [t.c.id.in_(ids), *self._older(task_id, status, cutoff)]
                if archive:
                    # the jobs table's own columns (not the generated ones)
                    names = [c.name for c in self.jobs.columns]
                    conn.execute(
                        insert(self.archive).from_select(
                            [*names, "archived_at"],
                            select(
                                *(t.c[n] for n in names),
                                literal(now, self.archive.c.archived_at.type),
                            ).where(*again),
                        )
                    )
                removed = conn.execute(delete(t).where(*again)).rowcount
        self._release_keys([task_id], ids)
        last_row = rows[-1]
        cursor = None if len(rows) < limit else (last_row.updated_at, int(last_row.id))
        return PurgeChunk(removed, len(held), cursor)


def _record(m: Any) -> JobRecord:
    values = {c: m[c] for c in _FIELDS}
    values["payload"] = bytes(values["payload"])
    if values["result"] is not None:
        values["result"] = bytes(values["result"])
    return JobRecord(**values, status=Status(m["status"]), data=values["payload"])


#: The JobRecord fields read from their columns (``data`` is the payload, undecoded).
_FIELDS = [f for f in JobRecord.__dataclass_fields__ if f not in ("status", "data")]


def _retrying_deadlocks(work: Callable[[], T]) -> T:
    """``work()``, tried again (up to :data:`DEADLOCK_RETRIES` times) when the database
    chose it as a deadlock's victim: its transaction was rolled back whole."""
    for attempt in range(DEADLOCK_RETRIES):
        try:
            return work()
        except LedgerUnavailableError as exc:
            if "deadlock" not in str(exc).lower() or attempt == DEADLOCK_RETRIES - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover
