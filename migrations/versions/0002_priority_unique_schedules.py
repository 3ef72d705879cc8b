"""Priorities, unique keys and schedules.

Adds ``priority`` to the jobs table (existing rows get ``default``), and the
``<table>_unique`` and ``<table>_schedules`` companion tables.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from meepo.ledger.migrate import table_name
from meepo.ledger.types import JobId, Payload, UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    name = table_name()
    with op.batch_alter_table(name) as batch:
        batch.add_column(
            sa.Column("priority", sa.String(32), nullable=False, server_default="default")
        )
    op.create_table(
        f"{name}_unique",
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("job_id", JobId, nullable=False),
        sa.Column("hold_ms", sa.BigInteger, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("task_id", "key", name=f"pk_{name}_unique"),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )
    op.create_table(
        f"{name}_schedules",
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("expr", sa.String(255), nullable=False),
        sa.Column("tz", sa.String(64), nullable=False),
        sa.Column("payload", Payload, nullable=False),
        sa.Column("priority", sa.String(32), nullable=False),
        sa.Column("start_at", UTCDateTime, nullable=True),
        sa.Column("until_at", UTCDateTime, nullable=True),
        sa.Column("misfire", sa.String(8), nullable=False),
        sa.Column("next_fire_at", UTCDateTime, nullable=True),
        sa.Column("last_fire_at", UTCDateTime, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("task_id", "name", name=f"pk_{name}_schedules"),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )
    op.create_index(f"ix_{name}_schedules_due", f"{name}_schedules", ["task_id", "next_fire_at"])


def downgrade() -> None:
    name = table_name()
    op.drop_index(f"ix_{name}_schedules_due", table_name=f"{name}_schedules")
    op.drop_table(f"{name}_schedules")
    op.drop_table(f"{name}_unique")
    with op.batch_alter_table(name) as batch:
        batch.drop_column("priority")
