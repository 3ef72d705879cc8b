"""Retention: ``<table>_retention``, ``<table>_archive`` and ``updated_at`` in the task index.

* ``<table>_retention``: how long each task keeps its finished jobs, per status
  (``Task(retention=...)``), so every worker's cleaner and the CLI read one policy;
* ``<table>_archive``: where ``meepo purge --archive`` moves rows (the jobs table's
  columns, ids kept, and ``archived_at``);
* ``ix_<table>_finished`` on ``(task_id, status, updated_at)`` of the finished rows
  (``expires_at IS NULL``), so the cleaner finds the rows past their retention by a
  range scan instead of reading every finished row: a partial index on PostgreSQL and
  SQLite (a job enters it once, when it finishes), a full one on MariaDB/MySQL. (Adding
  ``updated_at`` to the task index instead led PostgreSQL to lock the reaper's rows
  through that index, scanning it whole, rather than by primary key.)
* ``<table>_unique`` gains an index on ``job_id``: the cleaner asks which of a chunk's
  jobs still hold a key, and removes the keys of the jobs it deleted, by job id;
* on SQLite the jobs table is rebuilt with ``AUTOINCREMENT``: without it SQLite hands
  out the id of a deleted row again once the highest row is gone, and a purge or
  ``meepo jobs delete`` would let a new job take a purged job's id (its archived copy,
  its stale messages). The downgrade leaves it (harmless to older revisions).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from meepo.ledger.migrate import table_name
from meepo.ledger.types import JobId, Payload, UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    name = table_name()
    if op.get_context().dialect.name == "sqlite":
        # The table as 0003 left it (no reflection: ``--sql`` works offline too).
        with op.batch_alter_table(
            name,
            recreate="always",
            copy_from=_jobs_0003(name),
            table_kwargs={"sqlite_autoincrement": True},
        ):
            pass
    op.create_index(
        f"ix_{name}_finished",
        name,
        ["task_id", "status", "updated_at"],
        postgresql_where=sa.text("expires_at IS NULL"),
        sqlite_where=sa.text("expires_at IS NULL"),
    )
    op.create_index(f"ix_{name}_unique_job", f"{name}_unique", ["job_id"])
    op.create_table(
        f"{name}_retention",
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("keep_ms", sa.BigInteger, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("task_id", "status", name=f"pk_{name}_retention"),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )
    op.create_table(
        f"{name}_archive",
        sa.Column("id", JobId, primary_key=True, autoincrement=False),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
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
        sa.Column("archived_at", UTCDateTime, nullable=False),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )


def _jobs_0003(name: str) -> sa.Table:
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("id", JobId, primary_key=True, autoincrement=True),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
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
        sa.Index(f"ix_{name}_task_status_expires", "task_id", "status", "expires_at"),
    )


def downgrade() -> None:
    name = table_name()
    op.drop_table(f"{name}_archive")
    op.drop_table(f"{name}_retention")
    op.drop_index(f"ix_{name}_unique_job", table_name=f"{name}_unique")
    op.drop_index(f"ix_{name}_finished", table_name=name)
