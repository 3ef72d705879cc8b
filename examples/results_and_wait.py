"""JSON payloads, stored results and ``task.wait``, in one short run.

* a task with ``serializer="json"`` takes any JSON value as a payload; the handler reads
  it as ``job.data`` and returns a dict, stored with the job (``store_results=True``);
* ``task.wait(job_id, timeout=...)`` returns the finished job's record, ``rec.result``
  decoded: it wakes on the commit's notice through Redis, no polling loop in the app;
* a payload JSON cannot hold is refused at the push, naming what and where;
* a result over ``max_result_bytes`` fails the job (not retried), and says why;
* a wait that runs out of time is a ``WaitTimeoutError`` (a ``TimeoutError``).

Connection: ``MEEPO_DB_URL`` and ``MEEPO_REDIS_URL`` if set, else the embedded default.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from meepo import Job, PayloadError, Status, Task, WaitTimeoutError


def word_count(job: Job) -> dict[str, Any]:
    text: str = job.data["text"]
    if job.data.get("huge"):
        return {"padding": "x" * 5000}  # over max_result_bytes below
    return {"words": len(text.split()), "first": text.split()[0] if text else None}


def main() -> int:
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    db, redis = os.environ.get("MEEPO_DB_URL"), os.environ.get("MEEPO_REDIS_URL")
    task = Task(
        "results_example",
        db=db,
        redis=redis,
        job_func=word_count,
        serializer="json",
        store_results=True,
        max_result_bytes=1024,
        init_db=True,
    )
    producer = Task("results_example_idle", db=db, redis=redis, serializer="json")
    ok = True
    with task:
        task.start()
        job_id = task.push({"text": "the quick brown fox", "lang": "en"})
        rec = task.wait(job_id, timeout=30)
        print(f"job {job_id}: {rec.status.value}, result {rec.result}, payload {rec.data}")
        ok &= rec.status is Status.DONE and rec.result == {"words": 4, "first": "the"}

        try:
            task.push({"text": "tags", "tags": {"a", "b"}})
            ok = False
        except PayloadError as exc:
            print(f"refused at push: {exc}")

        big = task.wait(task.push({"text": "big", "huge": True}), timeout=30)
        print(f"job {big.id}: {big.status.value} after {big.failed_times} run: {big.last_error}")
        ok &= big.status is Status.FAILED and big.failed_times == 1

    never = producer.push({"text": "nobody consumes results_example_idle"})
    try:
        producer.wait(never, timeout=0.5)
        ok = False
    except WaitTimeoutError as exc:
        print(f"wait gave up: {exc}")
    if not ok:
        print("results_and_wait: unexpected outcome")
        return 1
    print("results_and_wait: results stored, waits woken, bad values refused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
