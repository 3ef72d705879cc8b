"""Results: a ``result`` column on the jobs table and its archive.

``Task(store_results=True)`` writes the handler's return value (through the task's
serializer) into ``result`` by the same UPDATE that commits the job ``done``; a manual
``task.commit(id, "done", result=...)`` does the same. NULL: nothing stored. The
archive (``meepo purge --archive``) keeps the jobs table's columns, so it gains the
column too; retention deletes a result with its row.

A LargeBinary: BLOB on SQLite, BYTEA on PostgreSQL, MEDIUMBLOB on MariaDB/MySQL
(``max_result_bytes`` is at most 16 MiB - 1). Nullable, no default: adding it rewrites
no row on any of the three servers.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from meepo.ledger.migrate import table_name
from meepo.ledger.types import Result

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    name = table_name()
    for table in (name, f"{name}_archive"):
        op.add_column(table, sa.Column("result", Result, nullable=True))


def downgrade() -> None:
    name = table_name()
    with op.batch_alter_table(f"{name}_archive") as batch:
        batch.drop_column("result")
    # SQLite rebuilds the table to drop a column: keep its AUTOINCREMENT (see 0004).
    with op.batch_alter_table(name, table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_column("result")
