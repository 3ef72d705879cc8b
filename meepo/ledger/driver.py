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

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol

from sqlalchemy import Connection, Row, Table, TextClause, bindparam, func, text

from ..records import DEFAULT_PRIORITY, Job, JobRecord, Message, Pair, ScheduleRecord, Status

#: Rows per statement for batched transitions, inserts and pages of rows (keeps lists,
#: parameters and packets bounded). Redis commands have their own size,
#: ``meepo.transport.MESSAGES_PER_CALL``.
ROWS_PER_STATEMENT = 1000


class Doing:
    """A from-status of a compare-and-set: ``doing`` with ``cancel_requested`` as
    given. The transitions that end a run as its consumer or the zombie policy decides
    (the group commit, a manual commit, release, reaping) start from ``LIVE`` (no cancel
    requested), so that a job cancelled while it runs leaves ``doing`` only from
    ``CANCEL_REQUESTED``, as ``cancelled`` (or by an admin's repush, from any status).
    It stands alone in a group's statuses."""

    value = Status.DOING.value

    def __init__(self, cancel_requested: bool) -> None:
        self.cancel_requested = cancel_requested

    def __repr__(self) -> str:
        return "CANCEL_REQUESTED" if self.cancel_requested else "LIVE"


LIVE = Doing(False)
CANCEL_REQUESTED = Doing(True)

FromStatus = Status | Doing

Group = tuple[Sequence[Pair], Iterable[FromStatus], dict[str, Any]]
"""One compare-and-set group: the claims, the statuses they may be in (``LIVE``:
doing, no cancel requested), the values to write (``commit_id`` + 1 is implied)."""


def from_statuses(statuses: Iterable[FromStatus]) -> tuple[list[str], bool | None]:
    """A group's statuses as the strings to match, and the value ``cancel_requested``
    must have (None: any; a group from ``LIVE`` or ``CANCEL_REQUESTED``)."""
    given = list(statuses)
    names = [s.value for s in given]
    flags = [s.cancel_requested for s in given if isinstance(s, Doing)]
    if flags and len(given) != 1:
        raise ValueError("LIVE and CANCEL_REQUESTED stand alone in a group's statuses")
    return names, flags[0] if flags else None


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


class PerRow:
    """A SET value that differs from row to row: ``values[id]`` for each row it names
    and NULL for the others (the results a group commit carries). Every driver writes
    it into the group's one statement: ``CASE id WHEN … THEN … END`` (portable,
    MariaDB/MySQL) or an array lookup (PostgreSQL). Binary columns only."""

    def __init__(self, values: Mapping[int, Any]) -> None:
        self.values = dict(values)

    def __repr__(self) -> str:
        return f"PerRow({len(self.values)} rows)"


#: Arms of one flat CASE in :func:`case_text`'s search tree.
CASE_LEAF = 8


def case_text(id_column: str, ids: Sequence[int], mark: Callable[[int], str]) -> str:
    """SQL text of "``mark(k)`` for the row whose id is ``ids[k]``, else NULL" (``ids``
    sorted): a search tree of CASEs, ``CASE WHEN id < 500 THEN (…) ELSE (…) END``, with
    flat ``CASE id WHEN … THEN …`` of up to CASE_LEAF arms at its leaves, so that each
    row takes about log2(n) comparisons, not n (a flat 1000-arm CASE on every row of a
    1000-row UPDATE cost more than the UPDATE). The ids are written as integers; the
    marks appear in ``k`` order (positional parameters bind in that order)."""

    def tree(lo: int, hi: int) -> str:
        if hi - lo <= CASE_LEAF:
            arms = " ".join(f"WHEN {int(ids[k])} THEN {mark(k)}" for k in range(lo, hi))
            return f"CASE {id_column} {arms} ELSE NULL END"
        mid = (lo + hi) // 2
        return (
            f"CASE WHEN {id_column} < {int(ids[mid])} THEN ({tree(lo, mid)}) "
            f"ELSE ({tree(mid, hi)}) END"
        )

    return tree(0, len(ids))


def per_row_case(table: Table, column: str, v: PerRow) -> TextClause:
    """:func:`case_text` as a SQLAlchemy text clause, the values bound. (Built as
    SQLAlchemy elements, a thousand-arm CASE cost ten times the UPDATE's own time to
    build, cache-key and compile.)"""
    col = table.c[column]
    rows = sorted(v.values.items())
    sql = case_text(table.c.id.name, [i for i, _ in rows], lambda k: f":{column}_{k}")
    return text(sql).bindparams(
        *(bindparam(f"{column}_{k}", r, type_=col.type) for k, (_, r) in enumerate(rows))
    )


def sa_values(table: Table, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` for a SQLAlchemy UPDATE: PLUS_ONE becomes ``column + 1``, Coalesce
    ``coalesce(column, value)``, PerRow ``CASE id WHEN … THEN … END`` (see
    :func:`per_row_case`)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if v is PLUS_ONE:
            out[k] = table.c[k] + 1
        elif isinstance(v, Coalesce):
            out[k] = func.coalesce(table.c[k], v.value)
        elif isinstance(v, PerRow):
            out[k] = per_row_case(table, k, v)
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
    result: bytes | None = field(default=None, repr=False)  # a done outcome's stored result


@dataclass(frozen=True)
class Zombie:
    """A doing row whose lease expired; ``started``: its handler's start was recorded
    (``started_at`` set), so the lost claim was a run, a failed attempt."""

    id: int
    commit_id: int
    failed_times: int
    priority: str = DEFAULT_PRIORITY
    started: bool = True
    #: Someone cancelled the job while it ran: it is closed as cancelled.
    cancel_requested: bool = False


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
    #: Renewed or skipped leases whose job someone cancelled (``cancel_requested``),
    #: read by the same statement: the consumer tells their handlers.
    cancel: set[Pair] = field(default_factory=set)


Progress = tuple[Pair, float, "str | None"]
"""One claim's latest progress report: ``((id, commit_id), fraction, note)``."""


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
    #: lost: the job is doing under that commit_id, but someone cancelled it
    cancel_requested: bool = False


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


#: A row found for ``meepo jobs delete``: ``(id, task_id, commit_id, status)``.
Found = tuple[int, str, int, Status]
#: Where a purge pass has got to: the ``(updated_at, id)`` of the last row it read.
Cursor = tuple[datetime, int]


# -- the protocol -------------------------------------------------------------------------


class LedgerDriver(Protocol):
    """The statements of one ledger (jobs, unique keys, schedules, retention policies,
    the archive) on one server.

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
    retention: Table
    archive: Table

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
        """Set ``dispatch_deadline`` of current todo rows to ``never`` (due for the
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

    def progress(self, reports: Sequence[Progress]) -> set[Pair]:
        """Write each claim's progress and note on its row if still doing under that
        commit_id (not a transition); the pairs written."""
        ...

    def request_cancel(self, pairs: Sequence[Pair]) -> set[Pair]:
        """Set ``cancel_requested`` of doing rows under these commit_ids not flagged
        yet (not a transition: the runner's claim stays current); the pairs flagged."""
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
        SKIP LOCKED by primary key); each with id, commit_id, expires_at, started_at,
        dispatch_deadline, cancel_requested."""
        ...

    def update_locked(
        self,
        conn: Connection,
        pairs: Sequence[Pair],
        statuses: Iterable[FromStatus],
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
        """Recovery: a page of todo rows in (dispatch_deadline, id) order after ``after``."""
        ...

    # admin -------------------------------------------------------------------------------

    def priorities(self, ids: Sequence[int]) -> dict[int, str]:
        """The priority of each of ``ids``."""
        ...

    def get(self, job_id: int, task_id: str | None) -> JobRecord | None:
        """One row."""
        ...

    def cancel_states(self, pairs: Sequence[Pair]) -> dict[Pair, tuple[Status, bool]]:
        """Status and ``cancel_requested`` of the rows still at these commit_ids."""
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

    def outstanding(self, task_id: str, worker: str, now: datetime) -> int:
        """The task's jobs due by ``now`` (todo) or claimed by ``worker`` (doing)."""
        ...

    def commit_one(self, task_id: str, pair: Pair, values: dict[str, Any]) -> CommitOne:
        """One fenced doing → outcome commit from outside the consumer (doing, no cancel
        requested)."""
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

    def insert_schedule(self, row: dict[str, Any]) -> bool:
        """INSERT a schedule declaration; False when its (task_id, name) exists."""
        ...

    def redeclare_schedule(
        self, task_id: str, name: str, updated_at: datetime, values: dict[str, Any]
    ) -> bool:
        """Redeclaration: compare-and-set of a schedule row on ``updated_at``; True if
        this call won."""
        ...

    def delete_schedule(self, task_id: str, name: str) -> bool:
        """DELETE one schedule; True if it existed."""
        ...

    def get_schedule(self, task_id: str, name: str) -> ScheduleRecord | None:
        """One schedule, by (task_id, name)."""
        ...

    def list_schedules(self, task_id: str | None) -> list[ScheduleRecord]:
        """Every schedule of the table, or of one task, by task and name."""
        ...

    # job management and retention -------------------------------------------------------

    def begin_read_committed(self) -> AbstractContextManager[Connection]:
        """A transaction at READ COMMITTED on MariaDB/MySQL (no gap locks), as
        :meth:`begin` elsewhere (the others run at READ COMMITTED or have no row locks)."""
        ...

    def list_jobs(self, f: JobFilter, *, limit: int, after_id: int | None) -> list[JobRecord]:
        """``meepo jobs list``: up to ``limit`` rows matching every filter, by id, past
        ``after_id``."""
        ...

    def matching(self, f: JobFilter, *, limit: int, after_id: int | None) -> list[Found]:
        """``meepo jobs delete``'s read: (id, task_id, commit_id, status) of up to
        ``limit`` rows matching every filter, by id, past ``after_id``."""
        ...

    def delete_current(self, rows: Sequence[Found]) -> list[int]:
        """DELETE the rows still at the (commit_id, status) they were read at (locked
        first), in one transaction; the ids deleted."""
        ...

    def release_keys(self, task_ids: Sequence[str], job_ids: Sequence[int]) -> None:
        """DELETE the ``<table>_unique`` rows of these tasks that name these (deleted)
        jobs, in a READ COMMITTED transaction of its own."""
        ...

    def save_policy(self, task_id: str, keep_ms: Mapping[Status, int]) -> None:
        """Make ``keep_ms`` the task's ``<table>_retention`` rows (the others deleted),
        in one READ COMMITTED transaction; a row another writer inserted meanwhile is
        overwritten."""
        ...

    def policies(self, task_id: str | None) -> list[tuple[str, Status, int]]:
        """(task_id, status, keep_ms) of the stored retention of one task, or of all."""
        ...

    def count_finished(self, task_id: str, status: Status, cutoff: datetime) -> int:
        """How many finished ``status`` rows of the task last changed before
        ``cutoff`` (by the finished rows' index)."""
        ...

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
        """A purge chunk's read: (id, updated_at) of up to ``limit`` finished ``status``
        rows of the task changed before ``cutoff``, past ``after``, in (updated_at, id)
        order by the finished rows' index, locked (FOR UPDATE SKIP LOCKED) where the
        server has row locks."""
        ...

    def key_holds(
        self, conn: Connection, task_id: str, job_ids: Sequence[int]
    ) -> list[tuple[int, int]]:
        """(job id, hold_ms) of the unique keys of the task these jobs hold."""
        ...

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
        """DELETE these rows if still finished in ``status`` before ``cutoff``, first
        copied into ``<table>_archive`` (``archived_at`` given) in the same
        transaction; rows deleted."""
        ...
