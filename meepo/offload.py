"""The async producer API's means: a small thread pool that runs the sync calls.

``await task.push_async(...)`` (and ``push_many_async``, ``get_async``, ``async with
task.batch()``) run the very same ``push`` / ``push_many`` / ``get`` / batch write as
the sync API, in one of :data:`WORKERS` threads of the Task's own pool, awaited with
``loop.run_in_executor``: the caller's event loop only schedules the call and resumes
when the future completes, so it is never blocked by the ledger's INSERT, the Redis
send, a slow database or a Redis outage (whose waits are bounded as for a sync push).

Why a bounded offload rather than async drivers (SQLAlchemy's asyncio extension and
``redis.asyncio``): a push is ledger first, then Redis, with unique keys, batches,
middleware hooks and the outage rules around it; async drivers would need a second
copy of that path (and of the ledger drivers' statements) to keep in step forever,
plus an async database driver per server. One code path keeps one set of guarantees.
The pool bounds what concurrent async pushes cost the database (at most WORKERS
connections of the Task's pool); more callers wait in the pool's queue, not on the
loop. ``benchmarks/async_push.py`` measures the loop's lag under 1,000 concurrent
``push_async`` calls.

Nothing here imports asyncio: a sync-only process never loads it for meepo's sake.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

#: Threads of one Task's offload pool (each holds at most one ledger connection).
WORKERS = 4


class Offload:
    """A lazily started thread pool for one Task's async producer calls."""

    def __init__(self, name: str, workers: int = WORKERS) -> None:
        self.name = name
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def pool(self) -> ThreadPoolExecutor:
        """The pool, started on first use (again in a forked child: the parent's
        threads are not there)."""
        pool, pid = self._pool, os.getpid()
        if pool is not None and self._pid == pid:
            return pool
        with self._lock:
            if self._pool is None or self._pid != pid:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=self.name)
                self._pid = pid
            return self._pool

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` in the pool, awaited: the running loop is never blocked by it."""
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(self.pool(), fn)

    def close(self) -> None:
        """Let the pool's threads end once their calls are done."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)
