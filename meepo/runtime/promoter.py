"""The promoter: moves delayed jobs to their queues when they fall due.

Delayed messages wait in the task's Redis sorted set (``P{task}:delayed``, scored by
due time). Every process that runs consumers runs a promoter, which calls one Lua
script every ``interval`` (default 50 ms, sooner when the next job is due sooner): the
script moves the due members to their priority queues and removes them from the set in
one atomic step, so however many promoters race, each message is promoted once. The
ledger stays the truth: a lost set is rebuilt by the reaper's recovery, and a row whose
message never arrives is re-sent by the dispatch sweep after it was due.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from ..dispatch import Dispatcher
from ..transport import PROMOTE_LIMIT
from .service import Service

log = logging.getLogger("meepo.promoter")


class Promoter(Service):
    kind = "promoter"

    def __init__(
        self,
        dispatcher: Dispatcher,
        clock: Callable[[], datetime],
        interval: float = 0.05,
    ) -> None:
        super().__init__(dispatcher.task_id, log, interval)
        self.d = dispatcher
        self.clock = clock
        self.interval = interval
        self.promoted = 0

    def run_once(self) -> tuple[int, float | None]:
        """Promote what is due now; returns how many moved and when the next is due
        (Unix seconds, by the task's clock)."""
        moved, nxt = self.d.promote(self.clock())
        if moved:
            self.promoted += moved
            log.debug("task %s: %d delayed job(s) fell due", self.task_id, moved)
        return moved, nxt

    def tick(self) -> float:
        moved, nxt = self.run_once()
        if moved >= PROMOTE_LIMIT:
            return 0.0  # more may be due: go again at once
        wait = self.interval
        if nxt is not None:
            wait = min(wait, max(0.0, nxt - self.clock().timestamp()))
        return max(wait, 0.001)
