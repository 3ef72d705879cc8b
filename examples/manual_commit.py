"""Manual commit mode, after the original Meepo example.

With ``auto_commit=False`` the handler decides each job's status itself with
``task.commit()``: ``done``, ``todo`` (run it again; counts a failed attempt) or
``failed``. Here every job whose id is a multiple of 99 fails; the handler re-queues it
until its fifth attempt and then commits it ``failed``. A handler that returned without
committing would leave its job to the reaper (see ``zombie_dst_status``).

Connection: ``MEEPO_DB_URL`` and ``MEEPO_REDIS_URL`` if set, else the embedded default
(SQLite and a redis-server started on demand under ``./.meepo``). The script pushes its
jobs, consumes them, prints a summary and exits.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from meepo import Job, Status, Task

JOBS = 100
MAX_ATTEMPTS = 5
TIMEOUT = 60.0

mytask: Task

print_lock = threading.Lock()


def say(text: str) -> None:
    """print() from many handler threads without interleaving lines."""
    with print_lock:
        print(text, flush=True)


def my_job(job: Job) -> None:
    """The consumer function: it commits every job it is given, whatever happens."""
    succ = False
    error = None
    try:
        say(f"MyJob assigned job: {job.id} {job.payload.decode()} (attempt {job.failed_times + 1})")
        # Check for idempotency first: the job may have run before (at-least-once),
        # e.g. look up job.id in your own records.
        # then, do something ...
        if job.id % 99 == 0:
            raise RuntimeError("mock error")
        succ = True
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        if succ:
            mytask.commit(job.id, Status.DONE)
        elif job.failed_times + 1 >= MAX_ATTEMPTS:
            mytask.commit(job.id, Status.FAILED, error=error)
        else:
            # back on the queue at once; delay=seconds would postpone the next attempt
            mytask.commit(job.id, Status.TODO, error=error)


def main() -> int:
    global mytask
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    mytask = Task(
        "my_task_0831_manual",  # task id, required
        db=os.environ.get("MEEPO_DB_URL"),  # None: the embedded SQLite default
        redis=os.environ.get("MEEPO_REDIS_URL"),  # None: the embedded redis-server
        job_func=my_job,
        parallel_num=10,
        auto_commit=False,  # the handler commits; a job it never commits goes to the reaper
        zombie_dst_status=Status.TODO,  # expired leases: todo re-queues, done/failed close
        zombie_period=20.0,
        zombie_timeout=20.0,
        zombie_limit=1000,
        init_db=True,
    )
    ids = mytask.push_many([f"hello {n}".encode() for n in range(JOBS)])
    print(f"pushed {len(ids)} jobs: ids {ids[0]}..{ids[-1]}")

    mytask.start()
    pending = set(ids)
    deadline = time.monotonic() + TIMEOUT
    try:
        while pending:
            for job_id in list(pending):
                rec = mytask.get(job_id)
                if rec is not None and rec.status.terminal:
                    pending.discard(job_id)
            if pending and time.monotonic() > deadline:
                print(f"manual_commit: {len(pending)} jobs still unfinished after {TIMEOUT:.0f}s")
                return 1
            time.sleep(0.1)
    finally:
        mytask.stop(wait=True)

    records = [mytask.get(job_id) for job_id in ids]
    failed = [r for r in records if r is not None and r.status is Status.FAILED]
    done = [r for r in records if r is not None and r.status is Status.DONE]
    for r in failed:
        print(f"job {r.id}: failed after {r.failed_times} attempts, last_error={r.last_error!r}")
    expected = {job_id for job_id in ids if job_id % 99 == 0}
    if {r.id for r in failed} != expected or len(done) + len(failed) != len(ids):
        print("manual_commit: unexpected outcome")
        return 1
    print(f"manual_commit: {len(ids)} jobs finished: {len(done)} done, {len(failed)} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
