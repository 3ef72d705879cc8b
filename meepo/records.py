"""Plain records: job states, the job handed to a handler, a ledger row. No I/O here."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
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
    * ``cancelled`` - cancelled (``Task.cancel``): at once if it was todo, when its
      handler ended if it was doing. Terminal, never retried; left only by an admin
      repush.
    """

    TODO = "todo"
    DOING = "doing"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

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


#: The statuses a job ends in (asked once per committed job: a set lookup).
_TERMINAL = frozenset({Status.DONE, Status.FAILED, Status.CANCELLED})


#: The longest ``note`` of ``Job.progress`` (characters; the column is VARCHAR(255)).
MAX_PROGRESS_NOTE = 255


def check_progress(fraction: float, note: str | None) -> tuple[float, str | None]:
    """``fraction`` as a float in [0, 1] and ``note`` as text of at most
    MAX_PROGRESS_NOTE characters, or a ValueError naming the problem."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(
            f"progress fraction must be a number from 0 to 1, not {type(fraction).__name__}"
        )
    value = float(fraction)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"progress fraction must be from 0 to 1, not {fraction!r}")
    if note is not None:
        if not isinstance(note, str):
            raise ValueError(f"progress note must be a str or None, not {type(note).__name__}")
        if len(note) > MAX_PROGRESS_NOTE:
            raise ValueError(
                f"progress note has {len(note)} characters, more than {MAX_PROGRESS_NOTE}"
            )
    return value, note


class RunControl:
    """The live side of one claimed run, shared by its handler and its consumer.

    The consumer's heartbeat sets :attr:`cancel_requested` when the ledger says someone
    cancelled the job; the handler's :meth:`Job.progress` leaves its latest report in
    :attr:`latest` and marks it :attr:`dirty`, and the consumer writes it with its next
    heartbeat (or after a short delay, see ``meepo.runtime.heartbeat``), so a handler
    reporting in a tight loop costs no round trip per call. Plain attribute writes: a
    report is one tuple, replaced whole.
    """

    __slots__ = ("cancel_requested", "dirty", "latest", "notify", "on_cancel")

    def __init__(self) -> None:
        self.cancel_requested = False
        self.dirty = False
        self.latest: tuple[float, str | None] | None = None
        #: Called once when a report arrives with none pending (the consumer's wake-up).
        self.notify: Callable[[], None] | None = None
        #: Called once when the run is cancelled (the asyncio executor cancels the
        #: handler's coroutine); thread handlers read :attr:`cancel_requested` instead.
        self.on_cancel: Callable[[], None] | None = None

    def request_cancel(self) -> bool:
        """Mark the run cancelled (the heartbeat saw the ledger's flag) and tell
        :attr:`on_cancel`; False if it was marked already."""
        if self.cancel_requested:
            return False
        self.cancel_requested = True
        hook = self.on_cancel
        if hook is not None:
            hook()
        return True

    def report(self, fraction: float, note: str | None) -> None:
        self.latest = (fraction, note)
        if not self.dirty:
            self.dirty = True
            notify = self.notify
            if notify is not None:
                notify()

    def take(self) -> tuple[float, str | None] | None:
        """The latest report not written yet (None: nothing new); marks it written."""
        if not self.dirty:
            return None
        self.dirty = False
        return self.latest


@dataclass(frozen=True)
class Job:
    """What a handler receives: one claimed run of a job.

    ``commit_id`` is the fencing token of this claim: pass it as
    ``task.commit(job.id, status, commit_id=job.commit_id)`` when the job is finished
    from another thread, process or service.

    ``orphaned_claims`` counts earlier claims of the job whose lease expired before its
    handler started (their worker died or lost them): they were requeued without
    counting a failed attempt.

    ``cancel_requested`` turns True (within one heartbeat interval) once someone
    cancelled the running job: the handler may stop early; however it ends, the job
    becomes ``cancelled``. ``progress(fraction, note)`` reports how far it got.

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
    dispatch_deadline: datetime | None = None
    #: The task's serializer (set by the consumer; None: bytes).
    serializer: Any = field(default=None, repr=False, compare=False)
    control: RunControl = field(default_factory=RunControl, repr=False, compare=False)

    @property
    def cancel_requested(self) -> bool:
        """Whether the job was cancelled while it runs (seen by the last heartbeat)."""
        return self.control.cancel_requested

    def progress(self, fraction: float, note: str | None = None) -> None:
        """Report how far the run got: ``0 <= fraction <= 1`` (else ValueError) and an
        optional ``note`` (at most 255 characters). Cheap: the latest report is written
        to the ledger with the consumer's next heartbeat (or within about a second),
        fenced by this claim's commit_id, and read back as ``JobRecord.progress``."""
        value, text = check_progress(fraction, note)
        self.control.report(value, text)

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
    ``expires_at``: a doing job's lease end (None in other statuses).
    ``dispatch_deadline``: a todo job's redispatch deadline, after which the dispatch
    sweep sends its message again (None in other statuses).
    ``cancel_requested``: someone cancelled the job while it ran (it becomes
    ``cancelled`` when its handler ends). ``progress``, ``progress_note``: the latest
    ``Job.progress`` report of the current (or last) run; None when never reported.

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
    dispatch_deadline: datetime | None = None
    cancel_requested: bool = False
    progress: float | None = None
    progress_note: str | None = None
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
