"""The I/O-bound workload (issue 14): jobs that each await 20 ms, meepo against the
async peers, in one run.

``--jobs`` jobs (10,000) are enqueued first; then ``--procs`` worker processes (2) are
started together, each running ``--concurrency`` jobs at once (100), and the drain is
timed from the start signal to the last job done. Each job's handler is
``await asyncio.sleep(--sleep)`` (0.02 s):

* meepo: an ``async def`` job_func with ``parallel_num`` = the concurrency (one event
  loop per worker process, ``docs/async.md``), on PostgreSQL, MariaDB and SQLite; done
  is the last ``done`` row's ``updated_at``;
* arq (``max_jobs``), SAQ (``concurrency``) and taskiq (taskiq-redis's
  ``RedisStreamBroker``, ``taskiq worker --workers 2 --max-async-tasks``), the same
  concurrency, their other settings at their defaults; done is the last job's end, seen
  through ``peers/probe.py``.

Printed: jobs/s per system, meepo / the fastest peer (target >= 1.5) and meepo / the
concurrency bound, procs x concurrency / sleep = 10,000 jobs/s (target >= 0.8). Each
figure is the median of ``--runs`` (1); the figures go to
``benchmarks/results/io_bound-<UTC timestamp>.json``.

    python -m benchmarks.io_bound                   # 10,000 jobs, about a minute
    python -m benchmarks.io_bound --quick           # 2,000 jobs, a smoke run
    python -m benchmarks.io_bound --backends postgres --peers saq --runs 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

from .common import (
    BACKENDS,
    DEFAULT_REDIS_URL,
    DEFAULT_URLS,
    Backend,
    Context,
    Metric,
    Settings,
    machine,
)
from .meepo_bench import Meepo
from .peers.base import CONCURRENCY_ENV, SLEEP_ENV
from .peers.driver import PEERS_BACKEND, PeerSystem
from .run import fmt_rate, leave_workdir, reachable_backends, run_backend, save_report

IO_PEERS = ("arq", "saq", "taskiq")
METRIC = "io_drain"
TARGET_PEER = 1.5
TARGET_BOUND = 0.8


class IoPeer(PeerSystem):
    """A peer in its configuration for this load: the concurrency, sleeping jobs."""

    def __init__(self, key: str, pg_url: str, sleep: float, concurrency: int) -> None:
        super().__init__(key, pg_url)
        self.sleep = sleep
        self.concurrency = concurrency

    def env(self, ctx: Context) -> dict[str, str]:
        return {
            **super().env(ctx),
            SLEEP_ENV: repr(self.sleep),
            CONCURRENCY_ENV: str(self.concurrency),
        }

    def metrics(self, ctx: Context) -> list[Metric]:
        self.load(ctx)
        return [(METRIC, partial(self.drain, n=ctx.settings.jobs))]


class IoMeepo(Meepo):
    def __init__(self, sleep: float, concurrency: int, procs: int) -> None:
        super().__init__(
            concurrency,
            name="meepo async",
            pushes=False,
            worker=["--async-sleep", repr(sleep)],
        )
        self.procs = procs

    def metrics(self, ctx: Context) -> list[Metric]:
        return [(METRIC, partial(self.drain, n=ctx.settings.jobs, procs=self.procs))]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.io_bound",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--backends", default=",".join(BACKENDS), help="meepo's ledgers")
    p.add_argument("--peers", default=",".join(IO_PEERS), help="comma-separated, or 'none'")
    p.add_argument("--jobs", type=int, default=None, help="10,000 (--quick: 2,000)")
    p.add_argument("--sleep", type=float, default=0.02, help="each job awaits (seconds)")
    p.add_argument("--concurrency", type=int, default=100, help="jobs at once per process")
    p.add_argument("--procs", type=int, default=2, help="worker processes")
    p.add_argument("--runs", type=int, default=1, help="runs per figure, the median is kept")
    p.add_argument("--redis", default=DEFAULT_REDIS_URL, help="Redis URL (peers flush its db)")
    p.add_argument("--quick", action="store_true", help="small N: a smoke run")
    p.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/")
    p.add_argument("--keep", action="store_true", help="keep the work directory (worker logs)")
    args = p.parse_args(argv)
    if args.jobs is None:
        args.jobs = 2_000 if args.quick else 10_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bound = args.procs * args.concurrency / args.sleep
    settings = Settings(jobs=args.jobs, procs=(args.procs,), latency=0, growth=0)
    workdir = Path(tempfile.mkdtemp(prefix="meepo-io-bench-"))
    started = datetime.now(timezone.utc)
    info = machine()
    print(
        f"I/O-bound workload, {started:%Y-%m-%d %H:%M} UTC: {args.jobs:,} jobs awaiting "
        f"{args.sleep * 1000:g} ms each, {args.procs} processes x {args.concurrency} at "
        f"once (bound {bound:,.0f} jobs/s), load {info['loadavg_start'][0]:.2f}"
    )
    rates: dict[str, float] = {}
    configs: dict[str, str] = {}
    report: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "machine": info,
        "options": dict(vars(args)),
        "bound": bound,
        "results": {},
    }
    peer_names = [] if args.peers == "none" else [x for x in args.peers.split(",") if x]
    if peer_names:
        peers = [
            IoPeer(n, DEFAULT_URLS["postgres"], args.sleep, args.concurrency) for n in peer_names
        ]
        print(f"\npeers ({', '.join(peer_names)})")
        res = run_backend(
            Backend(PEERS_BACKEND, DEFAULT_URLS["postgres"]),
            list(peers),
            settings,
            args.redis,
            workdir,
            args.runs,
        )
        report["results"]["peers"] = res
        for peer in peers:
            rate = res[peer.name].get(METRIC, {}).get("rate")
            configs[peer.name] = peer.config or (peer.unavailable or "not measured")
            if rate:
                rates[peer.name] = rate
    for backend, _server in reachable_backends(args.backends, workdir):
        name = backend.name
        system = IoMeepo(args.sleep, args.concurrency, args.procs)
        res = run_backend(backend, [system], settings, args.redis, workdir, args.runs)
        report["results"][name] = res
        rate = res[system.name].get(METRIC, {}).get("rate")
        label = f"meepo {name}"
        configs[label] = f"async def, parallel_num={args.concurrency}, {args.procs} processes"
        if rate:
            rates[label] = rate

    print(f"\nI/O-bound drain, jobs/s (median of {args.runs}; bound {bound:,.0f})")
    for name, config in configs.items():
        rate = rates.get(name)
        cells = f"{fmt_rate(rate):>9}  {rate / bound:5.2f} of bound" if rate else "   failed"
        print(f"  {name:<16} {config[:52]:<53} {cells}")
    peer_rates = {k: v for k, v in rates.items() if k in peer_names}
    best = max(peer_rates.items(), key=lambda kv: kv[1]) if peer_rates else None
    targets = []
    for label, rate in rates.items():
        if not label.startswith("meepo"):
            continue
        if best:
            r = rate / best[1]
            targets.append((f"{label} / fastest peer ({best[0]})", r, TARGET_PEER))
        targets.append((f"{label} / bound {bound:,.0f}", rate / bound, TARGET_BOUND))
    if targets:
        print("\ntargets:")
    for what, value, floor in targets:
        verdict = "met" if value >= floor else "NOT met"
        print(f"  {what:<42} {value:5.2f}  (target >= {floor})  {verdict}")
    report["ratios"] = [{"what": w, "ratio": v, "target": f} for w, v, f in targets]
    info["loadavg_end"] = list(os.getloadavg())
    print(f"\nload average {info['loadavg_start'][0]:.2f} -> {info['loadavg_end'][0]:.2f}")
    if not args.no_save and rates:
        print(f"results: {save_report(report, started, 'io_bound-')}")
    # a peer that is missing or failed is reported above; a meepo drain that failed fails
    failed = any(label.startswith("meepo") and label not in rates for label in configs)
    leave_workdir(workdir, args.keep or len(rates) < len(configs))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
