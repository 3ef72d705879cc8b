"""The shared shape of meepo's background duties: one daemon thread that calls
``tick()`` until stopped, waits what ``tick()`` asks between calls, and backs off
(logged, never silent) when a tick fails.

Every duty is a :class:`Service`: the reaper, the promoter and the scheduler, and the
consumer's own fetcher, committer, heartbeat, starter and watchdog (see
:mod:`meepo.runtime.consumer`). A test drives one without its thread by calling its
``run_once()`` (or ``tick()``) directly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..errors import MeepoError

#: How often a service waiting for ``not_before`` looks again (seconds).
READY_POLL = 0.005


class Backoff:
    """Exponential wait between retries against a server that is down."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first, self.cap, self.next = first, cap, first

    def wait(self, stop: threading.Event) -> None:
        stop.wait(self.next)
        self.next = min(self.cap, self.next * 2)

    def reset(self) -> None:
        self.next = self.first


class Service:
    """Start/stop and the loop around :meth:`tick`.

    ``stop()`` is :meth:`request_stop` (set the stop event and :meth:`wake` a tick that
    blocks) then :meth:`join`; a service whose stop must let queued work finish first
    (the committer) overrides :meth:`request_stop`."""

    #: What the service is called in thread names and log lines.
    kind = "service"

    def __init__(
        self, task_id: str, log: logging.Logger, first_backoff: float, cap: float = 10.0
    ) -> None:
        self.task_id = task_id
        self.log = log
        self.backoff = Backoff(first=first_backoff, cap=cap)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: If set, the thread's first tick waits until it returns True (Task sets the
        #: consumer's ``settled``: the duties begin after the first claim).
        self.not_before: Callable[[], bool] | None = None

    def tick(self) -> float:
        """One round of work; returns how long to wait before the next one (seconds)."""
        raise NotImplementedError

    def failed(self, exc: Exception) -> None:
        """Log a tick that raised (it is retried after a backoff)."""
        if isinstance(exc, MeepoError):
            self.log.warning("task %s: %s pass failed: %s (retrying)", self.task_id, self.kind, exc)
        else:  # never let a background duty die silently
            self.log.exception("task %s: %s pass crashed (retrying)", self.task_id, self.kind)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""
        return self._stop.is_set()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, name=f"meepo-{self.task_id}-{self.kind}", daemon=True
        )
        self._thread.start()

    def wake(self) -> None:
        """Interrupt a tick that waits for work (nothing to do by default)."""

    def request_stop(self) -> None:
        """Ask the thread to end after its current tick."""
        self._stop.set()
        self.wake()

    def join(self, timeout: float | None = 10.0) -> bool:
        """Wait for the thread to end; False if it is still running after ``timeout``."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            return False
        self._thread = None
        return True

    def stop(self, timeout: float = 10.0) -> None:
        self.request_stop()
        self.join(timeout)
        self._thread = None

    def _loop(self) -> None:
        backoff = self.backoff
        ready = self.not_before
        while ready is not None and not ready() and not self._stop.is_set():
            self._stop.wait(READY_POLL)
        while not self._stop.is_set():
            try:
                wait = self.tick()
            except Exception as exc:
                self.failed(exc)
                backoff.wait(self._stop)
                continue
            backoff.reset()
            if wait > 0:
                self._stop.wait(wait)
