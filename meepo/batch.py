"""``Task.batch()``: many pushes, one transaction, dispatched after it commits."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Protocol

from .records import NewJob


class Producer(Protocol):
    """What a batch needs from whoever pushes: validate one job, write many.
    :class:`meepo.Task` is one."""

    def new_job(
        self,
        payload: Any,
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        priority: str | None = None,
        key: str | None = None,
        unique_for: float | timedelta | None = None,
    ) -> NewJob:
        """One job, validated, nothing written (raises on a bad option)."""
        ...

    def push_jobs(self, jobs: list[NewJob], connection: Any = None) -> list[int]:
        """Write the jobs (in the caller's transaction with ``connection``) and
        dispatch them; their ids, in order."""
        ...

    async def push_jobs_async(self, jobs: list[NewJob]) -> list[int]:
        """:meth:`push_jobs` without a connection, awaited without blocking the loop."""
        ...


class Batch:
    """Collects jobs in a ``with`` block and pushes them all when it ends.

    The jobs are validated as they are pushed (a bad one raises at once and, unless
    caught, aborts the block) and written together when the block exits without an
    exception: one multi-row INSERT for the plain jobs, in one transaction with the
    unique-key jobs. Their messages are sent only after that transaction commits; an
    exception in the block writes and sends nothing. With a caller's ``connection``
    the rows join the caller's transaction (and are dispatched after it commits, as
    ``push(connection=…)`` does).
    """

    def __init__(self, producer: Producer, connection: Any = None) -> None:
        self.producer = producer
        self.connection = connection
        self.jobs: list[NewJob] = []
        #: The ids of the pushed jobs, in push order, once the block is over.
        self.ids: list[int] = []
        self._open = False

    def push(
        self,
        payload: Any,
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        priority: str | None = None,
        key: str | None = None,
        unique_for: float | timedelta | None = None,
    ) -> None:
        """Add one job (the options of ``Task.push``)."""
        self._check_open()
        self.jobs.append(
            self.producer.new_job(
                payload,
                delay=delay,
                run_at=run_at,
                priority=priority,
                key=key,
                unique_for=unique_for,
            )
        )

    def push_many(
        self,
        payloads: Sequence[Any],
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        priority: str | None = None,
    ) -> None:
        for payload in payloads:
            self.push(payload, delay=delay, run_at=run_at, priority=priority)

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError("push to a batch inside its with block")

    def __enter__(self) -> Batch:
        if self._open or self.ids:
            raise RuntimeError("a batch is used once")
        self._open = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        if exc_type is not None or not self.jobs:
            self.jobs = []
            return
        self.ids = self.producer.push_jobs(self.jobs, self.connection)

    async def __aenter__(self) -> Batch:
        """``async with task.batch() as b``: as ``with``, but the write at the end of
        the block is awaited without blocking the event loop. Not with a caller's
        ``connection`` (a sync Connection or Session is the caller's own thread's)."""
        if self.connection is not None:
            raise TypeError(
                "async with task.batch(connection=...) is not supported: a transactional "
                "batch joins the caller's sync transaction; use a plain with block there"
            )
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        if exc_type is not None or not self.jobs:
            self.jobs = []
            return
        self.ids = await self.producer.push_jobs_async(self.jobs)
