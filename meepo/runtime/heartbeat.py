"""The heartbeat: one UPDATE renews every lease this consumer holds.

Every ``heartbeat_interval`` it renews the leases of all held claims
(:meth:`Dispatcher.renew`, fenced by commit_id). A renewed lease's end moves on (by the
consumer's monotonic clock, from the beat's start); a lost one (reaped or repushed) is
forgotten, so that its job's commit will be rejected as stale; a skipped one (its row
locked by another transaction) is retried next beat. It also gives back the claimed
jobs an executor refused to start (too little of their lease was left).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from ..config import Options
from ..dispatch import Dispatcher
from ..errors import MeepoError
from ..ledger import Pair
from ..records import Job
from .claims import Claims
from .service import Service

log = logging.getLogger("meepo.consumer")


class Heartbeat(Service):
    kind = "heartbeat"

    def __init__(self, dispatcher: Dispatcher, claims: Claims, options: Options) -> None:
        super().__init__(dispatcher.task_id, log, options.heartbeat_interval)
        self.d = dispatcher
        self.claims = claims
        self.opts = options
        self._lease = timedelta(seconds=options.lease)

    def tick(self) -> float:
        if self._stop.wait(self.opts.heartbeat_interval):
            return 0.0
        self.run_once()
        return 0.0

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
        with claims.lock:  # claims committed meanwhile were not lost, just finished
            lost = {(i, c) for i, c in renewal.lost if claims.holds(i, c)}
            for i, c in renewal.renewed:
                if claims.holds(i, c):
                    claims.held[i].lease_end = began + self.opts.lease
        if lost:
            log.warning(
                "task %s: lost the lease of job(s) %s (reaped or repushed); their commits "
                "will be rejected",
                self.task_id,
                sorted(i for i, _ in lost),
            )
            claims.forget(sorted(lost))
        return lost
