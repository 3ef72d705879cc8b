"""The floor: meepo's work written directly with SQLAlchemy Core + redis-py.

The physical reference for a SQL ledger in front of Redis: what the same round trips
cost with nothing else around them. It runs on a scratch table with meepo's columns and
index, and keeps meepo's per-job compare-and-set on ``commit_id``:

* unbatched push: ``INSERT`` + ``COMMIT``, then ``RPUSH`` (one job at a time);
* unbatched drain: ``BLPOP``, claim ``UPDATE … WHERE id AND commit_id AND status='todo'``
  + ``COMMIT``, (no-op job), commit ``UPDATE`` + ``COMMIT``, one job at a time;
* batched push: one 1000-row ``INSERT … RETURNING id``, then one ``RPUSH`` of 1000;
* batched drain: ``LPOP 100``, one claim ``UPDATE`` over ``(id, commit_id) IN (…)``,
  one commit ``UPDATE``.

It does not read payloads back on claim (a no-op job needs none; meepo reads them), and
it has no heartbeat, reaper or error handling: a lower bound on meepo's cost, not a queue.

``python -m benchmarks.floor`` is its drain worker process (see ``common.py``).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any

import redis
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import mysql

from .common import (
    BenchError,
    Child,
    Context,
    Measure,
    Metric,
    System,
    analyze,
    announce_ready,
    delete_keys,
    drain_metric,
    fresh_name,
    peak_rss_kb,
    report,
    start_together,
)
from .peers import probe

Pair = tuple[int, int]
LEASE = timedelta(seconds=20)
TS = DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def floor_table(name: str) -> Table:
    """meepo's ledger columns and index, declared independently of meepo."""
    return Table(
        name,
        MetaData(),
        Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
        Column("task_id", String(64), nullable=False),
        Column("status", String(8), nullable=False),
        Column(
            "payload",
            LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"),
            nullable=False,
        ),
        Column("failed_times", Integer, nullable=False),
        Column("commit_id", BigInteger, nullable=False),
        Column("created_at", TS, nullable=False),
        Column("updated_at", TS, nullable=False),
        Column("run_at", TS, nullable=False),
        Column("expires_at", TS, nullable=True),
        Column("worker", String(128), nullable=True),
        Column("last_error", Text, nullable=True),
        Index(f"ix_{name}_task_status_expires", "task_id", "status", "expires_at"),
    )


def floor_engine(url: str) -> Engine:
    """A plain engine; on SQLite the same journal settings as meepo's (WAL, NORMAL)."""
    if not url.startswith("sqlite"):
        return create_engine(url)
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    return engine


class Floor:
    """The floor's operations on one scratch table and one Redis list."""

    def __init__(self, db_url: str, redis_url: str, table: str, task_id: str = "floor") -> None:
        self.engine = floor_engine(db_url)
        self.redis = redis.Redis.from_url(redis_url)
        self.t = floor_table(table)
        self.task_id = task_id
        self.queue = f"bench:{table}:{task_id}:queue"
        self.worker = f"floor:{id(self)}"
        self.aware = self.engine.dialect.name == "postgresql"
        t = self.t
        self.insert_one = insert(t)
        self.insert_many = insert(t).returning(t.c.id, sort_by_parameter_order=True)
        self.claim_one = (
            update(t)
            .where(
                t.c.id == bindparam("b_id"),
                t.c.commit_id == bindparam("b_cid"),
                t.c.status == "todo",
            )
            .values(
                status="doing",
                commit_id=t.c.commit_id + 1,
                updated_at=bindparam("b_now"),
                expires_at=bindparam("b_lease"),
                worker=bindparam("b_worker"),
            )
        )
        self.finish_one = (
            update(t)
            .where(
                t.c.id == bindparam("b_id"),
                t.c.commit_id == bindparam("b_cid"),
                t.c.status == "doing",
            )
            .values(
                status="done",
                commit_id=t.c.commit_id + 1,
                updated_at=bindparam("b_now"),
                expires_at=None,
            )
        )

    def now(self) -> datetime:
        now = datetime.now(timezone.utc)
        return now if self.aware else now.replace(tzinfo=None)

    def create(self) -> None:
        self.t.drop(self.engine, checkfirst=True)
        self.t.create(self.engine)

    def drop(self) -> None:
        self.t.drop(self.engine, checkfirst=True)
        self.redis.delete(self.queue)

    def close(self) -> None:
        self.redis.close()
        self.engine.dispose()

    def _row(self, payload: bytes, now: datetime) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "status": "todo",
            "payload": payload,
            "failed_times": 0,
            "commit_id": 0,
            "created_at": now,
            "updated_at": now,
            "run_at": now,
            "expires_at": now + LEASE,
        }

    # -- push -------------------------------------------------------------------------

    def push_one(self, payload: bytes) -> int:
        with self.engine.begin() as conn:
            key = conn.execute(self.insert_one, self._row(payload, self.now())).inserted_primary_key
        assert key is not None
        job_id = int(key[0])
        self.redis.rpush(self.queue, b"%d:0" % job_id)
        return job_id

    def push_stamped(self, ts: float) -> None:
        """One job whose message carries the push time (``id:0:ts``), for latency."""
        with self.engine.begin() as conn:
            key = conn.execute(self.insert_one, self._row(b"", self.now())).inserted_primary_key
        assert key is not None
        self.redis.rpush(self.queue, b"%d:0:%r" % (int(key[0]), ts))

    def claim_single(self, job_id: int, commit_id: int) -> bool:
        """One job's claim, one committed statement; True if it won."""
        now = self.now()
        with self.engine.begin() as conn:
            won = conn.execute(
                self.claim_one,
                {
                    "b_id": job_id,
                    "b_cid": commit_id,
                    "b_now": now,
                    "b_lease": now + LEASE,
                    "b_worker": self.worker,
                },
            ).rowcount
        return bool(won == 1)

    def finish_single(self, job_id: int, commit_id: int) -> None:
        """One job's commit as done, one committed statement."""
        with self.engine.begin() as conn:
            conn.execute(self.finish_one, {"b_id": job_id, "b_cid": commit_id, "b_now": self.now()})

    def serve_stamped(self, stop: threading.Event) -> None:
        """The unbatched loop on stamped messages until ``stop``: BLPOP, claim, (the
        handler starts: report it to the probe), commit."""
        while not stop.is_set():
            got: Any = self.redis.blpop([self.queue], timeout=0.2)
            if not got:
                continue
            head, _, rest = bytes(got[1]).partition(b":")
            cid, _, ts = rest.partition(b":")
            job_id, commit_id = int(head), int(cid)
            if not self.claim_single(job_id, commit_id):
                continue
            probe.tick(float(ts or 0))
            self.finish_single(job_id, commit_id + 1)

    def push_batch(self, payloads: Sequence[bytes]) -> list[int]:
        now = self.now()
        rows = [self._row(p, now) for p in payloads]
        with self.engine.begin() as conn:
            # (the dialect knows what the server supports once connected)
            if conn.dialect.insert_executemany_returning_sort_by_parameter_order:
                ids = [int(i) for i in conn.execute(self.insert_many, rows).scalars()]
            else:  # no INSERT … RETURNING: one statement per row
                ids = []
                for row in rows:
                    key = conn.execute(self.insert_one, row).inserted_primary_key
                    assert key is not None
                    ids.append(int(key[0]))
        self.redis.rpush(self.queue, *[b"%d:0" % i for i in ids])
        return ids

    # -- drain ------------------------------------------------------------------------

    def drain_unbatched(self) -> tuple[int, float]:
        """Until the queue stays empty; returns (jobs done, time.time() of the last)."""
        done, last = 0, 0.0
        while True:
            got: Any = self.redis.blpop([self.queue], timeout=0.2)
            if not got:
                return done, last
            head, _, tail = bytes(got[1]).partition(b":")
            job_id, commit_id = int(head), int(tail)
            if not self.claim_single(job_id, commit_id):
                continue
            # the no-op job runs here
            self.finish_single(job_id, commit_id + 1)
            done += 1
            last = time.time()

    def _pairs_where(self, pairs: Sequence[Pair]) -> Any:
        t = self.t
        return (t.c.id.in_([p[0] for p in pairs]), tuple_(t.c.id, t.c.commit_id).in_(pairs))

    def drain_batched(self, count: int) -> tuple[int, float]:
        t = self.t
        done, last = 0, 0.0
        while True:
            got: Any = self.redis.lpop(self.queue, count)
            if not got:
                return done, last
            pairs = sorted(
                {(int(h), int(c)) for h, _, c in (bytes(m).partition(b":") for m in got)}
            )
            now = self.now()
            with self.engine.begin() as conn:
                won = conn.execute(
                    update(t)
                    .where(*self._pairs_where(pairs), t.c.status == "todo")
                    .values(
                        status="doing",
                        commit_id=t.c.commit_id + 1,
                        updated_at=now,
                        expires_at=now + LEASE,
                        worker=self.worker,
                    )
                ).rowcount
            if won != len(pairs):
                raise BenchError(f"floor: claimed {won} of {len(pairs)} (no contention expected)")
            # the no-op jobs run here
            claimed = [(i, c + 1) for i, c in pairs]
            with self.engine.begin() as conn:
                conn.execute(
                    update(t)
                    .where(*self._pairs_where(claimed), t.c.status == "doing")
                    .values(
                        status="done",
                        commit_id=t.c.commit_id + 1,
                        updated_at=self.now(),
                        expires_at=None,
                    )
                )
            done += len(pairs)
            last = time.time()

    def count_done(self) -> int:
        t = self.t
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(t.c.task_id == self.task_id, t.c.status == "done")
                ).scalar_one()
            )


# -- the two systems ------------------------------------------------------------------------


class _FloorSystem(System):
    batched = False

    def table(self, ctx: Context) -> str:
        return f"{ctx.name}_floor_{'b' if self.batched else 'u'}"

    def floor(self, ctx: Context, task_id: str = "floor") -> Floor:
        return Floor(ctx.backend.url, ctx.redis_url, self.table(ctx), task_id)

    def setup(self, ctx: Context) -> None:
        f = self.floor(ctx)
        try:
            f.create()
        finally:
            f.close()

    def teardown(self, ctx: Context) -> None:
        f = self.floor(ctx)
        try:
            f.drop()
        finally:
            f.close()
        delete_keys(ctx.redis_url, f"bench:{self.table(ctx)}:*")

    def drain(self, ctx: Context, n: int, procs: int) -> Measure:
        """Enqueue ``n`` jobs (batched), then drain them with ``procs`` processes started
        together; time from the start signal to the last commit."""
        task_id = fresh_name("f")
        f = self.floor(ctx, task_id)
        s = ctx.settings
        args = [
            *("--db", ctx.backend.url, "--redis", ctx.redis_url),
            *("--table", self.table(ctx), "--task", task_id),
            *("--mode", "batched" if self.batched else "unbatched"),
            *("--count", str(s.pop_count)),
        ]
        log = ctx.workdir / f"{ctx.backend.name}-{task_id}"
        try:
            # the workers start (import, connect) while the jobs are enqueued
            children = [
                Child("benchmarks.floor", args, log.with_suffix(f".{k}.log")) for k in range(procs)
            ]
            try:
                for i in range(0, n, s.batch):
                    f.push_batch([b""] * min(s.batch, n - i))
                if s.analyze:
                    analyze(f.engine, self.table(ctx))
                t0 = start_together(children)
                results = [child.result(ctx.timeout) for child in children]
            finally:
                for child in children:
                    child.close()
            processed = sum(int(r["done"]) for r in results)
            in_ledger = f.count_done()
            if processed != n or in_ledger != n:
                raise BenchError(f"floor drain: {processed} processed, {in_ledger} done of {n}")
            last = max(float(r["last"]) for r in results)
            rss = max(int(r["rss_kb"]) for r in results)
            return Measure(n, last - t0, {"procs": procs, "worker_rss_kb": rss})
        finally:
            f.close()


class FloorUnbatched(_FloorSystem):
    name = "floor unbatched"
    batched = False

    def metrics(self, ctx: Context) -> list[Metric]:
        s = ctx.settings
        out: list[Metric] = [("push", lambda c: self.push(c, s.single))]
        for procs in s.procs:
            out.append((drain_metric(procs), partial(self.drain, n=s.single, procs=procs)))
        if s.latency and ctx.backend.name in ("mariadb", "postgres"):
            out.append(("latency", partial(self.latency, n=s.latency)))
        return out

    def latency(self, ctx: Context, n: int) -> Measure:
        """The unbatched loop in one idle worker process: push -> claimed (the handler
        would start here), p50/p99 of ``n`` jobs pushed at ~100/s."""
        task_id = fresh_name("f")
        f = self.floor(ctx, task_id)
        probe_key = f"probe:{task_id}"
        args = [
            *("--db", ctx.backend.url, "--redis", ctx.redis_url),
            *("--table", self.table(ctx), "--task", task_id, "--mode", "latency"),
        ]
        env = {probe.URL_ENV: ctx.redis_url, probe.KEY_ENV: probe_key}
        child = Child("benchmarks.floor", args, ctx.workdir / f"{task_id}-latency.log", env=env)
        pr = probe.Probe(ctx.redis_url, probe_key)
        s = ctx.settings
        try:
            start_together([child])
            probe.warm_up(f.push_stamped, pr, 5, 60.0, child.check_alive)
            seconds, extra = probe.measure_latency(
                f.push_stamped, pr, n, s.latency_rate, n / s.latency_rate + 60, child.check_alive
            )
            child.send("stop")
            extra["worker_rss_kb"] = int(child.result(60.0)["rss_kb"])
            return Measure(n, seconds, extra)
        finally:
            child.close()
            pr.close()
            f.close()

    def push(self, ctx: Context, n: int) -> Measure:
        f = self.floor(ctx)
        try:
            for _ in range(20):
                f.push_one(b"")
            t = time.perf_counter()
            for _ in range(n):
                f.push_one(b"")
            return Measure(n, time.perf_counter() - t)
        finally:
            f.close()


class FloorBatched(_FloorSystem):
    name = "floor batched"
    batched = True

    def metrics(self, ctx: Context) -> list[Metric]:
        s = ctx.settings
        out: list[Metric] = [("push_many", lambda c: self.push_many(c, s.jobs))]
        for procs in s.procs:
            out.append((drain_metric(procs), partial(self.drain, n=s.jobs, procs=procs)))
        return out

    def push_many(self, ctx: Context, n: int) -> Measure:
        f = self.floor(ctx)
        batch = ctx.settings.batch
        try:
            f.push_batch([b""] * 20)
            t = time.perf_counter()
            done = 0
            while done < n:
                k = min(batch, n - done)
                f.push_batch([b""] * k)
                done += k
            return Measure(n, time.perf_counter() - t, {"batch": batch})
        finally:
            f.close()


# -- the drain worker process -------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The floor's drain worker (see benchmarks/common.py)")
    p.add_argument("--db", required=True)
    p.add_argument("--redis", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--mode", choices=["batched", "unbatched", "latency"], required=True)
    p.add_argument("--count", type=int, default=100)
    args = p.parse_args(argv)
    f = Floor(args.db, args.redis, args.table, args.task)
    with f.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    f.redis.ping()
    if not announce_ready():
        return 1
    if args.mode == "latency":  # until "stop" on stdin
        stop = threading.Event()
        server = threading.Thread(target=f.serve_stamped, args=(stop,), daemon=True)
        server.start()
        sys.stdin.readline()
        stop.set()
        server.join()
        report({"rss_kb": peak_rss_kb()})
        f.close()
        return 0
    if args.mode == "batched":
        done, last = f.drain_batched(args.count)
    else:
        done, last = f.drain_unbatched()
    report({"done": done, "last": last, "rss_kb": peak_rss_kb()})
    f.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
