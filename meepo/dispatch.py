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
from .ledger import Inserted, Ledger, Outcome, Pair
from .records import Message, NewJob, Status
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
        *,
        injected_clock: bool = False,
    ) -> None:
        self.ledger = ledger
        self.transport = transport
        self.task_id = task_id
        self.clock = clock
        self.redispatch_timeout = redispatch_timeout
        #: A clock given by the caller (tests) replaces the database's clock in the
        #: transitions that judge time (claim, heartbeat, reaping).
        self.injected_clock = injected_clock

    def ledger_now(self) -> datetime | None:
        """The ``now`` of a transition that judges time: None (the database's clock),
        or the injected clock's time."""
        return self.clock() if self.injected_clock else None

    def insert(
        self, jobs: Sequence[NewJob], conn: Connection | None = None, *, due_now: bool = False
    ) -> tuple[list[int], list[Message]]:
        """Ledger rows only: the ids (in ``jobs`` order) and the messages to send once the
        rows are committed. ``due_now`` makes the rows due for the dispatch sweep at once
        (for rows whose commit meepo cannot observe); then there is nothing to send."""
        inserted = self.ledger.insert(
            self.task_id,
            jobs,
            now=self.clock(),
            redispatch_timeout=self.redispatch_timeout,
            never_dispatched=due_now,
            conn=conn,
        )
        return [i.id for i in inserted], [] if due_now else _messages(jobs, inserted)

    def push(self, jobs: Sequence[NewJob]) -> list[int]:
        ids, messages = self.insert(jobs)
        self.send(messages)
        return ids

    def send(self, messages: Sequence[Message]) -> bool:
        """Dispatch messages of committed todo rows (due ones to their queues, later ones
        to the delayed set); on a Redis failure, make the rows due for the sweep
        instead. Returns whether Redis took them."""
        if not messages:
            return True
        try:
            self.transport.send(messages, self.clock())
            return True
        except TransportUnavailableError as exc:
            log.warning(
                "task %s: %d job(s) committed but not dispatched (%s); the ledger sweep "
                "will dispatch them when Redis is back",
                self.task_id,
                len(messages),
                exc,
            )
            try:
                self.ledger.mark_due([(m.job_id, m.commit_id) for m in messages])
            except LedgerUnavailableError as exc2:
                log.warning(
                    "task %s: could not mark them due either (%s); their dispatch "
                    "deadline will bring them back",
                    self.task_id,
                    exc2,
                )
            return False

    def finish(self, outcomes: Sequence[Outcome]) -> set[Pair]:
        """Group commit, then re-dispatch the todo outcomes that won."""
        now = self.clock()
        won = self.ledger.finish(outcomes, now=now, redispatch_timeout=self.redispatch_timeout)
        self.send(
            [
                Message(o.job_id, o.commit_id + 1, o.priority, o.run_at)
                for o in outcomes
                if o.status is Status.TODO and (o.job_id, o.commit_id) in won
            ]
        )
        return won

    def commit_one(self, outcome: Outcome) -> int:
        now = self.clock()
        new, priority = self.ledger.commit_one(
            self.task_id, outcome, now=now, redispatch_timeout=self.redispatch_timeout
        )
        if outcome.status is Status.TODO:
            self.send([Message(outcome.job_id, new, priority, outcome.run_at)])
        return new

    def release(self, jobs: Sequence[tuple[int, int, str]]) -> None:
        """Give claimed-but-unstarted jobs ``(id, commit_id, priority)`` back to their
        queues (shutdown)."""
        now = self.clock()
        won = self.ledger.release(
            [(i, c) for i, c, _ in jobs], now=now, expires_at=now + self.redispatch_timeout
        )
        prio = {i: p for i, _, p in jobs}
        self.send([Message(i, c + 1, prio[i]) for i, c in sorted(won)])

    def repush(self, pairs: Sequence[Pair]) -> list[Message]:
        sent = self.ledger.repush(
            pairs, now=self.clock(), redispatch_timeout=self.redispatch_timeout
        )
        self.send(sent)
        return sent


def _messages(jobs: Sequence[NewJob], inserted: Sequence[Inserted]) -> list[Message]:
    return [
        Message(row.id, 0, job.priority, job.run_at)
        for job, row in zip(jobs, inserted, strict=True)
        if row.created
    ]
