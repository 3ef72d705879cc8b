"""The ledger: all SQL. The source of truth for every job."""

from .clock import ServerClock
from .engine import make_engine
from .fastpath import CHUNK
from .ledger import (
    NEVER_DISPATCHED,
    Claimed,
    Inserted,
    Ledger,
    Outcome,
    Pair,
    Reaped,
    Renewal,
    TaskStats,
    Zombie,
)

__all__ = [
    "CHUNK",
    "NEVER_DISPATCHED",
    "Claimed",
    "Inserted",
    "Ledger",
    "Outcome",
    "Pair",
    "Reaped",
    "Renewal",
    "ServerClock",
    "TaskStats",
    "Zombie",
    "make_engine",
]
