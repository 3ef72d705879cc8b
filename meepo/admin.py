"""Operations on a ledger table as a whole: what the CLI (and a web dashboard) call.

A thin layer over the stores :class:`~meepo.client.Stores` opens (as for a ``Task``):
no SQL and no Redis commands of its own. Repush is :func:`meepo.client.repush`, the
code ``Task.repush`` runs: through each task's :class:`~meepo.dispatch.Dispatcher`, so
the ledger row moves (a compare-and-set) before its message is sent, to the queue of
the job's own task:

* the default table ``meepo_jobs``: keys prefixed ``meepo:``;
* a table of its own: ``meepo:<table>:`` (the same rule as ``Task``);
* or an explicit ``prefix`` (for tasks built with ``list_name_prefix=``).

Redis is only contacted by the operations that need it (repush, stats), so
``db`` commands and ``jobs show`` work with Redis down.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis as redis_lib
from sqlalchemy import Engine

from . import client
from .client import Row, Stores
from .config import (
    DEFAULT_TABLE,
    check_prefix,
    check_table_name,
    check_task_id,
    default_prefix,
    positive_int,
)
from .dispatch import Dispatcher
from .errors import ConfigError, JobNotFoundError, ScheduleNotFoundError, TaskNotFoundError
from .ledger import ROWS_PER_STATEMENT
from .ledger import migrate as migrations
from .ledger.schedules import next_fires
from .records import JobRecord, ScheduleRecord, Status
from .schedule import check_name
from .transport import Transport

#: ``progress(done, total)`` after each chunk; ``total`` is None when not known ahead.
Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class RepushedJob:
    """One job a repush moved (or, in a dry run, would move) back to todo."""

    id: int
    task_id: str
    previous: Status
    commit_id: int  # the new commit_id; in a dry run the current one


@dataclass
class RepushResult:
    dry_run: bool
    jobs: list[RepushedJob] = field(default_factory=list)
    #: Jobs that kept changing under the repush (a consumer or reaper moved them
    #: between the read and the compare-and-set every time); left as they were.
    skipped: list[int] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.jobs)

    def by_task(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for j in self.jobs:
            out[j.task_id] = out.get(j.task_id, 0) + 1
        return dict(sorted(out.items()))


@dataclass(frozen=True)
class CancelledJob:
    """One job a cancel acted on (or, in a dry run, would act on): ``outcome`` is
    ``cancelled`` (it was todo), ``requested`` (it was doing: it ends as cancelled when
    its handler does) or ``already`` (doing, cancelled before); in a dry run
    ``cancelled`` or ``requested``."""

    id: int
    task_id: str
    previous: Status
    outcome: str


@dataclass
class CancelResult:
    dry_run: bool
    jobs: list[CancelledJob] = field(default_factory=list)
    #: Jobs that kept changing under the cancel; left as they were.
    skipped: list[int] = field(default_factory=list)
    #: Jobs given by id that had finished already (left as they were).
    finished: list[int] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(1 for j in self.jobs if j.outcome != client.ALREADY)


@dataclass(frozen=True)
class TaskSummary:
    """One task's line in ``meepo stats``."""

    task_id: str
    counts: dict[Status, int]
    oldest_todo: datetime | None
    #: Seconds since the oldest todo job became due (0 when it is not due yet).
    oldest_todo_age: float | None
    #: Messages waiting in the task's Redis queues (all priorities).
    queue_depth: int | None
    #: Messages waiting per priority queue found in Redis.
    queues: dict[str, int] = field(default_factory=dict)
    #: Jobs waiting in Redis for their due time.
    delayed: int | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "counts": {s.value: self.counts.get(s, 0) for s in Status},
            "total": self.total,
            "oldest_todo": None if self.oldest_todo is None else self.oldest_todo.isoformat(),
            "oldest_todo_age": self.oldest_todo_age,
            "queue_depth": self.queue_depth,
            "queues": dict(self.queues),
            "delayed": self.delayed,
        }


@dataclass(frozen=True)
class DbState:
    table: str
    current: str | None
    head: str

    @property
    def at_head(self) -> bool:
        return self.current == self.head


def schedule_dict(rec: ScheduleRecord) -> dict[str, Any]:
    """A JSON-ready view of a schedule row (payload as UTF-8 text, undecodable bytes
    escaped)."""

    def when(d: datetime | None) -> str | None:
        return None if d is None else d.isoformat()

    return {
        "task_id": rec.task_id,
        "name": rec.name,
        "kind": rec.kind,
        "expr": rec.expr,
        "tz": rec.tz,
        "priority": rec.priority,
        "misfire": rec.misfire,
        "start_at": when(rec.start_at),
        "until_at": when(rec.until_at),
        "next_fire_at": when(rec.next_fire_at),
        "last_fire_at": when(rec.last_fire_at),
        "created_at": when(rec.created_at),
        "updated_at": when(rec.updated_at),
        "payload": rec.payload.decode("utf-8", errors="backslashreplace"),
    }


def json_view(raw: bytes | None) -> tuple[bool, Any]:
    """``(True, value)`` when ``raw`` is a JSON text (what ``serializer="json"`` and
    ``meepo push --json`` write), else ``(False, None)``.

    The CLI and the admin views do not know a task's serializer (a Task object is not
    at hand, and none is stored): the stored bytes say it themselves. A JSON task's
    payloads and results always parse; a bytes payload that happens to be JSON text
    (hand-encoded JSON) is shown as the value it spells, which is what it means.
    """
    if raw is None:
        return False, None
    try:
        return True, json.loads(raw.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError is a ValueError too
        return False, None


def record_dict(rec: JobRecord) -> dict[str, Any]:
    """A JSON-ready view of a ledger row: the payload as UTF-8 text (undecodable bytes
    escaped) and its size, and ``data``, the payload as a JSON value when it is JSON
    (else None); the stored ``result`` likewise (as a JSON value when it is JSON, else
    as text; None when nothing is stored) and its size."""

    def when(d: datetime | None) -> str | None:
        return None if d is None else d.isoformat()

    return {
        "id": rec.id,
        "task_id": rec.task_id,
        "status": rec.status.value,
        "failed_times": rec.failed_times,
        "commit_id": rec.commit_id,
        "priority": rec.priority,
        "created_at": when(rec.created_at),
        "updated_at": when(rec.updated_at),
        "run_at": when(rec.run_at),
        "expires_at": when(rec.expires_at),
        "dispatch_deadline": when(rec.dispatch_deadline),
        "worker": rec.worker,
        "last_error": rec.last_error,
        "cancel_requested": rec.cancel_requested,
        "progress": rec.progress,
        "progress_note": rec.progress_note,
        "payload": rec.payload.decode("utf-8", errors="backslashreplace"),
        "payload_size": len(rec.payload),
        "data": json_view(rec.payload)[1],
        "payload_is_json": json_view(rec.payload)[0],
        "result": _result_view(rec.result),
        "result_size": None if not isinstance(rec.result, bytes) else len(rec.result),
    }


def _result_view(raw: Any) -> Any:
    if not isinstance(raw, bytes):
        return raw
    is_json, value = json_view(raw)
    return value if is_json else raw.decode("utf-8", errors="backslashreplace")


class Admin:
    """Admin operations on one ledger table (every task in it)."""

    def __init__(
        self,
        db: str | Engine | None = None,
        redis: str | redis_lib.Redis | None = None,
        *,
        table: str | None = None,
        prefix: str | None = None,
        redispatch_timeout: float = 20.0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.table = check_table_name(table or DEFAULT_TABLE)
        self.prefix = check_prefix(default_prefix(self.table) if prefix is None else prefix)
        self.redispatch_timeout = timedelta(seconds=redispatch_timeout)
        # Redis is contacted on first use only (ledger-only commands never need it).
        self.stores = Stores(db, redis, table=self.table, prefix=self.prefix, clock=clock)
        self.engine = self.stores.engine
        self.ledger = self.stores.ledger
        # the database's clock as this host estimates it (see meepo.ledger.clock)
        self.clock = self.stores.clock
        self.schedule_ledger = self.stores.schedules
        self._dispatchers: dict[str, Dispatcher] = {}

    # -- plumbing ---------------------------------------------------------------------

    @property
    def redis(self) -> redis_lib.Redis:
        """The Redis client, made on first use (so ledger-only commands never need it)."""
        return self.stores.redis

    def transport(self, task_id: str) -> Transport:
        return self.stores.transport(task_id)

    def dispatcher(self, task_id: str) -> Dispatcher:
        d = self._dispatchers.get(task_id)
        if d is None:
            d = self._dispatchers[task_id] = self.stores.dispatcher(
                self.transport(task_id), self.redispatch_timeout
            )
        return d

    def require_task(self, task_id: str) -> str:
        """``task_id`` if the table holds at least one of its jobs, else TaskNotFoundError."""
        check_task_id(task_id)
        if not self.ledger.find(task_id=task_id, limit=1):
            raise TaskNotFoundError(f"no task {task_id!r} in table {self.table!r}")
        return task_id

    # -- jobs -------------------------------------------------------------------------

    def job(self, job_id: int, task_id: str | None = None) -> JobRecord:
        """A job's ledger row; JobNotFoundError if there is none."""
        if task_id is not None:
            check_task_id(task_id)
        rec = self.ledger.get(job_id, task_id)
        if rec is None:
            where = f"task {task_id!r} in table" if task_id is not None else "table"
            raise JobNotFoundError(f"no job {job_id} in {where} {self.table!r}")
        return rec

    def repush(
        self,
        ids: Sequence[int] | None = None,
        *,
        status: Status | str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
        task_id: str | None = None,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> RepushResult:
        """Put jobs back on their task's queue as todo (failed_times reset to 0).

        Either ``ids`` (any status; each job's task is read from its row, ``task_id``
        narrows; an id that does not exist is a JobNotFoundError and nothing changes),
        or a filter: ``status`` with optional ``since``/``until`` (bounds on
        ``updated_at``), ``limit`` and ``task_id`` (an unknown task is a
        TaskNotFoundError). Jobs are handled ``ROWS_PER_STATEMENT`` at a time, each chunk one
        compare-and-set per task followed by one pipelined RPUSH; ``progress`` is called
        after each chunk. ``dry_run`` reads only and returns what would be repushed.
        """
        if (ids is None) == (status is None):
            raise ConfigError("repush takes either job ids or a status filter")
        if task_id is not None:
            self.require_task(task_id)
        result = RepushResult(dry_run=dry_run)
        if ids is not None:
            if since is not None or until is not None or limit is not None:
                raise ConfigError("since, until and limit filter by status, not by ids")
            self._repush_ids(list(dict.fromkeys(ids)), task_id, result, progress)
        else:
            st = Status.parse(status) if status is not None else None
            if limit is not None:
                positive_int(limit, "limit")
            self._repush_filter(st, since, until, limit, task_id, result, progress)
        return result

    def cancel(
        self,
        ids: Sequence[int] | None = None,
        *,
        status: Status | str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
        task_id: str | None = None,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> CancelResult:
        """Cancel jobs: todo ones at once, doing ones when their handler ends (see
        ``Task.cancel``); finished ones are left as they are.

        Either ``ids`` (each job's task is read from its row; an id that does not exist
        is a JobNotFoundError and nothing changes) or a filter: ``status`` (todo or
        doing) with optional ``since``/``until`` (bounds on ``updated_at``), ``limit``
        and ``task_id``, as for :meth:`repush`. ``dry_run`` reads only."""
        if (ids is None) == (status is None):
            raise ConfigError("cancel takes either job ids or a status filter")
        if task_id is not None:
            self.require_task(task_id)
        result = CancelResult(dry_run=dry_run)

        def apply(rows: Sequence[Row], _: Any, reread: Callable[[list[int]], list[Row]]) -> None:
            live = [r for r in rows if not r[3].terminal]
            result.finished.extend(r[0] for r in rows if r[3].terminal)
            if dry_run:
                result.jobs.extend(
                    CancelledJob(
                        i, t, s, client.CANCELLED if s is Status.TODO else client.REQUESTED
                    )
                    for i, t, _, s in live
                )
                return
            done, skipped = client.cancel(live, self.dispatcher, reread)
            result.jobs.extend(CancelledJob(r[0], r[1], r[3], what) for r, what in done)
            result.skipped.extend(skipped)

        if ids is not None:
            if since is not None or until is not None or limit is not None:
                raise ConfigError("since, until and limit filter by status, not by ids")
            self._repush_ids(list(dict.fromkeys(ids)), task_id, None, progress, apply, "cancelled")
        else:
            st = Status.parse(status) if status is not None else None
            if st is None or st.terminal:
                raise ConfigError(f"cancel takes todo or doing jobs, not {st}")
            if limit is not None:
                positive_int(limit, "limit")
            self._repush_filter(st, since, until, limit, task_id, None, progress, apply)
        return result

    def _repush_ids(
        self,
        ids: list[int],
        task_id: str | None,
        result: RepushResult | None,
        progress: Progress | None,
        apply: Callable[[Sequence[Row], Any, Callable[[list[int]], list[Row]]], None] | None = None,
        verb: str = "repushed",
    ) -> None:
        apply = apply or self._apply
        rows: list[Row] = []
        for i in range(0, len(ids), ROWS_PER_STATEMENT):
            rows.extend(self.ledger.find(task_id=task_id, ids=ids[i : i + ROWS_PER_STATEMENT]))
        missing = sorted(set(ids) - {r[0] for r in rows})
        if missing:
            shown = ", ".join(str(i) for i in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            where = f"task {task_id!r} in table" if task_id is not None else "table"
            noun = "job" if len(missing) == 1 else "jobs"
            raise JobNotFoundError(
                f"no {noun} {shown}{more} in {where} {self.table!r}; nothing was {verb}"
            )
        order = {job_id: n for n, job_id in enumerate(ids)}
        rows.sort(key=lambda r: order[r[0]])
        done = 0
        for i in range(0, len(rows), ROWS_PER_STATEMENT):
            chunk = rows[i : i + ROWS_PER_STATEMENT]
            apply(chunk, result, lambda lost: self.ledger.find(task_id=task_id, ids=lost))
            done += len(chunk)
            if progress is not None:
                progress(done, len(rows))

    def _repush_filter(
        self,
        status: Status | None,
        since: datetime | None,
        until: datetime | None,
        limit: int | None,
        task_id: str | None,
        result: RepushResult | None,
        progress: Progress | None,
        apply: Callable[[Sequence[Row], Any, Callable[[list[int]], list[Row]]], None] | None = None,
    ) -> None:
        apply = apply or self._apply

        def find(**kwargs: Any) -> list[Row]:
            return self.ledger.find(
                task_id=task_id, status=status, since=since, until=until, **kwargs
            )

        after: int | None = None
        done = 0
        while limit is None or done < limit:
            want = ROWS_PER_STATEMENT if limit is None else min(ROWS_PER_STATEMENT, limit - done)
            rows = find(limit=want, after_id=after)
            if not rows:
                break
            after = rows[-1][0]
            apply(rows, result, lambda lost: find(ids=lost))
            done += len(rows)
            if progress is not None:
                progress(done, limit)
            if len(rows) < want:
                break

    def _apply(
        self,
        rows: Sequence[Row],
        result: Any,
        reread: Callable[[list[int]], list[Row]],
    ) -> None:
        """Repush ``rows`` task by task; a job that moved meanwhile is re-read (it must
        still match) and tried again (:func:`meepo.client.repush`)."""
        assert isinstance(result, RepushResult)
        if result.dry_run:
            result.jobs.extend(RepushedJob(i, t, s, c) for i, t, c, s in rows)
            return
        done, skipped = client.repush(rows, self.dispatcher, reread)
        result.jobs.extend(RepushedJob(r[0], r[1], r[3], m.commit_id) for r, m in done)
        result.skipped.extend(skipped)

    # -- stats ------------------------------------------------------------------------

    def stats(self, task_id: str | None = None) -> list[TaskSummary]:
        """Every task of the table (or one): counts by status, the age of the oldest
        todo job, and the depth of its Redis queue."""
        if task_id is not None:
            check_task_id(task_id)
        found = self.ledger.stats(task_id)
        if task_id is not None and not found:
            raise TaskNotFoundError(f"no task {task_id!r} in table {self.table!r}")
        now = self.clock()
        out: list[TaskSummary] = []
        for s in found:
            age = None
            if s.oldest_todo is not None:
                age = max(0.0, (now - s.oldest_todo).total_seconds())
            transport = self.transport(s.task_id)
            queues = transport.all_depths()
            out.append(
                TaskSummary(
                    task_id=s.task_id,
                    counts={st: s.counts.get(st, 0) for st in Status},
                    oldest_todo=s.oldest_todo,
                    oldest_todo_age=age,
                    queue_depth=sum(queues.values()),
                    queues=queues,
                    delayed=transport.delayed_depth(),
                )
            )
        return out

    # -- schedules --------------------------------------------------------------------

    def schedules(self, task_id: str | None = None) -> list[ScheduleRecord]:
        """Every schedule of the table (or of one task), by task and name."""
        if task_id is not None:
            check_task_id(task_id)
        return self.schedule_ledger.all(task_id)

    def schedule(self, task_id: str, name: str) -> ScheduleRecord:
        """One schedule's row; ScheduleNotFoundError if there is none."""
        check_task_id(task_id)
        rec = self.schedule_ledger.get(task_id, check_name(name))
        if rec is None:
            raise ScheduleNotFoundError(
                f"task {task_id!r} has no schedule {name!r} in table {self.table!r}"
            )
        return rec

    def unschedule(self, task_id: str, name: str) -> None:
        """Remove a schedule (jobs it made stay); ScheduleNotFoundError if none."""
        self.schedule(task_id, name)
        if not self.schedule_ledger.remove(task_id, name):
            raise ScheduleNotFoundError(
                f"task {task_id!r} has no schedule {name!r} in table {self.table!r}"
            )

    def next_fires(self, task_id: str, name: str, n: int = 5) -> list[datetime]:
        """The next ``n`` fire times of a schedule."""
        positive_int(n, "n")
        return next_fires(self.schedule(task_id, name), n)

    # -- schema -----------------------------------------------------------------------

    def db_current(self) -> DbState:
        return DbState(self.table, migrations.current(self.engine, self.table), migrations.head())

    def db_upgrade(self, revision: str = "head") -> DbState:
        with _alembic_errors(revision):
            migrations.upgrade(self.engine, self.table, revision)
        return self.db_current()

    def db_downgrade(self, revision: str = "-1") -> DbState:
        with _alembic_errors(revision):
            migrations.downgrade(self.engine, self.table, revision)
        return self.db_current()


@contextlib.contextmanager
def _alembic_errors(revision: str) -> Iterator[None]:
    """Alembic's own errors (an unknown revision, nothing to downgrade) as ConfigError."""
    from alembic.util import CommandError

    try:
        yield
    except CommandError as exc:
        text = str(exc).strip().splitlines()
        reason = text[0] if text else type(exc).__name__
        raise ConfigError(f"revision {revision!r}: {reason}") from exc


__all__ = [
    "Admin",
    "DbState",
    "Progress",
    "RepushResult",
    "RepushedJob",
    "TaskSummary",
    "record_dict",
    "schedule_dict",
]
