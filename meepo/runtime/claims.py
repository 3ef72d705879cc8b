"""The claims one consumer holds: the book its services share.

One lock guards it all; the fetcher waits on :attr:`Claims.slot` for free capacity and
the starter on :attr:`Claims.start_cv` for a start to record (both conditions of that
one lock), so each job's start and end hold the lock once each (see
:mod:`meepo.runtime.executor`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..config import AUTO_PREFETCH_MAX_PER_THREAD, AUTO_PREFETCH_SECONDS, Options
from ..ledger import Pair
from ..records import Job, RunControl


@dataclass
class Counters:
    claimed: int = 0
    done: int = 0
    retried: int = 0
    failed: int = 0
    stale: int = 0
    dropped: int = 0
    cancelled: int = 0  # jobs closed as cancelled (cancelled while they ran)
    finished: int = 0  # handler runs that ended: returned, raised or timed out
    timed_out: int = 0  # handler runs that outlived job_timeout (their threads abandoned)


@dataclass
class Claim:
    """One claim this process holds: its commit_id, the job's priority, and when its
    lease ends as far as this process knows (monotonic seconds: set by the claim, pushed
    back by every heartbeat that renews it), and the run's live side (cancel flag,
    progress) that the heartbeat reads and sets."""

    commit_id: int
    priority: str
    lease_end: float
    control: RunControl | None = None


class Claims:
    """What a consumer holds, and the lock its services share.

    * :attr:`held`: job id → this process's claim (its lease is renewed by the
      heartbeat until its commit is written, or it is given back or lost);
    * :attr:`busy`: claims whose handler has not returned yet (queued or running):
      what the capacity bounds. A job whose handler returned stays in ``held`` but no
      longer takes a slot; ``held`` is bounded apart (twice the capacity), so a slow
      committer still holds the fetcher back;
    * :attr:`unmarked`: claims whose handler began and whose start is not recorded yet
      (the starter marks them, unless their commit does first);
    * :attr:`set_aside` (taken after the intake closed) and :attr:`not_started` (too
      little lease left to start): claimed jobs to give back;
    * :attr:`timed_out`: claims failed by job_timeout whose handler is still running.

    ``monotonic`` is the clock of leases and run times (a test passes its own).
    """

    def __init__(self, options: Options, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.opts = options
        self.monotonic = monotonic
        self.counters = Counters()
        self.capacity = options.parallel_num + options.prefetch
        self.run_time: float | None = None  # moving average of handler run times (s)
        self.lock = threading.Lock()
        self.slot = threading.Condition(self.lock)
        self.start_cv = threading.Condition(self.lock)
        self.held: dict[int, Claim] = {}
        self.busy = 0
        self.unmarked: set[Pair] = set()
        self.set_aside: list[Job] = []
        self.not_started: list[Job] = []
        self.timed_out: set[Pair] = set()
        self.intake_closed = threading.Event()  # executors start nothing new
        #: Called when a run reports progress with none pending (the heartbeat's
        #: wake-up: it writes the reports within PROGRESS_DELAY).
        self.progress_wake: Callable[[], None] | None = None

    def current_capacity(self) -> int:
        """How many claims the fetcher may hold unstarted or running: ``parallel_num +
        prefetch``; with the automatic prefetch, more while handlers are short (about
        AUTO_PREFETCH_SECONDS of work per thread ahead, bounded)."""
        avg = self.run_time
        if not self.opts.prefetch_auto or avg is None:
            return self.capacity
        n = self.opts.parallel_num
        ahead = n * AUTO_PREFETCH_SECONDS / max(avg, 1e-6)
        return n + max(self.opts.prefetch, min(int(ahead), AUTO_PREFETCH_MAX_PER_THREAD * n))

    def free(self) -> int:
        """How many more claims the fetcher may take now; call with the lock held."""
        cap = self.current_capacity()
        return min(cap - self.busy, 2 * cap - len(self.held))

    def holds(self, job_id: int, commit_id: int) -> bool:
        """Whether this process holds that claim of the job; call with the lock held."""
        claim = self.held.get(job_id)
        return claim is not None and claim.commit_id == commit_id

    def drop(self, job_id: int) -> None:
        """Forget a claim (its lease is no longer renewed); call with the lock held."""
        del self.held[job_id]

    def forget(self, pairs: Iterable[Pair]) -> None:
        """Forget these claims if still held (committed, given back, lost) and wake the
        fetcher."""
        with self.slot:
            for i, c in pairs:
                if self.holds(i, c):
                    self.drop(i)
            self.slot.notify_all()

    def take_back(self) -> list[Job]:
        """The claimed jobs set aside or not started, to give back (emptied)."""
        with self.lock:
            jobs = self.set_aside + self.not_started
            self.set_aside, self.not_started = [], []
        return jobs
