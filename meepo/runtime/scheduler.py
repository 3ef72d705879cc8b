"""The scheduler: turns due cron and periodic schedules into jobs.

Every process that runs consumers runs one per task (no separate beat process). A pass
(:meth:`Scheduler.run_once`) reads the task's schedules whose ``next_fire_at`` has come
and, for each, in ONE transaction: moves ``next_fire_at`` on with a compare-and-set and,
only if that UPDATE matched, inserts the jobs (``run_at`` = their fire times). The
messages are sent after the commit. However many schedulers race, each fire time gives
exactly one job: the losers' compare-and-set matches no row and they insert nothing.

Between passes the thread sleeps until the next fire is due, at most ``poll`` seconds
(0.5 s), re-reading the table each time, so a schedule declared or changed in another
process takes effect within half a second. A schedule whose stored row cannot be read
(edited by hand into something invalid) is logged and left alone; the scheduler never
dies of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from ..dispatch import Dispatcher
from ..ledger.schedules import Schedules, spec_of
from ..records import NewJob, ScheduleRecord
from ..schedule import DEFAULT_MISFIRE_GRACE, MAX_FIRES_PER_PASS, plan
from .service import Service

log = logging.getLogger("meepo.scheduler")

#: Most schedules read per pass (the rest follow in the next pass, at once).
DUE_BATCH = 100


class Scheduler(Service):
    kind = "scheduler"

    def __init__(
        self,
        schedules: Schedules,
        dispatcher: Dispatcher,
        clock: Callable[[], datetime],
        *,
        poll: float = 0.5,
        grace: float = DEFAULT_MISFIRE_GRACE,
    ) -> None:
        super().__init__(dispatcher.task_id, log, poll)
        self.schedules = schedules
        self.dispatcher = dispatcher
        self.clock = clock
        self.poll = poll
        #: Seconds after its fire time within which a fire counts as on time.
        self.grace = grace
        #: Jobs this scheduler inserted (fires it won).
        self.fired = 0
        self._bad: set[tuple[str, datetime]] = set()

    # -- one pass ---------------------------------------------------------------------

    def run_once(self) -> tuple[int, bool]:
        """Fire what is due now; returns (jobs inserted by this scheduler, whether more
        may be due at once)."""
        now = self.clock()
        made = 0
        more = False
        rows = self.schedules.due(self.task_id, now, DUE_BATCH)
        for rec in rows:
            n, again = self._fire(rec, now)
            made += n
            more = more or again
        return made, more or len(rows) >= DUE_BATCH

    def _fire(self, rec: ScheduleRecord, now: datetime) -> tuple[int, bool]:
        assert rec.next_fire_at is not None
        try:
            spec = spec_of(rec).check()
            p = plan(spec, rec.next_fire_at, now, self.grace, MAX_FIRES_PER_PASS)
        except ValueError as exc:
            key = (rec.name, rec.updated_at)
            if key not in self._bad:
                self._bad.add(key)
                log.error(
                    "task %s: schedule %r cannot fire (%s); declare it again to fix it",
                    self.task_id,
                    rec.name,
                    exc,
                )
            return 0, False
        jobs = [NewJob(rec.payload, f, rec.priority) for f in p.fires]
        if self.dispatcher.fire(self.schedules, rec, jobs, p.next_fire_at, now) is None:
            return 0, False  # another scheduler fired it (or it was redeclared)
        self.fired += len(jobs)
        if p.skipped:
            log.info(
                "task %s: schedule %r skipped missed fire(s) before %s (misfire=skip)",
                self.task_id,
                rec.name,
                p.next_fire_at.isoformat() if p.next_fire_at else "its end",
            )
        if jobs:
            log.debug("task %s: schedule %r fired %d job(s)", self.task_id, rec.name, len(jobs))
        return len(jobs), p.next_fire_at is not None and p.next_fire_at <= now

    # -- the thread -------------------------------------------------------------------

    def tick(self) -> float:
        _, more = self.run_once()
        if more:
            return 0.0
        nxt = self.schedules.next_due(self.task_id)
        wait = self.poll
        if nxt is not None:
            wait = min(wait, (nxt - self.clock()).total_seconds())
        return max(wait, 0.001)
