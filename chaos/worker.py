"""A chaos worker process: consumes the auto-commit task with ``task.run()`` and the
manual-commit task beside it, logging every handler run to ``exec-<pid>.jsonl``.

What a handler does is written in the job's payload by the producer (``{"k": kind}``):

auto task   ``normal`` a few ms · ``slow`` longer than the lease (the heartbeat must
            keep it) · ``flaky`` raises on its first attempt · ``poison`` always raises
            · ``hog`` holds ``c`` connections of ``task.engine`` for ``h`` seconds (a
            pool exhausted by handlers) · ``fork`` forks a child that calls
            ``sys.exit(0)`` (the child must never run meepo's loops; the parent reaps it)
manual task ``m-done`` / ``m-fail`` commit done / failed · ``m-retry`` commits todo on
            its first attempt, then done · ``m-none`` returns without committing (the
            reaper's zombie policy retries it, then fails it after max_failed_times) ·
            ``m-slow`` works 0.5-2 s, then commits done (a SIGTERM or a recycle catches
            it running: its in-handler commit must still work during the grace period)
zombie tasks (one per ``zombie_dst_status``: todo, done, failed; one thread, a large
            prefetch, ``max_failed_times`` 1): ``z`` works 50-250 ms. A kill leaves
            prefetched claims that never started: they must not be closed or charged.

Timestamps in the log are the real wall clock: a worker started under ``faketime``
(``--clock-offset``) subtracts its offset. Handlers wait with ``threading.Event().wait``
(``time.sleep`` can fail with EINVAL under faketime; a worker started with a clock
offset replaces ``time.sleep`` with that wait for every library). SIGUSR2 asks for a recycle (as
``meepo worker --max-jobs`` does): after 3 more manual-task jobs the worker stops its
tasks gracefully and re-executes itself (same pid).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import text

from meepo import Task
from meepo.errors import MeepoError, StaleCommitError
from meepo.records import Job
from meepo.runtime.runner import Runner

from .records import AppendLog

ZOMBIE_STATUSES = ("todo", "done", "failed")
#: The Runner counts handler runs only with a limit set: one that is never reached.
RECYCLE_NEVER = 2**62


class PlannedFailure(RuntimeError):
    """A failure the workload asked for (flaky and poison jobs)."""


def where(pid: int) -> dict[str, str]:
    """Where a stuck process waits (its kernel wait channel and syscall), to tell a lock
    inherited across fork() from anything else."""
    found: dict[str, str] = {}
    for name in ("wchan", "syscall", "stat"):
        try:
            found[name] = Path(f"/proc/{pid}/{name}").read_text(errors="replace").strip()
        except OSError as exc:
            found[name] = f"unreadable: {exc.strerror}"
    return found


def pause(seconds: float) -> None:
    threading.Event().wait(seconds)


_real_sleep = time.sleep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--db", required=True)
    p.add_argument("--redis", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--auto-task", required=True)
    p.add_argument("--manual-task", required=True)
    p.add_argument(
        "--zombie-tasks",
        default="",
        help="task ids for zombie_dst_status todo,done,failed (comma-separated; empty: none)",
    )
    p.add_argument("--log-dir", type=Path, required=True)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--manual-parallel", type=int, default=3)
    p.add_argument("--lease", type=float, default=6.0)
    p.add_argument("--zombie-timeout", type=float, default=10.0)
    p.add_argument("--zombie-period", type=float, default=2.0)
    p.add_argument("--max-failed-times", type=int, default=3)
    p.add_argument("--zombie-prefetch", type=int, default=12)
    p.add_argument("--slow", type=float, default=9.0, help="seconds a slow handler takes")
    p.add_argument(
        "--clock-offset",
        type=float,
        default=0.0,
        help="seconds this process's clock is ahead of the real one (faketime)",
    )
    args = p.parse_args(argv)

    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    pid = os.getpid()
    out = AppendLog(args.log_dir / f"exec-{pid}.jsonl")
    offset = args.clock_offset
    if offset:
        # Under faketime, time.sleep() can fail with EINVAL (its clock_nanosleep is
        # rewritten); redis-py sleeps between its retries, and a thread that dies of that
        # is an artefact of the tool, not a fault of the clock. Event.wait does not fail.
        time.sleep = pause
        for module in list(sys.modules.values()):  # bound by `from time import sleep`
            if getattr(module, "sleep", None) is _real_sleep:
                module.sleep = pause  # type: ignore[attr-defined]

    def now() -> float:
        return time.time() - offset

    def record(event: str, task: str, job: Job, **extra: object) -> None:
        out.write(
            e=event,
            task=task,
            job=job.id,
            cid=job.commit_id,
            att=job.failed_times + 1,
            pid=os.getpid(),  # a forked child that runs jobs shows up as itself
            ts=now(),
            **extra,
        )

    def work(kind: str) -> None:
        if kind == "slow":
            pause(args.slow)
        elif kind == "m-slow":
            pause(random.uniform(0.5, 2.0))
        elif kind == "z":
            pause(random.uniform(0.05, 0.25))
        else:
            pause(random.uniform(0.0, 0.01))

    def hog(job: Job, spec: dict[str, float]) -> None:
        """Hold connections of the task's own engine, as a handler doing its own SQL
        would, until the deadline."""
        deadline = time.monotonic() + spec["h"]
        pool: Any = auto.engine.pool
        if not hasattr(pool, "checkedout"):  # not a QueuePool: nothing to exhaust
            pause(spec["h"])
            return
        room = pool.size() + getattr(pool, "_max_overflow", 0)
        with contextlib.ExitStack() as stack:
            for _ in range(int(spec["c"])):
                # never wait for the pool (the wait is bounded by pool_timeout only):
                # take what is free, and hold it
                if time.monotonic() >= deadline or pool.checkedout() >= room:
                    break
                try:
                    conn = stack.enter_context(auto.engine.connect())
                    conn.execute(text("SELECT 1"))
                except Exception:  # a pool timeout: hold what we have
                    break
            pause(max(0.0, deadline - time.monotonic()))

    def forked() -> None:
        child = os.fork()
        if child == 0:  # the child: leave at once, the way a careless handler does
            sys.exit(0)
        out.write(e="fork", parent=os.getpid(), child=child, ts=now())
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            done, _ = os.waitpid(child, os.WNOHANG)
            if done:
                return
            pause(0.02)
        out.write(e="fork_stuck", parent=os.getpid(), child=child, ts=now(), where=where(child))
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)

    def handle_auto(job: Job) -> None:
        spec = json.loads(job.payload)
        kind = spec["k"]
        record("start", "auto", job, kind=kind)
        if kind == "hog":
            hog(job, spec)
        elif kind == "fork":
            forked()
        else:
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
            "m-slow": "done",
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
        except MeepoError as exc:  # e.g. NotRunningHereError during a graceful stop
            record(
                "commit_error",
                "manual",
                job,
                out=verdict,
                error=type(exc).__name__,
                stopping=stopping.is_set(),
            )
            raise

    def zombie_handler(name: str):  # type: ignore[no-untyped-def]
        def handle(job: Job) -> None:
            kind = json.loads(job.payload)["k"]
            record("start", name, job, kind=kind)
            work(kind)
            record("end", name, job, out="ok")

        return handle

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
    stopping = threading.Event()
    auto = Task(args.auto_task, job_func=handle_auto, parallel_num=args.parallel, **common)
    manual = Task(
        args.manual_task,
        job_func=handle_manual,
        parallel_num=args.manual_parallel,
        auto_commit=False,
        **common,
    )
    zombies: list[Task] = []
    zombie_ids = [t for t in args.zombie_tasks.split(",") if t]
    for status, task_id in zip(ZOMBIE_STATUSES, zombie_ids, strict=False):
        zombies.append(
            Task(
                task_id,
                job_func=zombie_handler(f"z-{status}"),
                parallel_num=1,
                prefetch=args.zombie_prefetch,
                zombie_dst_status=status,
                **{**common, "max_failed_times": 1},
            )
        )

    # Every task runs under one Runner, as `meepo worker app:a app:b` runs them (one
    # reaper, promoter, scheduler and cleaner shared). A recycle on demand (SIGUSR2) is
    # `--max-jobs` reached a few jobs later: the running handlers, manual commits among
    # them, finish (and commit) during the grace period, then the process execs again.
    runner = Runner([auto, manual, *zombies], max_jobs=RECYCLE_NEVER)

    def on_usr2(_signum: int, _frame: FrameType | None) -> None:
        runner.max_jobs = runner.jobs() + 3
        out.write(e="recycle_asked", pid=os.getpid(), ts=now())

    def watch_stop() -> None:
        while not (runner.signalled or runner.reason is not None):
            pause(0.05)
        stopping.set()

    signal.signal(signal.SIGUSR2, on_usr2)
    threading.Thread(target=watch_stop, name="chaos-stopping", daemon=True).start()
    try:
        outcome = runner.run()
    finally:
        stopping.set()
    recycled = outcome == "recycle"
    if recycled:
        out.write(e="recycle", pid=os.getpid(), ts=now(), reason=runner.reason)
        out.close()
        # The same command line again (meepo's exec_again leaves --db/--redis out, for
        # the CLI that exported them; this script takes them as arguments).
        logging.shutdown()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
