"""meepo: a reliable distributed task queue with a SQL ledger and a Redis transport."""

# First, before anything imports redis: meepo's code is sync, redis.asyncio waits.
from . import _lazy_redis  # noqa: F401
from .errors import (
    CommitModeError,
    ConfigError,
    JobNotFoundError,
    LedgerUnavailableError,
    MeepoError,
    NotRunningHereError,
    PayloadError,
    ScheduleNotFoundError,
    SchemaError,
    StaleCommitError,
    TaskNotFoundError,
    TransportUnavailableError,
    UnavailableError,
    UnsupportedServerError,
)
from .middleware import Middleware, MiddlewareError, RunInfo
from .records import Job, JobRecord, ScheduleRecord, Status
from .task import Task

__version__ = "0.1.0"

__all__ = [
    "CommitModeError",
    "ConfigError",
    "Job",
    "JobNotFoundError",
    "JobRecord",
    "LedgerUnavailableError",
    "MeepoError",
    "Middleware",
    "MiddlewareError",
    "NotRunningHereError",
    "PayloadError",
    "RunInfo",
    "ScheduleNotFoundError",
    "ScheduleRecord",
    "SchemaError",
    "StaleCommitError",
    "Status",
    "Task",
    "TaskNotFoundError",
    "TransportUnavailableError",
    "UnavailableError",
    "UnsupportedServerError",
    "__version__",
]
