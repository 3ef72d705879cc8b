"""One exception tree for everything meepo raises.

Driver errors (SQLAlchemy, redis-py) never escape raw from the public API: they are
wrapped at the boundary into a subclass of :class:`MeepoError` with the original
exception kept as ``__cause__`` and any password in a URL masked.
"""

from __future__ import annotations


class MeepoError(Exception):
    """Base class of every error meepo raises on purpose."""


class ConfigError(MeepoError, ValueError):
    """An option, a name or a URL is not acceptable (raised before any I/O)."""


class PayloadError(MeepoError, ValueError):
    """A payload or a result cannot be stored: too large, or not a value the task's
    serializer writes (the message names the type and where the bad value is)."""


class JobNotFoundError(MeepoError, LookupError):
    """No job with this id exists (in this task's ledger)."""


class TaskNotFoundError(MeepoError, LookupError):
    """No job of this task exists in the ledger table."""


class StaleCommitError(MeepoError):
    """A commit carried a commit_id that is no longer current.

    The job was reaped, repushed or committed by someone else since the caller's claim;
    the ledger was left unchanged.
    """

    def __init__(self, job_id: int, commit_id: int, message: str | None = None) -> None:
        self.job_id = job_id
        self.commit_id = commit_id
        super().__init__(
            message
            or f"job {job_id}: commit_id {commit_id} is stale (the job was reaped, repushed "
            "or committed since it was claimed); nothing was changed"
        )


class CommitModeError(MeepoError):
    """``commit()`` was called on a task whose consumers commit automatically."""


class NotRunningHereError(MeepoError):
    """``commit()`` without ``commit_id`` for a job this process is not running."""


class SchemaError(MeepoError):
    """The ledger schema is missing or older than this version of meepo expects."""


class UnsupportedServerError(MeepoError):
    """The database server is too old for meepo (the message names its version)."""


class UnavailableError(MeepoError):
    """A server could not be reached or failed mid-operation."""


class LedgerUnavailableError(UnavailableError):
    """The SQL database could not be reached or failed mid-operation."""


class TransportUnavailableError(UnavailableError):
    """Redis could not be reached or failed mid-operation."""


class ScheduleNotFoundError(MeepoError, LookupError):
    """No schedule with this name is declared for the task."""


class WaitTimeoutError(MeepoError, TimeoutError):
    """``Task.wait`` gave up: the job was not finished (done, failed) within its
    timeout. The job itself is unaffected."""
