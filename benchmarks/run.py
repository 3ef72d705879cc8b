"""``make bench``: meepo and the floor on every database, side by side.

For each backend (a SQLite file in a temporary directory, MariaDB, PostgreSQL; one that
is unreachable is skipped with a note) and each system:

* ``push``       single pushes, one job per call (``--single`` jobs)
* ``push_many``  batches of ``--batch`` (``--jobs`` jobs)
* ``drain_K``    ``--jobs`` no-op jobs enqueued first, then K worker processes started
  together; from the start signal to the last job ``done`` in the ledger

The floor (``floor.py``) does meepo's work directly with SQLAlchemy Core + redis-py,
one job per round trip (unbatched) and sharing round trips (batched). Ratios compare
meepo with it. Each figure is the median of ``--runs`` runs; the table is printed and
every figure is written to ``benchmarks/results/<UTC timestamp>.json`` and
``benchmarks/results/latest.json``.

    python -m benchmarks.run                      # everything, one run
    python -m benchmarks.run --quick              # a smoke run, well under a minute
    python -m benchmarks.run --backends postgres --runs 3 --procs 1,2 --meepo 10,20,10x300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import create_engine, text

from meepo.config import mask_url

from .common import (
    BACKENDS,
    DEFAULT_REDIS_URL,
    DEFAULT_URLS,
    Backend,
    BenchError,
    Context,
    Measure,
    Settings,
    System,
    drain_metric,
    fresh_name,
    machine,
    median,
)
from .floor import FloorBatched, FloorUnbatched
from .meepo_bench import Meepo

#: meepo's drain worker configurations (``--meepo``): ``P`` is parallel_num=P with
#: meepo's default prefetch (= parallel_num), ``PxF`` adds prefetch=F. The first one is
#: the "meepo" row (pushes and drains); the others add drain-only rows.
DEFAULT_MEEPO = "20,10x300"


def meepo_systems(spec: str) -> list[Meepo]:
    out: list[Meepo] = []
    for i, item in enumerate(x.strip() for x in spec.split(",") if x.strip()):
        parallel, _, prefetch = item.partition("x")
        p, f = int(parallel), (int(prefetch) if prefetch else None)
        if i == 0:
            out.append(Meepo(p, f))
        else:
            out.append(Meepo(p, f, name=f"meepo p{p}/f{f or p}", pushes=False))
    return out


def all_systems(args: argparse.Namespace) -> list[System]:
    """Every system measured, in table order. Peers go here."""
    return [*meepo_systems(args.meepo), FloorUnbatched(), FloorBatched()]


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset")
    p.add_argument("--systems", default=None, help="comma-separated names (default: all)")
    p.add_argument("--jobs", type=int, default=None, help="jobs for push_many and drains")
    p.add_argument("--single", type=int, default=None, help="jobs for one-at-a-time figures")
    p.add_argument("--batch", type=int, default=1000, help="push_many batch size")
    p.add_argument("--runs", type=int, default=1, help="runs per figure (the median is kept)")
    p.add_argument("--procs", default="1,2", help="drain worker process counts")
    p.add_argument(
        "--meepo",
        default=None,
        help="meepo drain worker configs: P (parallel_num) or PxF (prefetch F), "
        f"comma-separated; the first is the main row (default {DEFAULT_MEEPO}; "
        "--quick: the first only)",
    )
    p.add_argument("--pop-count", type=int, default=100, help="batched floor LPOP count")
    p.add_argument("--redis", default=DEFAULT_REDIS_URL, help="Redis URL (keys are cleaned up)")
    p.add_argument("--quick", action="store_true", help="small N: a smoke run")
    p.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/")
    p.add_argument(
        "--no-analyze",
        action="store_true",
        help="drain without refreshing the planner's statistics first (stale-stats case)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (worker logs)")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="record py-spy profiles of meepo drain workers into this folder",
    )
    args = p.parse_args(argv)
    if args.jobs is None:
        args.jobs = 2_000 if args.quick else 20_000
    if args.single is None:
        args.single = 300 if args.quick else 2_000
    if args.meepo is None:
        args.meepo = DEFAULT_MEEPO.split(",")[0] if args.quick else DEFAULT_MEEPO
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        jobs=args.jobs,
        single=args.single,
        batch=args.batch,
        procs=tuple(int(x) for x in args.procs.split(",") if x),
        pop_count=args.pop_count,
        profile=args.profile,
        analyze=not args.no_analyze,
    )


# -- servers --------------------------------------------------------------------------------


def probe_db(backend: Backend) -> str:
    """The server's name and version; raises when it is unreachable."""
    if backend.name == "sqlite":
        return f"SQLite {sqlite3.sqlite_version}"
    engine = create_engine(backend.url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            version = str(conn.execute(text("SELECT version()")).scalar_one())
    finally:
        engine.dispose()
    if backend.name == "postgres":
        return " ".join(version.split()[:2])  # "PostgreSQL 15.4"
    return f"MariaDB {version}" if "mariadb" in version.lower() else f"MySQL {version}"


def probe_redis(url: str) -> str:
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        return f"Redis {client.info('server')['redis_version']}"
    finally:
        client.close()


# -- running --------------------------------------------------------------------------------


def measure_one(system: System, ctx: Context, metric: str, fn: Any, record: dict[str, Any]) -> None:
    label = f"  {ctx.backend.name:<9} {system.name:<16} {metric:<10}"
    print(label, end="", flush=True)
    try:
        m: Measure = fn(ctx)
    except Exception as exc:  # one failed figure must not end the run
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f" failed: {type(exc).__name__}: {first}")
        if not isinstance(exc, BenchError):
            traceback.print_exc(limit=4)
        record.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}")
        return
    print(f" {m.n:>7,} jobs in {m.seconds:7.3f} s = {m.rate:>9,.0f} jobs/s")
    record.setdefault("runs", []).append(
        {"n": m.n, "seconds": m.seconds, "rate": m.rate, **m.extra}
    )


def run_backend(
    backend: Backend,
    systems: list[System],
    settings: Settings,
    redis_url: str,
    workdir: Path,
    runs: int,
) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {s.name: {} for s in systems}
    for run in range(runs):
        ctx = Context(backend, redis_url, workdir, settings, fresh_name("bench"))
        if runs > 1:
            print(f"  -- run {run + 1} of {runs}")
        for system in systems:
            if backend.name not in system.backends:
                continue
            try:
                system.setup(ctx)
            except Exception as exc:
                print(f"  {backend.name:<9} {system.name:<16} setup failed: {exc}")
                continue
            try:
                for metric, fn in system.metrics(ctx):
                    measure_one(system, ctx, metric, fn, out[system.name].setdefault(metric, {}))
            finally:
                try:
                    system.teardown(ctx)
                except Exception as exc:
                    print(f"  {backend.name:<9} {system.name:<16} teardown failed: {exc}")
    for metrics in out.values():
        for record in metrics.values():
            rates = [r["rate"] for r in record.get("runs", [])]
            record["rate"] = median(rates) if rates else None
            rss = [r["worker_rss_kb"] for r in record.get("runs", []) if "worker_rss_kb" in r]
            if rss:
                record["worker_rss_kb"] = max(rss)
    return out


def ratio_specs(
    settings: Settings, results: dict[str, dict[str, dict[str, Any]]]
) -> list[tuple[str, str, str, str, str]]:
    """(label, numerator system, its metric, denominator system, its metric): every
    meepo row against the floor, single push against unbatched, the rest against both."""
    specs = []
    for name in results:
        if not name.startswith("meepo"):
            continue
        specs.append((f"{name} / floor unbatched: push", name, "push", "floor unbatched", "push"))
        specs.append(
            (f"{name} / floor batched: push_many", name, "push_many", "floor batched", "push_many")
        )
        for procs in settings.procs:
            d = drain_metric(procs)
            for floor in ("floor unbatched", "floor batched"):
                specs.append((f"{name} / {floor}: {d}", name, d, floor, d))
    return specs


def ratios(results: dict[str, dict[str, dict[str, Any]]], settings: Settings) -> dict[str, float]:
    out: dict[str, float] = {}
    for label, ns, nm, ds, dm in ratio_specs(settings, results):
        num = results.get(ns, {}).get(nm, {}).get("rate")
        den = results.get(ds, {}).get(dm, {}).get("rate")
        if num and den:
            out[label] = num / den
    return out


# -- printing -------------------------------------------------------------------------------


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1000:
        digits = len(str(int(x))) - 3  # three significant figures
        return f"{round(x, -digits):,.0f}"
    return f"{x:,.0f}"


def fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def print_table(
    backend: Backend,
    server: str,
    results: dict[str, dict[str, dict[str, Any]]],
    rat: dict[str, float],
    settings: Settings,
    runs: int,
) -> None:
    metrics = ["push", "push_many", *[drain_metric(p) for p in settings.procs]]
    heads = ["push", "push_many", *[f"drain x{p}" for p in settings.procs], "worker RSS"]
    first = f"jobs/s, median of {runs}"
    labels = [f"{n} / floor unbatched" for n in results if n.startswith("meepo")]
    w0 = max([24, len(first) + 2, *(len(x) + 2 for x in labels)])
    print(f"\n{backend.name}: {server}")
    print(f"{first:<{w0}}" + "".join(f"{h:>12}" for h in heads))
    for name, by_metric in results.items():
        if not by_metric:
            continue
        cells = [
            fmt_rate(by_metric.get(m, {}).get("rate")) if m in by_metric else "" for m in metrics
        ]
        rss = [r["worker_rss_kb"] for r in by_metric.values() if "worker_rss_kb" in r]
        cells.append(f"{max(rss) / 1024:.0f} MB" if rss and name.startswith("meepo") else "")
        print(f"{name:<{w0}}" + "".join(f"{c:>12}" for c in cells))
    for name in results:
        if not name.startswith("meepo"):
            continue
        for floor in ("floor unbatched", "floor batched"):
            cells = [fmt_ratio(rat.get(f"{name} / {floor}: {m}")) for m in metrics]
            if any(cells):
                label = f"{name} / {floor}"
                print(f"{label:<{w0}}" + "".join(f"{c:>12}" for c in cells))


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in BACKENDS]
    if unknown:
        print(f"unknown backend(s) {unknown}: choose from {', '.join(BACKENDS)}", file=sys.stderr)
        return 2
    systems = every = all_systems(args)
    if args.systems:
        names = {s.strip() for s in args.systems.split(",")}
        systems = [s for s in every if s.name in names or s.name.split()[0] in names]
        if not systems:
            print(f"no system matches {args.systems!r}", file=sys.stderr)
            return 2
    try:
        redis_server = probe_redis(args.redis)
    except redis.RedisError as exc:
        print(f"Redis at {mask_url(args.redis)} is unreachable: {exc}", file=sys.stderr)
        return 1

    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="meepo-bench-"))
    started = datetime.now(timezone.utc)
    info = machine()
    info["redis"] = redis_server
    print(
        f"meepo benchmarks, {started:%Y-%m-%d %H:%M} UTC: {info['nproc']} CPUs, "
        f"Python {info['python']}, {redis_server}, load {info['loadavg_start'][0]:.2f}"
    )
    print(
        f"push {settings.single:,} single, push_many {settings.jobs:,} in batches of "
        f"{settings.batch}, drain {settings.jobs:,} no-op jobs (unbatched floor "
        f"{settings.single:,}) with {'/'.join(map(str, settings.procs))} process(es)"
    )
    for m in systems:
        if isinstance(m, Meepo):
            prefetch = "default (= parallel_num)" if m.prefetch is None else m.prefetch
            print(f"{m.name}: parallel_num={m.parallel}, prefetch={prefetch}")
    report: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "machine": info,
        "options": {**asdict(settings), "runs": args.runs, "quick": args.quick},
        "systems": {
            m.name: {"parallel_num": m.parallel, "prefetch": m.prefetch}
            for m in systems
            if isinstance(m, Meepo)
        },
        "backends": {},
    }
    tables: list[tuple[Backend, str, Any, dict[str, float]]] = []
    failed = False
    t_start = time.monotonic()
    try:
        for name in wanted:
            url = (
                f"sqlite:///{workdir / 'ledger.sqlite3'}"
                if name == "sqlite"
                else DEFAULT_URLS[name]
            )
            backend = Backend(name, url)
            entry: dict[str, Any] = {"url": mask_url(url)}
            report["backends"][name] = entry
            try:
                server = probe_db(backend)
            except Exception as exc:
                why = str(exc).strip().splitlines()[0]
                print(f"\n{name}: skipped, unreachable at {mask_url(url)} ({why})")
                entry["skipped"] = why
                continue
            entry["server"] = server
            info.setdefault("servers", {})[name] = server
            print(f"\n{name}: {server}")
            results = run_backend(backend, systems, settings, args.redis, workdir, args.runs)
            rat = ratios(results, settings)
            entry["results"] = results
            entry["ratios"] = rat
            failed = failed or any("errors" in r for m in results.values() for r in m.values())
            tables.append((backend, server, results, rat))
    except KeyboardInterrupt:
        print("\ninterrupted")
        failed = True
    info["loadavg_end"] = list(os.getloadavg())
    report["seconds"] = round(time.monotonic() - t_start, 1)

    for backend, server, results, rat in tables:
        print_table(backend, server, results, rat, settings, args.runs)
    print(
        f"\nload average {info['loadavg_start'][0]:.2f} -> {info['loadavg_end'][0]:.2f}, "
        f"{report['seconds']:.0f} s"
    )
    if not args.no_save and tables:
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"{started:%Y%m%dT%H%M%SZ}.json"
        text_out = json.dumps(report, indent=2, default=str) + "\n"
        path.write_text(text_out)
        (RESULTS_DIR / "latest.json").write_text(text_out)
        print(
            f"results: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}"
        )
    if args.keep or failed:
        print(f"worker logs: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
