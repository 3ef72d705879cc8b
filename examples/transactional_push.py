"""Pushing jobs inside your own SQLAlchemy transaction.

``task.push(payload, connection=...)`` inserts the job's ledger row in the caller's
transaction instead of committing one of its own, so the job exists if and only if the
caller's transaction commits: write your business rows and their jobs atomically.

* With a ``Session``, meepo hooks the session's commit and dispatches the job to Redis
  right after it; a rollback discards it.
* With a ``Connection`` (``engine.begin()``), meepo cannot see the commit, so the row is
  written as "not dispatched yet" and the reaper's dispatch sweep sends it on its next
  tick (``poll_interval``) in any process consuming the task.

The ledger table must be in the database your transaction runs on. Here the task's own
engine (``task.engine``) plays the application's; you may equally pass your own Engine
as ``db=``.

Connection: ``MEEPO_DB_URL`` and ``MEEPO_REDIS_URL`` if set, else the embedded default.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from sqlalchemy.orm import Session

from meepo import Job, Task

TIMEOUT = 30.0

seen: list[bytes] = []
seen_lock = threading.Lock()


def handle(job: Job) -> None:
    with seen_lock:  # also keeps the handler threads' lines whole
        seen.append(job.payload)
        print(f"  consumer ran job {job.id}: {job.payload!r}", flush=True)


def wait_until(what: str, predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"transactional_push: gave up after {TIMEOUT:.0f}s waiting for {what}")
        time.sleep(0.05)


class Cancelled(Exception):
    """Raised to roll a transaction back."""


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run = f"txn_push_{time.strftime('%Y%m%d_%H%M%S')}_{os.getpid()}"
    task = Task(
        run,
        db=os.environ.get("MEEPO_DB_URL"),
        redis=os.environ.get("MEEPO_REDIS_URL"),
        job_func=handle,
        parallel_num=2,
        poll_interval=0.25,  # reaper tick: how soon Connection pushes are dispatched
        init_db=True,
    )
    engine = task.engine

    # 1. A Session: the job is sent to Redis right after session.commit().
    with Session(engine) as session:
        # session.add(Order(...))  # your own rows, same transaction
        session_id = task.push(b"invoice 7 sent", connection=session)
        session.commit()
    print(f"Session committed: job {session_id}")

    # 2. A Connection: the rows commit with the block; the reaper's sweep sends them.
    with engine.begin() as conn:
        # conn.execute(insert(orders).values(...))
        conn_ids = task.push_many([b"order 1 shipped", b"order 2 shipped"], connection=conn)
    print(f"Connection committed: jobs {conn_ids}")

    # 3. Rolled back: no row, no message, the handler never sees it.
    try:
        with engine.begin() as conn:
            lost = task.push(b"rolled back (Connection)", connection=conn)
            raise Cancelled
    except Cancelled:
        pass
    exists = task.get(lost) is not None
    print(f"Connection rolled back: job {lost} exists afterwards: {exists}")
    if exists:
        return 1
    with Session(engine) as session:
        lost = task.push(b"rolled back (Session)", connection=session)
        session.rollback()
    exists = task.get(lost) is not None
    print(f"Session rolled back: job {lost} exists afterwards: {exists}")
    if exists:
        return 1

    # Consumers (here in the same process, usually elsewhere) run the committed jobs.
    committed = [session_id, *conn_ids]

    def all_done() -> bool:
        recs = [task.get(i) for i in committed]
        return all(r is not None and r.status.terminal for r in recs)

    task.start()
    try:
        wait_until("the committed jobs", all_done)
    finally:
        task.stop(wait=True)

    with seen_lock:
        ran = list(seen)
    if any(p.startswith(b"rolled back") for p in ran):
        print("transactional_push: a rolled-back job was dispatched")
        return 1
    print(f"transactional_push: {len(committed)} committed jobs ran, rolled-back jobs ran: 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
