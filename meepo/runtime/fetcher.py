"""The fetcher: pops messages and claims their jobs, as fast as there is room.

Each round takes up to the free capacity (``parallel_num + prefetch``, or more with
the automatic prefetch; never more than MESSAGES_PER_CALL) in one pop (LPOP n, or a blocking pop of
one message while every queue is empty) and one claim (:meth:`Dispatcher.pop_and_claim`:
one compare-and-set UPDATE for the batch), records the claims, and hands the jobs to the
executor. Flow control: while the claims whose handler has not returned fill the
capacity, or the claims not yet committed fill twice of it, it pops nothing and waits
for a slot to free up. Redis or the database down: logged, retried with backoff.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import timedelta

from ..config import Options
from ..dispatch import Dispatcher, Popped
from ..errors import MeepoError, TransportUnavailableError
from ..middleware import Hooks
from ..records import Job
from ..serializers import is_bytes
from ..transport import MESSAGES_PER_CALL
from .claims import Claim, Claims
from .service import Service

log = logging.getLogger("meepo.consumer")

#: How long a round blocks on an empty queue (seconds), and how long it waits for free
#: capacity before it looks again (a freed slot wakes it at once).
POP_TIMEOUT, FULL_WAIT = 1.0, 0.5


class Fetcher(Service):
    kind = "fetch"
    #: middleware (set through Consumer.hooks); None: none installed.
    hooks: Hooks | None = None

    def __init__(
        self,
        dispatcher: Dispatcher,
        claims: Claims,
        submit: Callable[[Job], None],
        options: Options,
        worker: str,
    ) -> None:
        super().__init__(dispatcher.task_id, log, 0.1, 5.0)
        self.d = dispatcher
        self.claims = claims
        self.submit = submit
        self.opts = options
        self.worker = worker
        self._lease = timedelta(seconds=options.lease)
        #: The key this fetcher's blocking pops watch besides the queues: a stop pushes
        #: to it (:meth:`request_stop`), so the pop ends at once, not at POP_TIMEOUT.
        self.wake_key = dispatcher.wake_key(f"{worker}:{os.urandom(6).hex()}")
        self._blocking = False  # a pop that may block is under way
        #: Set once the first round (pop and claim) has ended, whatever its outcome:
        #: the process's other duties wait for it at start (see Consumer.settled).
        self.first_round = threading.Event()

    def wake(self) -> None:
        with self.claims.slot:
            self.claims.slot.notify_all()

    def request_stop(self) -> None:
        """Stop after this round; a blocking pop under way is ended through the wake key
        (from another thread: a silent Redis must not hold up the caller)."""
        super().request_stop()
        if self._blocking:
            threading.Thread(
                target=self._interrupt, name=f"meepo-{self.task_id}-wake", daemon=True
            ).start()

    def _interrupt(self) -> None:
        try:
            self.d.wake(self.wake_key)
        except MeepoError as exc:  # the pop ends by itself within POP_TIMEOUT
            log.debug("task %s: could not wake the fetcher: %s", self.task_id, exc)

    def tick(self) -> float:
        try:
            self.run_once(timeout=POP_TIMEOUT, full_wait=FULL_WAIT)
        finally:
            self.first_round.set()
        return 0.0

    def failed(self, exc: Exception) -> None:
        if isinstance(exc, TransportUnavailableError):
            log.warning("task %s: cannot pop: %s (retrying)", self.task_id, exc)
        elif isinstance(exc, MeepoError):
            log.warning("task %s: claim failed: %s (retrying)", self.task_id, exc)
        else:  # the fetcher must never die silently
            log.exception("task %s: claim crashed (retrying)", self.task_id)

    def run_once(self, *, timeout: float = 0.0, full_wait: float = 0.0) -> Popped | None:
        """One round: pop and claim up to the free capacity, waiting up to ``timeout``
        on empty queues. None if there was no room (after waiting up to ``full_wait``
        for some); raises if the pop or the claim failed (the popped messages were
        handed back)."""
        claims = self.claims
        with claims.slot:
            free = claims.free()
            if free <= 0:
                if full_wait > 0:
                    claims.slot.wait(full_wait)
                return None
        # Flag the pop as blocking before looking at the stop request: a stop that
        # comes in between sees the flag and wakes it.
        self._blocking = timeout > 0
        if self._stop.is_set():
            timeout = 0.0  # stopping: take what is there, wait for nothing
        try:
            popped = self.d.pop_and_claim(
                min(free, MESSAGES_PER_CALL),
                timeout=timeout,
                lease=self._lease,
                worker=self.worker,
                monotonic=claims.monotonic,
                wake=self.wake_key if timeout > 0 else None,
            )
        finally:
            self._blocking = False
        counters = claims.counters
        for m in popped.malformed:
            counters.dropped += 1
            log.warning("task %s: dropped a malformed message %r", self.task_id, m[:80])
        if popped.stale:
            counters.dropped += popped.stale
            log.debug(
                "task %s: dropped %d stale or duplicate message(s)", self.task_id, popped.stale
            )
        jobs = popped.jobs
        if not jobs:
            return popped
        counters.claimed += len(jobs)
        codec = self.opts.serializer
        if codec is not None and not is_bytes(codec):
            for j in jobs:
                # The claim just made these (no one else holds them yet): the serializer
                # rides on the frozen Job so that ``job.data`` can decode its payload.
                object.__setattr__(j, "serializer", codec)
        if self.hooks is not None:  # middleware: after_claim
            self.hooks.after_claim(jobs)
        lease_end = popped.claimed_at + self.opts.lease
        wake = claims.progress_wake
        with claims.lock:
            claims.busy += len(jobs)
            held = claims.held
            for j in jobs:
                j.control.notify = wake
                held[j.id] = Claim(j.commit_id, j.priority, lease_end, j.control)
        submit = self.submit
        if log.isEnabledFor(logging.INFO):
            for j in jobs:
                log.info("task %s: job %d claimed (commit_id %d)", self.task_id, j.id, j.commit_id)
        for j in jobs:
            submit(j)
        return popped
