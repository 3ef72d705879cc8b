"""An in-process transport: the queues of one task in this process's memory, no Redis.

:class:`LocalTransport` answers every call the :class:`~meepo.dispatch.Dispatcher` makes
of a :class:`~meepo.transport.Transport` (send, pop, promote, the queue heads, the epoch
and the recovery lock) from plain Python lists under one lock, with the same meaning:
due messages go to their priority's queue, later ones to a delayed set until
:meth:`promote` moves them; pops take the first non-empty queue in priority order.

It backs the inline test mode (``Task(..., inline=True)``, :mod:`meepo.testing`): the
ledger is real (any database, SQLite by default) and every transition goes through the
same dispatcher verbs as in production, only the messages never leave the process.
Like Redis, it holds nothing durable: the ledger stays the truth.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ..config import PRIORITY_RE
from ..records import DEFAULT_PRIORITY, Message, Pair
from .notify import Watch
from .transport import MESSAGES_PER_CALL, PROMOTE_LIMIT, Transport, decode, encode, new_epoch


class LocalNotices:
    """Finish notices within the process: ``submit`` (the committer's, through
    ``Dispatcher.notify``) wakes the waiters (``Task.wait``) of those jobs at once. It
    is both the transport's ``notices`` and its ``listener``; the subscription is
    always confirmed (there is nothing to subscribe to)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watches: dict[int, set[Watch]] = {}

    def submit(self, ids: list[int]) -> None:
        with self._lock:
            woken = [w for i in ids for w in self._watches.get(i, ())]
        for w in woken:
            w.event.set()

    def watch(
        self,
        channel: str,
        job_id: int,
        confirm_timeout: float,
        event: threading.Event | None = None,
    ) -> tuple[Watch, bool]:
        w = Watch(channel, job_id) if event is None else Watch(channel, job_id, event)
        with self._lock:
            self._watches.setdefault(job_id, set()).add(w)
        return w, True

    def confirmed(self, channel: str) -> bool:
        return True

    def unwatch(self, w: Watch) -> None:
        with self._lock:
            got = self._watches.get(w.job_id)
            if got is not None:
                got.discard(w)
                if not got:
                    del self._watches[w.job_id]

    def close(self) -> None:
        pass


class LocalTransport(Transport):
    """The queues of ``task_id`` in memory (thread-safe). Not shared between processes,
    nor between two transports: each Task in inline mode has its own."""

    def __init__(
        self,
        task_id: str,
        prefix: str = "meepo:",
        priorities: Sequence[str] = (DEFAULT_PRIORITY,),
        default_priority: str = DEFAULT_PRIORITY,
        *,
        route_any: bool = False,
    ) -> None:
        # No Redis client and no scripts: Transport.__init__ is not called.
        self.route_any = route_any
        self.task_id = task_id
        self.priorities = list(priorities)
        self.default_priority = default_priority
        self._base = f"{prefix}{{{task_id}}}"
        self.queue_key = f"{self._base}:queue"
        self.queue_keys = {p: self._queue_key(self._base, p) for p in self.priorities}
        self._pop_keys = list(self.queue_keys.values())
        self._key_priority = {k: p for p, k in self.queue_keys.items()}
        self.delayed_key = f"{self._base}:delayed"
        self.epoch_key = f"{self._base}:epoch"
        self.counter_key = f"{self._base}:epoch:counter"
        self._recovery_base = f"{self._base}:recovery:"
        self.where = f"in-process queues of task {task_id!r} (pid {os.getpid()})"
        self.done_channel = f"{self._base}:done"
        self.notices: Any = LocalNotices()
        self._cv = threading.Condition(threading.Lock())
        self._queues: dict[str, deque[bytes]] = {}
        # (due, member) sorted by due time, then by member: the delayed set.
        self._delayed: list[tuple[float, bytes]] = []
        self._epoch: bytes | None = None
        self._counter = 0
        self._locks: dict[str, bytes] = {}
        self._woken: set[str] = set()

    # -- dispatch ---------------------------------------------------------------------

    def send(self, messages: Sequence[Message], now: datetime | None = None) -> None:
        if not messages:
            return
        with self._cv:
            for m in messages:
                if m.run_at is not None and now is not None and m.run_at > now:
                    member = b"%d:%d:%s" % (m.job_id, m.commit_id, m.priority.encode())
                    self._add_delayed(m.run_at.timestamp(), member)
                else:
                    key = self.key_for(m.priority)
                    self._queues.setdefault(key, deque()).append(encode((m.job_id, m.commit_id)))
            if self._epoch is None:
                self._epoch = new_epoch()
            self._cv.notify_all()

    def _add_delayed(self, due: float, member: bytes) -> None:
        # A ZADD: a member already there takes the new score.
        self._delayed = [(d, m) for d, m in self._delayed if m != member]
        bisect.insort(self._delayed, (due, member))

    def pop(self, count: int, timeout: float, wake: str | None = None) -> tuple[str, list[bytes]]:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cv:
            while True:
                for prio, key in zip(self.priorities, self._pop_keys, strict=True):
                    q = self._queues.get(key)
                    if q:
                        n = min(count, len(q), MESSAGES_PER_CALL)
                        return prio, [q.popleft() for _ in range(n)]
                if wake is not None and wake in self._woken:
                    self._woken.discard(wake)
                    return self.default_priority, []
                left = deadline - time.monotonic()
                if left <= 0:
                    return self.default_priority, []
                self._cv.wait(left)

    def wake_key(self, token: str) -> str:
        return f"{self._base}:wake:{token}"

    def wake(self, key: str) -> None:
        with self._cv:
            self._woken.add(key)
            self._cv.notify_all()

    def promote(self, now: datetime) -> tuple[int, float | None]:
        ts = now.timestamp()
        with self._cv:
            moved = 0
            while self._delayed and moved < PROMOTE_LIMIT and self._delayed[0][0] <= ts:
                _, member = self._delayed.pop(0)
                pair, _, prio = member.rpartition(b":")
                if decode(pair) is not None:
                    key = self.queue_keys.get(prio.decode(), self.queue_keys[self.default_priority])
                    self._queues.setdefault(key, deque()).append(pair)
                moved += 1
            nxt = self._delayed[0][0] if self._delayed else None
            if moved:
                self._cv.notify_all()
            return moved, nxt

    def delayed(self) -> list[tuple[float, Pair, str]]:
        """The delayed set: ``(due Unix seconds, (id, commit_id), priority)``, soonest
        first (for tests and :mod:`meepo.testing`)."""
        out: list[tuple[float, Pair, str]] = []
        with self._cv:
            for due, member in self._delayed:
                head, _, prio = member.rpartition(b":")
                pair = decode(head)
                if pair is not None:
                    out.append((due, pair, prio.decode()))
        return out

    # -- what the sweep and the tools read --------------------------------------------

    def heads(self) -> dict[str, tuple[int, Pair | None]]:
        with self._cv:
            out: dict[str, tuple[int, Pair | None]] = {}
            for prio, key in zip(self.priorities, self._pop_keys, strict=True):
                q = self._queues.get(key) or deque()
                out[prio] = len(q), decode(q[0]) if q else None
            return out

    def depths(self) -> dict[str, int]:
        with self._cv:
            return {
                p: len(self._queues.get(k) or ())
                for p, k in zip(self.priorities, self._pop_keys, strict=True)
            }

    def all_depths(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with self._cv:
            for key, q in self._queues.items():
                suffix = key[len(self.queue_key) :]
                if not q:
                    continue
                if suffix == "":
                    out[DEFAULT_PRIORITY] = len(q)
                elif suffix.startswith(":") and PRIORITY_RE.fullmatch(suffix[1:]):
                    out[suffix[1:]] = len(q)
        return out

    def delayed_depth(self) -> int:
        with self._cv:
            return len(self._delayed)

    # -- the epoch and the recovery lock ----------------------------------------------

    def epoch(self) -> bytes | None:
        with self._cv:
            return self._epoch

    def ensure_epoch(self) -> tuple[bytes, bool, int]:
        with self._cv:
            created = self._epoch is None
            if created:
                self._epoch = new_epoch()
            self._counter += 1
            assert self._epoch is not None
            return self._epoch, created, self._counter

    def rotate_epoch(self, old: bytes) -> bytes:
        with self._cv:
            if self._epoch is None or self._epoch == old:
                self._epoch = new_epoch()
            return self._epoch

    def take_recovery(self, epoch: bytes) -> tuple[str, bytes | None]:
        key = self._recovery_key(epoch)
        with self._cv:
            current = self._locks.get(key)
            if current is None:
                token = b"running:" + new_epoch()
                self._locks[key] = token
                return "taken", token
            return ("done", None) if current == b"done" else ("running", None)

    def hold_recovery(self, epoch: bytes, token: bytes) -> None:
        """The lock never expires here: nothing to renew."""

    def finish_recovery(self, epoch: bytes, token: bytes) -> None:
        key = self._recovery_key(epoch)
        with self._cv:
            if self._locks.get(key) == token:
                self._locks[key] = b"done"

    def release_recovery(self, epoch: bytes, token: bytes) -> None:
        key = self._recovery_key(epoch)
        with self._cv:
            if self._locks.get(key) == token:
                del self._locks[key]

    def config_get(self, *names: str) -> dict[str, str] | None:
        """No server settings to check (as a server that refuses CONFIG)."""
        return None

    def info(self) -> dict[str, Any]:
        return {"redis_version": "none (in-process transport)"}

    @property
    def listener(self) -> Any:
        """Waiters watch the in-process notices (:class:`LocalNotices`)."""
        return self.notices

    def publish_done(self, ids: Sequence[int]) -> int:
        self.notices.submit(list(ids))
        return 1

    def close(self) -> None:
        with self._cv:
            self._queues.clear()
            self._delayed.clear()
