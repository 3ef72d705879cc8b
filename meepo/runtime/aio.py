"""The asyncio executor: ``async def`` handlers on one event loop per consumer.

A consumer whose handler is a coroutine function runs its handlers here instead of in
threads (:func:`meepo.runtime.consumer.executor_for` picks it). One thread runs an
event loop; ``parallel_num`` slots are places on it, each running at most one handler
coroutine (an asyncio Task) at a time. The fetcher, the committer, the heartbeat, the
starter and the watchdog are the same services as for threads: a job is admitted and its
end accounted for by the shared :meth:`Executor.admit` / :meth:`Executor.ended`, so
start marks, orphaned claims, group commits, manual commits and middleware hooks behave
exactly as with threads.

What differs:

* **job_timeout cancels** the coroutine (the handler sees ``CancelledError`` at its
  current ``await``); the watchdog has already failed the attempt as a timeout, as for a
  thread, and the slot is replaced at once. A handler that swallows the cancellation
  runs on, abandoned (its outcome is ignored, its late commit stale).
* **A handler that blocks the loop** (a sync call inside ``async def``: ``time.sleep``,
  a blocking client) stalls every other coroutine of the consumer. A monitor thread
  posts a beat to the loop every :data:`BLOCK_THRESHOLD` / 4 seconds; a beat late by
  more than :data:`BLOCK_THRESHOLD` is logged (WARNING, ``meepo.consumer``) with the
  task id and the id of the job whose coroutine holds the loop (read from the loop
  thread's stack at each look while it blocks: the same job every time), and once more
  with the total when the loop is free. A lag with no single holder (many short steps,
  or a host that did not schedule the process) is logged at INFO.
* The hand-over from the fetcher is a thread-safe queue's ``put`` plus, when the loop
  has not been woken already, one ``call_soon_threadsafe``.

This module imports asyncio; it is imported only by a consumer of an ``async def``
handler, so a worker of plain functions never loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import queue
import sys
import threading
import time
from types import FrameType
from typing import Any

from ..config import Options
from ..records import Job
from .claims import Claims
from .committer import Committer
from .executor import Executor, Handler, Slot
from .starter import Starter

log = logging.getLogger("meepo.consumer")

#: Loop lag (seconds) logged as a handler blocking the event loop.
BLOCK_THRESHOLD = 0.1

#: The job of the handler coroutine whose context this is (and its executor).
_running_job: contextvars.ContextVar[tuple[AsyncioExecutor, Job] | None] = contextvars.ContextVar(
    "meepo_running_job", default=None
)


class AsyncioExecutor(Executor):
    """Coroutine handlers, ``parallel_num`` at once on one event loop in its own thread."""

    retire_note = "its coroutine is cancelled and its slot replaced"

    def __init__(
        self,
        claims: Claims,
        options: Options,
        handler: Handler,
        committer: Committer,
        starter: Starter,
        task_id: str,
    ) -> None:
        super().__init__(claims, options, handler, committer, starter, task_id)
        self.submit = self._submit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._free: list[Slot] = []  # the loop thread's: slots with no handler
        self._running: dict[Slot, asyncio.Task[None]] = {}  # written by the loop thread
        self._woken = False  # a _pump is scheduled and has not begun
        self._ended = threading.Condition()  # wait(): a handler ended while stopping
        self._monitor: LoopMonitor | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self.stopping = False
        self.slots = [Slot() for _ in range(self.opts.parallel_num)]
        self._free = list(self.slots)
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=self._run_loop, args=(loop,), name=f"meepo-{self.task_id}-loop", daemon=True
        )
        self._thread.start()
        self._monitor = LoopMonitor(self, loop, self._thread)
        self._monitor.start()

    def _run_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    def _call(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` on the loop soon (from any thread); nothing once it closed."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to run
            loop.call_soon_threadsafe(fn, *args)

    def _submit(self, job: Job | None) -> None:
        self._work.put(job)
        if not self._woken:
            self._woken = True
            self._call(self._pump)

    def shutdown(self) -> list[Slot]:
        with self.claims.lock:
            self.stopping = True  # the watchdog replaces no slot from now on
            slots = list(self.slots)
        self._call(self._stop_if_idle)
        return slots

    def wait(self, slots: list[Slot], deadline: float) -> bool:
        def busy(s: Slot) -> bool:  # a timed-out handler is not waited for
            return s in self._running and not s.abandoned

        while any(busy(s) for s in slots):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._ended:
                self._ended.wait(min(0.1, left))
        return True

    def replace(self, slot: Slot) -> None:
        fresh = Slot()
        self.slots.append(fresh)
        self._call(self._add_slot, fresh)

    def retire(self, slot: Slot) -> None:
        task = self._running.get(slot)
        super().retire(slot)
        if task is not None:
            self._call(task.cancel)

    def alive(self, slot: Slot) -> bool:
        return slot in self._running

    def current_job(self) -> Job | None:
        held = _running_job.get()
        return held[1] if held is not None and held[0] is self else None

    def running_jobs(self) -> list[Job]:
        """The jobs of the handlers on the loop now (any thread; a snapshot)."""
        with self.claims.lock:
            return [s.job for s in self.slots if s.job is not None]

    # -- the loop thread ----------------------------------------------------------------

    def _add_slot(self, slot: Slot) -> None:
        self._free.append(slot)
        self._pump()

    def _pump(self) -> None:
        """Start a handler in each free slot while jobs wait (the loop thread)."""
        self._woken = False
        loop = self._loop
        assert loop is not None
        while self._free:
            try:
                job = self._work.get_nowait()
            except queue.Empty:
                return
            if job is None:
                continue
            slot = self._free.pop()
            self._running[slot] = loop.create_task(self._run(slot, job))

    def _stop_if_idle(self) -> None:
        if self.stopping and not self._running and self._work.empty() and self._loop:
            self._loop.stop()

    async def _run(self, slot: Slot, job: Job) -> None:
        try:
            if job.orphaned_claims > 0:  # admit records the start first: a round trip
                admitted = await asyncio.to_thread(self.admit, slot, job)
            else:
                admitted = self.admit(slot, job)
            if admitted:
                await self.run(slot, job)
        finally:
            del self._running[slot]
            if not slot.abandoned:
                self._free.append(slot)
                self._pump()
            if self.stopping:
                with self._ended:
                    self._ended.notify_all()
                self._stop_if_idle()

    async def run(self, slot: Slot, job: Job) -> bool:
        """Run one admitted job's handler on the loop; False if it outlived job_timeout."""
        _running_job.set((self, job))  # this asyncio Task's own context
        result: Any = None
        error: str | None = None
        failure: BaseException | None = None
        hooks = self.hooks
        began = time.perf_counter()
        running = asyncio.current_task()
        if running is not None:
            # A cancel the heartbeat sees (in its thread) cancels the coroutine: the
            # handler sees CancelledError, and the job ends as cancelled.
            job.control.on_cancel = functools.partial(self._call, running.cancel)
        try:
            if hooks is not None:  # middleware: before_run (raising fails the attempt)
                hooks.before_run(job)
            result = await self.handler(job)
        except asyncio.CancelledError as exc:
            error = "CancelledError: the handler was cancelled"
            failure = exc
            if not slot.abandoned:
                log.warning("task %s: job %d was cancelled", self.task_id, job.id)
        except BaseException as exc:  # the job's failure (ended makes its error text)
            failure = exc
        job.control.on_cancel = None
        # A coroutine cancelled by job_timeout ended as asked: no warning about it.
        quiet = slot.abandoned and isinstance(failure, asyncio.CancelledError)
        return self.ended(slot, job, began, result, error, failure, quiet=quiet)


class LoopMonitor:
    """Watches an executor's loop from a thread of its own: a beat posted to the loop
    that runs late by more than :data:`BLOCK_THRESHOLD` means a coroutine blocks it."""

    def __init__(
        self, executor: AsyncioExecutor, loop: asyncio.AbstractEventLoop, thread: threading.Thread
    ) -> None:
        self.ex = executor
        self.loop = loop
        self.loop_thread = thread
        self.posted: float | None = None  # when the pending beat was posted
        #: What the loop thread was running at each look during this lag (a job, or None
        #: outside any handler): one job at every look is one handler holding the loop.
        self.seen: list[Job | None] = []
        self.reported = False  # this lag was logged while it lasted
        self.lock = threading.Lock()
        self.thread = threading.Thread(
            target=self._watch, name=f"meepo-{executor.task_id}-loopwatch", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def _watch(self) -> None:
        threshold = BLOCK_THRESHOLD
        check = threshold / 4
        while self.loop_thread.is_alive():
            time.sleep(check)
            now = time.monotonic()
            with self.lock:
                posted = self.posted
                if posted is None:
                    self.posted = now
            if posted is None:
                try:
                    self.loop.call_soon_threadsafe(self._beat)
                except RuntimeError:  # closed
                    return
                continue
            lag = now - posted
            if lag < check:
                continue
            holder = self._holder()
            with self.lock:
                if self.posted != posted:
                    continue  # the beat ran meanwhile
                self.seen.append(holder)
                job = self._culprit()
                report = job is not None and lag > threshold and not self.reported
                if report:
                    self.reported = True
            if report:
                assert job is not None
                log.warning(
                    "task %s: %s has blocked the event loop for %.2fs so far (a blocking "
                    "call inside an async def handler? await an async API instead, or run "
                    "it with asyncio.to_thread); every other handler of the task waits",
                    self.ex.task_id,
                    f"job {job.id}",
                    lag,
                )

    def _culprit(self) -> Job | None:
        """The one job seen at every look of this lag, if any (call with the lock)."""
        first = self.seen[0] if self.seen else None
        if first is None or any(s is not first for s in self.seen):
            return None
        return first

    def _beat(self) -> None:
        """The beat, on the loop: how late it ran."""
        now = time.monotonic()
        with self.lock:
            posted, job = self.posted, self._culprit()
            self.posted, self.seen, self.reported = None, [], False
        if posted is None:
            return
        lag = now - posted
        if lag <= BLOCK_THRESHOLD:
            return
        if job is not None:
            log.warning(
                "task %s: job %d blocked the event loop for %.2fs (more than %gs)",
                self.ex.task_id,
                job.id,
                lag,
                BLOCK_THRESHOLD,
            )
        else:  # many short steps, or the host did not run this process
            log.info(
                "task %s: the event loop ran %.2fs late with no single handler holding it "
                "(many handlers at once, or an overloaded host)",
                self.ex.task_id,
                lag,
            )

    def _holder(self) -> Job | None:
        """The job whose handler coroutine the loop thread is running now, read from
        that thread's stack (the frame of :meth:`AsyncioExecutor.run`)."""
        ident = self.loop_thread.ident
        frame: FrameType | None = sys._current_frames().get(ident) if ident else None
        code = AsyncioExecutor.run.__code__
        while frame is not None:
            if frame.f_code is code:
                job = frame.f_locals.get("job")
                return job if isinstance(job, Job) else None
            frame = frame.f_back
        return None
