"""A process's consumers of one task: fetcher, executors, committer and heartbeat.

::

    fetcher ──LPOP n / BLPOP──► claim (one CAS UPDATE for the batch) ──► work queue
    executors (parallel_num threads) ── run handler ──► outcome queue
    committer ── group commit (one UPDATE per status) ──► re-dispatch retries
    heartbeat ── one UPDATE renews every lease this process holds
    starter ── one UPDATE records the start of the handlers that began meanwhile

Round trips are shared, checks are not: every claim, commit and lease renewal is a
per-job compare-and-set on ``commit_id`` (see :mod:`meepo.ledger.ledger`).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import os
import queue
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..config import AUTO_PREFETCH_MAX_PER_THREAD, AUTO_PREFETCH_SECONDS, Options
from ..dispatch import Dispatcher
from ..errors import (
    LedgerUnavailableError,
    MeepoError,
    NotRunningHereError,
    StaleCommitError,
    UnavailableError,
)
from ..ledger import CHUNK, Outcome, Pair
from ..records import Job, Message, Status
from ..transport import decode

log = logging.getLogger("meepo.consumer")

Handler = Callable[[Job], Any]

#: A message claimed before its run_at is delayed at least this long (seconds).
EARLY_MARGIN = 0.05

#: The starter waits this long (seconds) after a handler began before it records the
#: start, so that one UPDATE marks every job begun meanwhile (jobs that end sooner are
#: marked by their commit instead).
START_RECORD_DELAY = 0.005

#: How often a handler waiting for its commit checks that the committer is still there.
COMMIT_WAIT_CHECK = 0.5


def worker_name() -> str:
    import os

    return f"{socket.gethostname()}:{os.getpid()}"


class Backoff:
    """Exponential wait between retries against a server that is down."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first, self.cap, self.next = first, cap, first

    def wait(self, stop: threading.Event) -> None:
        stop.wait(self.next)
        self.next = min(self.cap, self.next * 2)

    def reset(self) -> None:
        self.next = self.first


def error_summary(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@dataclass
class _Commit:
    outcome: Outcome
    future: Future[bool] | None = None


def did_no_work(result: object) -> str | None:
    """Why a handler's return value shows that it did not run the job, or None.

    Any ordinary value means done. A coroutine, generator or other awaitable means the
    body never ran (typically an ``async def`` handler): that is a failed attempt. A
    coroutine or generator is closed, so Python does not warn that it was never awaited.
    """
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
        f"HandlerError: the handler returned {kind} instead of running the job (an async "
        "def or a yield in the handler?); meepo calls handlers as plain functions in threads"
    )


@dataclass
class Counters:
    claimed: int = 0
    done: int = 0
    retried: int = 0
    failed: int = 0
    stale: int = 0
    dropped: int = 0
    finished: int = 0  # handler runs that ended: returned, raised or timed out
    timed_out: int = 0  # handler runs that outlived job_timeout (their threads abandoned)


@dataclass
class _Claim:
    """One claim this process holds: its commit_id, the job's priority, and when its
    lease ends as far as this process knows (monotonic seconds: set by the claim, pushed
    back by every heartbeat that renews it)."""

    commit_id: int
    priority: str
    lease_end: float


@dataclass(eq=False)
class _Slot:
    """One executor thread and the job it runs (for job_timeout)."""

    thread: threading.Thread | None = None
    job: Job | None = None
    started: float = 0.0
    abandoned: bool = False


class Consumer:
    """Runs ``handler`` for one task in ``options.parallel_num`` threads."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        options: Options,
        handler: Handler,
        clock: Callable[[], datetime],
        retry_delay: Callable[[int], float] | None = None,
    ) -> None:
        self.d = dispatcher
        self.task_id = dispatcher.task_id
        self.opts = options
        self.handler = handler
        self.clock = clock
        self.retry_delay = retry_delay
        self.worker = worker_name()
        self.counters = Counters()
        self.capacity = options.parallel_num + options.prefetch
        self._run_time: float | None = None  # moving average of handler run times (s)
        self._lease = timedelta(seconds=options.lease)
        self._held: dict[int, _Claim] = {}  # job id -> this process's claim of it
        # Claims whose handler has not returned yet (queued or running): what the
        # capacity bounds. A job whose handler returned stays in _held (its lease is
        # renewed) until its commit is written, but no longer takes a slot; _held is
        # bounded apart (2 x capacity), so a slow committer still holds the fetcher.
        self._busy = 0
        self._lock = threading.Lock()
        self._slot = threading.Condition(self._lock)
        self._work: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._commits: queue.SimpleQueue[_Commit | None] = queue.SimpleQueue()
        self._local = threading.local()
        self._stop_fetch = threading.Event()
        self._intake_closed = threading.Event()  # executors start nothing new
        self._set_aside: list[Job] = []  # taken by an executor after the intake closed
        # Claimed jobs an executor did not start because too little of their lease was
        # left (heartbeats failing): the heartbeat gives them back.
        self._not_started: list[Job] = []
        self._stop_hb = threading.Event()
        self._abandon = threading.Event()  # committer: stop retrying a dead database
        self._fetcher: threading.Thread | None = None
        self._slots: list[_Slot] = []  # the live executors (not the abandoned ones)
        self._abandoned: list[_Slot] = []  # timed out, their handler still running
        self._timed_out: set[Pair] = set()  # claims failed by the timeout, handler running
        self._stopping = False
        self._seq = itertools.count()
        self._stop_watch = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._committer: threading.Thread | None = None
        self._heartbeat: threading.Thread | None = None
        # Claims whose handler began and whose start is not recorded yet: the starter
        # marks them (Ledger.start), unless their commit does first.
        self._unmarked: set[Pair] = set()
        self._start_cv = threading.Condition(self._lock)
        self._stop_start = threading.Event()
        self._starter: threading.Thread | None = None
        # The process that runs the handlers: a handler that forks returns in a child
        # too, which must exit instead of running this consumer's loops (see _run).
        self._pid = os.getpid()
        self.running = False
        #: Abandoned handler threads still running above this number are logged as an
        #: error on every new timeout: hung handlers are piling up threads.
        self.abandoned_bound = options.parallel_num

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if self.running:
            return
        self.running = True
        self._pid = os.getpid()
        self._measure_skew()
        name = f"meepo-{self.task_id}"
        self._committer = threading.Thread(
            target=self._commit_loop, name=f"{name}-committer", daemon=True
        )
        self._heartbeat = threading.Thread(
            target=self._heartbeat_loop, name=f"{name}-heartbeat", daemon=True
        )
        self._slots = [self._new_slot() for _ in range(self.opts.parallel_num)]
        self._fetcher = threading.Thread(target=self._fetch_loop, name=f"{name}-fetch", daemon=True)
        self._starter = threading.Thread(
            target=self._start_loop, name=f"{name}-starter", daemon=True
        )
        threads = [self._committer, self._heartbeat, self._starter, self._fetcher]
        if self.opts.job_timeout is not None:
            self._watchdog = threading.Thread(
                target=self._watch_loop, name=f"{name}-watchdog", daemon=True
            )
            threads.append(self._watchdog)
        for s in self._slots:
            assert s.thread is not None
            s.thread.start()
        for t in threads:
            t.start()
        if inspect.iscoroutinefunction(self.handler):
            log.warning(
                "task %s: the handler is an async def function: meepo calls handlers as "
                "plain functions in threads, so every job will fail without running",
                self.task_id,
            )

    def _measure_skew(self) -> None:
        """Measure this host's clock against the database's (the ledger's clock warns
        when they differ by more than a second): leases and due times are judged by the
        database's, but this host's estimate of it promotes delayed jobs."""
        clock = self.d.ledger.clock
        try:
            offset = clock.measure()
        except Exception as exc:  # the database may be down at start: measured later
            log.warning(
                "task %s: could not measure this host's clock against the database's: %s",
                self.task_id,
                error_summary(exc),
            )
            return
        log.debug("task %s: database clock offset %+.3fs", self.task_id, offset)

    def _new_slot(self) -> _Slot:
        slot = _Slot()
        slot.thread = threading.Thread(
            target=self._exec_loop,
            args=(slot,),
            name=f"meepo-{self.task_id}-exec-{next(self._seq)}",
            daemon=True,
        )
        return slot

    def stop(self, grace: float | None = None) -> bool:
        """Graceful stop: no new pops, unstarted claimed jobs go back to the queue,
        running jobs get ``grace`` seconds to finish and are committed. Returns False
        if some handler was still running when the grace period ran out (its job is
        left to the reaper)."""
        if not self.running:
            return True
        grace = self.opts.shutdown_grace if grace is None else grace
        deadline = time.monotonic() + grace
        self._stop_fetch.set()
        with self._slot:
            self._slot.notify_all()
        # Take the claimed-but-unstarted jobs from the executors now, not only after the
        # fetcher's blocking pop returns: a stopping consumer starts nothing new.
        unstarted = self._drain_work()
        if self._fetcher is not None:
            self._fetcher.join()
        unstarted += self._drain_work()  # the fetcher's last batch
        with self._lock:
            unstarted += self._set_aside + self._not_started
            self._set_aside, self._not_started = [], []
        with self._lock:
            self._stopping = True  # the watchdog replaces no executor from now on
            slots = list(self._slots)
        for _ in slots:
            self._work.put(None)
        if unstarted:
            self._release(unstarted)

        def busy(s: _Slot) -> bool:  # a timed-out handler is not waited for
            return s.thread is not None and s.thread.is_alive() and not s.abandoned

        for s in slots:
            while busy(s) and time.monotonic() < deadline:
                assert s.thread is not None
                s.thread.join(min(0.1, max(0.0, deadline - time.monotonic())))
        clean = not any(busy(s) for s in slots)
        self._stop_watch.set()
        if self._watchdog is not None:
            self._watchdog.join(5.0)
        if not clean:
            log.warning(
                "task %s: handlers still running after the %.1fs grace period; their jobs "
                "are left to the reaper",
                self.task_id,
                grace,
            )
        # Record the start of the handlers still running: their jobs are left to the
        # reaper, which charges a started job's expired lease as a failed attempt.
        self._stop_start.set()
        with self._start_cv:
            self._start_cv.notify_all()
        if self._starter is not None:
            self._starter.join(5.0)
        self._record_starts()
        self._commits.put(None)
        if self._committer is not None:
            self._committer.join(max(5.0, deadline - time.monotonic()))
            if self._committer.is_alive():
                self._abandon.set()
                self._committer.join(5.0)
        self._stop_hb.set()
        if self._heartbeat is not None:
            self._heartbeat.join(5.0)
        self.running = False
        return clean

    def _drain_work(self) -> list[Job]:
        jobs: list[Job] = []
        while True:
            try:
                job = self._work.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)

    def _release(self, jobs: list[Job]) -> None:
        """Give back claimed jobs that never ran (their slots are freed)."""
        with self._slot:
            self._busy -= len(jobs)
        pairs = [(j.id, j.commit_id) for j in jobs]
        try:
            self.d.release([(j.id, j.commit_id, j.priority) for j in jobs])
        except MeepoError as exc:
            log.warning("task %s: could not release %d job(s): %s", self.task_id, len(pairs), exc)
        self._forget(pairs)

    def _forget(self, pairs: list[Pair]) -> None:
        with self._slot:
            for i, c in pairs:
                if self._holds(i, c):
                    self._drop_held(i)
            self._slot.notify_all()

    def _holds(self, job_id: int, commit_id: int) -> bool:
        """Whether this process holds that claim of the job; call with the lock held."""
        claim = self._held.get(job_id)
        return claim is not None and claim.commit_id == commit_id

    def _drop_held(self, job_id: int) -> None:
        """Forget a claim (its lease is no longer renewed); call with the lock held."""
        del self._held[job_id]

    def current_capacity(self) -> int:
        """How many claims the fetcher may hold unstarted or running: ``parallel_num +
        prefetch``; with the automatic prefetch, more while handlers are short (about
        AUTO_PREFETCH_SECONDS of work per thread ahead, bounded)."""
        avg = self._run_time
        if not self.opts.prefetch_auto or avg is None:
            return self.capacity
        n = self.opts.parallel_num
        ahead = n * AUTO_PREFETCH_SECONDS / max(avg, 1e-6)
        return n + max(self.opts.prefetch, min(int(ahead), AUTO_PREFETCH_MAX_PER_THREAD * n))

    @property
    def held(self) -> dict[int, int]:
        with self._lock:
            return {i: c.commit_id for i, c in self._held.items()}

    # -- fetcher ----------------------------------------------------------------------

    def _fetch_loop(self) -> None:
        backoff = Backoff()
        while not self._stop_fetch.is_set():
            with self._slot:
                cap = self.current_capacity()
                free = min(cap - self._busy, 2 * cap - len(self._held))
                if free <= 0:
                    self._slot.wait(0.5)
                    continue
            try:
                priority, messages = self.d.transport.pop(min(free, CHUNK), timeout=1.0)
            except UnavailableError as exc:
                log.warning("task %s: cannot pop: %s (retrying)", self.task_id, exc)
                backoff.wait(self._stop_fetch)
                continue
            if not messages:
                backoff.reset()
                continue
            pairs: list[Pair] = []
            for m in messages:
                pair = decode(m)
                if pair is None:
                    self.counters.dropped += 1
                    log.warning("task %s: dropped a malformed message %r", self.task_id, m[:80])
                else:
                    pairs.append(pair)
            try:
                self._claim(pairs)
                backoff.reset()
            except Exception as exc:  # the fetcher must never die silently
                if isinstance(exc, MeepoError):
                    log.warning("task %s: claim failed: %s (retrying)", self.task_id, exc)
                else:
                    log.exception("task %s: claim crashed (retrying)", self.task_id)
                # hand the messages back; the ledger sweep covers a failure here
                with contextlib.suppress(UnavailableError):
                    self.d.transport.send([Message(i, c, priority) for i, c in pairs])
                backoff.wait(self._stop_fetch)

    def _claim(self, pairs: list[Pair]) -> None:
        if not pairs:
            return
        began = time.monotonic()
        jobs = self.d.ledger.claim(
            self.task_id, pairs, now=self.d.ledger_now(), lease=self._lease, worker=self.worker
        )
        if jobs.early:
            self._delay_early(jobs.early)
        stale = len(set(pairs)) - len(jobs) - len(jobs.early)
        if stale:
            self.counters.dropped += stale
            log.debug("task %s: dropped %d stale or duplicate message(s)", self.task_id, stale)
        if not jobs:
            return
        self.counters.claimed += len(jobs)
        with self._lock:
            self._busy += len(jobs)
            for j in jobs:
                self._held[j.id] = _Claim(j.commit_id, j.priority, began + self.opts.lease)
        for j in jobs:
            log.info("task %s: job %d claimed (commit_id %d)", self.task_id, j.id, j.commit_id)
            self._work.put(j)

    def _delay_early(self, early: list[Message]) -> None:
        """Messages of jobs the claim refused as not due yet by the database's clock
        (promoted early by a host whose clock runs ahead, or sent by an old meepo):
        back to the delayed set, due at their run_at by this host's estimate of the
        database's clock, and at least EARLY_MARGIN from now (so that an estimate a
        little behind does not send them straight back)."""
        now = self.clock()
        soon = now + timedelta(seconds=EARLY_MARGIN)
        again = [
            Message(m.job_id, m.commit_id, m.priority, max(m.run_at or soon, soon)) for m in early
        ]
        log.info(
            "task %s: %d job(s) not due yet by the database's clock, delayed again",
            self.task_id,
            len(again),
        )
        self.d.send(again)

    # -- executors --------------------------------------------------------------------

    def close_intake(self) -> None:
        """Start no new job from now on (a stop is coming): running handlers finish,
        claimed jobs wait to be given back by :meth:`stop`. Safe from a handler."""
        self._intake_closed.set()
        self._stop_fetch.set()

    def _exec_loop(self, slot: _Slot) -> None:
        while True:
            job = self._work.get()
            if job is None:
                return
            if not self._admit(slot, job):
                continue
            if not self._run(slot, job):
                return  # timed out: a fresh executor has taken this one's place

    def _admit(self, slot: _Slot, job: Job) -> bool:
        """Whether to run the job now; if so it is the slot's job from now on.

        Every job passes here, so the usual case holds the lock once. It is not run
        after the intake closed (it waits to be given back by :meth:`stop`), nor when
        less than a third of its lease is left (normally two thirds are, as heartbeats
        renew it every third): a claim that waited in the prefetch while heartbeats
        failed may have expired and been reaped, and its job claimed and started
        elsewhere; starting it here too would run it twice at once. Such a job is given
        back by the next heartbeat, if the claim is still ours. An attempt is a run, so
        a run's start is recorded: usually later, in a batch, by the starter (or by the
        commit); see :meth:`_mark_start` for a job whose earlier claim expired unstarted."""
        with self._lock:
            if self._intake_closed.is_set():
                self._set_aside.append(job)
                return False
            claim = self._held.get(job.id)
            now = time.monotonic()
            fresh = claim is not None and claim.lease_end - now >= self.opts.lease / 3
            if not fresh:
                self._not_started.append(job)
            elif job.orphaned_claims <= 0:
                if not self._unmarked:
                    self._start_cv.notify()  # the starter waits only while there is none
                self._unmarked.add((job.id, job.commit_id))
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
        if not self._mark_start(job):
            return False
        with self._lock:
            slot.job, slot.started = job, time.monotonic()
        return True

    # -- start marks ------------------------------------------------------------------

    def _mark_start(self, job: Job) -> bool:
        """Record the start of a job whose earlier claim expired before it started
        (``orphaned_claims``) synchronously, before it runs: if its handler kills the
        worker at once, the next reap then counts the attempt, so such a job still ends
        after max_failed_times attempts. False if the claim was lost meanwhile (the job
        is not run) or the mark could not be written (the job is given back)."""
        pair = (job.id, job.commit_id)
        try:
            marked = self.d.ledger.start([pair], now=self.d.ledger_now())
        except MeepoError as exc:
            log.warning(
                "task %s: job %d not started: could not record its start: %s; it goes "
                "back to the queue",
                self.task_id,
                job.id,
                exc,
            )
            with self._lock:
                self._not_started.append(job)  # given back by the next heartbeat
            return False
        if marked:
            return True
        log.warning(
            "task %s: job %d not started: its claim (commit_id %d) was lost or expired "
            "before its start was recorded",
            self.task_id,
            job.id,
            job.commit_id,
        )
        with self._slot:
            self._busy -= 1
            if self._holds(job.id, job.commit_id):
                self._drop_held(job.id)
            self._slot.notify_all()
        return False

    def _start_loop(self) -> None:
        backoff = Backoff(first=0.05, cap=1.0)
        while not self._stop_start.is_set():
            with self._start_cv:
                while not self._unmarked and not self._stop_start.is_set():
                    self._start_cv.wait()
            if self._stop_start.wait(START_RECORD_DELAY):
                return
            try:
                self._record_starts()
                backoff.reset()
            except Exception as exc:  # the starter must never die silently
                log.warning(
                    "task %s: could not record job starts: %s (retrying)",
                    self.task_id,
                    error_summary(exc),
                )
                backoff.wait(self._stop_start)

    def _record_starts(self) -> None:
        """Mark the start of every job whose handler began and is not recorded yet, in
        one UPDATE (jobs committed meanwhile no longer match: their commit marked them)."""
        with self._lock:
            batch = sorted(self._unmarked)
        if not batch:
            return
        self.d.ledger.start(batch, now=self.d.ledger_now())
        with self._lock:
            self._unmarked.difference_update(batch)

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

    def _run(self, slot: _Slot, job: Job) -> bool:
        """Run one job; False if it outlived job_timeout (this thread is then retired)."""
        self._local.job = job
        error: str | None = None
        began = time.perf_counter()
        try:
            try:
                result = self.handler(job)
            except BaseException as exc:
                self._exit_if_forked(exc)
                raise
            self._exit_if_forked(None)
            error = did_no_work(result)
            if error is not None:
                log.warning("task %s: job %d: %s", self.task_id, job.id, error)
        except BaseException as exc:  # any handler failure is the job's, never the worker's
            error = error_summary(exc)
            log.warning("task %s: job %d raised %s", self.task_id, job.id, error, exc_info=True)
        finally:
            self._local.job = None
        took = time.perf_counter() - began
        pair = (job.id, job.commit_id)
        avg = self._run_time
        self._run_time = took if avg is None else avg + 0.05 * (took - avg)
        with self._slot:  # one hold of the lock per job's end, as at its start
            unmarked = pair in self._unmarked
            self._unmarked.discard(pair)  # its commit records the start from now on
            slot.job = None
            abandoned = slot.abandoned
            if abandoned:
                self._timed_out.discard(pair)
                if slot in self._abandoned:
                    self._abandoned.remove(slot)
            else:
                self.counters.finished += 1
                self._busy -= 1  # the slot is free; the claim stays held until committed
                self._slot.notify()
        if abandoned:
            log.warning(
                "task %s: job %d: its handler returned %.1fs after it started, past the "
                "%gs job_timeout; the job was already failed by the timeout, this outcome "
                "is ignored",
                self.task_id,
                job.id,
                time.monotonic() - slot.started,
                self.opts.job_timeout,
            )
            return False
        if self.opts.auto_commit:
            self._commits.put(_Commit(self._auto_outcome(job, error)))
            return True
        if error is not None and error.startswith("HandlerError:"):
            self._fail_now(job, error)  # it cannot have committed: it never ran
            return True
        with self._lock:
            uncommitted = self._holds(job.id, job.commit_id)
        if uncommitted and unmarked:
            # The reaper will charge this run only if its start is recorded.
            try:
                self.d.ledger.start([pair], now=self.d.ledger_now())
            except MeepoError as exc:
                log.warning(
                    "task %s: job %d: could not record its start: %s", self.task_id, job.id, exc
                )
        with self._slot:  # manual mode: a handler that did not commit leaves it to the reaper
            if self._holds(job.id, job.commit_id):
                self._drop_held(job.id)
                self._slot.notify_all()
                log.info(
                    "task %s: job %d returned without a commit; the reaper will apply the "
                    "zombie policy when its lease expires",
                    self.task_id,
                    job.id,
                )
        return True

    def _fail_now(self, job: Job, error: str) -> bool:
        """Commit a failed attempt (retry or fail per max_failed_times) for a claim this
        process still holds; False if it holds it no more (committed, reaped)."""
        with self._slot:
            if not self._holds(job.id, job.commit_id):
                return False
            self._drop_held(job.id)  # no more lease renewals
            self._slot.notify_all()
        self._commits.put(_Commit(self._auto_outcome(job, error)))
        return True

    # -- job timeout ------------------------------------------------------------------

    def _watch_loop(self) -> None:
        timeout = self.opts.job_timeout or 0.0
        interval = min(1.0, max(0.05, timeout / 10))
        while not self._stop_watch.wait(interval):
            try:
                self.check_timeouts()
            except Exception:  # the watchdog must not die silently
                log.exception("task %s: job timeout check crashed", self.task_id)

    def check_timeouts(self) -> list[Job]:
        """Fail the jobs whose handler has run past job_timeout; returns them.

        Python cannot stop a thread: the handler's thread is abandoned (whatever it
        returns or commits later is ignored, its commit_id being stale by then) and a
        fresh executor thread takes its place."""
        timeout = self.opts.job_timeout
        if timeout is None:
            return []
        now = time.monotonic()
        expired: list[Job] = []
        with self._lock:
            for slot in list(self._slots):
                job = slot.job
                if job is None or slot.abandoned or now - slot.started < timeout:
                    continue
                slot.abandoned = True
                self._busy -= 1  # its replacement executor takes the next job
                expired.append(job)
                self._timed_out.add((job.id, job.commit_id))
                self._slots.remove(slot)
                self._abandoned.append(slot)
                if not self._stopping:
                    fresh = self._new_slot()
                    self._slots.append(fresh)
                    assert fresh.thread is not None
                    fresh.thread.start()
            alive = sum(1 for s in self._abandoned if s.thread is not None and s.thread.is_alive())
        error = f"JobTimeout: timed out after {timeout:g}s (job_timeout)"
        for job in expired:
            with self._lock:
                self.counters.timed_out += 1
                self.counters.finished += 1
            failed = self._fail_now(job, error)
            log.warning(
                "task %s: job %d timed out after %gs; %s; its handler thread is abandoned "
                "and replaced (%d abandoned handler thread(s) still running)",
                self.task_id,
                job.id,
                timeout,
                "counted as a failed attempt" if failed else "it was already committed or lost",
                alive,
            )
        if expired and alive > self.abandoned_bound:
            log.error(
                "task %s: %d handler threads that outlived job_timeout are still running, "
                "more than parallel_num=%d: hung handlers are piling up threads in this "
                "process; fix the handler, or recycle workers (meepo worker --max-jobs / "
                "--max-memory)",
                self.task_id,
                alive,
                self.abandoned_bound,
            )
        return expired

    @property
    def abandoned(self) -> int:
        """Handler threads abandoned by job_timeout that are still running."""
        with self._lock:
            return sum(1 for s in self._abandoned if s.thread is not None and s.thread.is_alive())

    def _auto_outcome(self, job: Job, error: str | None) -> Outcome:
        if error is None:
            return Outcome(job.id, job.commit_id, Status.DONE)
        if job.failed_times + 1 >= self.opts.max_failed_times:
            return Outcome(job.id, job.commit_id, Status.FAILED, error)
        run_at = None
        if self.retry_delay is not None:
            try:
                delay = float(self.retry_delay(job.failed_times + 1))
            except Exception:
                log.exception("task %s: retry_backoff raised; retrying at once", self.task_id)
                delay = 0.0
            if delay > 0:
                run_at = self.clock() + timedelta(seconds=delay)
        return Outcome(job.id, job.commit_id, Status.TODO, error, run_at, job.priority)

    # -- manual commit ----------------------------------------------------------------

    def current_job(self) -> Job | None:
        job: Job | None = getattr(self._local, "job", None)
        return job

    def held_claim(self, job_id: int) -> tuple[int, str] | None:
        """The commit_id and priority of this process's claim of ``job_id`` (None if
        it holds none)."""
        job = self.current_job()
        if job is not None and job.id == job_id:
            return job.commit_id, job.priority
        with self._lock:
            claim = self._held.get(job_id)
            return None if claim is None else (claim.commit_id, claim.priority)

    def commit(self, outcome: Outcome) -> None:
        """A handler's commit, sent through the committer (shares its round trips).
        Raises StaleCommitError if the claim is no longer current."""
        if not self.running or self._commits is None:
            raise NotRunningHereError("the consumer is not running")
        with self._lock:
            timed_out = (outcome.job_id, outcome.commit_id) in self._timed_out
        if timed_out:
            raise StaleCommitError(
                outcome.job_id,
                outcome.commit_id,
                f"job {outcome.job_id} timed out (job_timeout={self.opts.job_timeout:g}s) and "
                "was failed; this late commit is ignored",
            )
        fut: Future[bool] = Future()
        self._commits.put(_Commit(outcome, fut))
        while True:
            try:
                accepted = fut.result(timeout=COMMIT_WAIT_CHECK)
                break
            except FutureTimeout:
                committer = self._committer
                if committer is not None and committer.is_alive():
                    continue
                if fut.done():
                    continue
                # The committer has finished (a stop is ending): nobody will take this
                # commit from the queue, so it goes to the ledger directly.
                self.d.commit_one(outcome)
                return
        if not accepted:
            raise StaleCommitError(outcome.job_id, outcome.commit_id)

    # -- committer --------------------------------------------------------------------

    def _commit_loop(self) -> None:
        while True:
            first = self._commits.get()
            batch: list[_Commit] = []
            last = first is None
            if first is not None:
                batch.append(first)
            while not last and len(batch) < CHUNK:
                try:
                    item = self._commits.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    last = True
                else:
                    batch.append(item)
            if batch:
                self._commit_batch(batch)
            if last:
                return

    def _commit_batch(self, batch: list[_Commit]) -> None:
        # Two commits of one claim in a batch (a manual commit racing the job timeout):
        # the first one is sent, the later ones are stale.
        seen: set[Pair] = set()
        first: list[_Commit] = []
        dupes: list[_Commit] = []
        for c in batch:
            pair = (c.outcome.job_id, c.outcome.commit_id)
            (dupes if pair in seen else first).append(c)
            seen.add(pair)
        batch = first
        for c in dupes:
            self.counters.stale += 1
            if c.future is not None:
                c.future.set_result(False)
        outcomes = [c.outcome for c in batch]
        backoff = Backoff()
        won: set[Pair] | None = None
        while won is None:
            try:
                won = self.d.finish(outcomes).won
            except (LedgerUnavailableError, MeepoError) as exc:
                if self._abandon.is_set():
                    log.error(
                        "task %s: gave up committing %d job(s) at shutdown: %s; the reaper "
                        "will recover them",
                        self.task_id,
                        len(batch),
                        exc,
                    )
                    won = set()
                    break
                log.warning("task %s: commit failed: %s (retrying)", self.task_id, exc)
                backoff.wait(self._abandon)
        self._forget([(o.job_id, o.commit_id) for o in outcomes])
        for c in batch:
            o = c.outcome
            ok = (o.job_id, o.commit_id) in won
            if ok:
                if o.status is Status.DONE:
                    self.counters.done += 1
                elif o.status is Status.FAILED:
                    self.counters.failed += 1
                else:
                    self.counters.retried += 1
                log.info("task %s: job %d committed %s", self.task_id, o.job_id, o.status.value)
            else:
                self.counters.stale += 1
                if c.future is None:
                    log.warning(
                        "task %s: job %d: commit %s rejected, commit_id %d is stale (reaped "
                        "or repushed meanwhile)",
                        self.task_id,
                        o.job_id,
                        o.status.value,
                        o.commit_id,
                    )
            if c.future is not None:
                c.future.set_result(ok)

    # -- heartbeat --------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._stop_hb.wait(self.opts.heartbeat_interval):
            self.heartbeat_once()

    def heartbeat_once(self) -> set[Pair]:
        """Renew every lease this process holds; returns the claims found lost."""
        with self._lock:
            not_started, self._not_started = self._not_started, []
        if not_started:
            self._release(not_started)
        with self._lock:
            pairs = [(i, c.commit_id) for i, c in self._held.items()]
        if not pairs:
            return set()
        began = time.monotonic()
        try:
            renewal = self.d.ledger.heartbeat(pairs, lease=self._lease, now=self.d.ledger_now())
        except MeepoError as exc:
            log.warning("task %s: heartbeat failed: %s", self.task_id, exc)
            return set()
        if renewal.skipped:
            log.info(
                "task %s: lease(s) of job(s) %s not renewed this beat: their rows are locked "
                "by another transaction (retried next beat)",
                self.task_id,
                sorted(i for i, _ in renewal.skipped),
            )
        with self._lock:  # claims committed meanwhile were not lost, just finished
            lost = {(i, c) for i, c in renewal.lost if self._holds(i, c)}
            for i, c in renewal.renewed:
                if self._holds(i, c):
                    self._held[i].lease_end = began + self.opts.lease
        if lost:
            log.warning(
                "task %s: lost the lease of job(s) %s (reaped or repushed); their commits "
                "will be rejected",
                self.task_id,
                sorted(i for i, _ in lost),
            )
            self._forget(sorted(lost))
        return lost
