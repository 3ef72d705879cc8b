"""The reaper: the ledger's watch over jobs that Redis or a consumer lost.

It runs beside the consumers in every process, and any number of reapers may race:
every action is a compare-and-set on ``commit_id``, so each zombie is handled once.
Each tick (``poll_interval``) it

1. checks the transport's epoch token: a missing or changed token means Redis lost its
   data, and one process (per epoch) re-dispatches every due todo job at once;
2. sweeps todo rows whose message is gone: never dispatched (a Redis failure at push,
   a transactional push on a Connection), or older than the message at the head of the
   queue and past their dispatch deadline (popped by a consumer that died before its
   claim). Rows whose message may still be waiting in the queue are left alone, so a
   long backlog is not reshuffled;
3. every ``zombie_period``, reaps doing jobs whose lease expired (their consumer died
   or froze): ``zombie_dst_status`` todo re-queues them, done/failed closes them. At
   most ``zombie_limit`` rows are read per step.

A todo job is never closed by the policy: it has not run, and losing a message must
cost time, never the job (DESIGN.md invariant 6).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..config import Options
from ..dispatch import Dispatcher
from ..errors import MeepoError
from ..ledger import CHUNK, NEVER_DISPATCHED
from .consumer import Backoff
from .redis_check import check_redis_config

log = logging.getLogger("meepo.reaper")


@dataclass
class ReapReport:
    recovered: int = 0
    swept: int = 0
    requeued: int = 0
    closed: int = 0


class Reaper:
    def __init__(
        self, dispatcher: Dispatcher, options: Options, clock: Callable[[], datetime]
    ) -> None:
        self.d = dispatcher
        self.task_id = dispatcher.task_id
        self.opts = options
        self.clock = clock
        self.known_epoch: bytes | None = None
        self._last_reap = float("-inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._timeout = timedelta(seconds=options.zombie_timeout)

    # -- one pass ---------------------------------------------------------------------

    def run_once(self, *, reap: bool | None = None) -> ReapReport:
        """One tick; ``reap`` forces (or skips) the lease scan regardless of the period."""
        report = ReapReport()
        report.recovered = self.check_epoch()
        report.swept = self.sweep()
        due = time.monotonic() - self._last_reap >= self.opts.zombie_period
        if reap if reap is not None else due:
            self._last_reap = time.monotonic()
            report.requeued, report.closed = self.reap()
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
        """Re-dispatch every due todo job (once per epoch across all processes).

        ``lost``: Redis lost its data; otherwise this process found no epoch at all (a
        new Redis, or one emptied before any consumer saw it)."""
        if not self.d.transport.take_recovery(epoch):
            return 0
        sent = 0
        now = self.clock()
        after: tuple[datetime, int] | None = None
        while True:
            rows = self.d.ledger.due_todo(self.task_id, now=now, after=after, limit=CHUNK)
            if not rows:
                break
            self.d.transport.send([(i, c) for i, c, _ in rows])
            sent += len(rows)
            after = (rows[-1][2], rows[-1][0])
        if sent:
            why = "after Redis lost its data" if lost else "found in the ledger at start"
            log.warning("task %s: re-dispatched %d job(s) %s", self.task_id, sent, why)
        return sent

    def sweep(self) -> int:
        """Re-dispatch todo rows whose message is gone; returns how many."""
        length, head = self.d.transport.head()
        now = self.clock()
        if length == 0:
            cutoff = now
        else:
            deadline = None if head is None else self.d.ledger.dispatch_deadline(head)
            # Rows dispatched before the head message were popped already: if still todo
            # past their deadline, their consumer died between pop and claim. A stale
            # head says nothing; then only never-dispatched rows are swept.
            if deadline is not None:
                cutoff = min(now, deadline)
            else:
                cutoff = NEVER_DISPATCHED + timedelta(microseconds=1)
        pairs = self.d.ledger.sweep(
            self.task_id,
            now=now,
            cutoff=cutoff,
            limit=self.opts.zombie_limit,
            redispatch_timeout=self._timeout,
        )
        if pairs:
            log.info(
                "task %s: dispatching %d todo job(s) from the ledger", self.task_id, len(pairs)
            )
            self.d.send(pairs)
        return len(pairs)

    def reap(self) -> tuple[int, int]:
        """Apply the zombie policy to expired leases; returns (requeued, closed)."""
        now = self.clock()
        zombies = self.d.ledger.expired_leases(self.task_id, now=now, limit=self.opts.zombie_limit)
        if not zombies:
            return 0, 0
        requeued, closed = self.d.ledger.reap(
            zombies,
            dst=self.opts.zombie_dst_status,
            max_failed_times=self.opts.max_failed_times,
            now=now,
            redispatch_timeout=self._timeout,
        )
        self.d.send(requeued)
        log.warning(
            "task %s: reaped %d job(s) with expired leases: %d re-queued, %d closed",
            self.task_id,
            len(requeued) + closed,
            len(requeued),
            closed,
        )
        return len(requeued), closed

    # -- loop -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, name=f"meepo-{self.task_id}-reaper", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)
            self._thread = None

    def _loop(self) -> None:
        backoff = Backoff(first=self.opts.poll_interval, cap=10.0)
        checked = False
        while not self._stop.is_set():
            try:
                if not checked:  # once Redis answers (it may be down at start)
                    checked = check_redis_config(self.d.transport, self.opts.zombie_timeout)
                self.run_once()
                backoff.reset()
                self._stop.wait(self.opts.poll_interval)
            except MeepoError as exc:
                log.warning("task %s: reaper pass failed: %s (retrying)", self.task_id, exc)
                backoff.wait(self._stop)
            except Exception:  # never let the reaper die silently
                log.exception("task %s: reaper pass crashed (retrying)", self.task_id)
                backoff.wait(self._stop)
