"""Alembic environment for meepo's ledger: all logic lives in meepo.ledger.migrate."""

from alembic import context

from meepo.ledger.migrate import run_env

run_env(context)
