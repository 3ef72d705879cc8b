"""The shared shape of meepo's background duties (reaper, promoter, scheduler): one
daemon thread that calls ``tick()`` until stopped, waits what ``tick()`` asks between
calls, and backs off (logged, never silent) when a tick fails."""

from __future__ import annotations

import logging
import threading

from ..errors import MeepoError
from .consumer import Backoff


class Service:
    #: What the service is called in thread names and log lines.
    kind = "service"

    def __init__(self, task_id: str, log: logging.Logger, first_backoff: float) -> None:
        self.task_id = task_id
        self.log = log
        self._first_backoff = first_backoff
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> float:
        """One round of work; returns how long to wait before the next one (seconds)."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, name=f"meepo-{self.task_id}-{self.kind}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        backoff = Backoff(first=self._first_backoff, cap=10.0)
        while not self._stop.is_set():
            try:
                wait = self.tick()
            except MeepoError as exc:
                self.log.warning(
                    "task %s: %s pass failed: %s (retrying)", self.task_id, self.kind, exc
                )
                backoff.wait(self._stop)
                continue
            except Exception:  # never let a background duty die silently
                self.log.exception("task %s: %s pass crashed (retrying)", self.task_id, self.kind)
                backoff.wait(self._stop)
                continue
            backoff.reset()
            if wait > 0:
                self._stop.wait(wait)
