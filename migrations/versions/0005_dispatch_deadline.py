"""Two deadlines: ``dispatch_deadline`` for todo jobs, ``expires_at`` for leases only.

Until 0004 ``expires_at`` meant two things: a doing job's lease end, and a todo job's
redispatch deadline (after which the dispatch sweep sends its message again; the epoch
for one never sent). Now:

* ``dispatch_deadline`` (new) holds a todo job's redispatch deadline, NULL otherwise;
* ``expires_at`` holds a doing job's lease end, NULL otherwise.

Existing todo rows move their deadline to the new column (``expires_at`` cleared);
doing and finished rows are unchanged. The task index becomes ``(task_id, status,
expires_at, dispatch_deadline)``: the reaper ranges over the lease end of doing rows,
the sweep and recovery over the deadline of todo rows (``expires_at IS NULL``), in one
index as before. The finished rows' partial index (PostgreSQL, SQLite) now requires
both deadlines NULL, so todo rows stay out of it. ``<table>_archive`` gains the column.
The downgrade moves todo deadlines back into ``expires_at``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from meepo.ledger.migrate import table_name
from meepo.ledger.types import UTCDateTime

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_FINISHED = "expires_at IS NULL"
NEW_FINISHED = "expires_at IS NULL AND dispatch_deadline IS NULL"


def _jobs(name: str) -> sa.TableClause:
    return sa.table(
        name,
        sa.column("status", sa.String(8)),
        sa.column("expires_at", UTCDateTime),
        sa.column("dispatch_deadline", UTCDateTime),
    )


def _move(table: str, src: str, dst: str) -> None:
    """Move the todo rows' deadline from column ``src`` to ``dst``: copy, then clear
    (two statements: MySQL assigns a SET list left to right, from updated values)."""
    rows = _jobs(table)
    todo = rows.c.status == "todo"
    op.execute(rows.update().where(todo).values({dst: rows.c[src]}))
    op.execute(rows.update().where(todo).values({src: None}))


def _finished_index(name: str, where: str) -> None:
    op.create_index(
        f"ix_{name}_finished",
        name,
        ["task_id", "status", "updated_at"],
        postgresql_where=sa.text(where),
        sqlite_where=sa.text(where),
    )


def upgrade() -> None:
    name = table_name()
    # ALTER TABLE … ADD COLUMN on every server (SQLite too: no table rebuild).
    op.add_column(name, sa.Column("dispatch_deadline", UTCDateTime, nullable=True))
    op.add_column(f"{name}_archive", sa.Column("dispatch_deadline", UTCDateTime, nullable=True))
    for table in (name, f"{name}_archive"):
        _move(table, "expires_at", "dispatch_deadline")
    op.drop_index(f"ix_{name}_task_status_expires", table_name=name)
    op.create_index(
        f"ix_{name}_task_status_deadlines",
        name,
        ["task_id", "status", "expires_at", "dispatch_deadline"],
    )
    if op.get_context().dialect.name != "mysql":  # MySQL's is a full index: unchanged
        op.drop_index(f"ix_{name}_finished", table_name=name)
        _finished_index(name, NEW_FINISHED)


def downgrade() -> None:
    name = table_name()
    for table in (name, f"{name}_archive"):
        rows = _jobs(table)
        op.execute(
            rows.update().where(rows.c.status == "todo").values(expires_at=rows.c.dispatch_deadline)
        )
    if op.get_context().dialect.name != "mysql":
        op.drop_index(f"ix_{name}_finished", table_name=name)
        _finished_index(name, OLD_FINISHED)
    op.drop_index(f"ix_{name}_task_status_deadlines", table_name=name)
    op.create_index(f"ix_{name}_task_status_expires", name, ["task_id", "status", "expires_at"])
    with op.batch_alter_table(f"{name}_archive") as batch:
        batch.drop_column("dispatch_deadline")
    # SQLite: the jobs table keeps AUTOINCREMENT (0004) through the rebuild.
    with op.batch_alter_table(name, table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_column("dispatch_deadline")
