"""Start marks: ``started_at`` and ``orphaned_claims`` on the jobs table.

An attempt is a run, not a claim: a claim clears ``started_at``, the consumer sets it
once the job's handler has begun (or its commit does), and the reaper charges an
expired lease as a failed attempt only when the job had started. An expired claim that
never started goes back to ``todo`` uncharged and counts in ``orphaned_claims``.
Existing ``doing`` rows are taken as started (``started_at = updated_at``): their
leases keep being charged as before.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from meepo.ledger.migrate import table_name
from meepo.ledger.types import UTCDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    name = table_name()
    with op.batch_alter_table(name) as batch:
        batch.add_column(sa.Column("started_at", UTCDateTime, nullable=True))
        batch.add_column(
            sa.Column("orphaned_claims", sa.Integer, nullable=False, server_default="0")
        )
    jobs = sa.table(
        name,
        sa.column("status", sa.String(8)),
        sa.column("updated_at", UTCDateTime),
        sa.column("started_at", UTCDateTime),
    )
    op.execute(jobs.update().where(jobs.c.status == "doing").values(started_at=jobs.c.updated_at))


def downgrade() -> None:
    name = table_name()
    with op.batch_alter_table(name) as batch:
        batch.drop_column("orphaned_claims")
        batch.drop_column("started_at")
