"""The reaper: the ledger's watch over jobs that Redis or a consumer lost.

It runs beside the consumers in every process, and any number of reapers may race:
every action is a compare-and-set on ``commit_id``, so each zombie is handled once.
Each tick (``poll_interval``) it runs three independent steps: a failure of one (Redis
refusing writes under ``maxmemory`` with ``noeviction``, a read-only replica after a
failover, Redis down, a database error) is logged and reported in
:attr:`ReapReport.errors`, and the other steps still run. The lease scan needs only the
ledger, so dead workers' jobs are reaped whatever state Redis is in.

1. checks the transport's epoch token (:mod:`meepo.runtime.recovery`): if Redis lost its
   data (or went back in time), one process re-dispatches every todo job from the ledger;
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
from datetime import datetime

from ..config import Options
from ..dispatch import Dispatcher
from ..errors import MeepoError
from ..middleware import Hooks
from .recovery import Recovery
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

    def __init__(
        self, dispatcher: Dispatcher, options: Options, clock: Callable[[], datetime]
    ) -> None:
        super().__init__(dispatcher.task_id, log, options.poll_interval)
        self.d = dispatcher
        self.opts = options
        self.clock = clock
        self.recovery = Recovery(dispatcher, options, clock)
        self._hooks: Hooks | None = None
        self._failing = 0  # ticks in a row with a failed step
        self._last_reap = float("-inf")
        self._redis_checked = False
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
        """The recovery step (:meth:`Recovery.run_once`): re-dispatch every todo job if
        Redis lost its data; returns how many were sent."""
        return self.recovery.run_once()

    def recover(self, epoch: bytes, *, lost: bool = True) -> int:
        """Re-dispatch every todo job of ``epoch`` now (:meth:`Recovery.recover`)."""
        return self.recovery.recover(epoch, lost=lost)

    @property
    def known_epoch(self) -> bytes | None:
        """The epoch token this process last saw."""
        return self.recovery.known_epoch

    @property
    def hooks(self) -> Hooks | None:
        """The task's middleware (set by Task): after_reap here, after_recovery in the
        recovery; None: none installed."""
        return self._hooks

    @hooks.setter
    def hooks(self, hooks: Hooks | None) -> None:
        self._hooks = self.recovery.hooks = hooks

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
        if self._hooks is not None:  # middleware: after_reap
            self._hooks.after_reap([m.job_id for m in reaped.sent], reaped.closed)
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
            self._redis_checked = self.d.check_transport(self.opts.redispatch_timeout)
        report = self.run_once()
        if not report.errors:
            self._failing = 0
            return self.opts.poll_interval
        # A step failed (logged): wait longer each time, so that a Redis refusing writes
        # is not asked twice a second, but never longer than half the reap period.
        self._failing += 1
        cap = max(self.opts.poll_interval, min(MAX_BACKOFF, self.opts.zombie_period / 2))
        return float(min(cap, self.opts.poll_interval * 2 ** min(self._failing, 10)))
