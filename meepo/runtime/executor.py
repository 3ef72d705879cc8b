"""Executors: where a consumer's handlers run.

The fetcher hands each claimed job to :attr:`Executor.submit`; an executor admits it
(:meth:`Executor.admit`), runs the handler, and accounts for the run's end
(:meth:`Executor.ended`: the error text, the stored result's encoding, the middleware's
after_run, the slot's release), which hands the outcome to the committer (auto-commit).
Those two steps are the same for every executor and hold the consumer's lock once each;
how handlers are run (and before_run around them) is the executor's own business.
:class:`ThreadExecutor` runs plain functions in ``parallel_num`` threads; another
executor (an asyncio one) implements the same few abstract methods without touching the
fetcher or the committer.

A slot is one place a handler runs (a thread here). The watchdog retires a slot whose
handler outlived job_timeout (:meth:`Executor.retire`): Python cannot stop a thread, so
the thread is abandoned and a fresh one takes its place.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import itertools
import logging
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import Options
from ..errors import MeepoError
from ..middleware import Hooks
from ..records import Job
from ..serializers import BYTES, check_result
from .claims import Claims
from .committer import Commit, Committer
from .starter import Starter, error_summary

log = logging.getLogger("meepo.consumer")

Handler = Callable[[Job], Any]


def did_no_work(result: object) -> str | None:
    """Why a handler's return value shows that it did not run the job, or None.

    Any ordinary value means done. A coroutine, generator or other awaitable means the
    body never ran (typically an ``async def`` handler): that is a failed attempt. A
    coroutine or generator is closed, so Python does not warn that it was never awaited.
    """
    if result is None:  # most handlers: no need to ask inspect four questions
        return None
    if inspect.iscoroutine(result) or inspect.isgenerator(result):
        kind = "a coroutine" if inspect.iscoroutine(result) else "a generator"
        result.close()
    elif inspect.isasyncgen(result):
        kind = "an async generator"
    elif inspect.isawaitable(result):
        kind = f"an awaitable ({type(result).__name__})"
    else:
        return None
    return (
        f"HandlerError: the handler returned {kind} instead of running the job (a yield "
        "in the handler, or a plain function returning a coroutine?); meepo runs an async "
        "def handler on an event loop, and calls any other handler as a plain function"
    )


def is_async_handler(handler: object) -> bool:
    """Whether ``handler`` is a coroutine function (also a partial of one, or an object
    whose ``__call__`` is ``async def``): it then runs on an event loop
    (:class:`meepo.runtime.aio.AsyncioExecutor`), any other handler in threads."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - an object with async __call__
    )


@dataclass(eq=False)
class Slot:
    """One place a handler runs, and the job it runs (for job_timeout)."""

    thread: threading.Thread | None = None
    job: Job | None = None
    started: float = 0.0
    abandoned: bool = False


class Executor(abc.ABC):
    """Runs a consumer's handlers. Subclasses say how (threads, an event loop); the
    admission of a job and the accounting of its end are shared."""

    #: Hand over one claimed job (None: one slot ends). A queue's own ``put`` in the
    #: thread executor, so the fetcher pays no call per job beyond it.
    submit: Callable[[Job | None], None]
    #: middleware (set through Consumer.hooks): before_run and after_run around each
    #: handler call; None: none installed.
    hooks: Hooks | None = None
    #: What becomes of a handler that outlived job_timeout (the watchdog's log line).
    retire_note = "its handler thread is abandoned and replaced"

    def __init__(
        self,
        claims: Claims,
        options: Options,
        handler: Handler,
        committer: Committer,
        starter: Starter,
        task_id: str,
    ) -> None:
        self.claims = claims
        self.opts = options
        self.handler = handler
        self.committer = committer
        self.starter = starter
        self.task_id = task_id
        self.slots: list[Slot] = []  # the live slots (not the abandoned ones)
        self.abandoned: list[Slot] = []  # timed out, their handler still running
        #: Set by :meth:`shutdown`: the watchdog replaces no slot from then on.
        self.stopping = False
        #: The jobs submitted and not taken by a slot yet (None: a slot's stop signal).
        self._work: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        #: A handler's return value is stored (auto-commit only: a manual commit stores
        #: its own), so it is encoded and checked before after_run (:meth:`encode`).
        self.stores_results = options.store_results and options.auto_commit

    # -- what an executor implements ----------------------------------------------------

    @abc.abstractmethod
    def start(self) -> None:
        """Open ``parallel_num`` slots."""

    def drain(self) -> list[Job]:
        """Take back the submitted jobs no slot has taken yet."""
        jobs: list[Job] = []
        while True:
            try:
                job = self._work.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)

    @abc.abstractmethod
    def shutdown(self) -> list[Slot]:
        """Take no more jobs: each slot ends once its current job has; returns them."""

    @abc.abstractmethod
    def wait(self, slots: list[Slot], deadline: float) -> bool:
        """Wait (until ``deadline``, monotonic) for these slots' handlers to end; False
        if some still run (a timed-out handler is not waited for)."""

    @abc.abstractmethod
    def replace(self, slot: Slot) -> None:
        """Open a fresh slot in place of a retired one; called with the lock held."""

    @abc.abstractmethod
    def alive(self, slot: Slot) -> bool:
        """Whether a retired slot's handler still runs."""

    @abc.abstractmethod
    def current_job(self) -> Job | None:
        """The job whose handler is calling (manual commit), or None."""

    # -- shared -----------------------------------------------------------------------

    def retire(self, slot: Slot) -> None:
        """Abandon a slot whose handler outlived job_timeout and open a fresh one in its
        place (unless stopping); call with the lock held."""
        slot.abandoned = True
        self.slots.remove(slot)
        self.abandoned.append(slot)
        if not self.stopping:
            self.replace(slot)

    def abandoned_alive(self) -> int:
        """Abandoned handlers still running; call with the lock held."""
        return sum(1 for s in self.abandoned if self.alive(s))

    def admit(self, slot: Slot, job: Job) -> bool:
        """Whether to run the job now; if so it is the slot's job from now on.

        Every job passes here, so the usual case holds the lock once. It is not run
        after the intake closed (it waits to be given back by the consumer's stop), nor
        when less than a third of its lease is left (normally two thirds are, as
        heartbeats renew it every third): a claim that waited in the prefetch while
        heartbeats failed may have expired and been reaped, and its job claimed and
        started elsewhere; starting it here too would run it twice at once. Such a job
        is given back by the next heartbeat, if the claim is still ours. An attempt is a
        run, so a run's start is recorded: usually later, in a batch, by the starter (or
        by the commit); see :meth:`Starter.mark_now` for a job whose earlier claim
        expired unstarted."""
        claims = self.claims
        with claims.lock:
            if claims.intake_closed.is_set():
                claims.set_aside.append(job)
                return False
            claim = claims.held.get(job.id)
            now = claims.monotonic()
            fresh = claim is not None and claim.lease_end - now >= self.opts.lease / 3
            if not fresh:
                claims.not_started.append(job)
            elif job.orphaned_claims <= 0:
                if not claims.unmarked:
                    claims.start_cv.notify()  # the starter waits only while there is none
                claims.unmarked.add((job.id, job.commit_id))
                slot.job, slot.started = job, now
                return True
        if not fresh:
            log.warning(
                "task %s: job %d not started: less than a third of its lease was left "
                "(heartbeats failing?); it goes back to the queue",
                self.task_id,
                job.id,
            )
            return False
        if not self.starter.mark_now(job):
            return False
        with claims.lock:
            slot.job, slot.started = job, claims.monotonic()
        return True

    def encode(self, job: Job, result: Any) -> tuple[bytes | None, str | None]:
        """A handler's return value as the bytes its done commit stores, or why it
        cannot be stored (the serializer cannot write it, or it is larger than
        max_result_bytes): the job then fails at once, not retried, as running it again
        would return the same. Called in the handler's thread (or loop), before
        after_run, so the middleware sees the failure the job ends with."""
        try:
            return check_result(
                self.opts.serializer or BYTES, result, self.opts.max_result_bytes
            ), None
        except Exception as exc:  # PayloadError, or a custom serializer's surprise
            why = f"{type(exc).__name__}: {exc} (not retried)"
            log.warning("task %s: job %d failed: %s", self.task_id, job.id, why)
            return None, why

    def ended(
        self,
        slot: Slot,
        job: Job,
        began: float,
        result: Any = None,
        error: str | None = None,
        failure: BaseException | None = None,
        *,
        quiet: bool = False,
    ) -> bool:
        """The end of a run, the same for every executor; call it in the slot's thread
        (or on its loop) as soon as the handler has returned or raised.

        ``began``: when the run began (``time.perf_counter``). The handler returned
        ``result``, or the run failed: ``failure`` is what it raised (its error text is
        made and logged here unless ``error`` gives it), or ``error`` alone says why
        (it returned without doing the work). A result the task stores is encoded here
        (:meth:`encode`): one that cannot be stored fails the job. Then the middleware's
        after_run, the accounting (one hold of the lock), and the outcome goes to the
        committer. False if the run outlived job_timeout (its outcome is ignored: the
        watchdog failed it already; logged unless ``quiet``, for a handler that ended
        because the timeout cancelled it)."""
        took = time.perf_counter() - began
        raw: bytes | None = None  # the result as stored
        final = False  # the error fails the job at once (a result that cannot be stored)
        if failure is not None:
            if error is None:  # any handler failure is the job's, never the worker's
                error = error_summary(failure)
                log.warning(
                    "task %s: job %d raised %s", self.task_id, job.id, error, exc_info=failure
                )
        elif self.stores_results and result is not None and error is None:
            # A cancelled run ends cancelled and stores nothing: no need to encode.
            cancelled = job.control.cancel_requested
            raw, error = (None, None) if cancelled else self.encode(job, result)
            final = error is not None
        hooks = self.hooks
        if hooks is not None:  # middleware: after_run
            hooks.after_run(job, took, error, failure)
        claims = self.claims
        pair = (job.id, job.commit_id)
        avg = claims.run_time
        claims.run_time = took if avg is None else avg + 0.05 * (took - avg)
        with claims.slot:  # one hold of the lock per job's end, as at its start
            unmarked = pair in claims.unmarked
            claims.unmarked.discard(pair)  # its commit records the start from now on
            slot.job = None
            abandoned = slot.abandoned
            if abandoned:
                claims.timed_out.discard(pair)
                if slot in self.abandoned:
                    self.abandoned.remove(slot)
            else:
                claims.counters.finished += 1
                claims.busy -= 1  # the slot is free; the claim stays held until committed
                claims.slot.notify()
        if abandoned:
            if quiet:
                return False
            log.warning(
                "task %s: job %d: its handler returned %.1fs after it started, past the "
                "%gs job_timeout; the job was already failed by the timeout, this outcome "
                "is ignored",
                self.task_id,
                job.id,
                claims.monotonic() - slot.started,
                self.opts.job_timeout,
            )
            return False
        if job.control.dirty:  # its last report, before the commit ends the claim
            self.committer.write_progress(job)
        if self.opts.auto_commit:
            outcome = self.committer.outcome(job, error, raw, final=final)
            self.committer.submit(Commit(outcome))
            return True
        if error is not None and error.startswith("HandlerError:"):
            self.committer.fail_now(job, error)  # it cannot have committed: it never ran
            return True
        with claims.lock:
            uncommitted = claims.holds(job.id, job.commit_id)
        if uncommitted and unmarked:
            # The reaper will charge this run only if its start is recorded.
            try:
                self.starter.d.start([pair])
            except MeepoError as exc:
                log.warning(
                    "task %s: job %d: could not record its start: %s", self.task_id, job.id, exc
                )
        if job.control.cancel_requested:  # cancelled, and it did not commit: closed
            with claims.slot:
                uncommitted = claims.holds(job.id, job.commit_id)
                if uncommitted:
                    claims.drop(job.id)
                    claims.slot.notify_all()
            if uncommitted:
                self.committer.submit(Commit(self.committer.outcome(job, error)))
            return True
        with claims.slot:  # manual mode: a handler that did not commit leaves it to the reaper
            if claims.holds(job.id, job.commit_id):
                claims.drop(job.id)
                claims.slot.notify_all()
                log.info(
                    "task %s: job %d returned without a commit; the reaper will apply the "
                    "zombie policy when its lease expires",
                    self.task_id,
                    job.id,
                )
        return True


class ThreadExecutor(Executor):
    """Plain-function handlers, one thread per slot, fed from one queue."""

    def __init__(
        self,
        claims: Claims,
        options: Options,
        handler: Handler,
        committer: Committer,
        starter: Starter,
        task_id: str,
    ) -> None:
        super().__init__(claims, options, handler, committer, starter, task_id)
        self.submit = self._work.put
        self._local = threading.local()
        self._seq = itertools.count()
        # The process that runs the handlers: a handler that forks returns in a child
        # too, which must exit instead of running this consumer's loops (see run).
        self._pid = os.getpid()

    def start(self) -> None:
        self._pid = os.getpid()
        self.stopping = False
        self.slots = [self._new_slot() for _ in range(self.opts.parallel_num)]
        for s in self.slots:
            assert s.thread is not None
            s.thread.start()

    def _new_slot(self) -> Slot:
        slot = Slot()
        slot.thread = threading.Thread(
            target=self._loop,
            args=(slot,),
            name=f"meepo-{self.task_id}-exec-{next(self._seq)}",
            daemon=True,
        )
        return slot

    def replace(self, slot: Slot) -> None:
        fresh = self._new_slot()
        self.slots.append(fresh)
        assert fresh.thread is not None
        fresh.thread.start()

    def alive(self, slot: Slot) -> bool:
        return slot.thread is not None and slot.thread.is_alive()

    def shutdown(self) -> list[Slot]:
        with self.claims.lock:
            self.stopping = True  # the watchdog replaces no slot from now on
            slots = list(self.slots)
        for _ in slots:
            self._work.put(None)
        return slots

    def wait(self, slots: list[Slot], deadline: float) -> bool:
        def busy(s: Slot) -> bool:  # a timed-out handler is not waited for
            return s.thread is not None and s.thread.is_alive() and not s.abandoned

        for s in slots:
            while busy(s) and time.monotonic() < deadline:
                assert s.thread is not None
                s.thread.join(min(0.1, max(0.0, deadline - time.monotonic())))
        return not any(busy(s) for s in slots)

    def current_job(self) -> Job | None:
        job: Job | None = getattr(self._local, "job", None)
        return job

    def _loop(self, slot: Slot) -> None:
        work = self._work
        while True:
            job = work.get()
            if job is None:
                return
            if not self.admit(slot, job):
                continue
            if not self.run(slot, job):
                return  # timed out: a fresh executor has taken this one's place

    def run(self, slot: Slot, job: Job) -> bool:
        """Run one admitted job in the calling thread; False if it outlived job_timeout
        (this thread is then retired)."""
        self._local.job = job
        result: Any = None
        error: str | None = None
        failure: BaseException | None = None
        hooks = self.hooks
        began = time.perf_counter()
        try:
            try:
                if hooks is not None:  # middleware: before_run (raising fails the attempt)
                    hooks.before_run(job)
                result = self.handler(job)
            except BaseException as exc:
                self._exit_if_forked(exc)
                raise
            self._exit_if_forked(None)
            error = did_no_work(result)
            if error is not None:
                result = None
                log.warning("task %s: job %d: %s", self.task_id, job.id, error)
        except BaseException as exc:  # the job's failure (ended makes its error text)
            failure = exc
        finally:
            self._local.job = None
        return self.ended(slot, job, began, result, error, failure)

    def _exit_if_forked(self, exc: BaseException | None) -> None:
        """A handler that forked returns (or raises) in the child too: the child must
        never go on to run this consumer's loops (claims, commits, the next job). It
        exits at once: with a SystemExit's code, 1 after printing another exception's
        traceback, 0 after a normal return."""
        if os.getpid() == self._pid:
            return
        code = 0
        if isinstance(exc, SystemExit):
            if isinstance(exc.code, int):
                code = exc.code
            elif exc.code is not None:
                print(exc.code, file=sys.stderr)
                code = 1
        elif exc is not None:
            traceback.print_exception(exc)
            code = 1
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
