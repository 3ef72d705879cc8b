"""Testing your handlers: the inline mode, with no servers and no Redis at all.

``Task(..., inline=True)``, or ``with meepo.testing.inline(task):`` for a task built
elsewhere (imported from your app), makes ``push()`` run the handler in the pushing
thread, through the same claim, start and commit code as a worker, on the task's ledger
(an SQLite file by default; any database URL works). ``push`` returns once the job is
finished (retries included, at once: ``retry_backoff`` is not waited for), and
``task.get(job_id)`` shows the outcome. The messages that would go to Redis stay in
this process (:class:`meepo.transport.local.LocalTransport`).

* A handler's exception is not raised out of ``push``: the job fails as in production
  (``status``, ``failed_times``, ``last_error``). ``raise_errors=True`` raises it from
  ``push`` once its job ended ``failed``, with its traceback.
* Delayed jobs (``delay=``, ``run_at=``, a manual ``todo`` commit with ``delay=``) stay
  ``todo`` until :func:`run_due` runs what is due by then (the task's clock: pass
  ``Task(..., clock=...)`` to move time by hand).
* Middleware hooks run as in a worker (``on_start`` before the first job, ``on_stop``
  at ``task.stop()`` or the end of the ``with`` block).

docs/testing.md has the details and a pytest example; the pytest plugin (the
``meepo_ledger`` and ``meepo_inline`` fixtures) is :mod:`meepo_pytest`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import Engine

from .errors import ConfigError
from .task import Task

__all__ = ["inline", "run_due"]


@contextlib.contextmanager
def inline(
    task: Task, *, raise_errors: bool = False, db: str | Engine | None = None
) -> Iterator[Task]:
    """Run ``task`` inline for the block: its pushes run their jobs at once, in the
    pushing thread, with no Redis; the task is as it was after the block.

    ``db``: another ledger for the block (a test database URL or Engine, migrated
    first), e.g. the ``meepo_ledger`` fixture's; by default the task's own.
    ``raise_errors``: a job that ends ``failed`` because its handler raised re-raises
    that exception out of the ``push`` that ran it.

    The task must not be consuming (``start()``): a ConfigError says so."""
    if not isinstance(task, Task):
        raise TypeError(f"meepo.testing.inline takes a meepo.Task, not {type(task).__name__}")
    with task._inline_scope(raise_errors=raise_errors, db=db):
        yield task


def run_due(task: Task) -> list[int]:
    """Run the jobs of an inline task that are due now and not run yet: delayed jobs
    whose time has come by the task's clock, and jobs written but never dispatched
    (a push inside a caller's SQLAlchemy Connection transaction, after it committed).
    Returns the ids run, in order (a retried job once per attempt)."""
    if not isinstance(task, Task):
        raise TypeError(f"meepo.testing.run_due takes a meepo.Task, not {type(task).__name__}")
    runner = task._inline
    if not task.inline:
        raise ConfigError(
            f"task {task.task_id!r} is not inline: build it with inline=True or run it "
            "inside meepo.testing.inline(task)"
        )
    task.dispatcher.promote(task.clock())
    task.dispatcher.sweep(limit=task.options.zombie_limit)
    return [] if runner is None else runner.run_ready()
