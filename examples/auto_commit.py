"""Auto commit mode, after the original Meepo example.

The handler's return commits the job ``done``; an exception counts a failed attempt and
re-queues the job, until the ``max_failed_times``-th failure commits it ``failed``. Here
every job whose id is a multiple of 99 fails, so those jobs end ``failed`` after three
attempts and all the others end ``done``.

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
TIMEOUT = 60.0

print_lock = threading.Lock()


def say(text: str) -> None:
    """print() from many handler threads without interleaving lines."""
    with print_lock:
        print(text, flush=True)


def my_job(job: Job) -> None:
    """The consumer function: its return is the commit, an exception a failed attempt."""
    say(f"MyJob assigned job: {job.id} {job.payload.decode()} (attempt {job.failed_times + 1})")
    # job.id and job.failed_times can be tied to your own records (idempotency keys).
    # then, do something ...
    if job.id % 99 == 0:
        raise RuntimeError("mock error")
    # no commit here: in auto mode, calling task.commit() raises CommitModeError


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    mytask = Task(
        "my_task_0831",  # task id, required
        db=os.environ.get("MEEPO_DB_URL"),  # None: the embedded SQLite default
        redis=os.environ.get("MEEPO_REDIS_URL"),  # None: the embedded redis-server
        job_func=my_job,  # the consumer function: consumers run where it is given
        parallel_num=10,  # consumer threads in this process
        max_failed_times=3,  # the 3rd failure of a job commits it `failed`
        zombie_dst_status=Status.TODO,  # expired leases: todo re-queues, done/failed close
        zombie_period=20.0,  # how often the reaper looks for expired leases (seconds)
        zombie_timeout=20.0,  # the lease: a job not heartbeaten for this long is a zombie
        zombie_limit=1000,  # rows the reaper reads per pass
        # table_name="t_my_job_0831",  # a ledger table of its own (default: meepo_jobs)
        # list_name_prefix="l_my_job_0831:",  # Redis key prefix (default: meepo:)
        init_db=True,  # bring the ledger schema to head (runs the Alembic migrations)
    )
    # Producers usually run elsewhere; any process can push with a Task built like this
    # one (job_func may be left out there).
    ids = mytask.push_many([f"hello {n}".encode() for n in range(JOBS)])
    print(f"pushed {len(ids)} jobs: ids {ids[0]}..{ids[-1]}")

    mytask.start()  # consumers and reaper in background threads; mytask.run() blocks instead
    pending = set(ids)
    deadline = time.monotonic() + TIMEOUT
    try:
        while pending:
            for job_id in list(pending):
                rec = mytask.get(job_id)
                if rec is not None and rec.status.terminal:
                    pending.discard(job_id)
            if pending and time.monotonic() > deadline:
                print(f"auto_commit: {len(pending)} jobs still unfinished after {TIMEOUT:.0f}s")
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
        print("auto_commit: unexpected outcome")
        return 1
    print(f"auto_commit: {len(ids)} jobs finished: {len(done)} done, {len(failed)} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
