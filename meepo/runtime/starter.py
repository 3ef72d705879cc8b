"""The starter: records that handlers began (their start marks), in batches.

An attempt is a run, not a claim: the reaper charges an expired lease as a failed
attempt only if its job's start was recorded. Executors add each job they start to
:attr:`Claims.unmarked <meepo.runtime.claims.Claims.unmarked>`; the starter waits
START_RECORD_DELAY after the first one, then marks every job begun meanwhile in one
UPDATE (:meth:`Dispatcher.start`). A job that ends sooner is marked by its commit
instead. A job whose earlier claim expired before it started (``orphaned_claims``) is
marked synchronously before it runs (:meth:`Starter.mark_now`).
"""

from __future__ import annotations

import logging

from ..dispatch import Dispatcher
from ..errors import MeepoError
from ..records import Job
from .claims import Claims
from .service import Service

log = logging.getLogger("meepo.consumer")

#: The starter waits this long (seconds) after a handler began before it records the
#: start, so that one UPDATE marks every job begun meanwhile (jobs that end sooner are
#: marked by their commit instead).
START_RECORD_DELAY = 0.005


def error_summary(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class Starter(Service):
    kind = "starter"

    def __init__(self, dispatcher: Dispatcher, claims: Claims) -> None:
        super().__init__(dispatcher.task_id, log, 0.05, 1.0)
        self.d = dispatcher
        self.claims = claims

    def wake(self) -> None:
        with self.claims.start_cv:
            self.claims.start_cv.notify_all()

    def tick(self) -> float:
        claims = self.claims
        with claims.start_cv:
            while not claims.unmarked and not self._stop.is_set():
                claims.start_cv.wait()
        if self._stop.wait(START_RECORD_DELAY):
            return 0.0
        self.run_once()
        return 0.0

    def failed(self, exc: Exception) -> None:
        log.warning(
            "task %s: could not record job starts: %s (retrying)",
            self.task_id,
            error_summary(exc),
        )

    def run_once(self) -> int:
        """Mark the start of every job whose handler began and is not recorded yet, in
        one UPDATE (jobs committed meanwhile no longer match: their commit marked them).
        Returns how many were taken."""
        claims = self.claims
        with claims.lock:
            batch = sorted(claims.unmarked)
        if not batch:
            return 0
        self.d.start(batch)
        with claims.lock:
            claims.unmarked.difference_update(batch)
        return len(batch)

    def mark_now(self, job: Job) -> bool:
        """Record the start of a job whose earlier claim expired before it started
        (``orphaned_claims``) synchronously, before it runs: if its handler kills the
        worker at once, the next reap then counts the attempt, so such a job still ends
        after max_failed_times attempts. False if the claim was lost meanwhile (the job
        is not run) or the mark could not be written (the job is given back)."""
        claims = self.claims
        try:
            marked = self.d.start([(job.id, job.commit_id)])
        except MeepoError as exc:
            log.warning(
                "task %s: job %d not started: could not record its start: %s; it goes "
                "back to the queue",
                self.task_id,
                job.id,
                exc,
            )
            with claims.lock:
                claims.not_started.append(job)  # given back by the next heartbeat
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
        with claims.slot:
            claims.busy -= 1
            if claims.holds(job.id, job.commit_id):
                claims.drop(job.id)
            claims.slot.notify_all()
        return False
