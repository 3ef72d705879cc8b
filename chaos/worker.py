"""A chaos worker process: consumes the auto-commit task with ``task.run()`` and the
manual-commit task beside it, logging every handler run to ``exec-<pid>.jsonl``.

What a handler does is written in the job's payload by the producer (``{"k": kind}``):

auto task   ``normal`` a few ms · ``slow`` longer than the lease (the heartbeat must
            keep it) · ``flaky`` raises on its first attempt · ``poison`` always raises
manual task ``m-done`` / ``m-fail`` commit done / failed · ``m-retry`` commits todo on
            its first attempt, then done · ``m-none`` returns without committing (the
            reaper's zombie policy retries it, then fails it after max_failed_times)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

from meepo import Task
from meepo.errors import StaleCommitError
from meepo.records import Job

from .records import AppendLog


class PlannedFailure(RuntimeError):
    """A failure the workload asked for (flaky and poison jobs)."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--db", required=True)
    p.add_argument("--redis", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--auto-task", required=True)
    p.add_argument("--manual-task", required=True)
    p.add_argument("--log-dir", type=Path, required=True)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--manual-parallel", type=int, default=3)
    p.add_argument("--lease", type=float, default=6.0)
    p.add_argument("--zombie-timeout", type=float, default=10.0)
    p.add_argument("--zombie-period", type=float, default=2.0)
    p.add_argument("--max-failed-times", type=int, default=3)
    p.add_argument("--slow", type=float, default=9.0, help="seconds a slow handler takes")
    args = p.parse_args(argv)

    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    pid = os.getpid()
    out = AppendLog(args.log_dir / f"exec-{pid}.jsonl")

    def record(event: str, task: str, job: Job, **extra: object) -> None:
        out.write(
            e=event,
            task=task,
            job=job.id,
            cid=job.commit_id,
            att=job.failed_times + 1,
            pid=pid,
            ts=time.time(),
            **extra,
        )

    def work(kind: str) -> None:
        time.sleep(args.slow if kind == "slow" else random.uniform(0.0, 0.01))

    def handle_auto(job: Job) -> None:
        kind = json.loads(job.payload)["k"]
        record("start", "auto", job, kind=kind)
        work(kind)
        planned = kind == "poison" or (kind == "flaky" and job.failed_times == 0)
        record("end", "auto", job, out="raise" if planned else "ok")
        if planned:
            raise PlannedFailure(f"chaos: planned failure of a {kind} job")

    def handle_manual(job: Job) -> None:
        kind = json.loads(job.payload)["k"]
        record("start", "manual", job, kind=kind)
        work(kind)
        verdict = {
            "m-done": "done",
            "m-fail": "failed",
            "m-retry": "todo" if job.failed_times == 0 else "done",
        }.get(kind, "none")
        # The end record comes before the commit: a kill between the two must not look
        # like a done job whose handler never finished.
        record("end", "manual", job, out=verdict)
        if verdict == "none":
            return
        try:
            manual.commit(job.id, verdict, error="chaos: manual" if verdict != "done" else None)
        except StaleCommitError:
            record("stale", "manual", job, out=verdict)

    common = {
        "db": args.db,
        "redis": args.redis,
        "table_name": args.table,
        "lease": args.lease,
        "zombie_timeout": args.zombie_timeout,
        "zombie_period": args.zombie_period,
        "max_failed_times": args.max_failed_times,
        "shutdown_grace": args.slow + 5.0,
    }
    auto = Task(args.auto_task, job_func=handle_auto, parallel_num=args.parallel, **common)
    manual = Task(
        args.manual_task,
        job_func=handle_manual,
        parallel_num=args.manual_parallel,
        auto_commit=False,
        **common,
    )
    manual.start()
    try:
        auto.run()
    finally:
        manual.stop()
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
