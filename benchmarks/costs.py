"""What two features cost a drain: stored results (issue 14) and start marks (issue 11).

Each row is the drain of ``benchmarks.run`` (``--jobs`` jobs enqueued first, then
``--procs`` worker processes of meepo's defaults started together, timed to the last
``done`` row), with a different worker; the rows of a backend run one after the other,
in reverse order every other run, and each ratio compares two rows of the same run
(medians of ``--runs``):

* ``baseline``: a sync handler that returns ``b"ok"``, ``store_results=False``;
* ``store_results``: the same handler with ``store_results=True`` (the result is
  written by the done commit). Target: >= 0.90 of baseline;
* ``start delay 0``: the baseline with the starter's START_RECORD_DELAY set to 0 in
  the worker processes (a benchmark-only override, ``benchmarks/worker.py
  --start-delay``): the starter marks whatever job is running when it looks, instead
  of waiting 5 ms to mark a batch. Target: >= 0.95 of baseline. The workers count the
  starter's statements and the jobs they marked (the rest are marked by their
  commits): a no-op job mostly ends before the starter looks, even at 0, so this row
  shows what a starter that does not wait costs a no-op drain, not marks;
* ``sleep 10 ms`` / ``sleep 10 ms, marks suppressed`` (``--sleep-jobs``, 0: none):
  handlers that sleep 10 ms in ``--sleep-parallel`` threads (16), with meepo's start
  marks (each job outlives the delay, so every job is marked, about one UPDATE per
  5 ms per process) and without any (START_RECORD_DELAY set beyond the drain: their
  commits mark them). Target: >= 0.95.

    python -m benchmarks.costs                     # ~3 minutes: 2 backends x 3 runs
    python -m benchmarks.costs --quick             # a smoke run
    python -m benchmarks.costs --backends postgres --jobs 50000 --runs 5
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
    DEFAULT_REDIS_URL,
    Context,
    Metric,
    Settings,
    machine,
    median,
)
from .meepo_bench import Meepo
from .run import fmt_rate, leave_workdir, reachable_backends, run_backend, save_report

#: a START_RECORD_DELAY longer than any drain here: the starter never marks
NEVER = 3600.0


class Row(Meepo):
    """One worker configuration, drained ``jobs`` times with ``procs`` processes."""

    def __init__(
        self, name: str, slug: str, worker: list[str], jobs: int, procs: int, parallel: int = 10
    ) -> None:
        super().__init__(parallel, name=name, pushes=False, worker=worker)
        self.slug = slug  # the ledger table's suffix: table names are short
        self.jobs = jobs
        self.procs = procs

    def metrics(self, ctx: Context) -> list[Metric]:
        return [("drain", partial(self.drain, n=self.jobs, procs=self.procs))]


#: (numerator row, denominator row, target, what it checks)
COMPARISONS = [
    ("store_results", "baseline", 0.90, "store_results=True / without (issue 14)"),
    ("start delay 0", "baseline", 0.95, "start delay 0 / default (issue 11)"),
    (
        "sleep 10 ms",
        "sleep 10 ms, marks suppressed",
        0.95,
        "10 ms jobs, marked / not marked (issue 11)",
    ),
]


def rows(args: argparse.Namespace) -> list[Row]:
    out = [
        Row("baseline", "base", ["--result"], args.jobs, args.procs),
        Row("store_results", "res", ["--result", "--store-results"], args.jobs, args.procs),
        Row("start delay 0", "mark", ["--result", "--start-delay", "0"], args.jobs, args.procs),
    ]
    if args.sleep_jobs:
        sleep = ["--sleep", "0.01"]
        p = args.sleep_parallel
        out.append(Row("sleep 10 ms", "sleep", sleep, args.sleep_jobs, args.procs, p))
        out.append(
            Row(
                "sleep 10 ms, marks suppressed",
                "sleepnm",
                [*sleep, "--start-delay", repr(NEVER)],
                args.sleep_jobs,
                args.procs,
                p,
            )
        )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.costs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--backends", default="mariadb,postgres", help="sqlite, mariadb, postgres")
    p.add_argument("--jobs", type=int, default=None, help="no-op drains (20,000; --quick 2,000)")
    p.add_argument("--procs", type=int, default=2, help="worker processes")
    p.add_argument(
        "--sleep-jobs", type=int, default=None, help="10 ms drains (4,000; --quick 800; 0: none)"
    )
    p.add_argument("--sleep-parallel", type=int, default=16, help="parallel_num of those")
    p.add_argument("--runs", type=int, default=None, help="runs, the median is kept (3; quick 1)")
    p.add_argument("--redis", default=DEFAULT_REDIS_URL, help="Redis URL")
    p.add_argument("--quick", action="store_true", help="small N: a smoke run")
    p.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/")
    p.add_argument("--keep", action="store_true", help="keep the work directory (worker logs)")
    args = p.parse_args(argv)
    if args.jobs is None:
        args.jobs = 2_000 if args.quick else 20_000
    if args.sleep_jobs is None:
        args.sleep_jobs = 800 if args.quick else 4_000
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    return args


def marks(record: dict[str, Any]) -> tuple[float, float] | None:
    """The medians of the share of the jobs the starter marked (the rest: their
    commits) and of its statements per 1,000 jobs."""
    shares, statements = [], []
    for run in record.get("runs", []):
        workers = run.get("workers", [])
        shares.append(sum(int(w.get("start_marked") or 0) for w in workers) / run["n"])
        statements.append(sum(int(w.get("start_statements") or 0) for w in workers) / run["n"])
    return (median(shares), median(statements) * 1000) if shares else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(jobs=args.jobs, procs=(args.procs,), latency=0, growth=0)
    workdir = Path(tempfile.mkdtemp(prefix="meepo-costs-"))
    started = datetime.now(timezone.utc)
    info = machine()
    print(
        f"drain costs, {started:%Y-%m-%d %H:%M} UTC: {args.jobs:,} no-op jobs, "
        f"{args.sleep_jobs:,} 10 ms jobs, {args.procs} processes, median of {args.runs}, "
        f"load {info['loadavg_start'][0]:.2f}"
    )
    report: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "machine": info,
        "options": dict(vars(args)),
        "backends": {},
    }
    failed = False
    summary: list[str] = []
    for backend, server in reachable_backends(args.backends, workdir):
        name = backend.name
        # one unmeasured drain first: the first drain on a backend runs colder
        warm = Row("warm-up", "warm", ["--result"], min(args.jobs, 2_000), args.procs)
        run_backend(backend, [warm], settings, args.redis, workdir, 1)
        systems = rows(args)
        res = run_backend(backend, list(systems), settings, args.redis, workdir, args.runs,
                          alternate=True)  # fmt: skip
        entry: dict[str, Any] = {"server": server, "results": res, "ratios": {}}
        report["backends"][name] = entry
        summary.append(
            f"\n{name}, median of {args.runs}: jobs/s, the jobs the starter marked, "
            "its statements per 1,000 jobs"
        )
        for row in systems:
            record = res[row.name].get("drain", {})
            got = marks(record)
            failed = failed or not record.get("rate")
            cell = f"{got[0]:6.1%} {got[1]:7.0f}" if got is not None else ""
            summary.append(f"  {row.name:<32} {fmt_rate(record.get('rate')):>9}  {cell}")
        for num, den, target, what in COMPARISONS:
            a = res.get(num, {}).get("drain", {}).get("rate")
            b = res.get(den, {}).get("drain", {}).get("rate")
            if not (a and b):
                continue
            ratio = a / b
            entry["ratios"][what] = {"ratio": ratio, "target": target}
            verdict = "met" if ratio >= target else "NOT met"
            summary.append(f"  {what:<48} {ratio:5.2f}  (target >= {target:.2f})  {verdict}")
    print("\n".join(summary))
    info["loadavg_end"] = list(os.getloadavg())
    print(f"\nload average {info['loadavg_start'][0]:.2f} -> {info['loadavg_end'][0]:.2f}")
    if not args.no_save and report["backends"]:
        print(f"results: {save_report(report, started, 'costs-')}")
    leave_workdir(workdir, args.keep or failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
