"""The watchdog: fails the jobs whose handler outlived ``job_timeout``.

Python cannot stop a thread: the handler's slot is retired (its thread abandoned:
whatever it returns or commits later is ignored, its commit_id being stale by then) and
a fresh slot takes its place (:meth:`Executor.retire`). The job's attempt is committed
as failed (retried or failed per max_failed_times). Runs only when job_timeout is set,
every tenth of it (between 50 ms and 1 s).
"""

from __future__ import annotations

import logging

from ..config import Options
from ..records import Job
from .claims import Claims
from .committer import Committer
from .executor import Executor
from .service import Service

log = logging.getLogger("meepo.consumer")


class Watchdog(Service):
    kind = "watchdog"

    def __init__(
        self, claims: Claims, executor: Executor, committer: Committer, options: Options
    ) -> None:
        timeout = options.job_timeout or 0.0
        self.interval = min(1.0, max(0.05, timeout / 10))
        super().__init__(committer.task_id, log, self.interval, self.interval)
        self.claims = claims
        self.executor = executor
        self.committer = committer
        self.opts = options
        #: Abandoned handler threads still running above this number are logged as an
        #: error on every new timeout: hung handlers are piling up threads.
        self.bound = options.parallel_num

    def tick(self) -> float:
        if self._stop.wait(self.interval):
            return 0.0
        self.run_once()
        return 0.0

    def failed(self, exc: Exception) -> None:
        log.exception("task %s: job timeout check crashed", self.task_id)

    def run_once(self) -> list[Job]:
        """Fail the jobs whose handler has run past job_timeout; returns them."""
        timeout = self.opts.job_timeout
        if timeout is None:
            return []
        claims, ex = self.claims, self.executor
        now = claims.monotonic()
        expired: list[Job] = []
        with claims.lock:
            for slot in list(ex.slots):
                job = slot.job
                if job is None or slot.abandoned or now - slot.started < timeout:
                    continue
                claims.busy -= 1  # its replacement slot takes the next job
                expired.append(job)
                claims.timed_out.add((job.id, job.commit_id))
                ex.retire(slot)
            alive = ex.abandoned_alive()
        error = f"JobTimeout: timed out after {timeout:g}s (job_timeout)"
        for job in expired:
            with claims.lock:
                claims.counters.timed_out += 1
                claims.counters.finished += 1
            failed = self.committer.fail_now(job, error)
            log.warning(
                "task %s: job %d timed out after %gs; %s; %s (%d abandoned handler(s) still "
                "running)",
                self.task_id,
                job.id,
                timeout,
                "counted as a failed attempt" if failed else "it was already committed or lost",
                ex.retire_note,
                alive,
            )
        if expired and alive > self.bound:
            log.error(
                "task %s: %d handler threads that outlived job_timeout are still running, "
                "more than parallel_num=%d: hung handlers are piling up threads in this "
                "process; fix the handler, or recycle workers (meepo worker --max-jobs / "
                "--max-memory)",
                self.task_id,
                alive,
                self.bound,
            )
        return expired
