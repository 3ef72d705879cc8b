"""Plain records: job states, the job handed to a handler, a ledger row. No I/O here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

#: The priority of a job pushed without one; its queue is the task's classic queue key.
DEFAULT_PRIORITY = "default"

Pair = tuple[int, int]
"""``(job id, commit_id)``: one claim of one job, the unit every transition checks (and
what a message carries)."""


def utcnow() -> datetime:
    """The host's current time, timezone-aware in UTC."""
    return datetime.now(timezone.utc)


class Status(str, enum.Enum):
    """The closed set of job states, stored as these strings in the ledger.

    * ``todo``   - waiting to run. Left by: a consumer's claim.
    * ``doing``  - claimed by a consumer that holds a lease. Left by: that consumer's
      commit, the reaper when the lease expires, or an admin repush.
    * ``done``   - finished. Terminal; left only by an admin repush.
    * ``failed`` - gave up (max_failed_times reached, or committed failed). Terminal;
      left only by an admin repush.
    """

    TODO = "todo"
    DOING = "doing"
    DONE = "done"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self in (Status.DONE, Status.FAILED)

    @classmethod
    def parse(cls, value: str | Status) -> Status:
        """Accept a Status or its string; anything else is a ValueError naming the choices."""
        if isinstance(value, Status):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            choices = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown status {value!r}: expected one of {choices}") from None


@dataclass(frozen=True)
class Job:
    """What a handler receives: one claimed run of a job.

    ``commit_id`` is the fencing token of this claim: pass it as
    ``task.commit(job.id, status, commit_id=job.commit_id)`` when the job is finished
    from another thread, process or service.

    ``orphaned_claims`` counts earlier claims of the job whose lease expired before its
    handler started (their worker died or lost them): they were requeued without
    counting a failed attempt.

    ``payload`` is the stored bytes; ``data`` the value the task's serializer reads
    from them (the payload itself for the default ``bytes`` serializer).
    """

    id: int
    task_id: str
    payload: bytes = field(repr=False)
    failed_times: int
    commit_id: int
    priority: str = DEFAULT_PRIORITY
    orphaned_claims: int = 0
    #: The task's serializer (set by the consumer; None: bytes).
    serializer: Any = field(default=None, repr=False, compare=False)

    @cached_property
    def data(self) -> Any:
        """The payload decoded by the task's serializer (decoded once, on first use)."""
        s = self.serializer
        return self.payload if s is None else s.loads(self.payload)


@dataclass(frozen=True)
class NewJob:
    """One job to push: what ``Task.push`` and ``Batch.push`` hand to the dispatcher.

    ``run_at`` None means due now. ``key`` makes the job unique among its task's
    unfinished jobs (and for ``unique_for`` seconds after it finished).
    """

    payload: bytes = field(repr=False)
    run_at: datetime | None = None
    priority: str = DEFAULT_PRIORITY
    key: str | None = None
    unique_for: float = 0.0


@dataclass(frozen=True)
class Message:
    """A dispatch of one claim: ``(job_id, commit_id)`` to the ``priority`` queue, or to
    the delayed set until ``run_at`` when that is in the future."""

    job_id: int
    commit_id: int
    priority: str = DEFAULT_PRIORITY
    run_at: datetime | None = None


@dataclass(frozen=True)
class JobRecord:
    """A job's row in the ledger, as returned by ``Task.get``.

    ``started_at``: when the current (or last) claim's handler began; None while a
    claim has not started (or its start is not recorded yet). ``orphaned_claims``:
    claims whose lease expired before the handler started (requeued uncharged).

    ``result``: what the job's handler returned (``store_results=True``) or its manual
    commit stored, None if nothing was stored. ``Task.get`` and ``Task.wait`` decode it
    with the task's serializer; read elsewhere (``Admin``, the CLI) it is the stored
    bytes. ``data``: the payload decoded the same way (``Task.get``; the payload bytes
    elsewhere).
    """

    id: int
    task_id: str
    status: Status
    payload: bytes = field(repr=False)
    failed_times: int
    commit_id: int
    created_at: datetime
    updated_at: datetime
    run_at: datetime
    expires_at: datetime | None
    worker: str | None
    last_error: str | None
    priority: str = DEFAULT_PRIORITY
    started_at: datetime | None = None
    orphaned_claims: int = 0
    result: Any = field(default=None, repr=False)
    data: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class ScheduleRecord:
    """A declared cron or periodic schedule, as returned by ``Task.schedules``.

    ``kind`` is ``"cron"`` (``expr`` a cron expression read in ``tz``) or ``"every"``
    (``expr`` the interval in seconds). ``next_fire_at`` is None once ``until`` passed.
    """

    task_id: str
    name: str
    kind: str
    expr: str
    tz: str
    payload: bytes = field(repr=False)
    priority: str
    start_at: datetime | None
    until_at: datetime | None
    misfire: str
    next_fire_at: datetime | None
    last_fire_at: datetime | None
    created_at: datetime
    updated_at: datetime
