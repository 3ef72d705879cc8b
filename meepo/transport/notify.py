"""Finish notices: how ``Task.wait`` learns that a job's commit has happened.

After a group commit has committed, the ids of the jobs it finished go to the
transport's :class:`Publisher`, whose thread PUBLISHes them (at most one message per
batch, fewer under load: batches queued meanwhile share one; ``b"12,13,20"``) on the
task's channel ``P{task}:done`` (hash-tagged like every key of the task: see
:mod:`meepo.transport.transport`). A notice is only a hint to read the ledger again:
losing one costs a waiter its polling interval, never a result.

:class:`Listener` is the process's side: one pubsub connection and one small thread per
Transport, shared by every waiter. A waiter :meth:`~Listener.watch`-es a job id (which
subscribes the channel, if it is not yet, and waits for Redis to confirm it) *before*
it reads the ledger, so a commit between its read and its sleep still wakes it. The
subscription stays while waiters come and go; the thread ends (and unsubscribes) after
:data:`LINGER` seconds without any. When the connection fails every waiter is woken
(to read the ledger) and the channel counts as unconfirmed until the listener has
subscribed again, so waiters poll the ledger meanwhile.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from ..config import mask_url

log = logging.getLogger("meepo.transport")

#: Seconds the listener keeps its subscription (and thread) with no waiter.
LINGER = 10.0
#: How long the listener's read waits for a message before it looks at its state.
READ_TIMEOUT = 0.5
#: How long the notice thread gathers notices while nobody is subscribed (seconds): it
#: starts at QUIET_GATHER and doubles with every PUBLISH that reached nobody, up to
#: QUIET_GATHER_MAX (a drain with no waiter then sends about 10 notices a second, not
#: one per group commit); one that reached a subscriber sends the next at once.
QUIET_GATHER = 0.005
QUIET_GATHER_MAX = 0.1
#: Backoff between reconnection attempts after the pubsub connection failed (seconds).
RECONNECT_MIN, RECONNECT_MAX = 0.2, 5.0


def encode_ids(ids: list[int]) -> bytes:
    return b",".join(b"%d" % i for i in ids)


def decode_ids(data: Any) -> list[int]:
    """The ids of a notice; anything malformed is skipped."""
    raw = data if isinstance(data, bytes) else str(data).encode()
    return [int(p) for p in raw.split(b",") if p.isdigit()]


@dataclass(eq=False)
class Watch:
    """One waiter's interest in one job: ``event`` is set by a notice naming the job
    (or by anything that makes the ledger worth reading again)."""

    channel: str
    job_id: int
    event: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Channel:
    confirmed: threading.Event = field(default_factory=threading.Event)
    requested: bool = False
    watches: dict[int, set[Watch]] = field(default_factory=dict)


class Listener:
    """The shared subscription of one Redis client (see the module docstring)."""

    def __init__(self, client: redis.Redis, where: str) -> None:
        self.client = client
        self.where = where
        self._lock = threading.Lock()
        self._channels: dict[str, _Channel] = {}
        self._pubsub: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._watching = 0
        self._idle_since = time.monotonic()

    # -- the waiters' side -----------------------------------------------------------

    def watch(
        self,
        channel: str,
        job_id: int,
        confirm_timeout: float,
        event: threading.Event | None = None,
    ) -> tuple[Watch, bool]:
        """Register interest in ``job_id``'s notices and make sure the channel is
        subscribed; returns the watch and whether Redis has confirmed the subscription
        (within ``confirm_timeout`` seconds; ``event``: the one the notices set, for a
        waiter that is not a thread). Not confirmed: Redis is unreachable (or
        slow); the caller reads the ledger at its fallback interval. Never raises for
        Redis."""
        w = Watch(channel, job_id) if event is None else Watch(channel, job_id, event)
        with self._lock:
            ch = self._channels.setdefault(channel, _Channel())
            ch.watches.setdefault(job_id, set()).add(w)
            self._watching += 1
            if not ch.requested:
                ch.requested = True
                self._subscribe_locked([channel])
            self._ensure_thread_locked()
            confirmed = ch.confirmed
            if self._pubsub is None:  # Redis refused: no confirmation is coming soon
                return w, False
        return w, confirmed.wait(confirm_timeout) if confirm_timeout > 0 else confirmed.is_set()

    def confirmed(self, channel: str) -> bool:
        ch = self._channels.get(channel)
        return ch is not None and ch.confirmed.is_set()

    def unwatch(self, w: Watch) -> None:
        with self._lock:
            ch = self._channels.get(w.channel)
            if ch is None:
                return
            got = ch.watches.get(w.job_id)
            if got is not None and w in got:
                got.discard(w)
                if not got:
                    del ch.watches[w.job_id]
                self._watching -= 1
                if self._watching == 0:
                    self._idle_since = time.monotonic()

    def close(self) -> None:
        """Stop the thread and drop the connection (waiters fall back to polling)."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(READ_TIMEOUT * 4)

    # -- the listener's side ---------------------------------------------------------

    def _subscribe_locked(self, channels: list[str]) -> None:
        """Send SUBSCRIBE (its confirmation arrives on the listener thread). A failure
        is left to the listener's reconnection."""
        try:
            if self._pubsub is None:
                self._pubsub = self.client.pubsub()  # type: ignore[no-untyped-call, unused-ignore]
            self._pubsub.subscribe(*channels)
        except (redis.RedisError, OSError) as exc:
            log.debug("finish notices: subscribe failed on %s: %s", self.where, exc)
            self._drop_locked()

    def _drop_locked(self) -> None:
        ps, self._pubsub = self._pubsub, None
        for ch in self._channels.values():
            ch.confirmed.clear()
        if ps is not None:
            try:
                ps.close()
            except Exception:  # closing a broken connection: nothing to learn
                log.debug("finish notices: closing the pubsub failed", exc_info=True)

    def _ensure_thread_locked(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="meepo-wait-listener", daemon=True)
        self._thread.start()

    def _wake_all_locked(self, channel: str | None = None) -> None:
        for name, ch in self._channels.items():
            if channel is None or name == channel:
                for watches in ch.watches.values():
                    for w in watches:
                        w.event.set()

    def _run(self) -> None:
        backoff = RECONNECT_MIN
        while not self._stop.is_set():
            with self._lock:
                if self._watching == 0 and time.monotonic() - self._idle_since > LINGER:
                    self._channels.clear()
                    self._drop_locked()
                    self._thread = None
                    return
                ps = self._pubsub
                if ps is None:
                    wanted = list(self._channels)
                    if wanted:
                        self._subscribe_locked(wanted)
                    ps = self._pubsub
            if ps is None:
                self._stop.wait(backoff)
                backoff = min(RECONNECT_MAX, backoff * 2)
                continue
            try:
                msg = ps.get_message(timeout=READ_TIMEOUT)
            except (redis.RedisError, OSError, ValueError) as exc:
                log.info(
                    "finish notices: the connection to %s failed (%s); waiters read the "
                    "ledger until it is back",
                    self.where,
                    mask_url(str(exc)),
                )
                with self._lock:
                    if self._pubsub is ps:
                        self._drop_locked()
                    self._wake_all_locked()
                self._stop.wait(backoff)
                backoff = min(RECONNECT_MAX, backoff * 2)
                continue
            if msg is None:
                continue
            backoff = RECONNECT_MIN
            self._handle(msg)
        with self._lock:
            self._drop_locked()
            self._thread = None

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        name = msg.get("channel")
        channel = name.decode() if isinstance(name, bytes) else str(name)
        with self._lock:
            ch = self._channels.get(channel)
            if ch is None:
                return
            if kind == "subscribe":
                ch.confirmed.set()
                # Subscribed again after a failure: a commit may have come meanwhile.
                self._wake_all_locked(channel)
            elif kind == "message":
                for job_id in decode_ids(msg.get("data")):
                    for w in ch.watches.get(job_id, ()):
                        w.event.set()


class Publisher:
    """Sends finish notices off the caller's thread: the committer hands over the ids of
    a batch (a queue put, no round trip) and this thread PUBLISHes them, everything
    queued meanwhile in one message. A drain then pays no Redis round trip per group
    commit; a waiter's wake-up pays one thread hand-over. The thread ends after
    :data:`LINGER` seconds with nothing to send and starts again on the next notice."""

    def __init__(self, publish: Callable[[list[int]], int], task_id: str) -> None:
        self._publish = publish
        #: The last notice reached no subscriber (no process is waiting on this task).
        self._quiet = False
        self._gather = QUIET_GATHER  # the next quiet gathering (see QUIET_GATHER_MAX)
        self.task_id = task_id
        self._queue: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, ids: list[int]) -> None:
        self._queue.put(ids)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"meepo-{self.task_id}-notices", daemon=True
                )
                self._thread.start()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted so far is sent (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._thread is None and self._queue.empty():
                    return True
            time.sleep(0.005)
        return False

    def _run(self) -> None:
        while True:
            try:
                ids = self._queue.get(timeout=LINGER)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            if self._quiet:
                # Nobody was listening last time (PUBLISH says how many did): gather
                # the notices of more batches into one message, longer each time. A
                # waiter that has just subscribed pays this once (at most
                # QUIET_GATHER_MAX), then notices go out at once again.
                time.sleep(self._gather)
                self._gather = min(QUIET_GATHER_MAX, self._gather * 2)
            while True:  # coalesce what queued meanwhile
                try:
                    ids = ids + self._queue.get_nowait()
                except queue.Empty:
                    break
            try:
                self._quiet = self._publish(ids) == 0
                if not self._quiet:
                    self._gather = QUIET_GATHER
            except Exception as exc:  # a notice is a hint: waiters also read the ledger
                log.debug("task %s: finish notice not sent: %s", self.task_id, exc)
