"""A meepo drain worker for the benchmark (``python -m benchmarks.worker --help``).

Builds the same Task as the producer with a no-op ``job_func``, connects to both stores,
prints ``ready``, calls ``task.start()`` on ``go``, and on ``stop`` stops the task and
prints one JSON line: its peak RSS and the consumer's counters (see ``common.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from sqlalchemy import text

from meepo import Task

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
    args = p.parse_args(argv)
    job_func: Any = noop
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
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
