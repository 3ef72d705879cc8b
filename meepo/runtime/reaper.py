"""The reaper: the ledger's watch over jobs that Redis or a consumer lost.

It runs beside the consumers in every process, and any number of reapers may race:
every action is a compare-and-set on ``commit_id``, so each zombie is handled once.
Each tick (``poll_interval``) it runs three independent steps: a failure of one (Redis
refusing writes under ``maxmemory`` with ``noeviction``, a read-only replica after a
failover, Redis down, a database error) is logged and reported in
:attr:`ReapReport.errors`, and the other steps still run. The lease scan needs only the
ledger, so dead workers' jobs are reaped whatever state Redis is in.

1. checks the transport's epoch token: a missing or changed token means Redis lost its
   data, and one process (per epoch) re-dispatches every todo job at once (due ones to
   their queues, later ones to the delayed set). A Redis that went back in time (an
   RDB/AOF restore, a failover to a lagging replica) keeps its token; each tick also
   increments a counter in Redis, and a counter lower than the last one this process
   saw means the same, so the token is replaced and the re-dispatch runs. A recovery
   that fails (or whose process dies) half-way stays owed: it is retried on the next
   tick, and its lock (:data:`~meepo.transport.transport.RECOVERY_LOCK_TTL`, renewed
   page by page) is released on failure or soon expires, so another process takes it
   over. A process runs at most one full re-dispatch per ``zombie_timeout`` (a Redis
   under ``allkeys-*`` eviction may lose the epoch key again and again: each loss would
   otherwise re-send every todo job); one owed meanwhile waits for the window's end,
   and the sweep re-sends lost messages in the meantime;
2. sweeps todo rows whose message is gone: never dispatched (a Redis failure at push,
   a transactional push on a Connection), or older than the message at the head of the
   queue and past their dispatch deadline (popped by a consumer that died before its
   claim). Rows whose message may still be waiting in the queue are left alone, so a
   long backlog is not reshuffled (each priority queue is judged by its own head);
3. every ``zombie_period``, reaps doing jobs whose lease expired (their consumer died
   or froze): ``zombie_dst_status`` todo re-queues them, done/failed closes them. At
   most ``zombie_limit`` rows are read per step.

A todo job is never closed by the policy: it has not run, and losing a message must
cost time, never the job (docs/design.md invariant 6).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ..config import Options
from ..dispatch import Dispatcher
from ..errors import MeepoError
from ..ledger import CHUNK
from ..middleware import Hooks
from .service import Service

log = logging.getLogger("meepo.reaper")

#: The longest wait between ticks while a step keeps failing (seconds).
MAX_BACKOFF = 5.0


@dataclass
class ReapReport:
    recovered: int = 0
    swept: int = 0
    requeued: int = 0  # the unstarted ones included
    closed: int = 0
    unstarted: int = 0  # requeued uncharged: their claim expired before the job started
    #: Steps of the tick that failed (``"epoch"``, ``"sweep"``, ``"reap"``), with the
    #: error; the other steps ran.
    errors: dict[str, str] = field(default_factory=dict)


class Reaper(Service):
    kind = "reaper"
    #: middleware: the task's hooks (set by Task); None: none installed.
    hooks: Hooks | None = None

    def __init__(
        self, dispatcher: Dispatcher, options: Options, clock: Callable[[], datetime]
    ) -> None:
        super().__init__(dispatcher.task_id, log, options.poll_interval)
        self.d = dispatcher
        self.opts = options
        self.clock = clock
        self.known_epoch: bytes | None = None
        self._counter: int | None = None  # the epoch counter at the last check
        self._owed: tuple[bytes, bool] | None = None  # (epoch, lost): recovery to run
        self._last_recovery: datetime | None = None  # when this process last ran one
        self._deferred = False  # the storm window's line was logged
        self._failing = 0  # ticks in a row with a failed step
        self._last_reap = float("-inf")
        self._redis_checked = False
        self._timeout = timedelta(seconds=options.zombie_timeout)
        #: Expired claims requeued uncharged because their job had not started.
        self.unstarted = 0

    # -- one pass ---------------------------------------------------------------------

    def run_once(self, *, reap: bool | None = None) -> ReapReport:
        """One tick; ``reap`` forces (or skips) the lease scan regardless of the period.

        The epoch check, the sweep and the reap are independent: an error in one is
        logged and recorded in the report's ``errors`` and the next still runs."""
        report = ReapReport()
        try:
            report.recovered = self.check_epoch()
        except MeepoError as exc:
            self._failed(report, "epoch", exc)
        try:
            report.swept = self.sweep()
        except MeepoError as exc:
            self._failed(report, "sweep", exc)
        due = time.monotonic() - self._last_reap >= self.opts.zombie_period
        if reap if reap is not None else due:
            before = self.unstarted
            try:
                report.requeued, report.closed = self.reap()
                self._last_reap = time.monotonic()
            except MeepoError as exc:  # retried on the next tick, not a period later
                self._failed(report, "reap", exc)
            report.unstarted = self.unstarted - before
        return report

    def _failed(self, report: ReapReport, step: str, exc: MeepoError) -> None:
        report.errors[step] = str(exc)
        log.warning(
            "task %s: reaper step %r failed: %s (the other steps ran; retried next tick)",
            self.task_id,
            step,
            exc,
        )

    def check_epoch(self) -> int:
        """Detect that Redis lost its data (or went back in time); returns the number of
        jobs re-dispatched. A recovery owed and not finished (it failed, another process
        holds its lock, or the storm window is not over) is tried again next time."""
        epoch, created, counter = self.d.ensure_epoch()
        last, self._counter = self._counter, counter
        if last is not None and counter <= last and self.known_epoch == epoch:
            # Same token, older counter: a restore or a lagging replica.
            epoch = self.d.rotate_epoch(epoch)
            log.warning(
                "task %s: Redis went back in time (epoch counter %d after %d: restored "
                "from a backup or failed over to a lagging replica); re-dispatching todo "
                "jobs from the ledger",
                self.task_id,
                counter,
                last,
            )
        previous, self.known_epoch = self.known_epoch, epoch
        if previous != epoch and not (previous is None and not created):
            lost = previous is not None
            if lost:
                log.warning(
                    "task %s: Redis lost its data (epoch changed); re-dispatching due "
                    "jobs from the ledger",
                    self.task_id,
                )
            self._owed = (epoch, lost or (self._owed is not None and self._owed[1]))
        if self._owed is None:
            return 0
        owed_epoch, lost = self._owed
        now = self.clock()
        if self._last_recovery is not None and now - self._last_recovery < self._timeout:
            if not self._deferred:
                log.warning(
                    "task %s: another re-dispatch of every todo job is owed, but this "
                    "process ran one less than zombie_timeout=%gs ago: it waits for the "
                    "window's end (the sweep re-sends lost messages meanwhile)",
                    self.task_id,
                    self.opts.zombie_timeout,
                )
                self._deferred = True
            return 0
        sent = self.recover(owed_epoch, lost=lost)
        return sent

    def recover(self, epoch: bytes, *, lost: bool = True) -> int:
        """Re-dispatch every todo job (once per epoch across all processes): due ones to
        their queues, later ones to the delayed set.

        ``lost``: Redis lost its data; otherwise this process found no epoch at all (a
        new Redis, or one emptied before any consumer saw it). Raises on a failure,
        having released the recovery lock if Redis lets it; the recovery then stays
        owed (see :meth:`check_epoch`)."""
        state, token = self.d.take_recovery(epoch)
        if state == "done":  # another process finished it
            self._owed = None
            return 0
        if token is None:  # another process is running it: still owed
            return 0
        sent = len(self.d.recover(epoch, token, page=CHUNK).sent)
        if self._owed is not None and self._owed[0] == epoch:
            self._owed = None
        if sent and lost:  # the storm window: counted from a real loss's re-send
            self._last_recovery = self.clock()
            self._deferred = False
        if sent and self.hooks is not None:  # middleware: after_recovery
            self.hooks.after_recovery(sent, lost)
        if sent:
            why = "after Redis lost its data" if lost else "found in the ledger at start"
            log.warning("task %s: re-dispatched %d job(s) %s", self.task_id, sent, why)
        return sent

    def sweep(self) -> int:
        """Re-dispatch todo rows whose message is gone; returns how many."""
        return len(self.d.sweep(limit=self.opts.zombie_limit).sent)

    def reap(self) -> tuple[int, int]:
        """Apply the zombie policy to expired leases; returns (requeued, closed).

        Requeued counts the unstarted claims too (requeued uncharged); how many of them
        there were is logged and kept in :attr:`unstarted` (a running total)."""
        reaped = self.d.reap(
            dst=self.opts.zombie_dst_status,
            max_failed_times=self.opts.max_failed_times,
            limit=self.opts.zombie_limit,
        )
        if not reaped.sent and not reaped.closed:
            return 0, 0
        self.unstarted += reaped.unstarted
        if self.hooks is not None:  # middleware: after_reap
            self.hooks.after_reap([m.job_id for m in reaped.sent], reaped.closed)
        log.warning(
            "task %s: reaped %d job(s) with expired leases: %d re-queued (%d of them never "
            "started: not charged), %d closed",
            self.task_id,
            len(reaped.sent) + reaped.closed,
            len(reaped.sent),
            reaped.unstarted,
            reaped.closed,
        )
        return len(reaped.sent), reaped.closed

    def tick(self) -> float:
        if not self._redis_checked:  # once Redis answers (it may be down at start)
            self._redis_checked = self.d.check_transport(self.opts.zombie_timeout)
        report = self.run_once()
        if not report.errors:
            self._failing = 0
            return self.opts.poll_interval
        # A step failed (logged): wait longer each time, so that a Redis refusing writes
        # is not asked twice a second, but never longer than half the reap period.
        self._failing += 1
        cap = max(self.opts.poll_interval, min(MAX_BACKOFF, self.opts.zombie_period / 2))
        return float(min(cap, self.opts.poll_interval * 2 ** min(self._failing, 10)))
