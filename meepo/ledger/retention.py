"""Job management and retention: listing and deleting jobs, the per-task retention
policy (``<table>_retention``), and purging finished rows past their retention
(deleted, or moved to ``<table>_archive``). The rules live here; every statement is
the ledger driver's (:class:`~meepo.ledger.driver.LedgerDriver`, docs/drivers.md).

Operations, by caller:

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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import Engine

from ..errors import LedgerUnavailableError
from ..records import JobRecord, Status
from .driver import ROWS_PER_STATEMENT, Cursor, Found, JobFilter, LedgerDriver
from .drivers import driver_for

T = TypeVar("T")

#: Rows a purge chunk (one short transaction) and a delete statement handle at most.
CHUNK = min(1000, ROWS_PER_STATEMENT)
#: How many times a policy write or a purge chunk that lost a deadlock to another
#: writer (a racing cleaner) is tried.
DEADLOCK_RETRIES = 5

__all__ = ["CHUNK", "Cursor", "Found", "JobFilter", "PurgeChunk", "Retention"]


@dataclass(frozen=True)
class PurgeChunk:
    """What one :meth:`Retention.purge_chunk` did: rows removed (deleted or
    archived), rows left because they still hold a unique key, and the cursor to pass
    on (None: nothing more to read)."""

    removed: int
    held: int
    cursor: Cursor | None


class Retention:
    """Job management and retention on the ledger table ``table``, through the
    ledger driver of ``engine``'s server (or the one called ``driver``)."""

    def __init__(self, engine: Engine, table: str, *, driver: str | None = None) -> None:
        self.engine = engine
        self.table_name = table
        self.driver: LedgerDriver = driver_for(engine, table, driver)
        self.jobs = self.driver.table
        self.unique = self.driver.unique
        self.archive = self.driver.archive
        self.retention = self.driver.retention

    # -- listing ----------------------------------------------------------------------

    def list_jobs(
        self, f: JobFilter, *, limit: int, after_id: int | None = None
    ) -> list[JobRecord]:
        """Up to ``limit`` jobs matching ``f`` with ids above ``after_id``, by id."""
        return self.driver.list_jobs(f, limit=limit, after_id=after_id)

    def matching(
        self, f: JobFilter, *, limit: int = CHUNK, after_id: int | None = None
    ) -> list[Found]:
        """``(id, task_id, commit_id, status)`` of up to ``limit`` jobs matching ``f``
        with ids above ``after_id``, by id."""
        return self.driver.matching(f, limit=limit, after_id=after_id)

    # -- deleting ---------------------------------------------------------------------

    def delete(self, rows: Sequence[Found]) -> list[int]:
        """Delete each row if it is still at the ``(commit_id, status)`` it was read at
        (a compare-and-set: a job claimed, committed or repushed since is left alone);
        returns the ids deleted. Deleting a running job fences its consumer: its
        heartbeats and its commit match no row and change nothing. The unique keys the
        deleted jobs held are released."""
        gone: list[int] = []
        for i in range(0, len(rows), CHUNK):
            chunk = rows[i : i + CHUNK]
            won = self.driver.delete_current(chunk)
            self.driver.release_keys(sorted({task for _, task, _, _ in chunk}), won)
            gone.extend(won)
        return sorted(gone)

    # -- the retention policy ---------------------------------------------------------

    def save_policy(self, task_id: str, policy: Mapping[Status, float]) -> None:
        """Make ``policy`` (seconds to keep, per finished status) the task's; statuses
        not in it lose their retention (kept for ever). Safe to race: the last writer's
        policy is the one every cleaner reads (a deadlock between two writers is
        retried)."""
        keep_ms = {status: round(secs * 1000) for status, secs in policy.items()}
        _retrying_deadlocks(lambda: self.driver.save_policy(task_id, keep_ms))

    def policy(self, task_id: str) -> dict[Status, float]:
        """The task's stored retention: seconds to keep, per finished status."""
        return {s: ms / 1000 for _, s, ms in self.driver.policies(task_id)}

    def policies(self) -> dict[str, dict[Status, float]]:
        """Every task's stored retention."""
        out: dict[str, dict[Status, float]] = {}
        for task_id, s, ms in self.driver.policies(None):
            out.setdefault(task_id, {})[s] = ms / 1000
        return out

    # -- purging ----------------------------------------------------------------------

    def db_now(self) -> datetime:
        """The database's clock (docs/design.md invariant 8): cutoffs are measured by it."""
        with self.driver.begin() as conn:
            return self.driver.db_now(conn)

    def count_older(self, task_id: str, status: Status, cutoff: datetime) -> int:
        """How many ``status`` rows of the task last changed before ``cutoff``."""
        return self.driver.count_finished(task_id, status, cutoff)

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
        d = self.driver
        limit = max(1, min(limit, CHUNK))
        with d.begin_read_committed() as conn:
            rows = d.finished_page(conn, task_id, status, cutoff, after=after, limit=limit)
            if not rows:
                return PurgeChunk(0, 0, None)
            now = d.db_now(conn)
            changed = dict(rows)
            held = {
                j
                for j, ms in d.key_holds(conn, task_id, list(changed))
                if now < changed[j] + timedelta(milliseconds=ms)
            }
            ids = [i for i in changed if i not in held]
            removed = 0
            if ids:
                removed = d.remove_finished(
                    conn, task_id, status, cutoff, ids, archived_at=now if archive else None
                )
        d.release_keys([task_id], ids)
        last_id, last_at = rows[-1]
        cursor = None if len(rows) < limit else (last_at, last_id)
        return PurgeChunk(removed, len(held), cursor)


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
