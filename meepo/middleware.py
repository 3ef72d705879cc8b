"""Middleware: code that runs around a job's steps without being part of meepo's engine.

A middleware subclasses :class:`Middleware` and overrides the hooks it needs; the others
stay no-ops. ``Task(..., middleware=[A(), B()])`` installs them. The hooks, in a job's
order (docs/middleware.md has the details and examples):

==================  ===================================  ==============================
hook                where it runs                        arguments (after ``task``)
==================  ===================================  ==============================
``on_start``        ``Task.start()``, before consuming
``before_push``     the pushing process, before writing  the NewJobs
``after_push``      the pushing process, after writing   the NewJobs, their ids
``after_claim``     the worker, after a batch is claimed the claimed Jobs
``before_run``      the executor thread, before handler  the Job
``after_run``       the executor thread, after handler   the Job, RunInfo
``after_commit``    the committer, per outcome written   the Outcome, accepted
``after_retry``     the committer, per todo outcome      the Outcome
``after_reap``      the reaper, after expired leases     the requeued ids, closed count
``after_recovery``  the reaper, after a re-dispatch      jobs re-sent, whether lost
``on_stop``         ``Task.stop()``, after consuming
==================  ===================================  ==============================

``before_*`` hooks run in list order, ``after_*`` hooks in reverse order (the first
middleware wraps the others). Errors in a hook never lose a job:

* ``before_push`` raising refuses the push: :class:`MiddlewareError`, nothing written;
* ``before_run`` raising fails the attempt without running the handler (the job is
  retried per ``max_failed_times``; its last error names the middleware);
* any other hook raising is logged (naming the middleware and the hook) and ignored:
  the job's outcome stands.

Cost: a Task without middleware has no :class:`Hooks` at all (``None``); each call site
is one ``is not None`` test. With middleware only the hooks a class overrides are
called (they are collected once, when the Task is built).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import MeepoError
from .ledger import Outcome
from .records import Job, NewJob, Status

log = logging.getLogger("meepo.middleware")

__all__ = ["Hooks", "Middleware", "MiddlewareError", "Outcome", "RunInfo"]


class MiddlewareError(MeepoError):
    """A middleware hook raised where its error must stop the step (``before_push``,
    ``before_run``); the hook's exception is the ``__cause__``."""


@dataclass(frozen=True)
class RunInfo:
    """How one handler run ended, for :meth:`Middleware.after_run`."""

    #: Seconds the handler ran (``time.perf_counter``), 0.0 if it did not run.
    duration: float
    #: The job's error text as stored in the ledger (``"ValueError: bad input"``), None
    #: when the handler returned normally (with ``store_results``, a return value that
    #: cannot be stored is an error too: the job fails with it).
    error: str | None
    #: The exception the handler raised (None if it returned, even with an error
    #: such as a coroutine returned by an ``async def`` handler).
    exception: BaseException | None

    @property
    def ok(self) -> bool:
        return self.error is None


class Middleware:
    """Base class of meepo middleware: override any of the hooks; all are no-ops here.

    ``task`` is the :class:`meepo.Task` the middleware is installed on. Hooks run in
    meepo's own threads (the executor threads for ``before_run``/``after_run``, the
    committer for ``after_commit``/``after_retry``, the reaper for ``after_reap``/
    ``after_recovery``): keep them short and thread-safe, and let them not block on
    I/O for long (a slow ``after_commit`` slows every commit)."""

    def on_start(self, task: Any) -> None:
        """The task starts consuming (``Task.start()``, once the ledger answered)."""

    def on_stop(self, task: Any) -> None:
        """The task stopped consuming (end of ``Task.stop()``)."""

    def before_push(self, task: Any, jobs: Sequence[NewJob]) -> None:
        """Jobs are about to be written (push, push_many, a batch's end). Raise to
        refuse them: the caller gets a MiddlewareError and nothing is written."""

    def after_push(self, task: Any, jobs: Sequence[NewJob], ids: Sequence[int]) -> None:
        """The jobs' rows are written (and, outside a caller's transaction, their
        messages sent); ``ids`` in ``jobs`` order (a unique key's existing job gives
        that job's id)."""

    def after_claim(self, task: Any, jobs: Sequence[Job]) -> None:
        """This worker claimed ``jobs`` (they wait for an executor thread)."""

    def before_run(self, task: Any, job: Job) -> None:
        """The handler is about to run ``job`` in this thread. Raising fails the
        attempt without running the handler."""

    def after_run(self, task: Any, job: Job, run: RunInfo) -> None:
        """The handler returned or raised (in the thread that ran it). The outcome is
        committed afterwards (``after_commit``). A handler that outlived
        ``job_timeout`` gets its ``after_run`` when it finally returns, if ever."""

    def after_commit(self, task: Any, outcome: Outcome, accepted: bool) -> None:
        """An outcome was written: ``outcome.status`` done, failed or todo (a retry),
        ``outcome.error`` the error text. ``accepted`` is False for a stale commit (the
        job was reaped or repushed meanwhile: the ledger did not change)."""

    def after_retry(self, task: Any, outcome: Outcome) -> None:
        """An accepted todo outcome: the job will run again (``outcome.run_at``: when,
        None for now). Called after ``after_commit``."""

    def after_reap(self, task: Any, requeued: Sequence[int], closed: int) -> None:
        """The reaper applied the zombie policy to expired leases: the ids it put back
        in todo and how many it closed (done or failed)."""

    def after_recovery(self, task: Any, count: int, lost: bool) -> None:
        """The reaper re-dispatched ``count`` todo jobs from the ledger: ``lost``, Redis
        lost its data; otherwise no epoch was found at start."""


#: The hook names, in a job's order.
HOOKS = (
    "on_start",
    "before_push",
    "after_push",
    "after_claim",
    "before_run",
    "after_run",
    "after_commit",
    "after_retry",
    "after_reap",
    "after_recovery",
    "on_stop",
)


def _overrides(m: Middleware, name: str) -> bool:
    return getattr(type(m), name) is not getattr(Middleware, name)


class Hooks:
    """The installed middleware of one task, with each hook's overriders collected once.

    The runtime holds ``hooks: Hooks | None``; None (no middleware) costs one test per
    call site. Each method calls the hook on every middleware that overrides it."""

    def __init__(self, task: Any, middleware: Sequence[Middleware]) -> None:
        self.task = task
        self.middleware = tuple(middleware)
        self._by_hook: dict[str, tuple[tuple[Middleware, Callable[..., None]], ...]] = {}
        for name in HOOKS:
            found = [(m, getattr(m, name)) for m in self.middleware if _overrides(m, name)]
            if name.startswith("after_") or name == "on_stop":
                found.reverse()
            self._by_hook[name] = tuple(found)

    @classmethod
    def build(cls, task: Any, middleware: Sequence[Middleware]) -> Hooks | None:
        """None when no middleware is installed (the runtime then skips every hook)."""
        return cls(task, middleware) if middleware else None

    def __repr__(self) -> str:
        names = ", ".join(type(m).__name__ for m in self.middleware)
        return f"Hooks({names})"

    def _call(self, name: str, *args: Any) -> None:
        """Run a hook that must not stop anything: an error is logged and ignored."""
        for m, hook in self._by_hook[name]:
            try:
                hook(self.task, *args)
            except KeyboardInterrupt:
                raise
            except BaseException:  # a SystemExit too: it must not end meepo's thread
                log.exception(
                    "task %s: middleware %s.%s raised; ignored (the job's outcome stands)",
                    getattr(self.task, "task_id", "?"),
                    type(m).__name__,
                    name,
                )

    def _guard(self, name: str, *args: Any, what: str) -> None:
        """Run a hook whose error stops the step: a MiddlewareError naming it."""
        for m, hook in self._by_hook[name]:
            try:
                hook(self.task, *args)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                text = str(exc).strip().splitlines()
                detail = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
                raise MiddlewareError(
                    f"middleware {type(m).__name__}.{name} raised {detail}; {what}"
                ) from exc

    # -- the task's side --------------------------------------------------------------

    def on_start(self) -> None:
        self._call("on_start")

    def on_stop(self) -> None:
        self._call("on_stop")

    def before_push(self, jobs: Sequence[NewJob]) -> None:
        self._guard("before_push", jobs, what="nothing was pushed")

    def after_push(self, jobs: Sequence[NewJob], ids: Sequence[int]) -> None:
        self._call("after_push", jobs, ids)

    # -- the runtime's side -----------------------------------------------------------

    def after_claim(self, jobs: Sequence[Job]) -> None:
        self._call("after_claim", jobs)

    def before_run(self, job: Job) -> None:
        self._guard("before_run", job, what="the handler was not run")

    def after_run(
        self, job: Job, duration: float, error: str | None, exception: BaseException | None
    ) -> None:
        if self._by_hook["after_run"]:
            self._call("after_run", job, RunInfo(duration, error, exception))

    def after_commit(self, outcome: Outcome, accepted: bool) -> None:
        self._call("after_commit", outcome, accepted)
        if accepted and outcome.status is Status.TODO:
            self._call("after_retry", outcome)

    def after_reap(self, requeued: Sequence[int], closed: int) -> None:
        self._call("after_reap", requeued, closed)

    def after_recovery(self, count: int, lost: bool) -> None:
        self._call("after_recovery", count, lost)
