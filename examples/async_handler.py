"""Async handlers, the async producer API and a burst worker.

An ``async def`` handler runs on an event loop (one per consumer), up to
``parallel_num`` coroutines at once: 200 jobs that each wait 50 ms for "the network"
take a fraction of a second with ``parallel_num=50``, not 10 s. ``job_timeout``
cancels a coroutine that runs too long (the handler sees ``CancelledError``; the
attempt fails as a timeout). The jobs are pushed from async code with
``await task.push_many_async(...)``, which never blocks the caller's event loop, and
consumed by ``task.run(burst=True)``, which returns once nothing is left to do.

Connection: ``MEEPO_DB_URL`` and ``MEEPO_REDIS_URL`` if set, else the embedded default
(SQLite and a redis-server started on demand under ``./.meepo``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

from meepo import Job, Status, Task

JOBS = 200
cancelled: list[int] = []


async def fetch(job: Job) -> None:
    """Stands for an HTTP call or a query through an async client."""
    if job.payload == b"too slow":
        try:
            await asyncio.sleep(60)  # job_timeout cancels this await
        except asyncio.CancelledError:
            cancelled.append(job.id)  # clean up here, then let it propagate
            raise
    await asyncio.sleep(0.05)


task = Task(
    "async_handler_example",
    db=os.environ.get("MEEPO_DB_URL"),  # None: the embedded SQLite default
    redis=os.environ.get("MEEPO_REDIS_URL"),  # None: the embedded redis-server
    job_func=fetch,  # async def: runs on the consumer's event loop
    parallel_num=50,  # coroutines at once
    job_timeout=1.0,  # a coroutine still running after 1 s is cancelled
    max_failed_times=1,  # no retry, so the timed-out job ends failed
    init_db=True,
)


async def produce() -> list[int]:
    """A producer inside an async app: the pushes run off the event loop."""
    ids = await task.push_many_async([b"https://example.org/%d" % n for n in range(JOBS)])
    ids.append(await task.push_async(b"too slow"))
    return ids


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ids = asyncio.run(produce())
    print(f"pushed {len(ids)} jobs from async code")
    began = time.monotonic()
    task.run(burst=True)  # consume until nothing is due or in hand, then return
    took = time.monotonic() - began
    records = [task.get(job_id) for job_id in ids]
    done = [r for r in records if r is not None and r.status is Status.DONE]
    failed = [r for r in records if r is not None and r.status is Status.FAILED]
    for r in failed:
        print(f"job {r.id}: {r.status.value}, last_error={r.last_error!r}")
    if len(done) != JOBS or [r.id for r in failed] != [ids[-1]] or cancelled != [ids[-1]]:
        print("async_handler: unexpected outcome")
        return 1
    print(
        f"async_handler: {len(done)} jobs done in {took:.1f}s (50 at once), "
        f"1 cancelled by job_timeout"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
