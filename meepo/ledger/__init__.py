"""The ledger: all SQL. The source of truth for every job."""

from .engine import make_engine
from .fastpath import CHUNK
from .ledger import (
    NEVER_DISPATCHED,
    Inserted,
    Ledger,
    Outcome,
    Pair,
    TaskStats,
    Zombie,
)

__all__ = [
    "CHUNK",
    "NEVER_DISPATCHED",
    "Inserted",
    "Ledger",
    "Outcome",
    "Pair",
    "TaskStats",
    "Zombie",
    "make_engine",
]
