"""A process's consumer of one task: small services around one book of claims.

::

    fetcher ──LPOP n / BLPOP──► claim (one CAS UPDATE for the batch) ──► executor
    executor (parallel_num slots) ── run handler ──► committer
    committer ── group commit (one UPDATE per status) ──► re-dispatch retries
    heartbeat ── one UPDATE renews every lease this process holds
    starter ── one UPDATE records the start of the handlers that began meanwhile
    watchdog ── fails the jobs that outlive job_timeout (when it is set)

Each is its own module (:mod:`~meepo.runtime.fetcher`, :mod:`~meepo.runtime.executor`,
:mod:`~meepo.runtime.committer`, :mod:`~meepo.runtime.heartbeat`,
:mod:`~meepo.runtime.starter`, :mod:`~meepo.runtime.watchdog`), a
:class:`~meepo.runtime.service.Service` with a ``run_once()`` a test drives directly;
they share :class:`~meepo.runtime.claims.Claims` (what this process holds, under one
lock) and reach the stores only through the :class:`~meepo.dispatch.Dispatcher`.
:class:`Consumer` composes them: it starts them, stops them in order, and offers the
manual-commit API.

Round trips are shared, checks are not: every claim, commit and lease renewal is a
per-job compare-and-set on ``commit_id`` (see :mod:`meepo.ledger.ledger`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from ..config import Options
from ..dispatch import Dispatcher
from ..errors import NotRunningHereError
from ..ledger import Outcome, Pair
from ..middleware import Hooks
from ..records import Job
from .claims import Claims, Counters
from .committer import COMMIT_WAIT_CHECK, Committer
from .executor import Executor, Handler, ThreadExecutor, did_no_work, is_async_handler
from .fetcher import Fetcher
from .heartbeat import Heartbeat
from .service import Backoff
from .starter import START_RECORD_DELAY, Starter, error_summary
from .watchdog import Watchdog

log = logging.getLogger("meepo.consumer")

#: How far ahead of now a todo job still counts as due for burst mode (see
#: :meth:`Consumer.outstanding`).
DUE_SLACK = timedelta(seconds=1)

#: The longest the process's other duties wait at start for the fetcher's first round
#: (seconds; see Consumer.settled), and how often they look.
SETTLE_CAP, SETTLE_POLL = 0.2, 0.005

__all__ = [
    "COMMIT_WAIT_CHECK",
    "START_RECORD_DELAY",
    "Backoff",
    "Consumer",
    "Counters",
    "Handler",
    "did_no_work",
    "error_summary",
    "executor_for",
    "worker_name",
]


def executor_for(handler: Handler) -> type[Executor]:
    """Where ``handler`` runs: an ``async def`` on an event loop, any other in threads.
    The asyncio executor's module is imported only here, for an async handler."""
    if is_async_handler(handler):
        from .aio import AsyncioExecutor

        return AsyncioExecutor
    return ThreadExecutor


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Consumer:
    """Runs ``handler`` for one task in ``options.parallel_num`` slots (threads, or
    coroutines on one event loop for an ``async def`` handler: see :func:`executor_for`)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        options: Options,
        handler: Handler,
        clock: Callable[[], datetime],
        retry_delay: Callable[[int], float] | None = None,
        *,
        executor: type[Executor] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.d = dispatcher
        self.task_id = dispatcher.task_id
        self.opts = options
        self.handler = handler
        self.clock = clock
        self.retry_delay = retry_delay
        self.worker = worker_name()
        self.claims = Claims(options, monotonic)
        self.counters = self.claims.counters
        self.capacity = self.claims.capacity
        self.committer = Committer(dispatcher, self.claims, options, clock, retry_delay)
        self.starter = Starter(dispatcher, self.claims)
        if executor is None:
            executor = executor_for(handler)
        self.executor: Executor = executor(
            self.claims, options, handler, self.committer, self.starter, self.task_id
        )
        self.fetcher = Fetcher(dispatcher, self.claims, self.executor.submit, options, self.worker)
        self.heartbeat = Heartbeat(dispatcher, self.claims, options)
        self.watchdog = Watchdog(self.claims, self.executor, self.committer, options)
        self.running = False
        self._started_at: float | None = None  # monotonic, at start()
        self._settle_stop = threading.Event()  # ends a wait for settled() at stop

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if self.running:
            return
        self.running = True
        self._started_at = time.monotonic()
        # In the background: nothing on the way to the first claim waits on it (the claim
        # judges time by the database's clock in SQL).
        threading.Thread(
            target=self._measure_skew, name=f"meepo-{self.task_id}-clock", daemon=True
        ).start()
        self.executor.start()
        self.committer.start()
        self.heartbeat.start()
        self.starter.start()
        self.fetcher.start()
        if self.opts.job_timeout is not None:
            self.watchdog.start()

    def settled(self) -> bool:
        """Whether the process's other duties (the clock measurement, the reaper, the
        promoter, the scheduler, the cleaner) may begin: once the fetcher's first round
        has ended, or SETTLE_CAP seconds after start (a first pop that blocks on an
        empty queue). At start they would otherwise compete with the first claim for the
        CPU and the service pool's connections (start-up time); nothing they do is due
        that soon."""
        if self.fetcher.first_round.is_set():
            return True
        started = self._started_at
        return started is not None and time.monotonic() - started >= SETTLE_CAP

    def wait_settled(self, stop: threading.Event) -> None:
        """Block until :meth:`settled` (or ``stop`` is set)."""
        while not self.settled() and not stop.is_set():
            stop.wait(SETTLE_POLL)

    def _measure_skew(self) -> None:
        """Measure this host's clock against the database's (the ledger's clock warns
        when they differ by more than a second): leases and due times are judged by the
        database's, but this host's estimate of it promotes delayed jobs. Runs on a
        thread of its own at start, once the consumer has settled."""
        self.wait_settled(self._settle_stop)
        try:
            offset = self.d.measure_clock()
        except Exception as exc:  # the database may be down at start: measured later
            log.warning(
                "task %s: could not measure this host's clock against the database's: %s",
                self.task_id,
                error_summary(exc),
            )
            return
        log.debug("task %s: database clock offset %+.3fs", self.task_id, offset)

    def stop(self, grace: float | None = None) -> bool:
        """Graceful stop: no new pops, unstarted claimed jobs go back to the queue,
        running jobs get ``grace`` seconds to finish and are committed. Returns False
        if some handler was still running when the grace period ran out (its job is
        left to the reaper)."""
        if not self.running:
            return True
        grace = self.opts.shutdown_grace if grace is None else grace
        deadline = time.monotonic() + grace
        self._settle_stop.set()
        self.fetcher.request_stop()
        # Take the claimed-but-unstarted jobs from the executor now, not only after the
        # fetcher's blocking pop returns: a stopping consumer starts nothing new.
        unstarted = self.executor.drain()
        self.fetcher.join(None)
        unstarted += self.executor.drain()  # the fetcher's last batch
        unstarted += self.claims.take_back()
        slots = self.executor.shutdown()
        if unstarted:
            self.heartbeat.release(unstarted)
        clean = self.executor.wait(slots, deadline)
        self.watchdog.stop(5.0)
        if not clean:
            log.warning(
                "task %s: handlers still running after the %.1fs grace period; their jobs "
                "are left to the reaper",
                self.task_id,
                grace,
            )
        # Record the start of the handlers still running: their jobs are left to the
        # reaper, which charges a started job's expired lease as a failed attempt.
        self.starter.stop(5.0)
        self.starter.run_once()
        self.committer.request_stop()
        if not self.committer.join(max(5.0, deadline - time.monotonic())):
            self.committer.abandon.set()
            self.committer.join(5.0)
        self.heartbeat.stop(5.0)
        self.running = False
        return clean

    def close_intake(self) -> None:
        """Start no new job from now on (a stop is coming): running handlers finish,
        claimed jobs wait to be given back by :meth:`stop`. Safe from a handler."""
        self.claims.intake_closed.set()
        self.fetcher.request_stop()

    # -- what the facade and the tools read -------------------------------------------

    @property
    def hooks(self) -> Hooks | None:
        """The task's middleware (set by Task before start): the fetcher calls
        after_claim, the executor before_run and after_run, the committer after_commit;
        None: none installed (each call site is skipped by one test)."""
        return self.committer.hooks

    @hooks.setter
    def hooks(self, hooks: Hooks | None) -> None:
        self.fetcher.hooks = self.executor.hooks = self.committer.hooks = hooks

    def current_capacity(self) -> int:
        """How many claims the fetcher may hold unstarted or running now."""
        return self.claims.current_capacity()

    @property
    def held(self) -> dict[int, int]:
        with self.claims.lock:
            return {i: c.commit_id for i, c in self.claims.held.items()}

    @property
    def abandoned(self) -> int:
        """Handler threads abandoned by job_timeout that are still running."""
        with self.claims.lock:
            return self.executor.abandoned_alive()

    @property
    def abandoned_bound(self) -> int:
        """Abandoned handlers above this number are logged as an error on every new
        timeout (parallel_num by default)."""
        return self.watchdog.bound

    @abandoned_bound.setter
    def abandoned_bound(self, value: int) -> None:
        self.watchdog.bound = value

    def outstanding(self) -> int:
        """The task's jobs left for this consumer: due now (todo, by the task's clock,
        give or take :data:`DUE_SLACK`) or claimed by it and not committed yet. Burst
        mode stops at zero. One COUNT.

        The slack: a retry due "now" was stamped by the clock estimate of its commit,
        which the background clock measurement may move back a little before this
        count; a job due within the slack is waited for, not left behind."""
        return self.d.outstanding(self.worker, self.clock() + DUE_SLACK)

    def heartbeat_once(self) -> set[Pair]:
        """Renew every lease this process holds; returns the claims found lost."""
        return self.heartbeat.run_once()

    def check_timeouts(self) -> list[Job]:
        """Fail the jobs whose handler has run past job_timeout; returns them."""
        return self.watchdog.run_once()

    # -- manual commit ----------------------------------------------------------------

    def current_job(self) -> Job | None:
        return self.executor.current_job()

    def held_claim(self, job_id: int) -> tuple[int, str] | None:
        """The commit_id and priority of this process's claim of ``job_id`` (None if
        it holds none)."""
        job = self.current_job()
        if job is not None and job.id == job_id:
            return job.commit_id, job.priority
        with self.claims.lock:
            claim = self.claims.held.get(job_id)
            return None if claim is None else (claim.commit_id, claim.priority)

    def commit(self, outcome: Outcome) -> None:
        """A handler's commit, sent through the committer (shares its round trips).
        Raises StaleCommitError if the claim is no longer current."""
        if not self.running:
            raise NotRunningHereError("the consumer is not running")
        job = self.current_job()
        if job is not None and job.id == outcome.job_id and job.control.dirty:
            self.committer.write_progress(job)  # before the commit ends its claim
        self.committer.commit(outcome)

    async def commit_async(self, outcome: Outcome) -> None:
        """:meth:`commit`, awaited without holding the event loop."""
        if not self.running:
            raise NotRunningHereError("the consumer is not running")
        await self.committer.commit_async(outcome)
