"""The committer: every outcome of this consumer's jobs reaches the ledger here.

Executors (and handlers committing by hand) hand it outcomes through :attr:`submit`, a
queue's ``put``; its thread takes whatever has queued meanwhile (up to
ROWS_PER_STATEMENT) and writes them in one group commit (:meth:`Dispatcher.finish`: one
UPDATE per status, each row fenced by its commit_id), then re-dispatches the retries. A
commit whose claim is no longer current (reaped, repushed, or committed twice) is stale
and rejected, alone: the rest of the batch goes through. While the database is down it
retries the batch with backoff; at shutdown it gives up when told to (:attr:`abandon`),
leaving the jobs to the reaper.

A job someone cancelled while it ran ends as ``cancelled``: its outcome is
``cancelled`` when the heartbeat told its run so; otherwise its commit loses (the
ledger's compare-and-set skips a cancel-requested row) and the committer closes it as
cancelled right after (:meth:`Dispatcher.close_cancelled`: a round trip only when a
commit lost). A manual commit that lost so raises StaleCommitError.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..config import Options
from ..dispatch import Dispatcher
from ..errors import MeepoError, StaleCommitError
from ..ledger import ROWS_PER_STATEMENT, Outcome, Pair
from ..middleware import Hooks
from ..records import Job, Status
from .claims import Claims
from .service import Backoff, Service

log = logging.getLogger("meepo.consumer")

#: How often a handler waiting for its commit checks that the committer is still there.
COMMIT_WAIT_CHECK = 0.5
#: A group commit takes no more outcomes once its results add up to this many bytes:
#: the batch's one UPDATE carries them (as hex on MariaDB/MySQL, whose default
#: max_allowed_packet is 16 MiB).
RESULT_BYTES_PER_BATCH = 1024 * 1024


def _result_size(c: Commit) -> int:
    r = c.outcome.result
    return 0 if r is None else len(r)


@dataclass
class Commit:
    """One outcome to write; ``future`` (a manual commit) learns whether it won."""

    outcome: Outcome
    future: Future[bool] | None = None


class Committer(Service):
    kind = "committer"
    #: middleware (set through Consumer.hooks): after_commit (and after_retry) for each
    #: outcome written or rejected; None: none installed.
    hooks: Hooks | None = None

    def __init__(
        self,
        dispatcher: Dispatcher,
        claims: Claims,
        options: Options,
        clock: Callable[[], datetime],
        retry_delay: Callable[[int], float] | None = None,
    ) -> None:
        super().__init__(dispatcher.task_id, log, 0.1, 5.0)
        self.d = dispatcher
        self.claims = claims
        self.opts = options
        self.clock = clock
        self.retry_delay = retry_delay
        self.queue: queue.SimpleQueue[Commit | None] = queue.SimpleQueue()
        #: Hand over one outcome (the queue's own ``put``: no extra call per job).
        self.submit = self.queue.put
        #: Set at shutdown: stop retrying a dead database (the reaper takes over).
        self.abandon = threading.Event()
        #: No thread of its own (the inline runner): a handler's commit is written in the
        #: calling thread, by the same group commit, before :meth:`commit` returns.
        self.synchronous = False

    # -- the thread -------------------------------------------------------------------

    def request_stop(self) -> None:
        """End after committing everything queued before this call."""
        self.queue.put(None)

    def tick(self) -> float:
        self.run_once(block=True)
        return 0.0

    def run_once(self, *, block: bool = False) -> int:
        """Commit what is queued (up to ROWS_PER_STATEMENT outcomes, in one group commit); with
        ``block``, wait for the first one. Returns how many were taken."""
        try:
            first = self.queue.get() if block else self.queue.get_nowait()
        except queue.Empty:
            return 0
        batch: list[Commit] = []
        last = first is None
        size = 0  # result bytes in the batch: its one statement stays well under a packet
        if first is not None:
            batch.append(first)
            size = _result_size(first)
        while not last and len(batch) < ROWS_PER_STATEMENT and size < RESULT_BYTES_PER_BATCH:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                last = True
            else:
                batch.append(item)
                size += _result_size(item)
        if batch:
            self.commit_batch(batch)
        if last:
            self._stop.set()
        return len(batch)

    # -- the group commit -------------------------------------------------------------

    def commit_batch(self, batch: list[Commit]) -> None:
        counters = self.claims.counters
        # Two commits of one claim in a batch (a manual commit racing the job timeout):
        # the first one is sent, the later ones are stale.
        seen: set[Pair] = set()
        first: list[Commit] = []
        dupes: list[Commit] = []
        for c in batch:
            pair = (c.outcome.job_id, c.outcome.commit_id)
            (dupes if pair in seen else first).append(c)
            seen.add(pair)
        batch = first
        for c in dupes:
            counters.stale += 1
            if c.future is not None:
                c.future.set_result(False)
        outcomes = [c.outcome for c in batch]
        backoff = Backoff()
        won: set[Pair] | None = None
        closed: set[Pair] = set()
        while won is None:
            try:
                won = self.d.finish(outcomes).won
                lost = [
                    (o.job_id, o.commit_id)
                    for o in outcomes
                    if o.status is not Status.CANCELLED and (o.job_id, o.commit_id) not in won
                ]
                if lost:  # cancelled while they ran, or stale
                    closed = self.d.close_cancelled(lost)
            except MeepoError as exc:
                if self.abandon.is_set():
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
                backoff.wait(self.abandon)
        self.claims.forget([(o.job_id, o.commit_id) for o in outcomes])
        info = log.isEnabledFor(logging.INFO)
        for c in batch:
            o = c.outcome
            pair = (o.job_id, o.commit_id)
            ok = pair in won
            if pair in closed:
                counters.cancelled += 1
                log.info(
                    "task %s: job %d cancelled while it ran: closed as cancelled (its %s "
                    "is ignored)",
                    self.task_id,
                    o.job_id,
                    o.status.value,
                )
                cancelled = Outcome(o.job_id, o.commit_id, Status.CANCELLED, o.error)
                if self.hooks is not None:  # middleware: after_commit
                    self.hooks.after_commit(cancelled, True)
                if c.future is not None:
                    c.future.set_exception(
                        StaleCommitError(
                            o.job_id,
                            o.commit_id,
                            f"job {o.job_id} was cancelled while it ran: it is now "
                            f"cancelled, this commit ({o.status.value}) is ignored",
                        )
                    )
                continue
            if ok:
                if o.status is Status.CANCELLED:
                    counters.cancelled += 1
                elif o.status is Status.DONE:
                    counters.done += 1
                elif o.status is Status.FAILED:
                    counters.failed += 1
                else:
                    counters.retried += 1
                if info:
                    log.info("task %s: job %d committed %s", self.task_id, o.job_id, o.status.value)
            else:
                counters.stale += 1
                if c.future is None:
                    log.warning(
                        "task %s: job %d: commit %s rejected, commit_id %d is stale (reaped "
                        "or repushed meanwhile)",
                        self.task_id,
                        o.job_id,
                        o.status.value,
                        o.commit_id,
                    )
            if self.hooks is not None:  # middleware: after_commit, after_retry
                self.hooks.after_commit(o, ok)
            if c.future is not None:
                c.future.set_result(ok)

    # -- outcomes ---------------------------------------------------------------------

    def outcome(
        self, job: Job, error: str | None, result: bytes | None = None, *, final: bool = False
    ) -> Outcome:
        """The automatic outcome of a run: done (with ``result``, already encoded by the
        executor when the task stores results), or a failed attempt (retried, after
        ``retry_delay``, until max_failed_times; ``final``: failed at once, as for a
        result the serializer cannot write or larger than max_result_bytes: running it
        again would return the same); cancelled if someone cancelled it while it ran (as
        the heartbeat last told)."""
        if job.control.cancel_requested:
            return Outcome(job.id, job.commit_id, Status.CANCELLED, error)
        if error is None:
            return Outcome(job.id, job.commit_id, Status.DONE, result=result)
        if final or job.failed_times + 1 >= self.opts.max_failed_times:
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

    def write_progress(self, job: Job) -> None:
        """Write the run's last progress report if it is not written yet (before its
        commit, which ends the claim that fences it)."""
        got = job.control.take()
        if got is None:
            return
        try:
            self.d.progress([((job.id, job.commit_id), got[0], got[1])])
        except MeepoError as exc:
            log.warning("task %s: job %d: could not write progress: %s", self.task_id, job.id, exc)

    def fail_now(self, job: Job, error: str) -> bool:
        """Commit a failed attempt (retry or fail per max_failed_times) for a claim this
        process still holds; False if it holds it no more (committed, reaped)."""
        claims = self.claims
        with claims.slot:
            if not claims.holds(job.id, job.commit_id):
                return False
            claims.drop(job.id)  # no more lease renewals
            claims.slot.notify_all()
        self.submit(Commit(self.outcome(job, error)))
        return True

    def commit(self, outcome: Outcome) -> None:
        """A handler's commit, sent through the group commit (shares its round trips).
        Raises StaleCommitError if the claim is no longer current."""
        fut = self._enqueue(outcome)
        while True:
            try:
                accepted = fut.result(timeout=COMMIT_WAIT_CHECK)
                break
            except FutureTimeout:
                if self.running or fut.done():
                    continue
                self._commit_directly(outcome)
                return
        if not accepted:
            raise StaleCommitError(outcome.job_id, outcome.commit_id)

    async def commit_async(self, outcome: Outcome) -> None:
        """:meth:`commit` for a coroutine: the wait for the group commit is awaited, so
        the event loop runs the other handlers meanwhile."""
        import asyncio

        fut = self._enqueue(outcome)
        waiting = asyncio.wrap_future(fut)
        while True:
            try:
                accepted = await asyncio.wait_for(asyncio.shield(waiting), COMMIT_WAIT_CHECK)
                break
            except asyncio.TimeoutError:
                if self.running or fut.done():
                    continue
                await asyncio.to_thread(self._commit_directly, outcome)
                return
        if not accepted:
            raise StaleCommitError(outcome.job_id, outcome.commit_id)

    def _enqueue(self, outcome: Outcome) -> Future[bool]:
        with self.claims.lock:
            timed_out = (outcome.job_id, outcome.commit_id) in self.claims.timed_out
        if timed_out:
            raise StaleCommitError(
                outcome.job_id,
                outcome.commit_id,
                f"job {outcome.job_id} timed out (job_timeout={self.opts.job_timeout:g}s) and "
                "was failed; this late commit is ignored",
            )
        fut: Future[bool] = Future()
        self.submit(Commit(outcome, fut))
        if self.synchronous:  # inline mode: the commit is written before it returns
            self.run_once()
        return fut

    def _commit_directly(self, outcome: Outcome) -> None:
        # The committer has finished (a stop is ending): nobody will take this commit
        # from the queue, so it goes to the ledger directly.
        self.d.commit_one(outcome)
        if self.hooks is not None:  # middleware: after_commit
            self.hooks.after_commit(outcome, True)
