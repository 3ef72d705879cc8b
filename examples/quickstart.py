"""meepo in one run: push, consume, retry, commit by hand, recover a zombie.

This is what ``make demo`` runs. Without ``MEEPO_DB_URL`` / ``MEEPO_REDIS_URL`` it uses
the embedded default: a SQLite ledger and a redis-server started on demand, both under
``./.meepo`` (or ``MEEPO_HOME``). With those variables set it runs unchanged against
MySQL/MariaDB or PostgreSQL and a real Redis.

Every run uses the same two task ids (``quickstart_auto``, ``quickstart_manual``), so
running it again adds jobs, not tasks, to what ``meepo stats`` shows. Ctrl-C stops it
quietly (the consumers finish what they run, exit status 130).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable

from meepo import Job, JobRecord, StaleCommitError, Status, Task

TIMEOUT = 30.0  # seconds allowed for each step before the demo gives up


class _NoTraceback(logging.Formatter):
    """One line per log record: the demo's failures are on purpose."""

    def formatException(self, ei: object) -> str:
        return ""


def show_meepo_warnings() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_NoTraceback("    [meepo] %(message)s"))
    log = logging.getLogger("meepo")
    log.addHandler(handler)
    log.setLevel(logging.WARNING)


_print_lock = threading.Lock()


def say(text: str) -> None:
    """Print one line; handlers print from their own threads."""
    with _print_lock:
        print(text, flush=True)


def wait_until(what: str, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll ``predicate`` until it holds; give up (exit 1) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"quickstart: gave up after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def finished(task: Task, ids: Iterable[int]) -> bool:
    for job_id in ids:
        rec = task.get(job_id)
        if rec is None or not rec.status.terminal:
            return False
    return True


def describe(rec: JobRecord | None) -> str:
    if rec is None:
        return "no such job"
    text = f"job {rec.id}: {rec.status.value:<6} failed_times={rec.failed_times}"
    text += f" commit_id={rec.commit_id} payload={rec.payload!r}"
    if rec.last_error:
        text += f"\n        last_error={rec.last_error!r}"
    return text


def auto_commit_part() -> int:
    say("\n1. Auto commit: the handler's return is the commit, an exception a retry")

    def handler(job: Job) -> None:
        attempt = job.failed_times + 1
        if job.payload == b"flaky" and job.failed_times == 0:
            say(f"    handler: job {job.id} attempt {attempt} {job.payload!r} -> raises")
            raise RuntimeError("flaky dependency timed out")
        say(f"    handler: job {job.id} attempt {attempt} {job.payload!r} -> ok")

    task = Task(
        "quickstart_auto",
        job_func=handler,
        parallel_num=4,
        max_failed_times=3,  # the third failure would commit `failed`
        init_db=True,  # bring the ledger schema to head (the Alembic migrations)
    )
    say(f"    {task!r}")
    first = task.push(b"hello")
    more = task.push_many([b"flaky", b"world", b"again"])
    ids = [first, *more]
    say(f"    push() -> job {first}; push_many() -> jobs {more}")
    say(f"    before any consumer runs, the ledger already has {describe(task.get(first))}")

    try:  # from the start on: a Ctrl-C at any point still stops the consumers
        task.start()
        say("    consumers started; waiting for every job to finish")
        wait_until("the auto-commit jobs", lambda: finished(task, ids))
    finally:
        task.stop(wait=True)
    for job_id in ids:
        say(f"    {describe(task.get(job_id))}")
    return first


def manual_commit_part() -> None:
    say("\n2. Manual commit, and a zombie recovered by the reaper")
    say("   (the handler commits by itself; one job is abandoned on its first attempt)")
    first_claims: dict[int, int] = {}
    lock = threading.Lock()

    def handler(job: Job) -> None:
        with lock:
            first_claims.setdefault(job.id, job.commit_id)
        if job.payload == b"abandon me" and job.failed_times == 0:
            say(
                f"    handler: job {job.id} (commit_id {job.commit_id}) returns without a "
                "commit: its lease will run out"
            )
            return
        say(f"    handler: job {job.id} (commit_id {job.commit_id}) commits done")
        task.commit(job.id, Status.DONE)

    task = Task(
        "quickstart_manual",
        job_func=handler,
        auto_commit=False,
        parallel_num=2,
        zombie_dst_status=Status.TODO,  # a zombie goes back to the queue
        zombie_timeout=1.0,  # the lease: 1 s (default 20 s), short for the demo
        zombie_period=0.5,  # look for expired leases every 0.5 s
        poll_interval=0.25,
        init_db=True,
    )
    ok, abandoned = task.push_many([b"commit me", b"abandon me"])
    say(f"    pushed job {ok} and job {abandoned}")
    try:  # from the start on, as above
        task.start()
        wait_until("the manual-commit jobs", lambda: finished(task, [ok, abandoned]))
        say(f"    {describe(task.get(ok))}")
        say(f"    {describe(task.get(abandoned))}")

        # The abandoned claim's commit_id is stale now: fencing rejects it.
        old = first_claims[abandoned]
        try:
            task.commit(abandoned, Status.FAILED, commit_id=old)
        except StaleCommitError as exc:
            say(f"    a late commit with the first claim's commit_id {old}: {exc}")
        else:
            raise SystemExit("quickstart: a stale commit was accepted")
    finally:
        task.stop(wait=True)
    rec = task.get(abandoned)
    if rec is None or rec.status is not Status.DONE:
        raise SystemExit(f"quickstart: unexpected state of the zombie: {describe(rec)}")


def main() -> int:
    show_meepo_warnings()
    started = time.monotonic()
    run = f"{time.strftime('%Y-%m-%d %H:%M:%S')}, pid {os.getpid()}"
    where = "embedded default" if not os.environ.get("MEEPO_DB_URL") else "MEEPO_DB_URL"
    say(f"meepo quickstart, run {run} ({where})")
    first = auto_commit_part()
    manual_commit_part()
    say(f"\nquickstart finished in {time.monotonic() - started:.1f}s: all jobs done")
    meepo = "meepo" if os.environ.get("VIRTUAL_ENV") else ".venv/bin/meepo"
    say(f"next: {meepo} stats               the tasks and jobs of this ledger, by status")
    say(f"next: {meepo} jobs show {first:<9} one job's row in the ledger")
    say(f"next: {meepo} worker app:task     run a Task of your own (see docs/cli.md)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the consumers were stopped by the parts' finally blocks
        say("\nquickstart: interrupted")
        sys.exit(130)
