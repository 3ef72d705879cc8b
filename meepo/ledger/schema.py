"""The ledger's tables as SQLAlchemy Core objects.

The Alembic migrations in ``migrations/`` create exactly these tables (a test compares
the migrated database with this metadata on every backend); ``init_db=True`` and
``meepo db upgrade`` run those migrations, never ``metadata.create_all``.

One jobs table holds many tasks (``task_id`` column); ``table_name=`` gives a task a
table of its own with the same shape. Two companions share its name:
``<table>_unique`` (the holders of unique job keys) and ``<table>_schedules`` (cron and
periodic schedules).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Computed,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.schema import SchemaItem

from ..records import DEFAULT_PRIORITY, MAX_PROGRESS_NOTE
from .types import JobId, Payload, Result, UTCDateTime

#: Alembic's bookkeeping table for a ledger table named ``name``.
VERSION_TABLE_SUFFIX = "_version"
UNIQUE_SUFFIX = "_unique"
SCHEDULES_SUFFIX = "_schedules"
#: The width of every ``status`` column (``cancelled`` has 9 characters).
STATUS_LENGTH = 16
RETENTION_SUFFIX = "_retention"
ARCHIVE_SUFFIX = "_archive"


#: The predicate of the finished rows' partial index (and of the cleaner's scan).
FINISHED = "expires_at IS NULL AND dispatch_deadline IS NULL"
#: MariaDB/MySQL (no partial indexes): two generated STORED columns that hold a row's
#: ``status`` and ``updated_at`` while it is finished (:data:`FINISHED`), NULL before,
#: and the finished rows' index over them; it changes only when a job finishes.
FINISHED_STATUS = "finished_status"
FINISHED_AT = "finished_at"
FINISHED_COLUMNS = {FINISHED_STATUS: "status", FINISHED_AT: "updated_at"}


def finished_expression(column: str) -> str:
    """The SQL of a generated column of :data:`FINISHED_COLUMNS` (``column`` while the
    row is finished, else NULL)."""
    return f"CASE WHEN {FINISHED} THEN {column} END"


def finished_columns() -> list[Column[Any]]:
    """The MariaDB/MySQL jobs table's generated columns (STORED: an index on VIRTUAL
    ones measured no faster), never written by an INSERT or UPDATE (SQLAlchemy leaves
    ``Computed`` columns out)."""
    return [
        Column(
            FINISHED_STATUS,
            String(STATUS_LENGTH),
            Computed(finished_expression("status"), persisted=True),
            nullable=True,
        ),
        Column(
            FINISHED_AT,
            UTCDateTime,
            Computed(finished_expression("updated_at"), persisted=True),
            nullable=True,
        ),
    ]


def version_table_name(table_name: str) -> str:
    return f"{table_name}{VERSION_TABLE_SUFFIX}"


def jobs_table(
    name: str, metadata: MetaData | None = None, *, ddl: bool = False, dialect: str | None = None
) -> Table:
    """The jobs table called ``name``.

    Two deadlines, one per status that has one (both NULL once the job is finished):

    * ``expires_at`` - a ``doing`` job's lease end (set by the claim, moved by each
      heartbeat); NULL in every other status. The reaper acts on it.
    * ``dispatch_deadline`` - a ``todo`` job's redispatch deadline: if the job is still
      unclaimed then, its message was lost and the dispatch sweep sends it again; NULL
      in every other status. :data:`~meepo.ledger.ledger.NEVER_DISPATCHED` (the epoch,
      before any cutoff) marks a todo job whose message was never sent.

    ``ddl``: with the partial index of the finished rows too, whose dialect options load
    the PostgreSQL and SQLite dialects (:func:`ledger_metadata`, which the migrations
    are compared with); the runtime's statements never need it, and a worker on
    MariaDB then loads neither dialect.

    ``dialect``: the server's dialect name. ``"mysql"`` (MariaDB/MySQL) adds the
    generated columns ``finished_status`` and ``finished_at`` (:func:`finished_columns`)
    that its finished rows' index is built on; the other servers have no such columns.
    The runtime's tables leave it out (their statements never name those columns), but
    for the cleaner's on MariaDB/MySQL.

    Indexes, and the statement each one serves:

    * primary key ``id`` - claim, commit, heartbeat, repush: single-row or ``id IN (…)``.
    * ``(task_id, status, expires_at, dispatch_deadline)`` - a range scan that never
      touches finished rows: the reaper (``status = 'doing' AND expires_at < now``),
      the dispatch sweep and recovery (``status = 'todo' AND expires_at IS NULL AND
      dispatch_deadline < cutoff``: a todo row has no lease, so the deadline is the
      next key part), and ``stats`` counts. One index for both deadlines: a second one
      would cost every push and claim another entry.
    * ``(task_id, status, updated_at)`` over finished rows only (both deadlines NULL; a
      partial index on PostgreSQL and SQLite) - the cleaner's ``status = 'done' AND
      expires_at IS NULL AND dispatch_deadline IS NULL AND updated_at < cutoff``.
      Partial, it costs a transition nothing until the job finishes. MariaDB/MySQL have
      no partial indexes: there it is ``(task_id, finished_status, finished_at)``, over
      generated columns that are NULL until the job finishes, so that a push or a claim
      does not change it either (a full index on ``status, updated_at`` cost every
      transition about 9 µs of server CPU per job); the cleaner asks
      ``finished_status = 'done' AND finished_at < cutoff``.
    """
    md = metadata if metadata is not None else MetaData()
    ddl_only: list[SchemaItem] = []
    options: dict[str, Any] = {}
    mysql = dialect == "mysql"
    if ddl and mysql:
        ddl_only.append(Index(f"ix_{name}_finished", "task_id", FINISHED_STATUS, FINISHED_AT))
    elif ddl:
        ddl_only.append(
            Index(
                f"ix_{name}_finished",
                "task_id",
                "status",
                "updated_at",
                postgresql_where=text(FINISHED),
                sqlite_where=text(FINISHED),
            )
        )
        # SQLite: never hand out a deleted row's id again (purges delete the newest too).
        options["sqlite_autoincrement"] = True
    return Table(
        name,
        md,
        Column("id", JobId, primary_key=True, autoincrement=True),
        Column("task_id", String(64), nullable=False),
        Column("status", String(STATUS_LENGTH), nullable=False),
        Column("payload", Payload, nullable=False),
        Column("failed_times", Integer, nullable=False, default=0),
        Column("commit_id", BigInteger, nullable=False, default=0),
        Column("created_at", UTCDateTime, nullable=False),
        Column("updated_at", UTCDateTime, nullable=False),
        # When the job is (or was) due to run.
        Column("run_at", UTCDateTime, nullable=False),
        # A doing job's lease end (the reaper's); NULL unless doing.
        Column("expires_at", UTCDateTime, nullable=True),
        # The process that made the latest claim ("host:pid").
        Column("worker", String(128), nullable=True),
        Column("last_error", Text, nullable=True),
        # The priority queue the job is dispatched to (one of its task's priorities).
        Column("priority", String(32), nullable=False, server_default=DEFAULT_PRIORITY),
        # When the current claim's handler began (NULL: not started, or not recorded
        # yet). A claim clears it; the consumer's start mark or the commit sets it. The
        # reaper charges an expired lease as a failed attempt only if it is set.
        Column("started_at", UTCDateTime, nullable=True),
        # Claims of this job whose lease expired before its handler started (requeued
        # uncharged). Non-zero: the consumer records the next start before running it.
        Column("orphaned_claims", Integer, nullable=False, server_default="0"),
        # A todo job's redispatch deadline (the dispatch sweep's); NULL unless todo.
        Column("dispatch_deadline", UTCDateTime, nullable=True),
        # What the handler returned (store_results) or its manual commit stored, through
        # the task's serializer; NULL: nothing stored.
        Column("result", Result, nullable=True),
        Index(
            f"ix_{name}_task_status_deadlines",
            "task_id",
            "status",
            "expires_at",
            "dispatch_deadline",
        ),
        # Someone cancelled the job while it was doing: its handler's end (or the
        # reaper) makes it cancelled; a commit, release or requeue no longer matches it.
        Column("cancel_requested", Boolean, nullable=False, server_default="0"),
        # The latest Job.progress report of the current (or last) run, written by the
        # consumer's heartbeat under the claim's commit_id; NULL when never reported.
        Column("progress", Float, nullable=True),
        Column("progress_note", String(MAX_PROGRESS_NOTE), nullable=True),
        *(finished_columns() if mysql else []),
        *ddl_only,
        **options,
    )


def archive_table(name: str, metadata: MetaData | None = None) -> Table:
    """``<name>_archive``: rows ``meepo purge --archive`` moved out of the jobs table,
    with the jobs table's columns (ids kept, not generated) and ``archived_at``."""
    md = metadata if metadata is not None else MetaData()
    jobs = jobs_table(name)
    cols = [
        Column(c.name, c.type, nullable=c.nullable, server_default=c.server_default)
        for c in jobs.columns
        if c.name != "id"
    ]
    return Table(
        f"{name}{ARCHIVE_SUFFIX}",
        md,
        Column("id", JobId, primary_key=True, autoincrement=False),
        *cols,
        Column("archived_at", UTCDateTime, nullable=False),
    )


def retention_table(name: str, metadata: MetaData | None = None) -> Table:
    """``<name>_retention``: how long each task keeps its finished jobs, one row per
    ``(task_id, status)`` (``retention=`` of ``Task``), read by every cleaner and the CLI."""
    md = metadata if metadata is not None else MetaData()
    return Table(
        f"{name}{RETENTION_SUFFIX}",
        md,
        Column("task_id", String(64), nullable=False),
        Column("status", String(STATUS_LENGTH), nullable=False),
        Column("keep_ms", BigInteger, nullable=False),
        Column("updated_at", UTCDateTime, nullable=False),
        PrimaryKeyConstraint("task_id", "status", name=f"pk_{name}{RETENTION_SUFFIX}"),
    )


def unique_table(name: str, metadata: MetaData | None = None) -> Table:
    """``<name>_unique``: which job holds each unique key of a task.

    The primary key ``(task_id, key)`` is what makes a key unique across processes: a
    second holder cannot be inserted, only handed over (by a compare-and-set on
    ``job_id``) once the holding job is finished and ``hold_ms`` has passed since.
    """
    md = metadata if metadata is not None else MetaData()
    return Table(
        f"{name}{UNIQUE_SUFFIX}",
        md,
        Column("task_id", String(64), nullable=False),
        Column("key", String(255), nullable=False),
        Column("job_id", JobId, nullable=False),
        # How long the key stays reserved after its job finished (unique_for).
        Column("hold_ms", BigInteger, nullable=False),
        Column("created_at", UTCDateTime, nullable=False),
        Column("updated_at", UTCDateTime, nullable=False),
        PrimaryKeyConstraint("task_id", "key", name=f"pk_{name}{UNIQUE_SUFFIX}"),
        # The cleaner's "which of these finished jobs still hold a key" (by job id).
        Index(f"ix_{name}{UNIQUE_SUFFIX}_job", "job_id"),
    )


def schedules_table(name: str, metadata: MetaData | None = None) -> Table:
    """``<name>_schedules``: one row per declared schedule, keyed by ``(task_id, name)``.

    ``next_fire_at`` is the compare-and-set that makes each fire time produce exactly one
    job: a scheduler moves it forward and inserts the job in the same transaction, and
    only the one whose UPDATE matched the old value inserts. NULL once ``until`` passed.
    The index ``(task_id, next_fire_at)`` serves the schedulers' "what is due" scan.
    """
    md = metadata if metadata is not None else MetaData()
    table = f"{name}{SCHEDULES_SUFFIX}"
    return Table(
        table,
        md,
        Column("task_id", String(64), nullable=False),
        Column("name", String(128), nullable=False),
        Column("kind", String(8), nullable=False),  # "cron" | "every"
        Column("expr", String(255), nullable=False),  # cron expression or seconds
        Column("tz", String(64), nullable=False),
        Column("payload", Payload, nullable=False),
        Column("priority", String(32), nullable=False),
        Column("start_at", UTCDateTime, nullable=True),
        Column("until_at", UTCDateTime, nullable=True),
        Column("misfire", String(8), nullable=False),  # "one" | "all" | "skip"
        Column("next_fire_at", UTCDateTime, nullable=True),
        Column("last_fire_at", UTCDateTime, nullable=True),
        Column("created_at", UTCDateTime, nullable=False),
        Column("updated_at", UTCDateTime, nullable=False),
        PrimaryKeyConstraint("task_id", "name", name=f"pk_{table}"),
        Index(f"ix_{table}_due", "task_id", "next_fire_at"),
    )


def ledger_metadata(name: str, dialect: str | None = None) -> MetaData:
    """All the tables of the ledger called ``name``, as the migrations leave them on
    ``dialect`` (the jobs table's finished rows' index differs on ``"mysql"``)."""
    md = MetaData()
    jobs_table(name, md, ddl=True, dialect=dialect)
    unique_table(name, md)
    schedules_table(name, md)
    retention_table(name, md)
    archive_table(name, md)
    return md
