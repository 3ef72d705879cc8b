"""The inline runner: a task's jobs run in the pushing thread (the test mode).

``Task(..., inline=True)`` and :func:`meepo.testing.inline` give a task an in-process
transport (:class:`~meepo.transport.local.LocalTransport`) and an :class:`InlineRunner`;
every push then ends with :meth:`InlineRunner.run_ready`, which drives one ordinary
:class:`~meepo.runtime.consumer.Consumer`'s services by hand, in the calling thread, with
no thread of their own: the fetcher's pop and claim (one job at a time), the thread
executor's admission and run (middleware, error capture), and the committer's group
commit, until the task has no job ready. The ledger sees exactly the transitions a
worker makes; only the waits are gone: a retry is due at once (``retry_backoff`` is not
applied) and a commit is written before the handler's ``task.commit`` returns.

A ``KeyboardInterrupt`` raised in a handler (Ctrl-C, as the handler runs in the test's
own thread) fails the attempt as any exception does, and is then raised out of ``push``.

What it does not do: leases are not renewed while a handler runs (nothing else can
reap the job: no reaper runs inline), and ``job_timeout`` is not enforced.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ..config import Options
from ..dispatch import Dispatcher
from ..middleware import Hooks
from ..records import Job, Status
from .consumer import Consumer
from .executor import Slot, ThreadExecutor, is_async_handler

log = logging.getLogger("meepo.inline")


def _run_to_completion(handler: Callable[[Job], Any]) -> Callable[[Job], Any]:
    """An ``async def`` handler as a plain function: each call runs the coroutine to
    its end on an event loop of its own, in a thread of its own (so a push from inside
    the test's own running loop works too), and returns or raises what it did."""

    def call(job: Job) -> Any:
        import asyncio

        box: dict[str, Any] = {}

        def go() -> None:
            try:
                box["result"] = asyncio.run(handler(job))
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=go, name=f"meepo-inline-{job.id}", daemon=True)
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box.get("result")

    return call


class InlineRunner:
    """Runs ``handler`` for the jobs of ``dispatcher``'s task, in the caller's thread.

    ``raise_errors``: when a job run here ends ``failed`` because its handler raised,
    :meth:`run_ready` raises that exception (the last attempt's, with its traceback)
    after the job was committed."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        options: Options,
        handler: Callable[[Job], Any],
        clock: Callable[[], datetime],
        hooks: Hooks | None,
        *,
        raise_errors: bool = False,
    ) -> None:
        # One claim at a time: the job runs right after its claim, with its whole lease.
        opts = dataclasses.replace(options, parallel_num=1, prefetch=0, prefetch_auto=False)
        self._raised: dict[int, BaseException] = {}

        self._interrupted: KeyboardInterrupt | None = None

        call = _run_to_completion(handler) if is_async_handler(handler) else handler

        def run(job: Job) -> Any:
            try:
                return call(job)
            except KeyboardInterrupt as exc:  # Ctrl-C in the test run: after the commit
                self._interrupted = exc
                raise
            except BaseException as exc:
                self._raised[job.id] = exc
                raise

        self.consumer = Consumer(dispatcher, opts, run, clock, retry_delay=None)
        self.consumer.hooks = hooks
        assert isinstance(self.consumer.executor, ThreadExecutor)
        self._executor = self.consumer.executor
        self.consumer.committer.synchronous = True
        # Running as far as manual commits (task.commit) are concerned; no thread starts.
        self.consumer.running = True
        self.hooks = hooks
        self.raise_errors = raise_errors
        self.started = False  # the middleware's on_start ran
        self._lock = threading.Lock()
        self._local = threading.local()
        self._slot = Slot()

    @property
    def dispatcher(self) -> Dispatcher:
        return self.consumer.d

    def run_ready(self) -> list[int]:
        """Run every job of the task that is ready (due and dispatched), retries
        included, until none is left; returns the ids of the runs, in order.

        A push from one of these handlers (re-entrant, same thread) returns at once:
        its job runs after the current one, before the outer call returns."""
        if getattr(self._local, "active", False):
            return []
        ran: list[int] = []
        with self._lock:
            self._local.active = True
            try:
                if not self.started and self.hooks is not None:
                    self.started = True
                    self.hooks.on_start()
                self._loop(ran)
            finally:
                self._local.active = False
        self._raise_failed(ran)
        return ran

    def _loop(self, ran: list[int]) -> None:
        c = self.consumer
        while True:
            popped = c.fetcher.run_once(timeout=0.0)
            jobs = c.executor.drain()
            if not jobs:
                if popped is None or popped.popped == 0:
                    return
                continue  # stale or early messages only: look again
            for job in jobs:
                if self._executor.admit(self._slot, job):
                    ran.append(job.id)
                    self._executor.run(self._slot, job)
                c.committer.run_once()
                interrupted, self._interrupted = self._interrupted, None
                if interrupted is not None:
                    raise interrupted  # the attempt is committed as failed; Ctrl-C goes on
            given_back = c.claims.take_back()
            if given_back:
                c.heartbeat.release(given_back)

    def _raise_failed(self, ran: list[int]) -> None:
        raised = {i: self._raised.pop(i) for i in dict.fromkeys(ran) if i in self._raised}
        if not self.raise_errors:
            return
        for job_id, exc in raised.items():
            rec = self.dispatcher.ledger.get(job_id, self.dispatcher.task_id)
            if rec is not None and rec.status is Status.FAILED:
                raise exc

    def stop(self) -> None:
        """The end of inline mode: the middleware's on_stop, if on_start ran."""
        if self.started and self.hooks is not None:
            self.started = False
            self.hooks.on_stop()
