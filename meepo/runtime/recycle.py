"""Recycling a long-lived worker process (``meepo worker --max-jobs/--max-memory``).

A leak in user code (a cache that only grows, a C extension that never frees) should
not grow a worker forever. The :class:`Recycler` watches the process's consumer: after
``max_jobs`` handler runs, or once the resident memory exceeds ``max_memory_mb`` after
a job, it stops the Task gracefully (no new pops, claimed-but-unstarted jobs go back to
the queue, running jobs finish and are committed). The CLI then replaces the process
image with a fresh one running the same command line (``os.execv``).

Why ``execv`` rather than a supervisor process forking children: the process keeps its
pid, so systemd, Docker, Kubernetes or supervisord go on tracking and signalling the
same process and see no exit; nothing extra stays resident beside the worker; and every
byte of the old interpreter is returned to the system, which is the point. Sockets are
opened close-on-exec by Python, so no connection leaks into the new image.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..records import Job

if TYPE_CHECKING:
    from ..task import Task

log = logging.getLogger("meepo")

#: The environment variable holding the worker's generation: 1 for the first process
#: image, incremented at each recycle (the process keeps its pid).
GENERATION_ENV = "MEEPO_WORKER_GENERATION"


def generation() -> int:
    try:
        return max(1, int(os.environ.get(GENERATION_ENV, "1")))
    except ValueError:
        return 1


def rss_mb() -> float:
    """This process's resident memory in MB (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class Recycler:
    """Stops ``task`` gracefully once a limit is reached; ``reason`` says why.

    It wraps the task's handler (before the task starts) to count handler runs as they
    end and to wake up at once, so that the stop follows the ``max_jobs``-th job
    closely: only the jobs running then finish, those claimed ahead go back to the
    queue. Handlers abandoned by job_timeout count as ended."""

    def __init__(
        self,
        task: Task,
        max_jobs: int | None,
        max_memory_mb: int | None,
        interval: float = 0.5,
    ) -> None:
        self.task = task
        self.max_jobs = max_jobs
        self.max_memory_mb = max_memory_mb
        self.interval = interval
        self.reason: str | None = None
        self.ended = 0  # handler runs that returned or raised
        self._count_lock = threading.Lock()
        self._wake = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        handler = task.job_func
        if handler is not None and not inspect.iscoroutinefunction(handler):
            task.job_func = self._counting(handler)

    def _counting(self, handler: Callable[[Job], Any]) -> Callable[[Job], Any]:
        @functools.wraps(handler)
        def counted(job: Job) -> Any:
            try:
                return handler(job)
            finally:
                with self._count_lock:
                    self.ended += 1
                if self.limit_reached() is not None:
                    # In the handler's own thread, before its executor takes the next
                    # job: the generation ends here, not a few jobs later.
                    consumer = self.task.consumer
                    if consumer is not None:
                        consumer.close_intake()
                self._wake.set()

        return counted

    def jobs(self) -> int:
        consumer = self.task.consumer
        timed_out = consumer.counters.timed_out if consumer is not None else 0
        with self._count_lock:
            return self.ended + timed_out

    def limit_reached(self) -> str | None:
        """Why this generation should end now, or None."""
        jobs = self.jobs()
        if self.max_jobs is not None and jobs >= self.max_jobs:
            return f"{jobs} jobs (--max-jobs {self.max_jobs})"
        if self.max_memory_mb is not None and jobs > 0:
            rss = rss_mb()
            if rss > self.max_memory_mb:
                return f"{rss:.0f} MB resident (--max-memory {self.max_memory_mb})"
        return None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="meepo-recycler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._done.set()
        self._wake.set()

    def _loop(self) -> None:
        while not self._done.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._done.is_set():
                return
            reason = self.limit_reached()
            if reason is None:
                continue
            self.reason = reason
            log.warning(
                "worker generation %d: recycling after %s: finishing running jobs, then "
                "restarting the process",
                generation(),
                reason,
            )
            self.task.stop()
            return


#: Options dropped from the command line on re-exec: their URLs (and any password in
#: them) reach the new image through ``MEEPO_DB_URL`` / ``MEEPO_REDIS_URL``, which the
#: worker sets from them, not through its argv.
SECRET_OPTIONS = ("--db", "--redis")


def without_secrets(argv: list[str]) -> list[str]:
    """``argv`` without ``--db URL``, ``--db=URL``, ``--redis URL``, ``--redis=URL``."""
    out: list[str] = []
    skip = positional = False
    for arg in argv:
        if skip:
            skip = False
        elif positional or arg == "--":
            positional = True
            out.append(arg)
        elif arg in SECRET_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in SECRET_OPTIONS)):
            out.append(arg)
    return out


def exec_again(argv: list[str] | None) -> None:
    """Replace this process with a fresh run of the same command (never returns).

    ``argv``: the arguments ``meepo`` was called with in-process, if not ``sys.argv``.
    ``--db`` and ``--redis`` are left out (see :data:`SECRET_OPTIONS`): the new image
    reads the URLs from the environment the worker exported them to.
    """
    command = [sys.executable, *without_secrets(sys.orig_argv[1:])] if argv is None else [
        sys.executable, "-m", "meepo", *without_secrets(argv)
    ]  # fmt: skip
    os.environ[GENERATION_ENV] = str(generation() + 1)
    import atexit

    # What a normal exit would do: flush the logs, stop an embedded Redis this process
    # started (the new image starts its own and re-sends the queue from the ledger).
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if run_exitfuncs is not None:
        run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os.execv(sys.executable, command)
