"""``meepo worker TARGET...``: import the user's modules and run their Tasks.

A TARGET is ``MODULE:ATTR`` (a Task, or a zero-argument callable returning one; ATTR
may be dotted) or ``MODULE`` alone (every Task with a job_func among the module's
attributes). Several Tasks run in one process, each with its own consumers; those on
the same database and Redis share one reaper, promoter, scheduler and cleaner thread.
:class:`meepo.runtime.runner.Runner` owns the run loop, the signals, the shared threads
and recycling."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys
import traceback
from types import ModuleType
from typing import Any

import click

from .. import __version__
from ..config import DB_ENV, PREFETCH_PER_THREAD, REDIS_ENV
from ..errors import MeepoError
from ..runtime.runner import Runner, exec_again, worker_log
from ..task import Task
from .common import (
    POSITIVE,
    SECONDS,
    UsageError,
    common_options,
    connections,
    given,
    log_level,
    worker_format,
)

_CLI_DIR = os.path.dirname(os.path.abspath(__file__))
_IMPORTLIB_DIR = os.path.dirname(os.path.abspath(importlib.__file__))


class UserCodeError(RuntimeError):
    """The user's module (or Task factory) raised: its traceback is shown, then this
    one-line summary. ``traceback_text`` leaves out importlib's and the CLI's frames."""

    def __init__(self, message: str, exc: BaseException) -> None:
        super().__init__(message)
        te = traceback.TracebackException.from_exception(exc)
        te.stack = traceback.StackSummary.from_list(
            [f for f in te.stack if not _internal(f.filename)]
        )
        self.traceback_text = "".join(te.format())


def _internal(filename: str) -> bool:
    if filename.startswith("<frozen importlib"):
        return True
    return os.path.dirname(os.path.abspath(filename)) in (_CLI_DIR, _IMPORTLIB_DIR)


def _import(module_name: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UsageError(
                f"cannot import {module_name!r}: no module named {exc.name!r} in the current "
                "directory or on PYTHONPATH"
            ) from None
        raise UserCodeError(f"importing {module_name!r} failed: {exc}", exc) from exc
    except MeepoError:
        raise
    except Exception as exc:
        raise UserCodeError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}", exc
        ) from exc


def load_task(spec: str) -> Task:
    """The Task named by ``MODULE:ATTR`` (ATTR may be dotted, or a zero-argument callable
    returning a Task). MODULE is searched in the current directory, then sys.path."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise UsageError(f"expected MODULE:ATTR (such as myapp.tasks:task), not {spec!r}")
    obj: Any = _import(module_name)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, Task) and callable(obj):
        try:
            obj = obj()
        except MeepoError:
            raise
        except Exception as exc:
            raise UserCodeError(f"{spec}() failed: {type(exc).__name__}: {exc}", exc) from exc
    if not isinstance(obj, Task):
        raise UsageError(f"{spec} is a {type(obj).__name__}, not a meepo Task")
    if obj.job_func is None:
        raise UsageError(
            f"{spec} is a Task without job_func: it can push but not consume "
            "(give it a job_func to run it with `meepo worker`)"
        )
    return obj


def load_module_tasks(module_name: str) -> list[Task]:
    """Every Task with a job_func among the attributes of MODULE, in definition order."""
    if not module_name.strip() or ":" in module_name:
        raise UsageError(f"expected MODULE or MODULE:ATTR, not {module_name!r}")
    module = _import(module_name)
    found: list[Task] = []
    producers = 0
    for value in list(vars(module).values()):
        if isinstance(value, Task) and not any(value is t for t in found):
            if value.job_func is None:
                producers += 1
            else:
                found.append(value)
    if not found:
        more = f" ({producers} without job_func, which can push but not consume)"
        raise UsageError(
            f"module {module_name!r} has no Task with a job_func"
            + (more if producers else "")
            + ": name one as MODULE:ATTR"
        )
    return found


def load_tasks(targets: tuple[str, ...]) -> list[Task]:
    """The Tasks of every TARGET, each once."""
    tasks: list[Task] = []
    for spec in targets:
        found = [load_task(spec)] if ":" in spec else load_module_tasks(spec)
        for task in found:
            if not any(task is t for t in tasks):
                tasks.append(task)
    return tasks


@click.command(
    "worker",
    short_help="Run the consumers and reaper of one or more Tasks.",
    help="Import MODULE (from the current directory or PYTHONPATH) and run the Task named "
    "ATTR (or returned by ATTR(), a zero-argument callable), or with MODULE alone every "
    "Task of the module that has a job_func, until SIGINT or SIGTERM (a second one exits "
    "at once). Several targets run in one process. --db/--redis set "
    "MEEPO_DB_URL/MEEPO_REDIS_URL for Tasks built without db=/redis=.",
)
@click.argument("targets", nargs=-1, required=True, metavar="MODULE[:ATTR]...")
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
@click.option(
    "--burst",
    is_flag=True,
    help="Stop (exit 0) once no job of the tasks is due or in hand: for cron-driven "
    "batches and tests.",
)
@common_options
@click.pass_context
def worker(
    ctx: click.Context,
    targets: tuple[str, ...],
    parallel: int | None,
    job_timeout: float | None,
    max_jobs: int | None,
    max_memory: int | None,
    burst: bool,
) -> int:
    worker_format()
    opts = given(ctx)
    # The start and shutdown lines show unless --log-level error asked for quiet.
    level = log_level(opts)
    old_level = worker_log.level
    worker_log.setLevel(logging.INFO if level <= logging.WARNING else level)
    try:
        db, redis = connections(ctx)
        # Tasks built without db=/redis= read these when the module is imported.
        if db:
            os.environ[DB_ENV] = db
        if redis:
            os.environ[REDIS_ENV] = redis
        tasks = load_tasks(targets)
        for task in tasks:
            override(task, parallel, job_timeout)
        runner = Runner(
            tasks, max_jobs=max_jobs, max_memory_mb=max_memory, version=__version__, burst=burst
        )
        outcome = runner.run()
    finally:
        worker_log.setLevel(old_level)
    if outcome == "recycle":
        exec_again(opts.get("argv"))
    return 0


def override(task: Task, parallel: int | None, job_timeout: float | None) -> None:
    """Apply ``--parallel`` and ``--job-timeout`` to a Task."""
    if parallel is not None:
        opts = task.options
        # prefetch follows parallel_num unless the Task set it apart.
        prefetch = PREFETCH_PER_THREAD * parallel if opts.prefetch_auto else opts.prefetch
        task.options = dataclasses.replace(opts, parallel_num=parallel, prefetch=prefetch)
    if job_timeout is not None:
        task.options = dataclasses.replace(task.options, job_timeout=job_timeout)
