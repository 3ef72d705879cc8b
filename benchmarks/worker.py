"""A meepo drain worker for the benchmark (``python -m benchmarks.worker --help``).

Builds the same Task as the producer with a no-op ``job_func``, connects to both stores,
prints ``ready``, calls ``task.start()`` on ``go``, and on ``stop`` stops the task and
prints one JSON line: its peak RSS, the consumer's counters and how many jobs the
starter's statements marked started (see ``common.py``).

The other workloads: ``--sleep S`` (a handler that sleeps in its thread),
``--async-sleep S`` (an ``async def`` handler awaiting ``asyncio.sleep``),
``--result`` (the handler returns ``b"ok"``) with ``--store-results``, and
``--start-delay S``, which sets the starter's START_RECORD_DELAY in this process only
(0: every job still running when the starter looks is marked; a large value: none is,
their commits mark them): a benchmark-only override, not an option of meepo.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from typing import Any

from sqlalchemy import text

from meepo import Task
from meepo.dispatch import Dispatcher
from meepo.runtime import starter

from .common import announce_ready, peak_rss_kb, report
from .peers import probe


def noop(_job: Any) -> None:
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--db", required=True)
    p.add_argument("--redis", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--table", default=None)
    p.add_argument("--parallel", type=int, default=10)
    p.add_argument("--prefetch", type=int, default=None)
    p.add_argument(
        "--probe",
        default=None,
        help="report each job's start to this probe key (payload: the push time)",
    )
    p.add_argument("--sleep", type=float, default=0.0, help="each job sleeps (seconds)")
    p.add_argument(
        "--async-sleep", type=float, default=None, help="async def handler: awaits (seconds)"
    )
    p.add_argument("--result", action="store_true", help='the handler returns b"ok"')
    p.add_argument("--store-results", action="store_true")
    p.add_argument(
        "--start-delay", type=float, default=None, help="START_RECORD_DELAY in this process"
    )
    args = p.parse_args(argv)
    if args.start_delay is not None:
        starter.START_RECORD_DELAY = args.start_delay
    marked = count_start_marks()
    job_func: Any = noop
    if args.async_sleep is not None:
        pause = args.async_sleep

        async def job_func(_job: Any) -> None:
            await asyncio.sleep(pause)

    elif args.sleep:
        pause = args.sleep

        def job_func(_job: Any) -> None:
            time.sleep(pause)

    elif args.result:

        def job_func(_job: Any) -> bytes:
            return b"ok"

    if args.probe:
        os.environ[probe.URL_ENV] = args.redis
        os.environ[probe.KEY_ENV] = args.probe

        def job_func(job: Any) -> None:
            probe.tick(float(job.payload or 0))

    task = Task(
        args.task,
        db=args.db,
        redis=args.redis,
        job_func=job_func,
        parallel_num=args.parallel,
        prefetch=args.prefetch,
        table_name=args.table,
        store_results=args.store_results,
    )
    with task.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    task.redis.ping()
    if not announce_ready():
        return 1
    task.start()
    consumer = task.consumer
    sys.stdin.readline()  # "stop", or EOF when the parent went away
    clean = task.stop(wait=True, grace=10)
    report(
        {
            "rss_kb": peak_rss_kb(),
            "clean": clean,
            "counters": dataclasses.asdict(consumer.counters) if consumer else None,
            "start_statements": marked[0],
            "start_marked": marked[1],
        }
    )
    return 0


def count_start_marks() -> list[int]:
    """Count the start-mark statements and the jobs they marked (``[statements, jobs]``,
    updated in place; a job that ended before the starter looked is marked by its commit
    instead, uncounted)."""
    count = [0, 0]
    real = Dispatcher.start

    def start(self: Dispatcher, pairs: Any) -> int:
        n = real(self, pairs)
        count[0] += 1
        count[1] += n
        return n

    Dispatcher.start = start  # type: ignore[method-assign]
    return count


if __name__ == "__main__":
    sys.exit(main())
