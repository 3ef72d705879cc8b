"""Cancellation and progress: ``cancel_requested``, ``progress``, ``progress_note``, and
room for the ``cancelled`` status.

* ``cancel_requested`` (boolean, default false): someone cancelled the job while it was
  ``doing``; its handler's end (or the reaper, if its worker died) makes it
  ``cancelled``, and no commit, release or requeue matches it any more;
* ``progress`` (float, NULL) and ``progress_note`` (VARCHAR(255), NULL): the latest
  ``Job.progress`` report, written by the consumer's heartbeat under the claim's
  ``commit_id``;
* ``status`` is widened from VARCHAR(8) to VARCHAR(16) in the jobs, archive and
  retention tables: ``cancelled`` has 9 characters (PostgreSQL and MariaDB in strict
  mode refuse a longer value; on both, widening a VARCHAR is a change of the catalogue
  only, no table rewrite). Statuses are plain strings, with no CHECK constraint or
  enum type, so the new value needs nothing else. SQLite rebuilds the three tables (it
  cannot alter a column's type), from their shape at 0006 (no reflection: ``--sql``
  works offline too), keeping ``AUTOINCREMENT``.

The archive table (``meepo purge --archive``) gets the same three columns.

The downgrade turns cancelled jobs into failed ones (``last_error`` says so) and drops
the retention policies of ``cancelled``, so that the narrower column fits.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from meepo.ledger.migrate import table_name
from meepo.ledger.types import JobId, Payload, Result, UTCDateTime

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW = ("cancel_requested", "progress", "progress_note")


def _columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default="0"),
        sa.Column("progress", sa.Float, nullable=True),
        sa.Column("progress_note", sa.String(255), nullable=True),
    ]


def _sqlite() -> bool:
    return bool(op.get_context().dialect.name == "sqlite")


def _job_columns(status: int) -> list[sa.Column[Any]]:
    """The jobs table's columns as 0004 left them, ``status`` ``status`` wide (0005 and
    0006 add theirs after these: :func:`_later_columns`)."""
    return [
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(status), nullable=False),
        sa.Column("payload", Payload, nullable=False),
        sa.Column("failed_times", sa.Integer, nullable=False),
        sa.Column("commit_id", sa.BigInteger, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("run_at", UTCDateTime, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=True),
        sa.Column("worker", sa.String(128), nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("priority", sa.String(32), nullable=False, server_default="default"),
        sa.Column("started_at", UTCDateTime, nullable=True),
        sa.Column("orphaned_claims", sa.Integer, nullable=False, server_default="0"),
    ]


def _later_columns() -> list[sa.Column[Any]]:
    """The columns 0005 (``dispatch_deadline``) and 0006 (``result``) added."""
    return [
        sa.Column("dispatch_deadline", UTCDateTime, nullable=True),
        sa.Column("result", Result, nullable=True),
    ]


def _jobs(name: str, status: int, new: bool) -> sa.Table:
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("id", JobId, primary_key=True, autoincrement=True),
        *_job_columns(status),
        *_later_columns(),
        *(_columns() if new else []),
        sa.Index(
            f"ix_{name}_task_status_deadlines",
            "task_id",
            "status",
            "expires_at",
            "dispatch_deadline",
        ),
        sa.Index(
            f"ix_{name}_finished",
            "task_id",
            "status",
            "updated_at",
            sqlite_where=sa.text("expires_at IS NULL AND dispatch_deadline IS NULL"),
        ),
        sqlite_autoincrement=True,
    )


def _archive(name: str, status: int, new: bool) -> sa.Table:
    return sa.Table(
        f"{name}_archive",
        sa.MetaData(),
        sa.Column("id", JobId, primary_key=True, autoincrement=False),
        *_job_columns(status),
        sa.Column("archived_at", UTCDateTime, nullable=False),
        *_later_columns(),
        *(_columns() if new else []),
    )


def _retention(name: str, status: int) -> sa.Table:
    return sa.Table(
        f"{name}_retention",
        sa.MetaData(),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(status), nullable=False),
        sa.Column("keep_ms", sa.BigInteger, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("task_id", "status", name=f"pk_{name}_retention"),
    )


def _widen(table: str, old: int, new: int) -> None:
    op.alter_column(
        table,
        "status",
        type_=sa.String(new),
        existing_type=sa.String(old),
        existing_nullable=False,
    )


def upgrade() -> None:
    name = table_name()
    if _sqlite():
        for copy, kwargs in (
            (_jobs(name, 8, False), {"sqlite_autoincrement": True}),
            (_archive(name, 8, False), {}),
        ):
            with op.batch_alter_table(
                copy.name, recreate="always", copy_from=copy, table_kwargs=kwargs
            ) as batch:
                batch.alter_column("status", type_=sa.String(16), existing_nullable=False)
                for column in _columns():
                    batch.add_column(column)
        with op.batch_alter_table(
            f"{name}_retention", recreate="always", copy_from=_retention(name, 8)
        ) as batch:
            batch.alter_column("status", type_=sa.String(16), existing_nullable=False)
        return
    for table in (name, f"{name}_archive"):
        for column in _columns():
            op.add_column(table, column)
        _widen(table, 8, 16)
    _widen(f"{name}_retention", 8, 16)


def downgrade() -> None:
    name = table_name()
    for table in (name, f"{name}_archive"):
        jobs = sa.table(table, sa.column("status", sa.String(16)), sa.column("last_error", sa.Text))
        op.execute(
            jobs.update()
            .where(jobs.c.status == "cancelled")
            .values(status="failed", last_error="cancelled")
        )
    retention = sa.table(f"{name}_retention", sa.column("status", sa.String(16)))
    op.execute(retention.delete().where(retention.c.status == "cancelled"))
    if _sqlite():
        for copy, kwargs in (
            (_jobs(name, 16, True), {"sqlite_autoincrement": True}),
            (_archive(name, 16, True), {}),
        ):
            with op.batch_alter_table(
                copy.name, recreate="always", copy_from=copy, table_kwargs=kwargs
            ) as batch:
                batch.alter_column("status", type_=sa.String(8), existing_nullable=False)
                for column in reversed(NEW):
                    batch.drop_column(column)
        with op.batch_alter_table(
            f"{name}_retention", recreate="always", copy_from=_retention(name, 16)
        ) as batch:
            batch.alter_column("status", type_=sa.String(8), existing_nullable=False)
        return
    _widen(f"{name}_retention", 16, 8)
    for table in (name, f"{name}_archive"):
        _widen(table, 16, 8)
        for column in reversed(NEW):
            op.drop_column(table, column)
