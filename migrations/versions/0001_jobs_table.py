"""Create the jobs table.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from meepo.ledger.migrate import table_name
from meepo.ledger.types import JobId, Payload, UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    name = table_name()
    op.create_table(
        name,
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
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )
    op.create_index(f"ix_{name}_task_status_expires", name, ["task_id", "status", "expires_at"])


def downgrade() -> None:
    name = table_name()
    op.drop_index(f"ix_{name}_task_status_expires", table_name=name)
    op.drop_table(name)
