"""A worker process for the fault tests (tests/process/test_faults.py); not a test module.

    python tests/support/fault_app.py --db URL --redis URL --task ID --log FILE [options]

It builds a ``meepo.Task`` whose handler appends one line to the append-only ``--log``
file when a run starts and one when it ends::

    start <job id> <commit_id> <pid> <failed_times>
    end <job id> <commit_id> <pid> <failed_times>

then calls ``task.run()`` (which owns SIGINT/SIGTERM: the first stops gracefully within
``--grace``, the second exits at once). meepo's own log goes to stderr at INFO.

The payload tells the handler what to do:

* ``sleep:S`` - sleep S seconds (float) on every run;
* ``hang:S``  - sleep S seconds only on the first run (``failed_times == 0``), so a
  job whose worker is killed runs quickly once recovered;
* ``ms:N``    - sleep N milliseconds;
* ``hangonce:S`` - sleep S seconds on the first run of any ``hangonce`` job of this
  log (a flag file beside it says one ran), return at once on every other run;
* ``kill``    - SIGKILL its own worker process right after logging the start, on
  every run (a poison job);
* ``when``    - also log the database's time at the start, as ``dbtime <job id> <ISO
  time>`` (a run must never start before its ``run_at``, whatever the host's clock);
* anything else - return at once.

Handlers wait with ``threading.Event().wait``, not ``time.sleep``: under Debian's
``faketime`` (the clock-skew tests) ``time.sleep`` can fail with EINVAL.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from meepo import Job, Task


def append_line(path: str, line: str) -> None:
    """One ``write`` on an O_APPEND descriptor: lines from many processes never mix."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def delay_of(job: Job) -> float:
    kind, _, arg = job.payload.decode(errors="replace").partition(":")
    if kind == "sleep":
        return float(arg)
    if kind == "hang":
        return float(arg) if job.failed_times == 0 else 0.0
    if kind == "hangonce":
        return float(arg)
    if kind == "ms":
        return float(arg) / 1000.0
    return 0.0


def first_hang(log: str) -> bool:
    """Whether this is the first ``hangonce`` run of the test (atomically: O_EXCL)."""
    try:
        os.close(os.open(log + ".hung", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--db", required=True)
    p.add_argument("--redis", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--log", required=True, help="append-only execution log")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=None)
    p.add_argument("--lease", type=float, default=None)
    p.add_argument("--zombie-timeout", type=float, default=2.0)
    p.add_argument("--zombie-period", type=float, default=0.5)
    p.add_argument("--poll-interval", type=float, default=0.2)
    p.add_argument("--grace", type=float, default=10.0)
    p.add_argument("--max-failed-times", type=int, default=None)
    p.add_argument("--zombie-dst", default=None)
    args = p.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {os.getpid()} %(threadName)s %(name)s %(levelname)s %(message)s",
    )
    pid = os.getpid()

    def handler(job: Job) -> None:
        who = f"{job.id} {job.commit_id} {pid} {job.failed_times}"
        append_line(args.log, f"start {who}")
        if job.payload == b"kill":
            os.kill(pid, signal.SIGKILL)
        if job.payload == b"when":
            with task.engine.connect() as conn:
                append_line(
                    args.log, f"dbtime {job.id} {task.ledger.driver.db_now(conn).isoformat()}"
                )
        delay = delay_of(job)
        if job.payload.startswith(b"hangonce:") and not first_hang(args.log):
            delay = 0.0
        if delay > 0:
            threading.Event().wait(delay)
        append_line(args.log, f"end {who}")

    task = Task(
        args.task,
        db=args.db,
        redis=args.redis,
        job_func=handler,
        parallel_num=args.parallel,
        prefetch=args.prefetch,
        lease=args.lease,
        zombie_timeout=args.zombie_timeout,
        zombie_period=args.zombie_period,
        poll_interval=args.poll_interval,
        shutdown_grace=args.grace,
        **({} if args.max_failed_times is None else {"max_failed_times": args.max_failed_times}),
        **({} if args.zombie_dst is None else {"zombie_dst_status": args.zombie_dst}),
    )
    task.run()
    logging.getLogger("meepo").info("fault_app %d: run() returned, exiting 0", pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
