"""The one coordinator of the two stores: the only module that uses both the ledger
and the transport. Everything else (the consumer's services, the reaper, the
recovery, the promoter, the scheduler, the facade) calls its verbs.

Writes go ledger first, then Redis: a row is committed before its message is sent, so
a message never names a row that does not exist, and a message lost on the way costs
time (the sweep or the recovery sends it again), never the job.

Every transition returns a :class:`Moved`: the claims it won (``(id, old commit_id)``
pairs whose compare-and-set took effect) and the messages it sent for the rows it put
(back) in ``todo``, new commit_id.

* producer side: :meth:`~Dispatcher.insert`, :meth:`~Dispatcher.push`,
  :meth:`~Dispatcher.send`, :meth:`~Dispatcher.fire` (a schedule's jobs);
* consumer side: :meth:`~Dispatcher.pop_and_claim`, :meth:`~Dispatcher.renew`,
  :meth:`~Dispatcher.start`, :meth:`~Dispatcher.progress`, :meth:`~Dispatcher.finish`,
  :meth:`~Dispatcher.close_cancelled`, :meth:`~Dispatcher.commit_one`,
  :meth:`~Dispatcher.release`;
* maintenance: :meth:`~Dispatcher.reap`, :meth:`~Dispatcher.sweep`,
  :meth:`~Dispatcher.ensure_epoch` / :meth:`~Dispatcher.take_recovery` /
  :meth:`~Dispatcher.recover`, :meth:`~Dispatcher.promote`, :meth:`~Dispatcher.repush`,
  :meth:`~Dispatcher.cancel` (ledger only: a cancelled job's message is dropped when
  popped, as a stale one).

If Redis fails after a commit the rows are marked due for the dispatch sweep (and even
if that fails, their dispatch deadline brings them back): a committed job is never lost.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from .errors import (
    JobNotFoundError,
    LedgerUnavailableError,
    MeepoError,
    TransportUnavailableError,
    UnavailableError,
    WaitTimeoutError,
)
from .ledger import (
    NEVER_DISPATCHED,
    ROWS_PER_STATEMENT,
    Cancelled,
    Claimed,
    Inserted,
    Ledger,
    Outcome,
    Pair,
    Renewal,
)
from .ledger.driver import Progress
from .ledger.schedules import Schedules
from .records import JobRecord, Message, NewJob, ScheduleRecord, Status
from .transport import Transport, decode
from .transport.settings import check_redis_config
from .transport.transport import RECOVERY_LOCK_TTL

log = logging.getLogger("meepo.dispatch")

#: A message claimed before its run_at is delayed at least this long (seconds).
EARLY_MARGIN = 0.05
#: ``wait``: how long it waits for Redis to confirm its subscription before its first
#: read (then it reads anyway, and polls until the subscription is confirmed).
WAIT_CONFIRM = 2.0
#: ``wait``: seconds between reads of the ledger while subscribed (a notice lost to a
#: Redis blip costs at most this) and while not (Redis down).
WAIT_SAFETY_POLL = 2.0
WAIT_FALLBACK_POLL = 0.5


@dataclass(slots=True)
class Moved:
    """What one transition did.

    ``won``: the ``(id, old commit_id)`` claims whose compare-and-set took effect (the
    reap's closed ones are only counted, in ``closed``); ``sent``: the messages (new
    commit_id) of the rows it put (back) in todo, dispatched (or, if Redis failed, made
    due for the sweep); ``closed``: rows it closed (done/failed by the reap's zombie
    policy); ``unstarted``: the reap's requeued claims whose job never started."""

    won: set[Pair] = field(default_factory=set)
    sent: list[Message] = field(default_factory=list)
    closed: int = 0
    unstarted: int = 0


@dataclass(slots=True)
class Popped:
    """What one :meth:`Dispatcher.pop_and_claim` did: the ``jobs`` it claimed (by id),
    the queue they came from, how many messages it popped (0: the pop timed out), the
    ``malformed`` ones it dropped, how many were ``stale`` (or duplicates) and how many
    it delayed again as not due yet (``early``)."""

    jobs: Claimed
    priority: str = ""
    #: When the claim was sent (the caller's monotonic clock): the leases run from then.
    claimed_at: float = 0.0
    popped: int = 0
    malformed: list[bytes] = field(default_factory=list)
    stale: int = 0
    early: int = 0


_NOTHING = Claimed()


class Dispatcher:
    #: Tests: called by :meth:`wait` between its subscription and its first read.
    after_subscribe: Callable[[int], None] | None = None

    def __init__(
        self,
        ledger: Ledger,
        transport: Transport,
        task_id: str,
        clock: Callable[[], datetime],
        redispatch_timeout: timedelta,
        *,
        injected_clock: bool = False,
    ) -> None:
        self.ledger = ledger
        self.transport = transport
        self.task_id = task_id
        self.clock = clock
        self.redispatch_timeout = redispatch_timeout
        #: A clock given by the caller (tests) replaces the database's clock in the
        #: transitions that judge time (claim, heartbeat, reaping).
        self.injected_clock = injected_clock

    def ledger_now(self) -> datetime | None:
        """The ``now`` of a transition that judges time: None (the database's clock),
        or the injected clock's time."""
        return self.clock() if self.injected_clock else None

    # -- producer side ----------------------------------------------------------------

    def insert(
        self, jobs: Sequence[NewJob], conn: Connection | None = None, *, due_now: bool = False
    ) -> tuple[list[int], list[Message]]:
        """Ledger rows only: the ids (in ``jobs`` order) and the messages to send once the
        rows are committed. ``due_now`` makes the rows due for the dispatch sweep at once
        (for rows whose commit meepo cannot observe); then there is nothing to send."""
        inserted = self.ledger.insert(
            self.task_id,
            jobs,
            now=self.clock(),
            redispatch_timeout=self.redispatch_timeout,
            never_dispatched=due_now,
            conn=conn,
        )
        return [i.id for i in inserted], [] if due_now else _messages(jobs, inserted)

    def push(self, jobs: Sequence[NewJob]) -> list[int]:
        ids, messages = self.insert(jobs)
        self.send(messages)
        return ids

    def send(self, messages: Sequence[Message]) -> bool:
        """Dispatch messages of committed todo rows (due ones to their queues, later ones
        to the delayed set); on a Redis failure, make the rows due for the sweep
        instead. Returns whether Redis took them."""
        if not messages:
            return True
        try:
            self.transport.send(messages, self.clock())
            return True
        except TransportUnavailableError as exc:
            log.warning(
                "task %s: %d job(s) committed but not dispatched (%s); the ledger sweep "
                "will dispatch them when Redis is back",
                self.task_id,
                len(messages),
                exc,
            )
            try:
                self.ledger.mark_due([(m.job_id, m.commit_id) for m in messages])
            except LedgerUnavailableError as exc2:
                log.warning(
                    "task %s: could not mark them due either (%s); their dispatch "
                    "deadline will bring them back",
                    self.task_id,
                    exc2,
                )
            return False

    def notify(self, finished: Sequence[int]) -> None:
        """Tell waiters (``Task.wait``) that these committed jobs are finished: handed
        to the transport's notice thread (no round trip here), which PUBLISHes them,
        coalesced with whatever else queued meanwhile. Redis failing is only logged:
        waiters read the ledger on their own too."""
        if finished:
            self.transport.notices.submit(list(finished))

    def wait(self, job_id: int, timeout: float | None) -> JobRecord:
        """The job's record once it is terminal (``Status.terminal``), read from the
        ledger; WaitTimeoutError after ``timeout`` seconds (None: no limit);
        JobNotFoundError at once for an id the task does not have.

        The waiter watches the task's notice channel *before* each read of the ledger
        (a commit between the read and the sleep sets the watch's event, so the sleep
        ends at once): no wake-up can be lost. Between notices it reads the ledger every
        WAIT_SAFETY_POLL seconds, and every WAIT_FALLBACK_POLL while the subscription is
        not confirmed (Redis down)."""
        began = time.monotonic()
        deadline = None if timeout is None else began + timeout
        listener = self.transport.listener
        channel = self.transport.done_channel
        confirm = WAIT_CONFIRM if timeout is None else min(WAIT_CONFIRM, timeout)
        watch, _ = listener.watch(channel, job_id, confirm)
        try:
            hook = self.after_subscribe
            if hook is not None:
                hook(job_id)
            while True:
                watch.event.clear()
                rec = self.ledger.get(job_id, self.task_id)
                if rec is None:
                    raise JobNotFoundError(f"task {self.task_id!r} has no job {job_id}")
                if rec.status.terminal:
                    return rec
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise WaitTimeoutError(
                        f"job {job_id} of task {self.task_id!r} is still {rec.status.value} "
                        f"after {time.monotonic() - began:.3g}s"
                    )
                poll = WAIT_SAFETY_POLL if listener.confirmed(channel) else WAIT_FALLBACK_POLL
                watch.event.wait(poll if left is None else min(left, poll))
        finally:
            listener.unwatch(watch)

    async def wait_async(
        self,
        job_id: int,
        timeout: float | None,
        offload: Callable[[Callable[[], Any]], Awaitable[Any]],
    ) -> JobRecord:
        """:meth:`wait` for a coroutine: the same watch-then-read loop, but it sleeps on
        the event loop (the notice's event wakes it through ``call_soon_threadsafe``)
        and runs its ledger reads with ``offload`` (a bounded thread pool), so the loop
        is never blocked and a waiter holds no thread while it sleeps."""
        import asyncio

        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        class Bridge(threading.Event):
            """Set by the notice thread; wakes the coroutine on its loop."""

            def set(self) -> None:
                super().set()
                with contextlib.suppress(RuntimeError):  # the loop has closed
                    loop.call_soon_threadsafe(woken.set)

        began = time.monotonic()
        deadline = None if timeout is None else began + timeout
        listener = self.transport.listener
        channel = self.transport.done_channel
        watch, _ = await offload(functools.partial(listener.watch, channel, job_id, 0.0, Bridge()))
        try:
            while True:
                woken.clear()
                watch.event.clear()
                rec: JobRecord | None = await offload(
                    functools.partial(self.ledger.get, job_id, self.task_id)
                )
                if rec is None:
                    raise JobNotFoundError(f"task {self.task_id!r} has no job {job_id}")
                if rec.status.terminal:
                    return rec
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise WaitTimeoutError(
                        f"job {job_id} of task {self.task_id!r} is still {rec.status.value} "
                        f"after {time.monotonic() - began:.3g}s"
                    )
                poll = WAIT_SAFETY_POLL if listener.confirmed(channel) else WAIT_FALLBACK_POLL
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(woken.wait(), poll if left is None else min(left, poll))
        finally:
            listener.unwatch(watch)

    def fire(
        self,
        schedules: Schedules,
        rec: ScheduleRecord,
        jobs: Sequence[NewJob],
        next_fire_at: datetime | None,
        now: datetime,
    ) -> Moved | None:
        """One schedule's fire: in one transaction, move its ``next_fire_at`` on (a
        compare-and-set) and, only if that matched, insert ``jobs``; then send them.
        None if another scheduler fired it first (or it was redeclared)."""
        messages: list[Message] = []
        with schedules.begin() as conn:
            last = jobs[-1].run_at if jobs else None
            if not schedules.advance(conn, rec, next_fire_at, last, now):
                return None
            if jobs:
                _, messages = self.insert(jobs, conn)
        self.send(messages)
        return Moved(sent=messages)

    # -- consumer side ----------------------------------------------------------------

    def outstanding(self, worker: str, now: datetime) -> int:
        """The task's jobs due by ``now`` or claimed by ``worker`` (a burst worker
        stops at zero); ledger only."""
        return self.ledger.outstanding(self.task_id, worker, now=now)

    def measure_clock(self) -> float:
        """Measure this host's clock against the database's now; returns the offset."""
        return self.ledger.clock.measure()

    def pop_and_claim(
        self,
        count: int,
        *,
        timeout: float,
        lease: timedelta,
        worker: str,
        monotonic: Callable[[], float] = time.monotonic,
        wake: str | None = None,
    ) -> Popped:
        """Pop up to ``count`` messages (waiting up to ``timeout`` seconds while every
        queue is empty) and claim their jobs in one compare-and-set.

        Messages of jobs not due yet by the database's clock go back to the delayed set;
        stale and duplicate ones are dropped. Raises :class:`UnavailableError` if the pop
        failed (nothing was taken) or the claim failed: then the popped messages were
        handed back to their queue first (and if that fails too, the sweep re-sends
        their rows)."""
        priority, raw = self.transport.pop(count, timeout=timeout, wake=wake)
        if not raw:
            return Popped(_NOTHING)
        pairs: list[Pair] = []
        malformed: list[bytes] = []
        for m in raw:
            pair = decode(m)
            if pair is None:
                malformed.append(m)
            else:
                pairs.append(pair)
        if not pairs:
            return Popped(_NOTHING, priority, 0.0, len(raw), malformed)
        began = monotonic()
        try:
            jobs = self.ledger.claim(
                self.task_id, pairs, now=self.ledger_now(), lease=lease, worker=worker
            )
        except BaseException:
            with contextlib.suppress(UnavailableError):
                self.transport.send([Message(i, c, priority) for i, c in pairs])
            raise
        if jobs.early:
            self._delay_early(jobs.early)
        stale = len(set(pairs)) - len(jobs) - len(jobs.early)
        return Popped(jobs, priority, began, len(raw), malformed, stale, len(jobs.early))

    def _delay_early(self, early: list[Message]) -> None:
        """Messages of jobs the claim refused as not due yet by the database's clock
        (promoted early by a host whose clock runs ahead, or sent by an old meepo):
        back to the delayed set, due at their run_at by this host's estimate of the
        database's clock, and at least EARLY_MARGIN from now (so that an estimate a
        little behind does not send them straight back)."""
        soon = self.clock() + timedelta(seconds=EARLY_MARGIN)
        again = [
            Message(m.job_id, m.commit_id, m.priority, max(m.run_at or soon, soon)) for m in early
        ]
        log.info(
            "task %s: %d job(s) not due yet by the database's clock, delayed again",
            self.task_id,
            len(again),
        )
        self.send(again)

    def wake_key(self, token: str) -> str:
        """The key a consumer's blocking pops watch for :meth:`wake` (``token``: the
        consumer's own)."""
        return self.transport.wake_key(token)

    def wake(self, key: str) -> None:
        """End the blocking pop that watches ``key`` at once (a consumer stopping)."""
        self.transport.wake(key)

    def renew(self, pairs: Sequence[Pair], *, lease: timedelta) -> Renewal:
        """Heartbeat: extend these claims' leases (fenced by commit_id, not a
        transition)."""
        return self.ledger.heartbeat(pairs, lease=lease, now=self.ledger_now())

    def start(self, pairs: Sequence[Pair]) -> int:
        """Record that these claims' handlers began (the reaper charges a started
        claim's expiry as a failed attempt); returns how many claims were current."""
        return self.ledger.start(pairs, now=self.ledger_now())

    def progress(self, reports: Sequence[Progress]) -> set[Pair]:
        """Write running jobs' latest progress, fenced by their claims' commit_id (not
        a transition); the claims written."""
        return self.ledger.progress(reports)

    def close_cancelled(self, pairs: Sequence[Pair]) -> set[Pair]:
        """doing → cancelled for claims whose job someone cancelled while it ran (the
        handler ended, or its commit lost to the cancel); the claims closed."""
        if not pairs:
            return set()
        return self.ledger.close_cancelled(pairs, now=self.clock())

    def cancel(self, todo: Sequence[Pair], doing: Sequence[Pair]) -> Cancelled:
        """Cancel todo jobs at once and flag doing ones (see :meth:`Ledger.cancel`).
        Nothing is sent: a cancelled job's message is stale, dropped when popped."""
        return self.ledger.cancel(todo, doing, now=self.clock())

    def finish(self, outcomes: Sequence[Outcome]) -> Moved:
        """Group commit, then re-dispatch the todo outcomes that won."""
        won = self.ledger.finish(
            outcomes, now=self.clock(), redispatch_timeout=self.redispatch_timeout
        )
        sent = [
            Message(o.job_id, o.commit_id + 1, o.priority, o.run_at)
            for o in outcomes
            if o.status is Status.TODO and (o.job_id, o.commit_id) in won
        ]
        self.notify(
            [o.job_id for o in outcomes if o.status.terminal and (o.job_id, o.commit_id) in won]
        )
        self.send(sent)
        return Moved(won, sent)

    def commit_one(self, outcome: Outcome) -> Moved:
        """One fenced commit from outside the committer; raises StaleCommitError (or
        JobNotFoundError) when it does not take effect."""
        new, priority = self.ledger.commit_one(
            self.task_id, outcome, now=self.clock(), redispatch_timeout=self.redispatch_timeout
        )
        sent: list[Message] = []
        if outcome.status is Status.TODO:
            sent = [Message(outcome.job_id, new, priority, outcome.run_at)]
            self.send(sent)
        elif outcome.status.terminal:
            self.notify([outcome.job_id])
        return Moved({(outcome.job_id, outcome.commit_id)}, sent)

    def release(self, jobs: Sequence[tuple[int, int, str]]) -> Moved:
        """Give claimed-but-unstarted jobs ``(id, commit_id, priority)`` back to their
        queues (shutdown), without counting a failure; those cancelled meanwhile are
        closed as cancelled instead (``closed``)."""
        now = self.clock()
        pairs = [(i, c) for i, c, _ in jobs]
        won = self.ledger.release(pairs, now=now, dispatch_deadline=now + self.redispatch_timeout)
        prio = {i: p for i, _, p in jobs}
        sent = [Message(i, c + 1, prio[i]) for i, c in sorted(won)]
        self.send(sent)
        lost = [p for p in pairs if p not in won]
        closed = self.ledger.close_cancelled(lost, now=now) if lost else set()
        return Moved(won | closed, sent, len(closed))

    # -- maintenance ------------------------------------------------------------------

    def repush(self, pairs: Sequence[Pair]) -> Moved:
        """Any status → todo, due now, failed_times reset (an admin's fresh start)."""
        sent = self.ledger.repush(
            pairs, now=self.clock(), redispatch_timeout=self.redispatch_timeout
        )
        self.send(sent)
        return Moved({(m.job_id, m.commit_id - 1) for m in sent}, sent)

    def reap(self, *, dst: Status, max_failed_times: int, limit: int) -> Moved:
        """Apply the zombie policy to (at most ``limit``) doing rows whose lease expired
        by the database's clock, and send the requeued ones."""
        now = self.ledger_now()  # None: the database's clock (docs/design.md, invariant 8)
        zombies = self.ledger.expired_leases(self.task_id, now=now, limit=limit)
        if not zombies:
            return Moved()
        reaped = self.ledger.reap(
            zombies,
            dst=dst,
            max_failed_times=max_failed_times,
            now=now,
            redispatch_timeout=self.redispatch_timeout,
        )
        self.send(reaped.requeued)
        won = {(m.job_id, m.commit_id - 1) for m in reaped.requeued}
        return Moved(won, reaped.requeued, reaped.closed, reaped.unstarted)

    def sweep(self, *, limit: int) -> Moved:
        """Re-dispatch todo rows whose message is gone: never dispatched, or older than
        the message at the head of their priority's queue and past their dispatch
        deadline (popped by a consumer that died before its claim). Rows whose message
        may still be waiting in a queue are left alone."""
        heads = self.transport.heads()
        now = self.clock()
        deadlines = self.ledger.dispatch_deadlines([h for _, h in heads.values() if h])
        cutoffs: dict[str, datetime] = {}
        for prio, (length, head) in heads.items():
            if length == 0:
                cutoffs[prio] = now
                continue
            # Rows dispatched before the head message were popped already: if still todo
            # past their deadline, their consumer died between pop and claim. A stale
            # head says nothing; then only never-dispatched rows are swept.
            deadline = None if head is None else deadlines.get(head)
            if deadline is not None:
                cutoffs[prio] = min(now, deadline)
            else:
                cutoffs[prio] = NEVER_DISPATCHED + timedelta(microseconds=1)
        sent = self.ledger.sweep(
            self.task_id,
            now=now,
            cutoffs=cutoffs,
            default_priority=self.transport.default_priority,
            limit=limit,
            redispatch_timeout=self.redispatch_timeout,
        )
        if sent:
            log.info("task %s: dispatching %d todo job(s) from the ledger", self.task_id, len(sent))
            self.send(sent)
        return Moved({(m.job_id, m.commit_id - 1) for m in sent}, sent)

    def ensure_epoch(self) -> tuple[bytes, bool, int]:
        """Redis's epoch token (created if missing), whether this call created it, and
        the epoch counter (incremented by the call): see the reaper."""
        return self.transport.ensure_epoch()

    def rotate_epoch(self, old: bytes) -> bytes:
        """Replace the epoch token (Redis went back in time); returns the new one."""
        return self.transport.rotate_epoch(old)

    def take_recovery(self, epoch: bytes) -> tuple[str, bytes | None]:
        """Try to take the re-dispatch of ``epoch`` (see :meth:`Transport.take_recovery`):
        ``("taken", token)``, ``("running", None)`` or ``("done", None)``."""
        return self.transport.take_recovery(epoch)

    def recover(self, epoch: bytes, token: bytes, *, page: int = ROWS_PER_STATEMENT) -> Moved:
        """Re-dispatch every todo row of the task (due ones to their queues, later ones to
        the delayed set), ``page`` rows at a time, renewing the recovery lock after each
        page and marking the epoch's recovery done at the end. Not a transition: the
        messages carry the rows' current commit_id (``won`` is empty).

        On a failure the lock is released (if Redis lets it; otherwise it expires) and
        the error raised: the recovery stays owed."""
        sent: list[Message] = []
        try:
            after: tuple[datetime, int] | None = None
            while True:
                rows = self.ledger.todo_page(self.task_id, after=after, limit=page)
                if not rows:
                    break
                messages = [m for m, _ in rows]
                self.transport.send(messages, self.clock())
                sent.extend(messages)
                last, expires = rows[-1]
                after = (expires, last.job_id)
                self.transport.hold_recovery(epoch, token)
            self.transport.finish_recovery(epoch, token)
        except BaseException:
            try:
                self.transport.release_recovery(epoch, token)
            except MeepoError as exc:
                log.warning(
                    "task %s: could not release the recovery lock (%s); it expires in %ds",
                    self.task_id,
                    exc,
                    RECOVERY_LOCK_TTL,
                )
            if sent:
                log.warning(
                    "task %s: re-dispatch failed after %d job(s); retried next tick",
                    self.task_id,
                    len(sent),
                )
            raise
        return Moved(sent=sent)

    def promote(self, now: datetime) -> tuple[int, float | None]:
        """Move the delayed messages due by ``now`` to their queues; returns how many
        moved and when the next one is due (Unix seconds), if any."""
        return self.transport.promote(now)

    def check_transport(self, redispatch_timeout: float) -> bool:
        """Warn (once per process and server) about Redis settings that lose queue keys;
        False if Redis could not be reached (try again later)."""
        return check_redis_config(self.transport, redispatch_timeout)


def _messages(jobs: Sequence[NewJob], inserted: Sequence[Inserted]) -> list[Message]:
    return [
        Message(row.id, 0, job.priority, job.run_at)
        for job, row in zip(jobs, inserted, strict=True)
        if row.created
    ]
