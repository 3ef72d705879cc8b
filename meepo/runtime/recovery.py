"""The recovery: the re-dispatch of every todo job after Redis lost its data.

A step of the reaper's tick (:meth:`Recovery.run_once`), in every process. It checks the
transport's epoch token: a missing or changed token means Redis lost its data, and one
process (per epoch) re-dispatches every todo job at once (due ones to their queues,
later ones to the delayed set). A Redis that went back in time (an RDB/AOF restore, a
failover to a lagging replica) keeps its token; each tick also increments a counter in
Redis, and a counter lower than the last one this process saw means the same, so the
token is replaced and the re-dispatch runs. A recovery that fails (or whose process
dies) half-way stays owed: it is retried on the next tick, and its lock
(:data:`~meepo.transport.transport.RECOVERY_LOCK_TTL`, renewed page by page) is released
on failure or soon expires, so another process takes it over. A process runs at most one
full re-dispatch per ``zombie_timeout`` (a Redis under ``allkeys-*`` eviction may lose
the epoch key again and again: each loss would otherwise re-send every todo job); one
owed meanwhile waits for the window's end, and the sweep re-sends lost messages in the
meantime.

Every store operation is a dispatcher verb: ``ensure_epoch`` and ``rotate_epoch`` (the
token and the counter), ``take_recovery`` (the lock), ``recover`` (the pages, the lock's
renewal, the end mark).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from ..config import Options
from ..dispatch import Dispatcher
from ..ledger import ROWS_PER_STATEMENT
from ..middleware import Hooks

log = logging.getLogger("meepo.reaper")


class Recovery:
    """One process's view of the Redis epoch, and the recovery it owes."""

    def __init__(
        self, dispatcher: Dispatcher, options: Options, clock: Callable[[], datetime]
    ) -> None:
        self.d = dispatcher
        self.task_id = dispatcher.task_id
        self.opts = options
        self.clock = clock
        #: middleware: after_recovery (set through the reaper); None: none installed.
        self.hooks: Hooks | None = None
        self.known_epoch: bytes | None = None
        self._counter: int | None = None  # the epoch counter at the last check
        self._owed: tuple[bytes, bool] | None = None  # (epoch, lost): recovery to run
        self._last_recovery: datetime | None = None  # when this process last ran one
        self._deferred = False  # the storm window's line was logged
        self._redispatch_timeout = timedelta(seconds=options.redispatch_timeout)

    def run_once(self) -> int:
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
        if self._last_recovery is not None and now - self._last_recovery < self._redispatch_timeout:
            if not self._deferred:
                log.warning(
                    "task %s: another re-dispatch of every todo job is owed, but this "
                    "process ran one less than zombie_timeout=%gs ago: it waits for the "
                    "window's end (the sweep re-sends lost messages meanwhile)",
                    self.task_id,
                    self.opts.redispatch_timeout,
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
        owed (see :meth:`run_once`)."""
        state, token = self.d.take_recovery(epoch)
        if state == "done":  # another process finished it
            self._owed = None
            return 0
        if token is None:  # another process is running it: still owed
            return 0
        sent = len(self.d.recover(epoch, token, page=ROWS_PER_STATEMENT).sent)
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
