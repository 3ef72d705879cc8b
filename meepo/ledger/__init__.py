"""The ledger: all SQL. The source of truth for every job."""

from ..records import Pair
from .clock import ServerClock
from .driver import ROWS_PER_STATEMENT, LedgerDriver
from .engine import make_engine
from .ledger import (
    NEVER_DISPATCHED,
    Cancelled,
    Claimed,
    Inserted,
    Ledger,
    Outcome,
    Reaped,
    Renewal,
    TaskStats,
    Zombie,
)

__all__ = [
    "NEVER_DISPATCHED",
    "ROWS_PER_STATEMENT",
    "Cancelled",
    "Claimed",
    "Inserted",
    "Ledger",
    "LedgerDriver",
    "Outcome",
    "Pair",
    "Reaped",
    "Renewal",
    "ServerClock",
    "TaskStats",
    "Zombie",
    "make_engine",
]
