"""The reaper: the ledger's watch over jobs that Redis or a consumer lost.

It runs beside the consumers in every process, and any number of reapers may race:
every action is a compare-and-set on ``commit_id``, so each zombie is handled once.
Each tick (``poll_interval``) it

1. checks the transport's epoch token: a missing or changed token means Redis lost its
   data, and one process (per epoch) re-dispatches every todo job at once (due ones to
   their queues, later ones to the delayed set);
2. sweeps todo rows whose message is gone: never dispatched (a Redis failure at push,
   a transactional push on a Connection), or older than the message at the head of the
   queue and past their dispatch deadline (popped by a consumer that died before its
   claim). Rows whose message may still be waiting in the queue are left alone, so a
   long backlog is not reshuffled (each priority queue is judged by its own head);
3. every ``zombie_period``, reaps doing jobs whose lease expired (their consumer died
   or froze): ``zombie_dst_status`` todo re-queues them, done/failed closes them. At
   most ``zombie_limit`` rows are read per step.

A todo job is never closed by the policy: it has not run, and losing a message must
cost time, never the job (DESIGN.md invariant 6).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..config import Options
from ..dispatch import Dispatcher
from ..ledger import CHUNK, NEVER_DISPATCHED
from .redis_check import check_redis_config
from .service import Service

log = logging.getLogger("meepo.reaper")


@dataclass
class ReapReport:
    recovered: int = 0
    swept: int = 0
    requeued: int = 0  # the unstarted ones included
    closed: int = 0
    unstarted: int = 0  # requeued uncharged: their claim expired before the job started


class Reaper(Service):
    kind = "reaper"

    def __init__(
        self, dispatcher: Dispatcher, options: Options, clock: Callable[[], datetime]
    ) -> None:
        super().__init__(dispatcher.task_id, log, options.poll_interval)
        self.d = dispatcher
        self.opts = options
        self.clock = clock
        self.known_epoch: bytes | None = None
        self._last_reap = float("-inf")
        self._redis_checked = False
        self._timeout = timedelta(seconds=options.zombie_timeout)
        #: Expired claims requeued uncharged because their job had not started.
        self.unstarted = 0

    # -- one pass ---------------------------------------------------------------------

    def run_once(self, *, reap: bool | None = None) -> ReapReport:
        """One tick; ``reap`` forces (or skips) the lease scan regardless of the period."""
        report = ReapReport()
        report.recovered = self.check_epoch()
        report.swept = self.sweep()
        due = time.monotonic() - self._last_reap >= self.opts.zombie_period
        if reap if reap is not None else due:
            self._last_reap = time.monotonic()
            before = self.unstarted
            report.requeued, report.closed = self.reap()
            report.unstarted = self.unstarted - before
        return report

    def check_epoch(self) -> int:
        """Detect that Redis lost its data; returns the number of jobs re-dispatched."""
        epoch, created = self.d.transport.ensure_epoch()
        previous, self.known_epoch = self.known_epoch, epoch
        if previous == epoch or (previous is None and not created):
            return 0
        lost = previous is not None
        if lost:
            log.warning(
                "task %s: Redis lost its data (epoch changed); re-dispatching due jobs "
                "from the ledger",
                self.task_id,
            )
        return self.recover(epoch, lost=lost)

    def recover(self, epoch: bytes, *, lost: bool = True) -> int:
        """Re-dispatch every todo job (once per epoch across all processes): due ones to
        their queues, later ones to the delayed set.

        ``lost``: Redis lost its data; otherwise this process found no epoch at all (a
        new Redis, or one emptied before any consumer saw it)."""
        if not self.d.transport.take_recovery(epoch):
            return 0
        sent = 0
        after: tuple[datetime, int] | None = None
        while True:
            rows = self.d.ledger.todo_page(self.task_id, after=after, limit=CHUNK)
            if not rows:
                break
            self.d.transport.send([m for m, _ in rows], self.clock())
            sent += len(rows)
            last, expires = rows[-1]
            after = (expires, last.job_id)
        if sent:
            why = "after Redis lost its data" if lost else "found in the ledger at start"
            log.warning("task %s: re-dispatched %d job(s) %s", self.task_id, sent, why)
        return sent

    def sweep(self) -> int:
        """Re-dispatch todo rows whose message is gone; returns how many."""
        heads = self.d.transport.heads()
        now = self.clock()
        deadlines = self.d.ledger.dispatch_deadlines([h for _, h in heads.values() if h])
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
        messages = self.d.ledger.sweep(
            self.task_id,
            now=now,
            cutoffs=cutoffs,
            default_priority=self.d.transport.default_priority,
            limit=self.opts.zombie_limit,
            redispatch_timeout=self._timeout,
        )
        if messages:
            log.info(
                "task %s: dispatching %d todo job(s) from the ledger",
                self.task_id,
                len(messages),
            )
            self.d.send(messages)
        return len(messages)

    def reap(self) -> tuple[int, int]:
        """Apply the zombie policy to expired leases; returns (requeued, closed).

        Requeued counts the unstarted claims too (requeued uncharged); how many of them
        there were is logged and kept in :attr:`unstarted` (a running total)."""
        now = self.d.ledger_now()  # None: the database's clock (DESIGN.md, invariant 8)
        zombies = self.d.ledger.expired_leases(self.task_id, now=now, limit=self.opts.zombie_limit)
        if not zombies:
            return 0, 0
        reaped = self.d.ledger.reap(
            zombies,
            dst=self.opts.zombie_dst_status,
            max_failed_times=self.opts.max_failed_times,
            now=now,
            redispatch_timeout=self._timeout,
        )
        self.d.send(reaped.requeued)
        self.unstarted += reaped.unstarted
        log.warning(
            "task %s: reaped %d job(s) with expired leases: %d re-queued (%d of them never "
            "started: not charged), %d closed",
            self.task_id,
            len(reaped.requeued) + reaped.closed,
            len(reaped.requeued),
            reaped.unstarted,
            reaped.closed,
        )
        return len(reaped.requeued), reaped.closed

    def tick(self) -> float:
        if not self._redis_checked:  # once Redis answers (it may be down at start)
            self._redis_checked = check_redis_config(self.d.transport, self.opts.zombie_timeout)
        self.run_once()
        return self.opts.poll_interval
