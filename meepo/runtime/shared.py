"""One thread for the same duty of several Tasks: a multi-task worker's reaper,
promoter, scheduler and cleaner threads.

A process that runs several Tasks (``meepo worker app:mails app:reports``) would run one
reaper, one promoter, one scheduler and one cleaner thread per Task. A
:class:`SharedLoop` runs the ticks of one kind of service for every Task on the same
database and Redis in one thread, each on its own schedule: a service's ``tick()``
returns how long it waits, as in its own thread; a tick that raises is logged by that
service and backs off that service only; due services take turns, so a service that
has more work at once (``tick()`` returned 0) never starves the others.

Why it is safe: every action of these services is a compare-and-set that any number of
processes may race (docs/design.md), so which thread runs it changes nothing but its
timing, and every wait inside a tick is bounded (invariant 9). The cost is that one
Task's long tick delays the others' ticks of the same kind by its length: a reaper
re-dispatching a whole queue after a Redis loss (page by page) holds back the other
Tasks' sweeps and lease scans until it is done (their zombies are reaped later, never
lost; the heartbeats, which keep running leases alive, are per consumer and not
shared). A Task's service runs only while ``active()`` says so (its consumer runs): a
Task waiting for its database at start, or stopped, is skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from .service import Service

log = logging.getLogger("meepo")

#: How often an inactive member (its Task not started, or stopped) is looked at again.
IDLE = 0.1


class SharedLoop:
    """The ticks of ``members`` (one service each, with the predicate that says when it
    runs) in one daemon thread."""

    def __init__(
        self, kind: str, members: Sequence[tuple[Service, Callable[[], bool]]], name: str = ""
    ) -> None:
        if not members:
            raise ValueError("a shared loop needs at least one service")
        self.kind = kind
        self.members = list(members)
        self.name = name or f"meepo-shared-{kind}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Ticks run, per member (tests).
        self.ticks = [0] * len(self.members)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """End the thread after its current tick; False if it still runs after
        ``timeout``."""
        self._stop.set()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            return False
        self._thread = None
        return True

    def run_once(self, now: float, due: list[float]) -> float:
        """Tick every member due at ``now`` (monotonic), updating ``due``; returns when
        the next one is due."""
        for i, (service, active) in enumerate(self.members):
            if self._stop.is_set():
                break
            if due[i] > now:
                continue
            if not active():
                due[i] = now + IDLE
                continue
            try:
                wait = service.tick()
            except Exception as exc:
                service.failed(exc)
                wait = service.backoff.next
                service.backoff.next = min(service.backoff.cap, service.backoff.next * 2)
            else:
                service.backoff.reset()
            self.ticks[i] += 1
            due[i] = time.monotonic() + max(0.0, wait)
        return min(due)

    def _loop(self) -> None:
        due = [0.0] * len(self.members)
        while not self._stop.is_set():
            try:
                nxt = self.run_once(time.monotonic(), due)
            except Exception:  # a bug here must not end every Task's duty silently
                log.exception("shared %s loop crashed (retrying)", self.kind)
                nxt = time.monotonic() + 1.0
            wait = nxt - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)
