"""The one place that writes to both stores, always ledger first.

* push: INSERT … and COMMIT the rows, then RPUSH their messages. If Redis fails after
  the commit the rows are marked due for the dispatch sweep (and even if that fails, their
  dispatch deadline brings them back): the id returned is never lost.
* send: messages for rows already committed (retries, reaper, recovery, repush).
* finish: the consumer's group commit, then re-dispatch of the jobs that went back to
  todo and are due now.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import Connection

from .errors import LedgerUnavailableError, TransportUnavailableError
from .ledger import NEVER_DISPATCHED, Ledger, Outcome, Pair
from .records import Status
from .transport import Transport

log = logging.getLogger("meepo.dispatch")


class Dispatcher:
    def __init__(
        self,
        ledger: Ledger,
        transport: Transport,
        task_id: str,
        clock: Callable[[], datetime],
        redispatch_timeout: timedelta,
    ) -> None:
        self.ledger = ledger
        self.transport = transport
        self.task_id = task_id
        self.clock = clock
        self.redispatch_timeout = redispatch_timeout

    def insert(
        self, payloads: Sequence[bytes], conn: Connection | None = None, *, due_now: bool = False
    ) -> list[int]:
        """Ledger rows only. ``due_now`` makes them due for the dispatch sweep at once
        (for rows whose commit meepo cannot observe)."""
        now = self.clock()
        expires = NEVER_DISPATCHED if due_now else now + self.redispatch_timeout
        return self.ledger.insert(self.task_id, payloads, now=now, expires_at=expires, conn=conn)

    def push(self, payloads: Sequence[bytes]) -> list[int]:
        ids = self.insert(payloads)
        self.send([(i, 0) for i in ids])
        return ids

    def send(self, pairs: Sequence[Pair]) -> bool:
        """RPUSH messages for committed todo rows; on a Redis failure, make the rows due
        for the sweep instead. Returns whether Redis took them."""
        if not pairs:
            return True
        try:
            self.transport.send(pairs)
            return True
        except TransportUnavailableError as exc:
            log.warning(
                "task %s: %d job(s) committed but not dispatched (%s); the ledger sweep "
                "will dispatch them when Redis is back",
                self.task_id,
                len(pairs),
                exc,
            )
            try:
                self.ledger.mark_due(pairs)
            except LedgerUnavailableError as exc2:
                log.warning(
                    "task %s: could not mark them due either (%s); their dispatch "
                    "deadline will bring them back",
                    self.task_id,
                    exc2,
                )
            return False

    def finish(self, outcomes: Sequence[Outcome]) -> set[Pair]:
        """Group commit, then re-dispatch todo outcomes that are due now."""
        now = self.clock()
        won = self.ledger.finish(outcomes, now=now, redispatch_timeout=self.redispatch_timeout)
        again = [
            (o.job_id, o.commit_id + 1)
            for o in outcomes
            if o.status is Status.TODO
            and (o.job_id, o.commit_id) in won
            and (o.run_at is None or o.run_at <= now)
        ]
        self.send(again)
        return won

    def commit_one(self, outcome: Outcome) -> int:
        now = self.clock()
        new = self.ledger.commit_one(
            self.task_id, outcome, now=now, redispatch_timeout=self.redispatch_timeout
        )
        if outcome.status is Status.TODO and (outcome.run_at is None or outcome.run_at <= now):
            self.send([(outcome.job_id, new)])
        return new

    def release(self, pairs: Sequence[Pair]) -> None:
        """Give claimed-but-unstarted jobs back to the queue (shutdown)."""
        now = self.clock()
        won = self.ledger.release(pairs, now=now, expires_at=now + self.redispatch_timeout)
        self.send(sorted((i, c + 1) for i, c in won))

    def repush(self, pairs: Sequence[Pair]) -> set[Pair]:
        won = self.ledger.repush(
            pairs, now=self.clock(), redispatch_timeout=self.redispatch_timeout
        )
        self.send(sorted(won))
        return won
