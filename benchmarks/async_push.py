"""The async producer API keeps the caller's event loop responsive.

In one ``asyncio.run``: a ticker coroutine sleeps 5 ms at a time and records how late
each wake-up is (the loop's lag) while ``--jobs`` concurrent ``await task.push_async()``
calls run (``asyncio.gather``). Two rows for scale: the floor of any thread offload (the
same number of gathered ``run_in_executor`` calls of a 1 ms ``time.sleep`` on a pool of
the same size: starting that many coroutines in one loop iteration is itself a lag), and
plain blocking ``task.push()`` calls made from a coroutine (what an async app would do
without push_async: each one stalls the loop for a whole round trip, seconds in a
database outage). Prints, per backend, the calls' wall time and rate and the loop's p99
and max lag in each case, and writes a JSON file to benchmarks/results/.

    python -m benchmarks.async_push [--backends sqlite,mariadb,postgres] [--jobs 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from meepo import Task

from .common import DEFAULT_REDIS_URL, DEFAULT_URLS, REPO
from .lateness import percentile

RESULTS = REPO / "benchmarks" / "results"
TICK = 0.005


async def ticker(lags: list[float], done: asyncio.Event) -> None:
    while not done.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(TICK)
        lags.append(time.perf_counter() - t0 - TICK)


async def under_load(task: Task, jobs: int, how: str) -> dict[str, float]:
    lags: list[float] = []
    done = asyncio.Event()
    tick = asyncio.create_task(ticker(lags, done))
    await asyncio.sleep(0.05)  # the ticker is running
    began = time.perf_counter()
    if how == "push_async":
        ids = await asyncio.gather(*(task.push_async(b"x") for _ in range(jobs)))
    elif how == "floor":
        loop = asyncio.get_running_loop()
        pool = task.offload.pool()
        await asyncio.gather(*(loop.run_in_executor(pool, time.sleep, 0.001) for _ in range(jobs)))
        ids = list(range(jobs))
    else:
        ids = []
        for _ in range(jobs):
            ids.append(task.push(b"x"))  # blocks the loop: the contrast
            await asyncio.sleep(0)
    took = time.perf_counter() - began
    done.set()
    await tick
    assert len(set(ids)) == jobs
    return {
        "jobs": jobs,
        "seconds": took,
        "per_second": jobs / took,
        "lag_p99_ms": percentile(lags, 0.99) * 1000,
        "lag_max_ms": max(lags) * 1000,
        "ticks": len(lags),
    }


async def measure(db_url: str, redis_url: str, jobs: int) -> dict[str, dict[str, float]]:
    task = Task(f"async_push_{os.getpid()}_{int(time.time())}", db=db_url, redis=redis_url)
    task.migrate()
    await task.push_async(b"warm-up")  # the pool's threads and connections
    return {
        "push_async": await under_load(task, jobs, "push_async"),
        "offload floor": await under_load(task, jobs, "floor"),
        "push (blocking)": await under_load(task, max(1, jobs // 10), "blocking"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,mariadb,postgres")
    parser.add_argument("--jobs", type=int, default=1000)
    args = parser.parse_args(argv)
    urls = dict(DEFAULT_URLS)
    RESULTS.mkdir(parents=True, exist_ok=True)
    urls["sqlite"] = f"sqlite:///{RESULTS / 'async_push.sqlite3'}"
    out: dict[str, Any] = {}
    print(f"event-loop lag (a {TICK * 1000:g} ms ticker) under {args.jobs} concurrent push_async")
    head = f"{'backend':10} {'call':16} {'calls':>6} {'wall':>8} {'calls/s':>8}"
    print(f"{head} {'lag p99':>9} {'max':>9}")
    for name in args.backends.split(","):
        out[name] = asyncio.run(measure(urls[name], DEFAULT_REDIS_URL, args.jobs))
        for call, r in out[name].items():
            print(
                f"{name:10} {call:16} {int(r['jobs']):6d} {r['seconds']:7.2f}s "
                f"{r['per_second']:8.0f} {r['lag_p99_ms']:7.1f}ms {r['lag_max_ms']:7.1f}ms"
            )
    load = os.getloadavg()[0]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"async_push-{stamp}.json"
    path.write_text(json.dumps({"when": stamp, "load1": load, "results": out}, indent=2))
    print(f"(load average {load:.2f}; written to {path.relative_to(REPO)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
