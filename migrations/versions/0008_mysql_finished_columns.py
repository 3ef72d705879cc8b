"""MariaDB/MySQL: the finished rows' index over two generated columns.

PostgreSQL and SQLite index the finished rows with a partial index (0004, 0005): a job
enters it once, when it finishes. MariaDB/MySQL have no partial indexes, so there
``ix_<table>_finished`` on ``(task_id, status, updated_at)`` held every row and every
transition (push, claim, finish) had to update it (about 9 µs of server CPU per job).
On MariaDB/MySQL only, the jobs table gains two generated STORED columns:

* ``finished_status``: ``status`` while the job is finished (``expires_at`` and
  ``dispatch_deadline`` both NULL), else NULL;
* ``finished_at``: ``updated_at`` under the same condition, else NULL;

and ``ix_<table>_finished`` becomes ``(task_id, finished_status, finished_at)``: its
entry of a row changes only when the job finishes (or leaves a finished status). The
cleaner's scan reads it (``finished_status = ? AND finished_at < cutoff``). STORED, not
VIRTUAL: an index on virtual columns measured no faster. No statement writes them
(meepo's INSERTs name their columns); ``<table>_archive`` does not get them.

It is one ``ALTER TABLE``, so the table is rebuilt once (a STORED column is computed
for every existing row). PostgreSQL and SQLite are unchanged.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from meepo.ledger.migrate import table_name

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The columns as this revision defines them (meepo.ledger.schema.finished_columns).
FINISHED = "expires_at IS NULL AND dispatch_deadline IS NULL"
FINISHED_STATUS = "finished_status"
FINISHED_AT = "finished_at"


def finished_expression(column: str) -> str:
    return f"CASE WHEN {FINISHED} THEN {column} END"


def _mysql() -> bool:
    return bool(op.get_context().dialect.name == "mysql")


def upgrade() -> None:
    if not _mysql():
        return
    name = table_name()
    op.execute(
        f"ALTER TABLE {name} "
        f"ADD COLUMN {FINISHED_STATUS} VARCHAR(16) "
        f"GENERATED ALWAYS AS ({finished_expression('status')}) STORED, "
        f"ADD COLUMN {FINISHED_AT} DATETIME(6) "
        f"GENERATED ALWAYS AS ({finished_expression('updated_at')}) STORED, "
        f"DROP INDEX ix_{name}_finished, "
        f"ADD INDEX ix_{name}_finished (task_id, {FINISHED_STATUS}, {FINISHED_AT})"
    )


def downgrade() -> None:
    if not _mysql():
        return
    name = table_name()
    op.execute(
        f"ALTER TABLE {name} "
        f"DROP INDEX ix_{name}_finished, "
        f"DROP COLUMN {FINISHED_AT}, "
        f"DROP COLUMN {FINISHED_STATUS}, "
        f"ADD INDEX ix_{name}_finished (task_id, status, updated_at)"
    )
