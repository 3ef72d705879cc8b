"""The ledger's driver protocol: every statement the engine runs, named once.

:class:`~meepo.ledger.ledger.Ledger` keeps the rules (which status a transition starts
from, what it writes, the compare-and-set on ``commit_id``, the zombie policy); a
:class:`LedgerDriver` runs the statements those rules need, in the form that suits its
server. A driver never decides who wins: every statement it runs names its
precondition (``status`` and ``commit_id``) in SQL, and it reports back what matched.

There is one driver per server (``meepo/ledger/drivers/``): ``portable`` (SQLAlchemy
Core, any supported dialect), ``postgres`` (psycopg 3: arrays, autocommit, SQL text on
the driver's cursor) and ``mysql`` (MariaDB/MySQL through PyMySQL: one-packet scripts,
primary-key hints). The same conformance suite (``tests/integration/test_conformance.py``) runs
every one of them; see ``docs/drivers.md``.

This module also holds what the rules and the drivers share: the result types, the
special SET values and the size of a statement's batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol

from sqlalchemy import Connection, Row, Table, func

from ..records import DEFAULT_PRIORITY, Job, JobRecord, Message, Pair, ScheduleRecord, Status

#: Rows per statement for batched transitions, inserts and pages of rows (keeps lists,
#: parameters and packets bounded). Redis commands have their own size,
#: ``meepo.transport.MESSAGES_PER_CALL``.
ROWS_PER_STATEMENT = 1000

Group = tuple[Sequence[Pair], Iterable[Status], dict[str, Any]]
"""One compare-and-set group: the claims, the statuses they may be in, the values to
write (``commit_id`` + 1 is implied)."""


class PlusOne:
    """A SET value meaning "this column plus one" (``failed_times``), in every form."""

    def __repr__(self) -> str:
        return "PLUS_ONE"


PLUS_ONE = PlusOne()


class Coalesce:
    """A SET value meaning "keep the column if set, else ``value``" (``started_at`` of
    a commit: the start mark if the consumer wrote one, else the commit's time)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Coalesce({self.value!r})"


def sa_values(table: Table, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` for a SQLAlchemy UPDATE: PLUS_ONE becomes ``column + 1``, Coalesce
    ``coalesce(column, value)``."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if v is PLUS_ONE:
            out[k] = table.c[k] + 1
        elif isinstance(v, Coalesce):
            out[k] = func.coalesce(table.c[k], v.value)
        else:
            out[k] = v
    return out


# -- results ------------------------------------------------------------------------------


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
    judged by (:attr:`now`, the database's clock; always set when ``early`` is not
    empty); they are to be delayed again."""

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


@dataclass
class TaskStats:
    task_id: str
    counts: dict[Status, int] = field(default_factory=dict)
    oldest_todo: datetime | None = None


class CommitOne(NamedTuple):
    """What an admin's single fenced commit found: ``priority`` when it won, else the
    job's ``status`` and ``commit_id`` (both None: no such job of the task)."""

    won: bool
    priority: str | None
    status: str | None
    commit_id: int | None


# -- the protocol -------------------------------------------------------------------------


class LedgerDriver(Protocol):
    """The statements of one ledger (jobs, unique keys, schedules) on one server.

    Pairs handed to a driver are sorted and unique; ``now=None`` means "the database's
    clock". A method without ``conn`` runs in a transaction of its own (or in autocommit,
    one statement) and commits before it returns; one with ``conn`` runs in the
    caller's transaction. Errors come out as meepo's (``translate_errors``).
    """

    #: ``portable``, ``postgres`` or ``mysql`` (logs, tests, docs).
    name: str
    table: Table
    unique: Table
    schedules: Table

    def begin(self) -> AbstractContextManager[Connection]:
        """A transaction on a pooled connection, errors translated to meepo's."""
        ...

    # producer ----------------------------------------------------------------------------

    def insert_rows(self, conn: Connection, rows: list[dict[str, Any]]) -> list[int]:
        """INSERT todo rows (built by the ledger) in the caller's transaction; their ids,
        in row order."""
        ...

    def push(self, rows: list[dict[str, Any]]) -> list[int]:
        """INSERT todo rows of one task and commit them (the hot push); their ids, in
        row order."""
        ...

    def insert_key(
        self, conn: Connection, task_id: str, key: str, job_id: int, hold_ms: int, now: datetime
    ) -> None:
        """INSERT a unique key's row naming its job; IntegrityError when the key exists."""
        ...

    def lock_key(self, conn: Connection, task_id: str, key: str) -> tuple[int, int] | None:
        """The key's holder (job id, hold in ms), its row locked (FOR UPDATE)."""
        ...

    def holder_state(self, conn: Connection, job_id: int) -> tuple[str, datetime] | None:
        """The holder job's status and updated_at, by a locking read (the latest
        committed version; KEY SHARE on PostgreSQL)."""
        ...

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
        ...

    def key_holder(self, task_id: str, key: str) -> int | None:
        """The id of the job holding ``key`` (finished or not), if any."""
        ...

    def mark_due(self, pairs: Sequence[Pair], never: datetime) -> None:
        """Set the dispatch deadline of current todo rows to ``never`` (due for the
        dispatch sweep)."""
        ...

    # consumer ----------------------------------------------------------------------------

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
        """todo → doing for the current, due pairs of ``task_id`` (commit_id + ``step``);
        the winners by id, the not-yet-due ones as early messages, the time judged."""
        ...

    def heartbeat(
        self, pairs: Sequence[Pair], *, lease: timedelta, now: datetime | None
    ) -> Renewal:
        """Extend the leases of doing rows under these commit_ids without waiting on a
        row lock: renewed, skipped (locked) or lost."""
        ...

    def start(self, pairs: Sequence[Pair], *, now: datetime | None) -> int:
        """Set ``started_at`` of doing rows not marked yet whose lease has not expired;
        how many were marked."""
        ...

    def transition(self, groups: Sequence[Group]) -> set[Pair]:
        """Every group's compare-and-set (commit_id + 1) in one transaction (the group
        commit, release, repush); the pairs that won, exactly."""
        ...

    # reaper ------------------------------------------------------------------------------

    def expired_leases(self, task_id: str, *, limit: int, now: datetime | None) -> list[Zombie]:
        """doing rows of the task whose lease ended before ``now``, oldest first."""
        ...

    def db_now(self, conn: Connection) -> datetime:
        """The database's current time, read in ``conn``."""
        ...

    def lock_current(self, conn: Connection, ids: Sequence[int], status: Status) -> list[Row[Any]]:
        """Lock the rows of ``ids`` still in ``status``, skipping locked ones (FOR UPDATE
        SKIP LOCKED by primary key); each with id, commit_id, expires_at, started_at."""
        ...

    def update_locked(
        self,
        conn: Connection,
        pairs: Sequence[Pair],
        statuses: Iterable[Status],
        values: dict[str, Any],
    ) -> int:
        """The compare-and-set of rows this transaction holds locked; rows changed."""
        ...

    def sweep_scan(
        self,
        task_id: str,
        *,
        now: datetime,
        cutoffs: dict[str, datetime],
        default_priority: str,
        limit: int,
    ) -> list[tuple[int, int, str]]:
        """Due todo rows whose dispatch deadline is before their priority's cutoff:
        (id, commit_id, priority), earliest deadline first."""
        ...

    def dispatch_deadlines(self, pairs: Sequence[Pair]) -> dict[Pair, datetime]:
        """The dispatch deadline of each current todo pair."""
        ...

    def todo_page(
        self, task_id: str, *, after: tuple[datetime, int] | None, limit: int
    ) -> list[tuple[Message, datetime]]:
        """Recovery: a page of todo rows in (expires_at, id) order after ``after``."""
        ...

    # admin -------------------------------------------------------------------------------

    def priorities(self, ids: Sequence[int]) -> dict[int, str]:
        """The priority of each of ``ids``."""
        ...

    def get(self, job_id: int, task_id: str | None) -> JobRecord | None:
        """One row."""
        ...

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
        ...

    def stats(self, task_id: str | None) -> list[TaskStats]:
        """Counts by status and the oldest due todo, per task."""
        ...

    def commit_one(self, task_id: str, pair: Pair, values: dict[str, Any]) -> CommitOne:
        """One fenced doing → outcome commit from outside the consumer."""
        ...

    # schedules ---------------------------------------------------------------------------

    def due_schedules(self, task_id: str, now: datetime, limit: int) -> list[ScheduleRecord]:
        """Schedules of the task due at ``now``, earliest first."""
        ...

    def next_schedule_due(self, task_id: str) -> datetime | None:
        """The earliest ``next_fire_at`` of the task's schedules."""
        ...

    def fire_schedule(self, conn: Connection, rec: ScheduleRecord, values: dict[str, Any]) -> bool:
        """Schedule fire: compare-and-set of a schedule row on (next_fire_at,
        updated_at) as ``rec`` read them, in the caller's transaction (the one that
        inserts the fired jobs); True if this call won."""
        ...
