"""A worker module for tests/process/test_recycle.py (not a test module)::

    meepo worker support.recycle_app:task --db URL --redis URL --max-jobs N

Its Task (id from ``RECYCLE_TASK``, ledger and Redis from the ``--db``/``--redis`` the
worker exports) appends ``<job id> <commit_id> <pid> <generation>`` to the file
``RECYCLE_LOG`` for each run. A payload ``leak:MB`` keeps MB megabytes alive for the
life of the process image, like a leaking handler.
"""

from __future__ import annotations

import os

from meepo import Job, Task
from support.fault_app import append_line

_leaked: list[bytes] = []


def handler(job: Job) -> None:
    kind, _, arg = job.payload.decode().partition(":")
    if kind == "leak":
        _leaked.append(b"x" * (int(arg) * 2**20))  # written, so resident
    generation = os.environ.get("MEEPO_WORKER_GENERATION", "1")
    append_line(os.environ["RECYCLE_LOG"], f"{job.id} {job.commit_id} {os.getpid()} {generation}")


# prefetch=1: a few claims ahead, given back at each recycle.
task = Task(
    os.environ["RECYCLE_TASK"],
    job_func=handler,
    poll_interval=0.2,
    zombie_timeout=5,
    prefetch=1,
)
