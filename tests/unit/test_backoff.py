"""The background services' shared loop without a server: a failing tick is logged and
retried after an exponential backoff (capped), a good tick resets it, and ``stop()``
ends the thread."""

from __future__ import annotations

import logging
import threading

import pytest
from support.helpers import wait_for

from meepo.errors import MeepoError
from meepo.runtime.service import Backoff, Service


class Timed(threading.Event):
    """An event that records the waits asked of it instead of waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        return self.is_set()


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    backoff, stop = Backoff(first=0.1, cap=0.5), Timed()
    for _ in range(5):
        backoff.wait(stop)
    assert stop.waits == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    backoff.wait(stop)
    assert stop.waits[-1] == 0.1


class Flaky(Service):
    kind = "flaky"

    def __init__(self, failures: list[Exception]) -> None:
        super().__init__("t", logging.getLogger("meepo.test"), first_backoff=0.01, cap=0.02)
        self.failures = failures
        self.ticks = 0
        self.backoffs: list[float] = []

    def tick(self) -> float:
        self.backoffs.append(self.backoff.next)
        self.ticks += 1
        if self.failures:
            raise self.failures.pop(0)
        return 0.01


def test_a_failing_tick_is_logged_retried_after_a_backoff_and_reset_by_a_good_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = Flaky([MeepoError("db down"), RuntimeError("bug"), MeepoError("db down")])
    with caplog.at_level(logging.WARNING, logger="meepo.test"):
        service.start()
        try:
            wait_for(lambda: service.ticks >= 5, message="five ticks")
        finally:
            service.stop()
    assert not service.running
    # the backoff grew over the three failures (capped at 0.02), then reset to 0.01
    assert service.backoffs[:5] == [0.01, 0.02, 0.02, 0.02, 0.01]
    warnings = [r for r in caplog.records if "flaky pass failed: db down" in r.getMessage()]
    crashes = [r for r in caplog.records if "flaky pass crashed" in r.getMessage()]
    assert len(warnings) == 2 and len(crashes) == 1
    assert crashes[0].exc_info is not None  # an unexpected error keeps its traceback


def test_stop_without_start_and_twice_is_harmless() -> None:
    service = Flaky([])
    service.stop()
    service.start()
    wait_for(lambda: service.ticks >= 1, message="a tick")
    service.stop()
    service.stop()
    assert not service.running and service.join()
