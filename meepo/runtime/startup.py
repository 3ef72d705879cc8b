"""Starting a consumer while its servers are down.

A worker that starts before its database is reachable (a deploy racing the database's
own start, a failover) must not crash: it waits with backoff, logs one line per step,
and starts consuming by itself once the database answers. A missing or outdated schema
is not an outage: it is raised at once, or as soon as the database answers.
Redis needs no such wait: the fetcher and the reaper retry it with backoff on their own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..errors import UnavailableError
from .service import Backoff

log = logging.getLogger("meepo")

#: Backoff between start attempts while the database is down (seconds).
FIRST_RETRY, MAX_RETRY = 0.5, 10.0


def wait_until_ready(
    prepare: Callable[[], None],
    stop: threading.Event,
    task_id: str,
    first: UnavailableError | None = None,
) -> bool:
    """Call ``prepare`` until it no longer raises UnavailableError; True once it
    succeeded, False if ``stop`` was set first. Any other error propagates. ``first``:
    the error of an attempt the caller already made (logged, then waited for)."""
    backoff = Backoff(FIRST_RETRY, MAX_RETRY)
    error = first
    while not stop.is_set():
        if error is not None:
            log.warning(
                "task %s: cannot start consuming yet: %s (retrying in %.1fs)",
                task_id,
                error,
                backoff.next,
            )
            backoff.wait(stop)
            if stop.is_set():
                break
        try:
            prepare()
            return True
        except UnavailableError as exc:
            error = exc
    return False
