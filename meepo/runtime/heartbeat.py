"""The heartbeat: one UPDATE renews every lease this consumer holds.

Every ``heartbeat_interval`` it renews the leases of all held claims
(:meth:`Dispatcher.renew`, fenced by commit_id). A renewed lease's end moves on (by the
consumer's monotonic clock, from the beat's start); a lost one (reaped or repushed) is
forgotten, so that its job's commit will be rejected as stale; a skipped one (its row
locked by another transaction) is retried next beat. It also gives back the claimed
jobs an executor refused to start (too little of their lease was left).

The same statement tells which of the jobs someone cancelled (``cancel_requested``):
their handlers see ``job.cancel_requested`` turn True. And it writes the runs'
progress: ``job.progress()`` only leaves its latest report on the run and wakes this
thread, which writes every report pending (one UPDATE per job, fenced by its claim's
commit_id) with the next beat or PROGRESS_DELAY after the first report, whichever
comes first; a handler reporting in a tight loop costs no round trip per call.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from ..config import Options
from ..dispatch import Dispatcher
from ..errors import MeepoError
from ..ledger import Pair
from ..ledger.driver import Progress
from ..records import Job, RunControl
from .claims import Claims
from .service import Service

log = logging.getLogger("meepo.consumer")

#: How long after a run's first unwritten progress report the heartbeat writes it
#: (seconds), when its next beat is later than that.
PROGRESS_DELAY = 0.5


class Heartbeat(Service):
    kind = "heartbeat"

    def __init__(self, dispatcher: Dispatcher, claims: Claims, options: Options) -> None:
        super().__init__(dispatcher.task_id, log, options.heartbeat_interval)
        self.d = dispatcher
        self.claims = claims
        self.opts = options
        self._lease = timedelta(seconds=options.lease)
        self._wake = threading.Event()
        claims.progress_wake = self._wake.set
        self._next_beat: float | None = None

    def wake(self) -> None:
        self._wake.set()

    def tick(self) -> float:
        """Wait for the next beat, writing progress reports PROGRESS_DELAY after they
        arrive meanwhile; then beat."""
        interval = self.opts.heartbeat_interval
        if self._next_beat is None:
            self._next_beat = time.monotonic() + interval
        progress_at: float | None = None
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= self._next_beat:
                self._next_beat = now + interval
                self.run_once()
                return 0.0
            if progress_at is not None and now >= progress_at:
                progress_at = None
                self.write_progress()
                continue
            timeout = self._next_beat - now
            if progress_at is not None:
                timeout = min(timeout, progress_at - now)
            if self._wake.wait(timeout):
                self._wake.clear()
                if progress_at is None:
                    progress_at = time.monotonic() + PROGRESS_DELAY
        return 0.0

    def write_progress(self) -> set[Pair]:
        """Write the progress reports of the held claims not written yet (one UPDATE
        per job, fenced by its commit_id); returns the claims written. A failed write is
        retried with the next beat."""
        claims = self.claims
        with claims.lock:
            live = [(i, c.commit_id, c.control) for i, c in claims.held.items() if c.control]
        reports: list[Progress] = []
        taken: list[RunControl] = []
        for i, commit_id, control in live:
            got = control.take()
            if got is not None:
                reports.append(((i, commit_id), got[0], got[1]))
                taken.append(control)
        if not reports:
            return set()
        try:
            return self.d.progress(reports)
        except MeepoError as exc:
            log.warning("task %s: could not write progress: %s", self.task_id, exc)
            for control in taken:
                control.dirty = True  # the next beat writes the latest report
            return set()

    def release(self, jobs: list[Job]) -> None:
        """Give back claimed jobs that never ran (their slots are freed)."""
        claims = self.claims
        with claims.slot:
            claims.busy -= len(jobs)
        pairs = [(j.id, j.commit_id) for j in jobs]
        try:
            self.d.release([(j.id, j.commit_id, j.priority) for j in jobs])
        except MeepoError as exc:
            log.warning("task %s: could not release %d job(s): %s", self.task_id, len(pairs), exc)
        claims.forget(pairs)

    def run_once(self) -> set[Pair]:
        """Renew every lease this process holds; returns the claims found lost."""
        claims = self.claims
        with claims.lock:
            not_started, claims.not_started = claims.not_started, []
        if not_started:
            self.release(not_started)
        with claims.lock:
            pairs = [(i, c.commit_id) for i, c in claims.held.items()]
        if not pairs:
            return set()
        began = claims.monotonic()
        try:
            renewal = self.d.renew(pairs, lease=self._lease)
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
        cancelled: list[int] = []
        with claims.lock:  # claims committed meanwhile were not lost, just finished
            lost = {(i, c) for i, c in renewal.lost if claims.holds(i, c)}
            for i, c in renewal.renewed:
                if claims.holds(i, c):
                    claims.held[i].lease_end = began + self.opts.lease
            for i, c in renewal.cancel:
                control = claims.held[i].control if claims.holds(i, c) else None
                if control is not None and control.request_cancel():
                    cancelled.append(i)
        if cancelled:
            log.info(
                "task %s: job(s) %s cancelled while running: they end as cancelled",
                self.task_id,
                sorted(cancelled),
            )
        self.write_progress()
        if lost:
            log.warning(
                "task %s: lost the lease of job(s) %s (reaped or repushed); their commits "
                "will be rejected",
                self.task_id,
                sorted(i for i, _ in lost),
            )
            claims.forget(sorted(lost))
        return lost
