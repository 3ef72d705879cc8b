"""Lateness of delayed jobs on an idle queue: due time (``run_at``) to handler start.

One consumer process with default settings (the promoter's 50 ms tick included) runs a
no-op handler that records when it started; the producer pushes ``--jobs`` jobs, each
with a delay of 0.2 to 0.5 s, at about ``--rate`` pushes per second, so the queue is
idle when each falls due. Prints p50/p95/p99/max per backend and writes a JSON file to
benchmarks/results/. Issue 3's target: p99 under 100 ms with default settings.

    python -m benchmarks.lateness [--backends sqlite,mariadb,postgres] [--jobs 300]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from datetime import datetime, timezone

from meepo import Job, Task

from .common import DEFAULT_REDIS_URL, DEFAULT_URLS, REPO

RESULTS = REPO / "benchmarks" / "results"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def measure(db_url: str, redis_url: str, jobs: int, rate: float) -> dict[str, float]:
    started: dict[int, datetime] = {}
    lock = threading.Lock()

    def handler(job: Job) -> None:
        now = datetime.now(timezone.utc)
        with lock:
            started[job.id] = now

    task_id = f"lateness_{os.getpid()}_{int(time.time())}"
    consumer = Task(task_id, db=db_url, redis=redis_url, job_func=handler, init_db=True)
    producer = Task(task_id, db=db_url, redis=redis_url)
    consumer.start()
    try:
        rng = random.Random(1)
        ids = []
        for _ in range(jobs):
            ids.append(producer.push(b"x", delay=rng.uniform(0.2, 0.5)))
            time.sleep(1.0 / rate)
        deadline = time.monotonic() + 60
        while len(started) < jobs and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        consumer.stop()
    late = []
    for job_id in ids:
        rec = producer.get(job_id)
        if rec is None or job_id not in started:
            raise SystemExit(f"job {job_id} never ran")
        late.append((started[job_id] - rec.run_at).total_seconds() * 1000)
    return {
        "jobs": jobs,
        "p50_ms": statistics.median(late),
        "p95_ms": percentile(late, 0.95),
        "p99_ms": percentile(late, 0.99),
        "max_ms": max(late),
        "min_ms": min(late),
        "early": sum(1 for x in late if x < 0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,mariadb,postgres")
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--rate", type=float, default=50.0, help="pushes per second")
    args = parser.parse_args(argv)
    urls = dict(DEFAULT_URLS)
    urls["sqlite"] = f"sqlite:///{RESULTS / 'lateness.sqlite3'}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, float]] = {}
    print(f"delayed-job lateness (run_at -> handler start), {args.jobs} jobs at {args.rate}/s")
    print(f"{'backend':10} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}  early  target p99<100ms")
    for name in args.backends.split(","):
        r = measure(urls[name], DEFAULT_REDIS_URL, args.jobs, args.rate)
        out[name] = r
        ok = "met" if r["p99_ms"] < 100 and r["early"] == 0 else "MISSED"
        print(
            f"{name:10} {r['p50_ms']:7.1f}ms {r['p95_ms']:7.1f}ms {r['p99_ms']:7.1f}ms "
            f"{r['max_ms']:7.1f}ms  {int(r['early']):5d}  {ok}"
        )
    load = os.getloadavg()[0]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"lateness-{stamp}.json"
    path.write_text(json.dumps({"when": stamp, "load1": load, "results": out}, indent=2))
    print(f"(load average {load:.2f}; written to {path.relative_to(REPO)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
