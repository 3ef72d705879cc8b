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
import threading
from collections.abc import Callable
from datetime import datetime

from ..errors import MeepoError
from ..transport import PROMOTE_LIMIT, Transport
from .consumer import Backoff

log = logging.getLogger("meepo.promoter")


class Promoter:
    def __init__(
        self,
        transport: Transport,
        clock: Callable[[], datetime],
        interval: float = 0.05,
    ) -> None:
        self.transport = transport
        self.task_id = transport.task_id
        self.clock = clock
        self.interval = interval
        self.promoted = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> tuple[int, float | None]:
        """Promote what is due now; returns how many moved and when the next is due
        (Unix seconds, by the task's clock)."""
        moved, nxt = self.transport.promote(self.clock())
        if moved:
            self.promoted += moved
            log.debug("task %s: %d delayed job(s) fell due", self.task_id, moved)
        return moved, nxt

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, name=f"meepo-{self.task_id}-promoter", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def _loop(self) -> None:
        backoff = Backoff(first=self.interval, cap=5.0)
        while not self._stop.is_set():
            try:
                moved, nxt = self.run_once()
                backoff.reset()
            except MeepoError as exc:
                log.warning("task %s: promoting delayed jobs failed: %s", self.task_id, exc)
                backoff.wait(self._stop)
                continue
            except Exception:  # never let the promoter die silently
                log.exception("task %s: promoter crashed (retrying)", self.task_id)
                backoff.wait(self._stop)
                continue
            if moved >= PROMOTE_LIMIT:
                continue  # more may be due: go again at once
            wait = self.interval
            if nxt is not None:
                wait = min(wait, max(0.0, nxt - self.clock().timestamp()))
            self._stop.wait(max(wait, 0.001))
