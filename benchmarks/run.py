"""``make bench``: meepo, the floor and the Python peers, side by side.

For each backend (a SQLite file in a temporary directory, MariaDB, PostgreSQL; one that
is unreachable is skipped with a note) and each system:

* ``push``       single pushes, one job per call (``--single`` jobs)
* ``push_many``  batches of ``--batch`` (``--jobs`` jobs)
* ``drain_K``    ``--jobs`` no-op jobs enqueued first, then K worker processes started
  together; from the start signal to the last job ``done`` in the ledger
* ``latency``    (MariaDB, PostgreSQL) one idle worker, ``--latency``
  jobs pushed at ~100/s: push -> handler start, p50/p99
* ``startup``    (MariaDB, PostgreSQL) ``meepo worker`` spawned on a migrated ledger
  with one job waiting: spawn -> the job claimed, in ms (target: under 300)
* growth         ``drain_2`` beside ``--growth`` finished rows vs on an empty table

The floor (``floor.py``) does meepo's work directly with SQLAlchemy Core + redis-py,
one job per round trip (unbatched) and sharing round trips (batched). The peers
(``peers/``: RQ, Celery, Dramatiq, arq, Huey, SAQ, Procrastinate; ``pip install
.[bench]``) are measured once, in their own configuration for 2 cores; a missing one
is reported as such. The ratios (meepo / fastest peer, meepo / floor) and the issue's
targets are printed after the tables. Each figure is the median of ``--runs`` runs
(3; ``--quick``: 1, with small N); every figure, with the load average when it was
taken, is written to ``benchmarks/results/<UTC timestamp>.json`` and ``latest.json``.

    python -m benchmarks.run                      # everything, median of 3 (~25 min)
    python -m benchmarks.run --quick              # a smoke run, about 2 minutes
    python -m benchmarks.run --backends postgres --peers huey,rq --runs 1 --growth 0
    python -m benchmarks.run --backends postgres --meepo 10,10x300 --procs 1,2
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
from collections.abc import Iterator
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
from .growth import EMPTY, GROWN, MeepoGrowth, drop_growth
from .meepo_bench import Meepo
from .peers.driver import PEERS_BACKEND, PeerSystem, peer_systems

#: meepo's drain worker configurations (``--meepo``): ``P`` is parallel_num=P with
#: meepo's default (automatic) prefetch, ``PxF`` adds prefetch=F. The first one is
#: the "meepo" row (pushes, drains, latency, growth: meepo's defaults); the others add
#: drain-only rows.
DEFAULT_MEEPO = "10,10x300"


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
    """Every system measured on the databases, in table order (the peers are apart)."""
    meepos = meepo_systems(args.meepo)
    out: list[System] = [*meepos, FloorUnbatched(), FloorBatched()]
    if args.growth:
        out.append(MeepoGrowth(meepos[0].parallel, meepos[0].prefetch))
    return out


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
    p.add_argument(
        "--runs", type=int, default=None, help="runs per figure, the median is kept (3; --quick 1)"
    )
    p.add_argument(
        "--peers",
        default=None,
        help="comma-separated peers to compare with (default: all installed; 'none': none)",
    )
    p.add_argument(
        "--latency",
        type=int,
        default=None,
        help="jobs of the idle-latency measurement, pushed at ~100/s, every run "
        "(1000; --quick 200; 0: none)",
    )
    p.add_argument(
        "--growth",
        type=int,
        default=None,
        help="finished rows already in the table for the growth case (1,000,000; --quick "
        "100,000; 0: none)",
    )
    p.add_argument(
        "--drop-growth", action="store_true", help="drop the kept growth tables, then exit"
    )
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
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.latency is None:
        args.latency = 200 if args.quick else 1_000
    if args.growth is None:
        args.growth = 100_000 if args.quick else 1_000_000
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
        latency=args.latency,
        growth=args.growth,
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


def reachable_backends(names: str, workdir: Path) -> Iterator[tuple[Backend, str]]:
    """The backends of a comma-separated list that answer (SQLite in ``workdir``), each
    announced with its server's version (yielded too); an unreachable one is skipped,
    and says so."""
    for name in [b for b in names.split(",") if b]:
        url = f"sqlite:///{workdir / 'ledger.sqlite3'}" if name == "sqlite" else DEFAULT_URLS[name]
        backend = Backend(name, url)
        try:
            server = probe_db(backend)
        except Exception as exc:
            print(f"\n{name}: skipped, unreachable ({str(exc).strip().splitlines()[0]})")
            continue
        print(f"\n{name}: {server}")
        yield backend, server


def save_report(report: dict[str, Any], started: datetime, prefix: str = "") -> Path:
    """Write a run's report to ``benchmarks/results/<prefix><timestamp>.json``."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{prefix}{started:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def leave_workdir(workdir: Path, keep: bool) -> None:
    """Keep the work directory (its worker logs), saying where, or remove it."""
    if keep:
        print(f"worker logs: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


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
    if "startup_ms" in m.extra:
        print(f" {m.extra['startup_ms']:7.0f} ms  (load {os.getloadavg()[0]:.2f})")
    elif "p50_ms" in m.extra:
        print(
            f" {m.n:>7,} jobs at {m.extra['rate']:.0f}/s: p50 {m.extra['p50_ms']:.2f} ms, "
            f"p99 {m.extra['p99_ms']:.2f} ms  (load {os.getloadavg()[0]:.2f})"
        )
    else:
        print(
            f" {m.n:>7,} jobs in {m.seconds:7.3f} s = {m.rate:>9,.0f} jobs/s"
            f"  (load {os.getloadavg()[0]:.2f})"
        )
    m.extra.setdefault("loadavg", list(os.getloadavg()))
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
    *,
    alternate: bool = False,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Every system's metrics, ``runs`` times; ``alternate``: every other run takes the
    systems in reverse order (rows compared with each other then share the conditions)."""
    out: dict[str, dict[str, dict[str, Any]]] = {s.name: {} for s in systems}
    for run in range(runs):
        ctx = Context(backend, redis_url, workdir, settings, fresh_name("bench"), run)
        if runs > 1:
            print(f"  -- run {run + 1} of {runs}")
        for system in systems[::-1] if alternate and run % 2 else systems:
            if backend.name not in system.backends:
                continue
            try:
                system.setup(ctx)
            except Exception as exc:
                why = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                print(f"  {backend.name:<9} {system.name:<16} setup failed: {why}")
                out[system.name].setdefault("setup", {}).setdefault("errors", []).append(why)
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
            for key in ("p50_ms", "p99_ms", "startup_ms"):
                values = [r[key] for r in record.get("runs", []) if key in r]
                if values:
                    record[key] = median(values)
            loads = [r["loadavg"][0] for r in record.get("runs", []) if "loadavg" in r]
            if loads:
                record["loadavg_1m"] = [min(loads), max(loads)]
    return out


def ratio_specs(
    settings: Settings, results: dict[str, dict[str, dict[str, Any]]]
) -> list[tuple[str, str, str, str, str]]:
    """(label, numerator system, its metric, denominator system, its metric): every
    meepo row against the floor, single push against unbatched, the rest against both."""
    specs = []
    for name in results:
        if not name.startswith("meepo") or name == "meepo growth":
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
    grown = results.get("meepo growth", {})
    num, den = grown.get(GROWN, {}).get("rate"), grown.get(EMPTY, {}).get("rate")
    if num and den:
        out["meepo growth: grown / empty: drain_2"] = num / den
    return out


def fastest(peers: dict[str, dict[str, dict[str, Any]]], metric: str) -> tuple[str, float] | None:
    rated = [
        (m[metric]["rate"], name) for name, m in peers.items() if m.get(metric, {}).get("rate")
    ]
    if not rated:
        return None
    rate, name = max(rated)
    return name, rate


def peer_ratios(
    results: dict[str, dict[str, dict[str, Any]]], peers: dict[str, dict[str, dict[str, Any]]]
) -> dict[str, Any]:
    """meepo (the main row) against the fastest peer of the same run, per metric."""
    out: dict[str, Any] = {}
    for metric in ("push", "push_many", drain_metric(2)):
        best = fastest(peers, metric)
        mine = results.get("meepo", {}).get(metric, {}).get("rate")
        if best and mine:
            out[f"meepo / fastest peer: {metric}"] = {
                "ratio": mine / best[1],
                "peer": best[0],
                "peer_rate": best[1],
            }
    return out


def target_checks(
    backend: str, results: dict[str, dict[str, dict[str, Any]]], rat: dict[str, Any]
) -> list[tuple[str, str, bool | None]]:
    """(what, measured, met) for the issue's targets on one database."""
    checks: list[tuple[str, str, bool | None]] = []

    def ratio(label: str, floor_at: float, what: str) -> None:
        value = rat.get(label)
        if isinstance(value, dict):
            text_ = f"{value['ratio']:.2f} ({value['peer']} {fmt_rate(value['peer_rate'])}/s)"
            checks.append((what, text_, value["ratio"] >= floor_at))
        elif value is not None:
            checks.append((what, f"{value:.2f}", value >= floor_at))
        else:
            checks.append((what, "-", None))

    d2 = drain_metric(2)
    ratio(f"meepo / fastest peer: {d2}", 2.0, "drain x2 >= 2x fastest peer")
    ratio(f"meepo / floor batched: {d2}", 0.5, "drain x2 >= 50% of batched floor")
    ratio("meepo / fastest peer: push_many", 1.0, "push_many >= fastest peer bulk")
    ratio("meepo / floor unbatched: push", 0.8, "push >= 80% of unbatched floor")
    lat = results.get("meepo", {}).get("latency", {})
    if "p50_ms" in lat:
        ok = lat["p50_ms"] < 3 and lat["p99_ms"] < 10
        checks.append(
            ("latency p50 < 3 ms, p99 < 10 ms", f"{lat['p50_ms']:.2f} / {lat['p99_ms']:.2f}", ok)
        )
    start = results.get("meepo", {}).get("startup", {})
    if "startup_ms" in start:
        ms = start["startup_ms"]
        checks.append(("worker start-up < 300 ms", f"{ms:.0f} ms", ms < 300))
    rss = [
        r["worker_rss_kb"]
        for name, by_metric in results.items()
        if name.startswith("meepo")
        for r in by_metric.values()
        if "worker_rss_kb" in r and r.get("runs") and r["runs"][0].get("parallel_num") == 10
    ]
    if rss:
        mb = max(rss) / 1024
        checks.append(("worker RSS < 80 MB (parallel_num=10)", f"{mb:.0f} MB", mb < 80))
    ratio("meepo growth: grown / empty: drain_2", 0.9, "drain x2 with N done rows >= 90% of empty")
    return checks


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


def fmt_latency(record: dict[str, Any] | None) -> str:
    if not record or "p50_ms" not in record:
        return ""
    return f"{record['p50_ms']:.1f}/{record['p99_ms']:.1f}"


def print_table(
    backend: Backend,
    server: str,
    results: dict[str, dict[str, dict[str, Any]]],
    rat: dict[str, Any],
    settings: Settings,
    runs: int,
) -> None:
    metrics = ["push", "push_many", *[drain_metric(p) for p in settings.procs]]
    heads = ["push", "push_many", *[f"drain x{p}" for p in settings.procs]]
    heads += ["p50/p99 ms", "start ms", "worker RSS"]
    first = f"jobs/s, median of {runs}"
    labels = [f"{n} / floor unbatched" for n in results if n.startswith("meepo")]
    w0 = max([24, len(first) + 2, *(len(x) + 2 for x in labels)])
    print(f"\n{backend.name}: {server}")
    print(f"{first:<{w0}}" + "".join(f"{h:>12}" for h in heads))
    for name, by_metric in results.items():
        if not by_metric or name == "meepo growth":
            continue
        if "setup" in by_metric and len(by_metric) == 1:
            print(f"{name:<{w0}}  not measured: {by_metric['setup']['errors'][0][:80]}")
            continue
        cells = [
            fmt_rate(by_metric.get(m, {}).get("rate")) if m in by_metric else "" for m in metrics
        ]
        cells.append(fmt_latency(by_metric.get("latency")))
        start = by_metric.get("startup", {}).get("startup_ms")
        cells.append(f"{start:.0f}" if start is not None else "")
        rss = [
            r["worker_rss_kb"]
            for k, r in by_metric.items()
            if "worker_rss_kb" in r and k != "latency"
        ]
        cells.append(f"{max(rss) / 1024:.0f} MB" if rss and name.startswith("meepo") else "")
        print(f"{name:<{w0}}" + "".join(f"{c:>12}" for c in cells))
    for name in results:
        if not name.startswith("meepo") or name == "meepo growth":
            continue
        for floor in ("floor unbatched", "floor batched"):
            cells = [fmt_ratio(rat.get(f"{name} / {floor}: {m}")) for m in metrics]
            if any(cells):
                label = f"{name} / {floor}"
                print(f"{label:<{w0}}" + "".join(f"{c:>12}" for c in cells))
    grown = results.get("meepo growth", {})
    if grown.get(EMPTY, {}).get("rate") or grown.get(GROWN, {}).get("rate"):
        print(
            f"growth: drain x2 on an empty table {fmt_rate(grown.get(EMPTY, {}).get('rate'))}, "
            f"with {settings.growth:,} done rows {fmt_rate(grown.get(GROWN, {}).get('rate'))}"
            f" jobs/s: ratio {fmt_ratio(rat.get('meepo growth: grown / empty: drain_2'))}"
        )
    for label, value in rat.items():
        if isinstance(value, dict):
            print(f"{label}: {value['ratio']:.2f} ({value['peer']} {fmt_rate(value['peer_rate'])})")


def print_peers(
    peers: dict[str, dict[str, dict[str, Any]]], systems: list[PeerSystem], runs: int
) -> None:
    metrics = ["push", "push_many", drain_metric(2)]
    heads = ["push", "push_many", "drain x2", "p50/p99 ms"]
    print(f"\npeers, jobs/s, median of {runs}")
    print(
        f"{'peer':<16}{'config':<42}" + "".join(f"{h:>11}" for h in heads[:3]) + f"{heads[3]:>14}"
    )
    for system in systems:
        by_metric = peers.get(system.name, {})
        if system.unavailable or ("setup" in by_metric and len(by_metric) == 1):
            why = system.unavailable or by_metric["setup"]["errors"][0]
            print(f"{system.name:<16}not measured: {why[:90]}")
            continue
        cells = [fmt_rate(by_metric[m].get("rate")) if m in by_metric else "" for m in metrics]
        cells.append(fmt_latency(by_metric.get("latency")))
        failed = [m for m, r in by_metric.items() if r.get("errors") and not r.get("runs")]
        note = f"  (failed: {', '.join(failed)})" if failed else ""
        rates = "".join(f"{c:>11}" for c in cells[:3])
        print(f"{system.name:<16}{system.config[:41]:<42}{rates}{cells[3]:>14}{note}")


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
    if args.drop_growth:
        for name in ("mariadb", "postgres"):
            try:
                drop_growth(DEFAULT_URLS[name], args.growth)
                print(f"{name}: dropped the growth table")
            except Exception as exc:
                print(f"{name}: {str(exc).strip().splitlines()[0]}")
        return 0
    peers: list[PeerSystem] = []
    if args.peers != "none":
        try:
            peers = peer_systems(args.peers, DEFAULT_URLS["postgres"])
        except BenchError as exc:
            print(str(exc), file=sys.stderr)
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
            prefetch = "automatic (default)" if m.prefetch is None else m.prefetch
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
    tables: list[tuple[Backend, str, Any, dict[str, Any]]] = []
    peer_results: dict[str, dict[str, dict[str, Any]]] = {}
    failed = False
    t_start = time.monotonic()
    try:
        if peers:
            print(f"\npeers ({', '.join(p.name for p in peers)}), Redis {mask_url(args.redis)}")
            peer_results = run_backend(
                Backend(PEERS_BACKEND, DEFAULT_URLS["postgres"]),
                list(peers),
                settings,
                args.redis,
                workdir,
                args.runs,
            )
            report["peers"] = {
                p.name: {"config": p.config, "unavailable": p.unavailable, **peer_results[p.name]}
                for p in peers
            }
            print(f"  ({time.monotonic() - t_start:.0f} s so far)")
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
            rat: dict[str, Any] = {**ratios(results, settings)}
            rat.update(peer_ratios(results, peer_results))
            entry["results"] = results
            entry["ratios"] = rat
            entry["targets"] = [
                {"target": what, "measured": got, "met": met}
                for what, got, met in target_checks(name, results, rat)
            ]
            failed = failed or any(
                "errors" in r for k, m in results.items() for r in m.values() if k != "setup"
            )
            tables.append((backend, server, results, rat))
            print(f"  ({time.monotonic() - t_start:.0f} s so far)")
    except KeyboardInterrupt:
        print("\ninterrupted")
        failed = True
    info["loadavg_end"] = list(os.getloadavg())
    report["seconds"] = round(time.monotonic() - t_start, 1)

    if peers:
        print_peers(peer_results, list(peers), args.runs)
    for backend, server, results, rat in tables:
        print_table(backend, server, results, rat, settings, args.runs)
    for backend, _server, results, rat in tables:
        if backend.name == "sqlite":
            continue
        print(f"\ntargets, {backend.name}:")
        for what, got, met in target_checks(backend.name, results, rat):
            verdict = "-" if met is None else ("met" if met else "NOT met")
            print(f"  {what:<42} {got:<28} {verdict}")
    print(
        f"\nload average {info['loadavg_start'][0]:.2f} -> {info['loadavg_end'][0]:.2f}, "
        f"{report['seconds']:.0f} s"
    )
    if not args.no_save and tables:
        path = save_report(report, started)
        (RESULTS_DIR / "latest.json").write_text(path.read_text())
        print(
            f"results: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}"
        )
    leave_workdir(workdir, args.keep or failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
