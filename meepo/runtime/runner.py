"""Running Tasks in the foreground: the one run loop ``Task.run()`` and ``meepo worker``
share.

:class:`Runner` starts one or more Tasks, blocks until they have stopped, and owns what
a foreground worker needs around that:

* **Signals** (main thread only): the first SIGINT or SIGTERM stops every Task
  gracefully (no new pops, claimed-but-unstarted jobs go back to the queue, running
  jobs get ``shutdown_grace`` to finish and be committed); a second one exits the
  process at once (the reaper recovers what was running).
* **Recycling** (``max_jobs`` / ``max_memory_mb``, counted by a middleware the Runner
  adds for the run; the handler is never wrapped): a leak in user code (a cache that
  only grows, a C extension that never frees) should not grow a worker forever. After
  ``max_jobs`` handler runs in the process, or once its resident memory exceeds
  ``max_memory_mb`` after a job, the Runner stops the Tasks gracefully and
  :meth:`Runner.run` returns ``"recycle"``; the caller then replaces the process image
  with a fresh one running the same command line (:func:`exec_again`).
* **Burst mode** (``burst=True``: ``Task.run(burst=True)``, ``meepo worker --burst``):
  every :data:`BURST_TICK` the Runner asks each Task's consumer how many of its jobs are
  left (:meth:`Consumer.outstanding`: one COUNT of the ledger's todo rows due now and of
  the doing rows this worker claimed); once every Task has none, it stops them
  gracefully and :meth:`Runner.run` returns ``"drained"``. The ledger is asked, not
  Redis: a job between its pop and its claim is still todo there, a claimed one is
  doing until its commit, a delayed one counts from its due time, so no state of a job
  slips between two reads. Jobs not due yet (delayed, or a retry waiting out its
  backoff) do not keep a burst worker running.
* **Shared duties**: Tasks on the same database and Redis get one reaper, one promoter,
  one scheduler and one cleaner thread between them (:mod:`meepo.runtime.shared`);
  each keeps its own consumer.
* **Two log lines** on the ``meepo.worker`` logger: one at start (the tasks, their
  parallel_num, the masked database and Redis URLs, meepo's version) and one at
  shutdown (what was finished, what was handed back).

Why ``execv`` rather than a supervisor process forking children: the process keeps its
pid, so systemd, Docker, Kubernetes or supervisord go on tracking and signalling the
same process and see no exit; nothing extra stays resident beside the worker; and every
byte of the old interpreter is returned to the system, which is the point. Sockets are
opened close-on-exec by Python, so no connection leaks into the new image.

The Runner knows Tasks through :class:`Runnable` (what ``Task`` offers), so the
runtime never imports the facade.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Literal, Protocol

from ..config import Options, mask_url
from ..errors import MeepoError
from ..middleware import Hooks, Middleware, RunInfo
from ..records import Job
from .consumer import Consumer
from .service import Service
from .shared import SharedLoop

log = logging.getLogger("meepo")
#: The start and shutdown lines: the CLI shows this logger at INFO by default.
worker_log = logging.getLogger("meepo.worker")

#: The environment variable holding the worker's generation: 1 for the first process
#: image, incremented at each recycle (the process keeps its pid).
GENERATION_ENV = "MEEPO_WORKER_GENERATION"

#: How often the run loop looks at its Tasks and the memory limit (seconds).
TICK = 0.5
#: How often a burst run asks the ledger whether anything is left (seconds).
BURST_TICK = 0.2

Outcome = Literal["stopped", "signal", "recycle", "drained"]


class _Ledger(Protocol):
    @property
    def url(self) -> str: ...


class _Transport(Protocol):
    @property
    def where(self) -> str: ...


class Runnable(Protocol):
    """What the Runner needs of a Task."""

    hooks: Hooks | None

    @property
    def task_id(self) -> str: ...

    @property
    def options(self) -> Options: ...

    @property
    def ledger(self) -> _Ledger: ...

    @property
    def transport(self) -> _Transport: ...

    @property
    def consumer(self) -> Consumer | None: ...

    @property
    def reaper(self) -> Service: ...

    @property
    def promoter(self) -> Service: ...

    @property
    def scheduler(self) -> Service: ...

    @property
    def cleaner(self) -> Service: ...

    def start(self, services: bool = True) -> None: ...

    def stop(self, wait: bool = True, grace: float | None = None) -> bool: ...

    def wait_stopped(self, timeout: float | None = None) -> bool: ...

    @property
    def start_error(self) -> MeepoError | None: ...


def where(task: Runnable) -> tuple[str, str]:
    """The task's database URL (masked) and Redis location."""
    return mask_url(task.ledger.url), task.transport.where


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


@dataclass
class Tally:
    """What the Tasks' consumers did in this process image (the shutdown line)."""

    done: int = 0
    failed: int = 0
    retried: int = 0
    claimed: int = 0
    finished: int = 0
    left_running: bool = False
    per_task: dict[str, int] = field(default_factory=dict)

    def add(self, task_id: str, consumer: Consumer | None) -> None:
        if consumer is None:
            return
        c = consumer.counters
        self.done += c.done
        self.failed += c.failed
        self.retried += c.retried
        self.claimed += c.claimed
        self.finished += c.finished
        self.per_task[task_id] = self.per_task.get(task_id, 0) + c.finished

    @property
    def handed_back(self) -> int:
        """Claims given back unstarted (and, after an unclean stop, left to the reaper)."""
        return max(0, self.claimed - self.finished)


class Runner:
    """Start ``tasks``, block until they stop; see the module docstring.

    ``max_jobs`` and ``max_memory_mb`` turn on recycling (None: off). ``announce``:
    log the start and shutdown lines (``meepo worker`` does; ``Task.run`` too, at INFO
    on ``meepo.worker``, which applications show or not)."""

    def __init__(
        self,
        tasks: Sequence[Runnable],
        *,
        max_jobs: int | None = None,
        max_memory_mb: int | None = None,
        version: str | None = None,
        burst: bool = False,
    ) -> None:
        if not tasks:
            raise ValueError("Runner needs at least one task")
        self.burst = burst
        self.drained = False  # burst: stopped because nothing was left
        self.tasks = list(tasks)
        self.max_jobs = max_jobs
        self.max_memory_mb = max_memory_mb
        self.version = version
        self.reason: str | None = None  # why this generation recycles
        self.signalled = False
        self.ended = 0  # handler runs that returned or raised (with recycling on)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._stop_thread: threading.Thread | None = None
        self._consumers: dict[str, Consumer] = {}
        self._clean = True
        #: The shared threads of the last run (see :meth:`shared_loops`).
        self.loops: list[SharedLoop] = []

    @property
    def recycling(self) -> bool:
        return self.max_jobs is not None or self.max_memory_mb is not None

    # -- the run loop -----------------------------------------------------------------

    def run(self) -> Outcome:
        """Run until every Task has stopped: by a signal, by ``task.stop()``, or for a
        recycle (the return value says which). A Task that cannot start (its start
        error, e.g. a schema that needs ``meepo db upgrade``) stops the others and is
        raised."""
        restore = self._install_signals()  # before start: a signal is never missed
        originals = self._count_jobs() if self.recycling else {}
        loops, shared = self.shared_loops()
        self.loops = loops
        try:
            self._announce_start()
            started: list[Runnable] = []
            try:
                for task in self.tasks:
                    task.start(services=task not in shared)
                    started.append(task)
                for loop in loops:
                    loop.start()
                if loops:
                    log.info(
                        "task(s) %s: shared reaper, promoter, scheduler and cleaner threads "
                        "for %d tasks",
                        ", ".join(t.task_id for t in self.tasks if t in shared),
                        len(shared),
                    )
            except BaseException:
                for task in started:
                    task.stop(wait=True)
                raise
            error = self._wait()
        finally:
            for loop in loops:
                loop.stop()
            for task, hooks in originals.items():
                task.hooks = hooks
            for sig, old in restore.items():
                signal.signal(sig, old)
        self._announce_stop()
        if error is not None:
            raise error
        if self.signalled:
            return "signal"
        if self.reason is not None:
            return "recycle"
        return "drained" if self.drained else "stopped"

    def shared_loops(self) -> tuple[list[SharedLoop], set[Runnable]]:
        """The shared threads of the Tasks on the same database and Redis (two or more):
        one reaper, one promoter, one scheduler and one cleaner thread serve them all
        (:mod:`meepo.runtime.shared`); and those Tasks. A Task alone on its servers
        keeps its own threads."""
        groups: dict[tuple[str, str], list[Runnable]] = {}
        for task in self.tasks:
            groups.setdefault((task.ledger.url, task.transport.where), []).append(task)
        loops: list[SharedLoop] = []
        shared: set[Runnable] = set()
        for n, tasks in enumerate(g for g in groups.values() if len(g) > 1):
            shared.update(tasks)
            for kind in ("reaper", "promoter", "scheduler", "cleaner"):
                members = [(_service(t, kind), _active(t)) for t in tasks]
                loops.append(SharedLoop(kind, members, name=f"meepo-shared{n}-{kind}"))
        return loops, shared

    def _wait(self) -> MeepoError | None:
        while True:
            self._snapshot()
            errors = [t.start_error for t in self.tasks if t.start_error is not None]
            if errors:
                self.stop()
                self._join_stop()
                return errors[0]
            if all(t.wait_stopped(0) for t in self.tasks):
                self._join_stop()
                return None
            if self.recycling and not self._stopping.is_set():
                reason = self.limit_reached()
                if reason is not None:
                    self._recycle(reason)
            if self.burst and not self._stopping.is_set() and self._nothing_left():
                self.drained = True
                worker_log.info("burst: nothing left to do, stopping")
                self.stop()
            self._wake.wait(BURST_TICK if self.burst else TICK)
            self._wake.clear()

    def _nothing_left(self) -> bool:
        """Burst mode: whether no Task has a job due now or claimed and uncommitted (a
        Task still starting, or a ledger that cannot be read, has something left)."""
        for task in self.tasks:
            consumer = task.consumer
            if consumer is None or not consumer.running:
                return False
            try:
                if consumer.outstanding() > 0:
                    return False
            except MeepoError as exc:
                log.warning("task %s: burst: cannot read the ledger: %s", task.task_id, exc)
                return False
        return True

    def _snapshot(self) -> None:
        """Keep each Task's consumer for the shutdown line (a stopped Task drops it)."""
        for task in self.tasks:
            consumer = task.consumer
            if consumer is not None:
                self._consumers[task.task_id] = consumer

    def stop(self) -> None:
        """Stop every Task gracefully, in the background, each on a thread of its own
        (their grace periods run side by side); the run loop returns once they are
        stopped. Safe from any thread and a signal handler."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
        self._snapshot()

        def stop_all() -> None:
            threads = [
                threading.Thread(target=self._stop_one, args=(t,), name="meepo-shutdown")
                for t in self.tasks
            ]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            self._wake.set()

        self._stop_thread = threading.Thread(target=stop_all, name="meepo-shutdown", daemon=True)
        self._stop_thread.start()

    def _stop_one(self, task: Runnable) -> None:
        try:
            if not task.stop(wait=True):
                self._clean = False
        except Exception:  # one Task's failure must not keep the others running
            log.exception("task %s: stop failed", task.task_id)

    def _join_stop(self) -> None:
        if self._stop_thread is not None:
            self._stop_thread.join()

    # -- signals ----------------------------------------------------------------------

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        names = ", ".join(t.task_id for t in self.tasks)

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            if self.signalled:
                log.warning("task(s) %s: second signal, exiting now", names)
                os._exit(1)
            self.signalled = True
            log.info(
                "task(s) %s: %s received, finishing running jobs (a second signal exits now)",
                names,
                signal.Signals(signum).name,
            )
            self.stop()

        old: dict[int, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, on_signal)
        return old

    # -- recycling --------------------------------------------------------------------

    def _count_jobs(self) -> dict[Runnable, Hooks | None]:
        """Add a middleware to each Task for the run (its hooks are restored after it)
        that counts handler runs as they end and acts at once, in the handler's thread:
        the stop follows the ``max_jobs``-th job closely (only the jobs running then
        finish, those claimed ahead go back to the queue). Handlers abandoned by
        job_timeout count as ended."""
        originals: dict[Runnable, Hooks | None] = {}
        counter = _RunCounter(self)
        for task in self.tasks:
            originals[task] = task.hooks
            installed = task.hooks.middleware if task.hooks is not None else ()
            task.hooks = Hooks(task, [*installed, counter])
        return originals

    def _ended(self) -> None:
        with self._lock:
            self.ended += 1
        if self.limit_reached() is not None:
            # Before the executor takes the next job: the generation ends here, not a
            # few jobs later.
            for task in self.tasks:
                consumer = task.consumer
                if consumer is not None:
                    consumer.close_intake()
        self._wake.set()

    def jobs(self) -> int:
        timed_out = sum(
            c.counters.timed_out for c in (t.consumer for t in self.tasks) if c is not None
        )
        with self._lock:
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

    def _recycle(self, reason: str) -> None:
        self.reason = reason
        log.warning(
            "worker generation %d: recycling after %s: finishing running jobs, then "
            "restarting the process",
            generation(),
            reason,
        )
        self.stop()

    # -- the two lines ----------------------------------------------------------------

    def _announce_start(self) -> None:
        first = self.tasks[0]
        db, redis = where(first)
        same = all(where(t) == (db, redis) for t in self.tasks)
        tasks = ", ".join(
            f"{t.task_id} (parallel_num {t.options.parallel_num})"
            + ("" if same else " on {} and {}".format(*where(t)))
            for t in self.tasks
        )
        place = f" on {db} and {redis}" if same else ""
        limits = []
        if self.max_jobs is not None:
            limits.append(f"--max-jobs {self.max_jobs}")
        if self.max_memory_mb is not None:
            limits.append(f"--max-memory {self.max_memory_mb}")
        extra = f", recycling at {' or '.join(limits)}" if limits else ""
        gen = generation()
        extra += f", generation {gen}" if gen > 1 else ""
        version = f"meepo {self.version}" if self.version else "meepo"
        worker_log.info(
            "%s worker %d starting: %s %s%s%s",
            version,
            os.getpid(),
            "task" if len(self.tasks) == 1 else "tasks",
            tasks,
            place,
            extra,
        )

    def _announce_stop(self) -> None:
        self._snapshot()
        tally = Tally()
        for task in self.tasks:
            tally.add(task.task_id, self._consumers.get(task.task_id))
        if self.reason is not None and not self.signalled:
            why = f"recycling after {self.reason}"
        elif self.signalled:
            why = "on a signal"
        else:
            why = "burst: nothing left to do" if self.drained else "stopped"
        split = ""
        if len(self.tasks) > 1:
            split = " [" + ", ".join(f"{t} {n}" for t, n in tally.per_task.items()) + "]"
        back = f"handed {tally.handed_back} claimed job(s) back to the queue"
        if not self._clean:
            back += " (some still running after the grace period: left to the reaper)"
        worker_log.info(
            "meepo worker %d stopped (%s): finished %d job(s)%s (%d done, %d failed, "
            "%d to retry), %s",
            os.getpid(),
            why,
            tally.finished,
            split,
            tally.done,
            tally.failed,
            tally.retried,
            back,
        )


def _service(task: Runnable, kind: str) -> Service:
    service: Service = getattr(task, kind)
    return service


def _active(task: Runnable) -> Callable[[], bool]:
    """Whether the Task's duties run: while its consumer does (not before a delayed
    start, not after a stop), once it has settled (its first claim done)."""

    def active() -> bool:
        consumer = task.consumer
        return consumer is not None and consumer.settled()

    return active


class _RunCounter(Middleware):
    """The Runner's count of handler runs (recycling)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def after_run(self, task: Any, job: Job, run: RunInfo) -> None:
        self.runner._ended()


# -- re-running the process -------------------------------------------------------------

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
