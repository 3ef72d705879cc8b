"""Cron and periodic schedules.

A schedule is declared by name, usually at application start-up in every process:
declaring it again with the same settings changes nothing, so the schedule is neither
duplicated nor reset. Every process that runs consumers (``task.start()``,
``task.run()``, ``meepo worker``) also runs a scheduler; however many there are, each
fire time makes exactly one job, whose ``run_at`` is the fire time.

Here: an every-2-seconds schedule and a 6-field cron schedule (the sixth field is the
second: ``*/3`` fires at seconds 0, 3, 6, …), each run a few times, then removed.

Connection: ``MEEPO_DB_URL`` and ``MEEPO_REDIS_URL`` if set, else the embedded default.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import Counter

from meepo import Job, Task

RUNS = 3
TIMEOUT = 60.0

ran: Counter[bytes] = Counter()
lock = threading.Lock()


def handle(job: Job) -> None:
    with lock:
        ran[job.payload] += 1
        print(f"  job {job.id}: {job.payload.decode()} (run {ran[job.payload]})", flush=True)


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    task = Task(
        f"cron_{time.strftime('%Y%m%d_%H%M%S')}_{os.getpid()}",
        db=os.environ.get("MEEPO_DB_URL"),
        redis=os.environ.get("MEEPO_REDIS_URL"),
        job_func=handle,
        parallel_num=2,
        init_db=True,
    )
    for _ in range(2):  # as every process would at start-up: the second changes nothing
        task.schedule_every("heartbeat", 2, b"every 2 s")
        task.schedule_cron("tick", "* * * * * */3", b"cron */3 s", tz="Europe/Paris")
    for s in task.schedules():
        print(f"schedule {s.name}: {s.kind} {s.expr!r}, next {task.next_fires(s.name, 3)[0]}")

    task.start()
    deadline = time.monotonic() + TIMEOUT
    try:
        while min(ran[b"every 2 s"], ran[b"cron */3 s"]) < RUNS:
            if time.monotonic() > deadline:
                print(f"cron: gave up after {TIMEOUT:.0f}s: {dict(ran)}")
                return 1
            time.sleep(0.1)
    finally:
        task.stop(wait=True)
        for name in ("heartbeat", "tick"):
            task.unschedule(name)

    # One job per fire time: each schedule's jobs have distinct run_at (its fire times).
    jobs = [task.get(i) for i, _, _, _ in task.ledger.find(task_id=task.task_id)]
    due = [(j.payload, j.run_at) for j in jobs if j is not None]
    if len(due) != len(set(due)):
        print(f"cron: two jobs for one fire time: {sorted(due)}")
        return 1
    print(
        f"cron: every-2s ran {ran[b'every 2 s']} times, cron ran {ran[b'cron */3 s']} times, "
        "one job per fire time"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
