"""The ledger's tables as SQLAlchemy Core objects.

The Alembic migrations in ``migrations/`` create exactly these tables (a test compares
the migrated database with this metadata on every backend); ``init_db=True`` and
``meepo db upgrade`` run those migrations, never ``metadata.create_all``.

One jobs table holds many tasks (``task_id`` column); ``table_name=`` gives a task a
table of its own with the same shape.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

from .types import JobId, Payload, UTCDateTime

#: Alembic's bookkeeping table for a ledger table named ``name``.
VERSION_TABLE_SUFFIX = "_version"


def version_table_name(table_name: str) -> str:
    return f"{table_name}{VERSION_TABLE_SUFFIX}"


def jobs_table(name: str, metadata: MetaData | None = None) -> Table:
    """The jobs table called ``name``.

    Indexes, and the statement each one serves:

    * primary key ``id`` - claim, commit, heartbeat, repush: single-row or ``id IN (…)``.
    * ``(task_id, status, expires_at)`` - the reaper and dispatch sweep
      (``status IN ('todo','doing') AND expires_at <= now``), recovery of due ``todo``
      rows, and ``stats`` counts: a range scan that never touches finished rows.
    """
    md = metadata if metadata is not None else MetaData()
    return Table(
        name,
        md,
        Column("id", JobId, primary_key=True, autoincrement=True),
        Column("task_id", String(64), nullable=False),
        Column("status", String(8), nullable=False),
        Column("payload", Payload, nullable=False),
        Column("failed_times", Integer, nullable=False, default=0),
        Column("commit_id", BigInteger, nullable=False, default=0),
        Column("created_at", UTCDateTime, nullable=False),
        Column("updated_at", UTCDateTime, nullable=False),
        # When the job is (or was) due to run.
        Column("run_at", UTCDateTime, nullable=False),
        # When the reaper may act on the row: a doing job's lease end, or the time by
        # which a todo job must have been claimed before it is dispatched again.
        # NULL once the job is finished.
        Column("expires_at", UTCDateTime, nullable=True),
        # The process that made the latest claim ("host:pid").
        Column("worker", String(128), nullable=True),
        Column("last_error", Text, nullable=True),
        Index(f"ix_{name}_task_status_expires", "task_id", "status", "expires_at"),
    )
