"""``meepo worker MODULE:ATTR``: import the user's module and run its Task."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import click

from ..config import DB_ENV, PREFETCH_PER_THREAD, REDIS_ENV
from ..errors import MeepoError
from ..runtime.recycle import Recycler, exec_again
from ..task import Task
from .common import POSITIVE, SECONDS, UsageError, common_options, connections, given, worker_format


def load_task(spec: str) -> Task:
    """The Task named by ``MODULE:ATTR`` (ATTR may be dotted, or a zero-argument callable
    returning a Task). MODULE is searched in the current directory, then sys.path."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise UsageError(f"expected MODULE:ATTR (such as myapp.tasks:task), not {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UsageError(
                f"cannot import {module_name!r}: no module named {exc.name!r} in the current "
                "directory or on PYTHONPATH"
            ) from None
        raise RuntimeError(f"importing {module_name!r} failed: {exc}") from exc
    except MeepoError:
        raise
    except Exception as exc:
        raise RuntimeError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, Task) and callable(obj):
        obj = obj()
    if not isinstance(obj, Task):
        raise UsageError(f"{spec} is a {type(obj).__name__}, not a meepo Task")
    if obj.job_func is None:
        raise UsageError(
            f"{spec} is a Task without job_func: it can push but not consume "
            "(give it a job_func to run it with `meepo worker`)"
        )
    return obj


@click.command(
    "worker",
    short_help="Run the consumers and reaper of a Task.",
    help="Import MODULE (from the current directory or PYTHONPATH) and run the Task named "
    "ATTR (or returned by ATTR(), a zero-argument callable) until SIGINT or SIGTERM. "
    "--db/--redis set MEEPO_DB_URL/MEEPO_REDIS_URL for Tasks built without db=/redis=.",
)
@click.argument("target", metavar="MODULE:ATTR")
@click.option("--parallel", type=POSITIVE, metavar="N", help="Override parallel_num.")
@click.option(
    "--job-timeout",
    type=SECONDS,
    metavar="S",
    help="Override job_timeout: a handler running longer than S seconds is a failed attempt.",
)
@click.option(
    "--max-jobs",
    type=POSITIVE,
    metavar="N",
    help="After N jobs, finish the running ones and restart the process (same pid).",
)
@click.option(
    "--max-memory",
    type=POSITIVE,
    metavar="MB",
    help="Once resident memory exceeds MB after a job, finish and restart the process.",
)
@common_options
@click.pass_context
def worker(
    ctx: click.Context,
    target: str,
    parallel: int | None,
    job_timeout: float | None,
    max_jobs: int | None,
    max_memory: int | None,
) -> int:
    worker_format()
    db, redis = connections(ctx)
    # Tasks built without db=/redis= read these when the module is imported.
    if db:
        os.environ[DB_ENV] = db
    if redis:
        os.environ[REDIS_ENV] = redis
    task = load_task(target)
    if parallel is not None:
        opts = task.options
        # prefetch follows parallel_num unless the Task set it apart.
        prefetch = PREFETCH_PER_THREAD * parallel if opts.prefetch_auto else opts.prefetch
        task.options = dataclasses.replace(opts, parallel_num=parallel, prefetch=prefetch)
    if job_timeout is not None:
        task.options = dataclasses.replace(task.options, job_timeout=job_timeout)
    if max_jobs is None and max_memory is None:
        task.run()
        return 0
    recycler = Recycler(task, max_jobs, max_memory)
    with _signals_seen() as seen:
        try:
            recycler.start()
            task.run()
        finally:
            recycler.close()
    if recycler.reason is None or seen():
        return 0  # stopped by a signal (even one during the recycle): exit
    exec_again(given(ctx).get("argv"))
    return 0  # not reached


@contextlib.contextmanager
def _signals_seen() -> Iterator[Callable[[], bool]]:
    """Whether SIGINT or SIGTERM arrived meanwhile, whoever handled it: Python writes
    the number of every signal it handles to the wakeup fd."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    old = signal.set_wakeup_fd(write_fd)
    got = bytearray()
    is_open = [True]

    def seen() -> bool:
        if is_open[0]:
            with contextlib.suppress(BlockingIOError):
                got.extend(os.read(read_fd, 256))
        return signal.SIGINT in got or signal.SIGTERM in got

    try:
        yield seen
    finally:
        seen()
        is_open[0] = False
        signal.set_wakeup_fd(old)
        os.close(read_fd)
        os.close(write_fd)
