"""``Task.wait``: commit -> ``wait()`` returns, and what the finish notices cost a drain.

* :func:`wait_latency`: ``n`` jobs, one at a time: a waiter thread waits for the job,
  the main thread commits it (``task.commit``, the manual path: one UPDATE, then the
  PUBLISH); the time from just before the commit call to the waiter's return, p50 and
  p99 (the commit's own round trip included). Issue 14's target: p50 under 2 ms on an
  idle machine.
* :func:`drain_cost`: an in-process consumer drains ``n`` no-op jobs, rounds alternating
  with the notices on and off (off: the dispatcher's ``notify`` does nothing), median
  jobs/s of each.

Short by default (a few seconds per backend; ``make bench`` runs it)::

    python -m benchmarks.wait_latency [--db URL ...] [--jobs 200] [--drain-jobs 2000]
    python -m benchmarks.wait_latency --quick      # 50 waits, 500-job drains
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

from meepo import Job, Status, Task
from meepo.dispatch import Dispatcher

from .common import DEFAULT_REDIS_URL, DEFAULT_URLS
from .lateness import percentile


def _task_id(kind: str) -> str:
    return f"bench_{kind}_{int(time.time() * 1000) % 10**9}"


def wait_latency(db_url: str, redis_url: str, n: int = 200) -> dict[str, float]:
    """p50/p99 (ms) of commit -> wait() returns, over ``n`` jobs (see the module)."""
    task = Task(_task_id("wait"), db_url, redis_url, init_db=True)
    try:
        ids = task.push_many([b"x"] * n)
        lease = timedelta(seconds=task.options.lease)
        claimed: list[Job] = []
        while len(claimed) < n:
            popped = task.dispatcher.pop_and_claim(
                n - len(claimed), timeout=1, lease=lease, worker="bench"
            )
            claimed.extend(popped.jobs)
        by_id = {j.id: j for j in claimed}
        samples = [_one_wait(task, by_id[i]) for i in ids]
        return {
            "jobs": n,
            "p50_ms": statistics.median(samples),
            "p99_ms": percentile(samples, 0.99),
        }
    finally:
        task.dispatcher.after_subscribe = None
        task.stop()


def _one_wait(task: Task, job: Job) -> float:
    """Milliseconds from just before the commit call to the waiter's return."""
    watching = threading.Event()
    done: list[float] = []

    def waiter() -> None:
        task.wait(job.id, timeout=30)
        done.append(time.perf_counter())

    task.dispatcher.after_subscribe = lambda _: watching.set()
    t = threading.Thread(target=waiter)
    t.start()
    watching.wait(10)
    time.sleep(0.002)  # let it read the ledger and go to sleep
    began = time.perf_counter()
    task.commit(job.id, Status.DONE, commit_id=job.commit_id)
    t.join(30)
    return (done[0] - began) * 1000


@contextlib.contextmanager
def _notices(on: bool) -> Iterator[None]:
    if on:
        yield
        return
    real = Dispatcher.notify
    Dispatcher.notify = lambda self, finished: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        Dispatcher.notify = real  # type: ignore[method-assign]


def drain_cost(db_url: str, redis_url: str, n: int = 2000, rounds: int = 3) -> dict[str, float]:
    """Median jobs/s of an in-process drain of ``n`` no-op jobs with and without the
    finish notices, ``rounds`` alternating rounds each."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        # alternating which goes first: the first drain of a pair runs in other conditions
        for on in (True, False) if len(rates[True]) % 2 == 0 else (False, True):
            rates[on].append(_drain_once(db_url, redis_url, n, on))
    return {
        "jobs": n,
        "with_notices_jobs_per_s": statistics.median(rates[True]),
        "without_notices_jobs_per_s": statistics.median(rates[False]),
    }


def results_cost(db_url: str, redis_url: str, n: int = 2000, rounds: int = 3) -> dict[str, float]:
    """Median jobs/s of a drain whose handler returns ``b"ok"``, with and without
    ``store_results`` (issue 14: within 10%)."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for on in (True, False) if len(rates[True]) % 2 == 0 else (False, True):
            rates[on].append(_drain_once(db_url, redis_url, n, True, store_results=on))
    return {
        "jobs": n,
        "store_results_jobs_per_s": statistics.median(rates[True]),
        "without_jobs_per_s": statistics.median(rates[False]),
    }


def _drain_once(
    db_url: str, redis_url: str, n: int, notices: bool, *, store_results: bool = False
) -> float:
    task = Task(
        _task_id("drain"),
        db_url,
        redis_url,
        job_func=lambda job: b"ok",
        store_results=store_results,
        init_db=True,
    )
    task.push_many([b"x"] * n)
    with _notices(notices):
        began = time.perf_counter()
        task.start()
        # until the ledger shows every job done (the last group commit included)
        while task.ledger.stats(task.task_id)[0].counts.get(Status.DONE, 0) < n:
            time.sleep(0.005)
        took = time.perf_counter() - began
        task.stop()
    for engine in {task.engine, task.service_engine}:  # leave the server's connections free
        engine.dispose()
    task.transport.close()
    return n / took


#: issue 14's target for the p50 of commit -> wait() returns, on an idle machine (ms)
TARGET_P50_MS = 2.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", action="append", help="ledger URL (repeat; default: the local servers)")
    ap.add_argument("--jobs", type=int, default=None, help="waits (200; --quick 50)")
    ap.add_argument("--drain-jobs", type=int, default=None, help="(2000; --quick 500; 0: none)")
    ap.add_argument("--redis", default=DEFAULT_REDIS_URL)
    ap.add_argument("--quick", action="store_true", help="small N: a smoke run")
    args = ap.parse_args(argv)
    if args.jobs is None:
        args.jobs = 50 if args.quick else 200
    if args.drain_jobs is None:
        args.drain_jobs = 500 if args.quick else 2000
    print(
        f"commit -> task.wait() returns, {args.jobs} jobs one at a time (target: p50 < "
        f"{TARGET_P50_MS:g} ms on an idle machine; load {os.getloadavg()[0]:.2f})"
    )
    for url in args.db or list(DEFAULT_URLS.values()):
        backend = url.split(":", 1)[0]
        lat = wait_latency(url, args.redis, args.jobs)
        verdict = "met" if lat["p50_ms"] < TARGET_P50_MS else "NOT met"
        print(
            f"{backend}: commit -> wait() p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms"
            f"  (target p50 < {TARGET_P50_MS:g} ms: {verdict})"
        )
        if args.drain_jobs:
            d = drain_cost(url, args.redis, args.drain_jobs)
            print(
                f"{backend}: drain {d['with_notices_jobs_per_s']:.0f} jobs/s with notices, "
                f"{d['without_notices_jobs_per_s']:.0f} without"
            )
            r = results_cost(url, args.redis, args.drain_jobs)
            print(
                f"{backend}: drain {r['store_results_jobs_per_s']:.0f} jobs/s storing results, "
                f"{r['without_jobs_per_s']:.0f} without"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
