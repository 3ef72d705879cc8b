"""Delayed jobs, retry backoff, priorities, unique keys and a batch, in one short run.

* three reminders pushed with ``delay=`` and ``run_at=`` start at their due time, never
  before (the script prints how late each one started);
* a flaky job fails twice and is retried after the ``retry_backoff`` waits (0.5 s, 1 s);
* a ``high`` job pushed after a backlog of ``low`` ones runs first;
* a second push with the same ``key`` returns the first job's id and writes nothing;
* a batch writes its jobs in one transaction, and dispatches them after it commits.

Connection: ``MEEPO_DB_URL`` and ``MEEPO_REDIS_URL`` if set, else the embedded default.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

from meepo import Job, Status, Task

TIMEOUT = 60.0

lock = threading.Lock()
started: dict[int, datetime] = {}
order: list[str] = []


def handler(job: Job) -> None:
    now = datetime.now(timezone.utc)
    with lock:
        started.setdefault(job.id, now)
        order.append(job.payload.decode())
    if job.payload == b"flaky" and job.failed_times < 2:
        raise RuntimeError(f"flaky failure #{job.failed_times + 1}")


def wait_done(task: Task, ids: list[int]) -> bool:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        records = [task.get(i) for i in ids]
        if all(r is not None and r.status.terminal for r in records):
            return True
        time.sleep(0.05)
    return False


def main() -> int:
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    task = Task(
        "delayed_example",
        db=os.environ.get("MEEPO_DB_URL"),
        redis=os.environ.get("MEEPO_REDIS_URL"),
        job_func=handler,
        parallel_num=1,  # one thread: the priority order below is easy to see
        prefetch=0,
        retry_backoff=[0.5, 1.0],
        init_db=True,
    )
    # A backlog of low-priority jobs, then one high: pushed before consumers start.
    low = task.push_many([b"low %d" % i for i in range(3)], priority="low")
    high = task.push(b"high", priority="high")

    soon = datetime.now(timezone.utc)
    reminders = [
        task.push(b"reminder +1.0s", delay=1.0),
        task.push(b"reminder +1.5s", delay=timedelta(seconds=1.5)),
        task.push(b"reminder at +2s", run_at=soon + timedelta(seconds=2)),
    ]
    flaky = task.push(b"flaky")
    invoice = task.push(b"invoice", key="invoice-2026-11")
    again = task.push(b"invoice again", key="invoice-2026-11")
    print(f"unique key: second push returned job {again}, the first was {invoice}")

    with task.batch() as batch:
        batch.push(b"batch a")
        batch.push(b"batch b", delay=0.5)
    print(f"batch: jobs {batch.ids} written in one transaction")

    task.start()
    ids = [*low, high, *reminders, flaky, invoice, *batch.ids]
    try:
        if not wait_done(task, ids):
            print("delayed: jobs still unfinished after the timeout")
            return 1
    finally:
        task.stop()

    early = 0
    for job_id in reminders:
        rec = task.get(job_id)
        assert rec is not None
        late_ms = (started[job_id] - rec.run_at).total_seconds() * 1000
        early += late_ms < 0
        print(f"job {job_id} {rec.payload.decode()!r}: started {late_ms:.0f} ms after its run_at")
    rec = task.get(flaky)
    assert rec is not None
    print(f"flaky job: {rec.status.value} after {rec.failed_times} failed attempts")
    print(f"first jobs run: {order[:4]}")
    ok = (
        early == 0
        and again == invoice
        and rec.status is Status.DONE
        and rec.failed_times == 2
        and order[0] == "high"
    )
    if not ok:
        print("delayed: unexpected outcome")
        return 1
    print("delayed: every job ran on time, in priority order, exactly as planned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
