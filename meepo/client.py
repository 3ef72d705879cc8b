"""The client layer: one ledger table and its Redis keys, opened the same way for
``Task`` (one task id) and ``Admin`` (every task of the table), and the verbs they share.

:class:`Stores` wires the engine, the ledger, the schedules and (on first use) the Redis
client, and makes each task's transport and :class:`~meepo.dispatch.Dispatcher`. Every
write then goes through the dispatcher's verbs (ledger first, then the message), so
``Task.repush`` and ``meepo jobs repush`` run the same code: :func:`repush`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import redis as redis_lib
from sqlalchemy import Engine

from .connect import engine_for, redis_for, service_engine_for
from .dispatch import Dispatcher
from .ledger import Ledger
from .ledger.bounds import Bounds
from .ledger.schedules import Schedules
from .records import DEFAULT_PRIORITY, Message, Status
from .transport import Transport

#: How many times a job that moved between the read and the compare-and-set of a repush
#: is re-read and tried again before it is reported as skipped (a consumer or reaper
#: moved it every time).
REPUSH_RETRIES = 5

#: ``(id, task_id, commit_id, status)``: a job as :meth:`Ledger.find` reads it.
Row = tuple[int, str, int, Status]


class Stores:
    """The ledger table ``table`` on ``db`` and the Redis keys under ``prefix``.

    The Redis client is made on first use (:attr:`redis`), so ledger-only work (the
    CLI's ``db`` and ``jobs show`` commands) never needs Redis; ``redis_timeout``
    bounds its socket waits. ``clock`` replaces the database's clock (tests)."""

    def __init__(
        self,
        db: str | Engine | None,
        redis: str | redis_lib.Redis | None,
        *,
        table: str,
        prefix: str,
        redis_timeout: float | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.table = table
        self.prefix = prefix
        self._db = db
        self.engine = engine_for(db)
        self.ledger = Ledger(self.engine, table)
        self.schedules = Schedules(self.engine, table)
        #: Whether the clock was given (it then replaces the database's clock in the
        #: transitions that judge time, see :class:`Dispatcher`).
        self.clock_given = clock is not None
        # The database's clock, as this host estimates it (meepo.ledger.clock).
        self.clock: Callable[[], datetime] = clock or self.ledger.clock.now
        self._redis_arg = redis
        self._redis_timeout = redis_timeout
        self._redis: redis_lib.Redis | None = None

    @property
    def redis(self) -> redis_lib.Redis:
        """The Redis client, made on first use."""
        if self._redis is None:
            self._redis = redis_for(self._redis_arg, self._redis_timeout)
        return self._redis

    def service_ledger(self, bounds: Bounds) -> Ledger:
        """The ledger on the pool of meepo's own threads (claim, committer, heartbeat,
        reaper, scheduler), every wait bounded by ``bounds``: handlers holding
        connections of :attr:`engine` never starve them (the same ledger on SQLite and
        on a caller's own Engine, see :func:`meepo.connect.service_engine_for`)."""
        engine = service_engine_for(self._db, bounds)
        return self.ledger if engine is self.engine else Ledger(engine, self.table)

    def transport(
        self,
        task_id: str,
        priorities: Sequence[str] | None = None,
        default_priority: str = DEFAULT_PRIORITY,
    ) -> Transport:
        """``task_id``'s queues: with its ``priorities`` (a Task), or any priority found
        in the ledger (``None``: an admin repushing jobs of tasks it does not know)."""
        if priorities is None:
            return Transport(self.redis, task_id, self.prefix, route_any=True)
        return Transport(self.redis, task_id, self.prefix, priorities, default_priority)

    def dispatcher(
        self,
        transport: Transport,
        redispatch_timeout: timedelta,
        *,
        ledger: Ledger | None = None,
    ) -> Dispatcher:
        """The dispatcher of ``transport``'s task on this table (``ledger``: another
        pool onto the same table, such as the runtime services' own)."""
        return Dispatcher(
            self.ledger if ledger is None else ledger,
            transport,
            transport.task_id,
            self.clock,
            redispatch_timeout,
            injected_clock=self.clock_given,
        )


def repush(
    rows: Sequence[Row],
    dispatcher: Callable[[str], Dispatcher],
    reread: Callable[[list[int]], list[Row]],
    retries: int = REPUSH_RETRIES,
) -> tuple[list[tuple[Row, Message]], list[int]]:
    """Put ``rows`` back in todo, each task's through its ``dispatcher(task_id)`` (the
    ledger's compare-and-set first, then one pipelined RPUSH per task).

    A job that moved since it was read is re-read with ``reread(ids)`` (which may drop
    it: it no longer matches what the caller asked for) and tried again, up to
    ``retries`` times. Returns each repushed row (as read) with its new message, and
    the ids of the jobs that kept changing (left as they were)."""
    done: list[tuple[Row, Message]] = []
    pending = list(rows)
    for _ in range(retries):
        lost: list[int] = []
        for task_id, group in _by_task(pending).items():
            # If Redis is down the rows stay todo and the dispatch sweep sends them later.
            moved = dispatcher(task_id).repush([(r[0], r[2]) for r in group])
            sent = {m.job_id: m for m in moved.sent}
            for r in group:
                if r[0] in sent:
                    done.append((r, sent[r[0]]))
                else:
                    lost.append(r[0])
        if not lost:
            return done, []
        pending = reread(sorted(lost))
        if not pending:
            return done, []
    return done, sorted(r[0] for r in pending)


#: What a cancel did to one job: ``cancelled`` (it was todo), ``requested`` (it was
#: doing: it ends as cancelled), ``already`` (doing, its cancel requested before).
CANCELLED, REQUESTED, ALREADY = "cancelled", "requested", "already"


def cancel(
    rows: Sequence[Row],
    dispatcher: Callable[[str], Dispatcher],
    reread: Callable[[list[int]], list[Row]],
    retries: int = REPUSH_RETRIES,
) -> tuple[list[tuple[Row, str]], list[int]]:
    """Cancel ``rows``, each task's through its ``dispatcher(task_id)``: todo ones at
    once, doing ones flagged; finished ones are left as they are (not in the result).

    A job that moved since it was read is re-read with ``reread(ids)`` and tried again,
    up to ``retries`` times, as for :func:`repush`. Returns each job acted on (as read,
    last) with what was done (CANCELLED, REQUESTED or ALREADY), and the ids of the jobs
    that kept changing."""
    done: list[tuple[Row, str]] = []
    pending = [r for r in rows if not r[3].terminal]
    for _ in range(retries):
        lost: list[int] = []
        for task_id, group in _by_task(pending).items():
            todo = [(r[0], r[2]) for r in group if r[3] is Status.TODO]
            doing = [(r[0], r[2]) for r in group if r[3] is Status.DOING]
            got = dispatcher(task_id).cancel(todo, doing)
            for r in group:
                pair = (r[0], r[2])
                if pair in got.cancelled:
                    done.append((r, CANCELLED))
                elif pair in got.requested:
                    done.append((r, REQUESTED))
                elif pair in got.already:
                    done.append((r, ALREADY))
                else:
                    lost.append(r[0])
        if not lost:
            return done, []
        pending = [r for r in reread(sorted(lost)) if not r[3].terminal]
        if not pending:
            return done, []
    return done, sorted(r[0] for r in pending)


def _by_task(rows: Sequence[Row]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}
    for r in rows:
        out.setdefault(r[1], []).append(r)
    return out
