"""meepo measured through its public API (``Task``), as a benchmark ``System``."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from datetime import datetime
from functools import partial

from sqlalchemy import func, select

from meepo import Status, Task

from .common import (
    BenchError,
    Child,
    Context,
    Measure,
    Metric,
    System,
    analyze,
    compile_package,
    delete_keys,
    drain_metric,
    drop_ledger,
    fresh_name,
    py_spy,
    start_together,
)
from .peers.probe import Probe, measure_latency, warm_up

#: where meepo's idle latency is measured (the servers a deployment would use)
LATENCY_BACKENDS = ("mariadb", "postgres")


class Meepo(System):
    """meepo through ``Task``: a table of its own per run, a fresh task id per metric.

    ``parallel``/``prefetch`` configure the drain workers (``prefetch=None``: meepo's
    default). ``pushes=False`` measures drains only (a variant of the worker config:
    pushing does not depend on it). ``worker`` adds arguments to the drain workers'
    command line (``benchmarks/worker.py``: the handler, results, start marks)."""

    def __init__(
        self,
        parallel: int = 10,
        prefetch: int | None = None,
        *,
        name: str = "meepo",
        pushes: bool = True,
        worker: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.worker = list(worker)
        self.parallel = parallel
        self.prefetch = prefetch
        self.pushes = pushes
        self.slug = re.sub(r"[^A-Za-z0-9]+", "_", name)

    def metrics(self, ctx: Context) -> list[Metric]:
        s = ctx.settings
        out: list[Metric] = []
        if self.pushes:
            out.append(("push", lambda c: self.push(c, s.single)))
            out.append(("push_many", lambda c: self.push_many(c, s.jobs)))
        for procs in s.procs:
            out.append((drain_metric(procs), partial(self.drain, n=s.jobs, procs=procs)))
        if self.pushes and s.latency and ctx.backend.name in LATENCY_BACKENDS:
            out.append(("latency", partial(self.latency, n=s.latency)))
        if self.pushes and ctx.backend.name in LATENCY_BACKENDS:
            out.append(("startup", self.startup))
        return out

    def table(self, ctx: Context) -> str:
        return f"{ctx.name}_{self.slug}"

    def task(self, ctx: Context, task_id: str | None = None) -> Task:
        return Task(
            task_id or fresh_name("t"),
            db=ctx.backend.url,
            redis=ctx.redis_url,
            table_name=self.table(ctx),
            init_db=True,
        )

    def setup(self, ctx: Context) -> None:
        self.task(ctx)  # runs the migrations once, outside any timing

    def teardown(self, ctx: Context) -> None:
        table = self.table(ctx)
        task = self.task(ctx)
        drop_ledger(task.engine, table)
        delete_keys(ctx.redis_url, f"{task.list_name_prefix}*")

    # -- metrics ----------------------------------------------------------------------

    def push(self, ctx: Context, n: int) -> Measure:
        task = self.task(ctx)
        for _ in range(20):  # warm the pools and the statement cache
            task.push(b"")
        t = time.perf_counter()
        for _ in range(n):
            task.push(b"")
        return Measure(n, time.perf_counter() - t)

    def push_many(self, ctx: Context, n: int) -> Measure:
        task = self.task(ctx)
        batch = ctx.settings.batch
        task.push_many([b""] * 20)
        t = time.perf_counter()
        done = 0
        while done < n:
            k = min(batch, n - done)
            task.push_many([b""] * k)
            done += k
        return Measure(n, time.perf_counter() - t, {"batch": batch})

    def worker_args(self, ctx: Context, task: Task) -> list[str]:
        args = [
            *("--db", ctx.backend.url, "--redis", ctx.redis_url),
            *("--task", task.task_id, "--table", task.table_name),
            *("--parallel", str(self.parallel)),
        ]
        if self.prefetch is not None:
            args += ["--prefetch", str(self.prefetch)]
        return [*args, *self.worker]

    def latency(self, ctx: Context, n: int) -> Measure:
        """One idle worker process; ``n`` jobs pushed at ~100/s, each carrying its push
        time; push -> handler start, p50/p99 (see ``peers/probe.py``)."""
        task = self.task(ctx)
        probe_key = f"probe:{fresh_name('meepo')}"
        args = [*self.worker_args(ctx, task), "--probe", probe_key]
        child = Child("benchmarks.worker", args, ctx.workdir / f"{task.task_id}-latency.log")
        probe = Probe(ctx.redis_url, probe_key)
        s = ctx.settings

        def push(ts: float) -> None:
            task.push(repr(ts).encode())

        try:
            start_together([child])
            warm_up(push, probe, 5, 60.0, child.check_alive)
            seconds, extra = measure_latency(
                push, probe, n, s.latency_rate, n / s.latency_rate + 60, child.check_alive
            )
            child.send("stop")
            extra["worker_rss_kb"] = int(child.result(60.0)["rss_kb"])
            extra["parallel_num"] = self.parallel
            return Measure(n, seconds, extra)
        finally:
            child.close()
            probe.close()

    def startup(self, ctx: Context) -> Measure:
        """A worker's start-up: ``meepo worker app:task`` (the CLI, as a deployment runs
        it) started on an already-migrated ledger with one job waiting, timed from the
        process's spawn to that job leaving ``todo`` (its claim), polled every 2 ms.

        The worker runs with Python's bytecode cache on, as an installed package does
        (pip compiles it): ``PYTHONDONTWRITEBYTECODE`` is dropped from its environment
        and meepo's modules are compiled before the first run, so that a run does not
        measure the compilation of meepo's sources (60-90 ms on the reference machine)."""
        task = self.task(ctx)
        app = ctx.workdir / "startup_app.py"
        app.write_text(
            "import os\n"
            "from meepo import Task\n"
            "task = Task(os.environ['BENCH_TASK'], job_func=lambda job: None,\n"
            "            table_name=os.environ['BENCH_TABLE'])\n"
        )
        compile_package()
        (job_id,) = task.push_many([b""])
        t = task.ledger.table
        status_q = select(t.c.status).where(t.c.id == job_id)
        env = {"BENCH_TASK": task.task_id, "BENCH_TABLE": task.table_name}
        args = ["worker", "startup_app:task", "--db", ctx.backend.url, "--redis", ctx.redis_url]
        log = ctx.workdir / f"{task.task_id}-startup.log"
        with task.engine.connect() as conn:  # the poll's own connection, opened first
            conn.execute(status_q).scalar_one()
            conn.commit()

            def claimed() -> bool:
                status = conn.execute(status_q).scalar_one()
                conn.commit()
                return bool(status != Status.TODO.value)

            began = time.perf_counter()
            child = Child(
                "meepo", args, log, env=env, cwd=ctx.workdir, protocol=False,
                drop_env=["PYTHONDONTWRITEBYTECODE"],
            )  # fmt: skip
            try:
                child.wait_until(claimed, 60.0, "startup: the job to be claimed")
                seconds = time.perf_counter() - began
            finally:
                child.terminate(30.0)
        return Measure(1, seconds, {"startup_ms": seconds * 1000})

    def drain(self, ctx: Context, n: int, procs: int, task: Task | None = None) -> Measure:
        """Enqueue ``n`` no-op jobs, start ``procs`` worker processes together, and time
        from the start signal to the last job's ``done`` in the ledger (its
        ``updated_at``, written by the worker's clock just before the commit)."""
        task = task or self.task(ctx)
        s = ctx.settings
        args = self.worker_args(ctx, task)
        log = ctx.workdir / f"{ctx.backend.name}-{task.task_id}"
        # the workers start (import, connect) while the jobs are enqueued
        wrap: list[list[str]] = [[] for _ in range(procs)]
        if s.profile is not None:  # the first worker, wall clock (--idle) and on-CPU (--gil)
            stem = f"{ctx.backend.name}-{self.slug}-drain{procs}"
            wrap[0] = py_spy(s.profile / f"{stem}-idle.txt", "--idle")
            if procs > 1:
                wrap[1] = py_spy(s.profile / f"{stem}-gil.txt", "--gil")
        children = [
            Child("benchmarks.worker", args, log.with_suffix(f".{k}.log"), wrap[k])
            for k in range(procs)
        ]
        try:
            since = self._max_id(task)
            for i in range(0, n, s.batch):
                task.push_many([b""] * min(s.batch, n - i))
            if s.analyze:
                analyze(task.engine, task.table_name)
            t0 = start_together(children)
            last = self._wait_done(task, n, ctx.timeout, since)
            for child in children:
                child.send("stop")
            results = [child.result(60.0) for child in children]
        finally:
            for child in children:
                child.close()
        rss = max(int(r["rss_kb"]) for r in results)
        extra = {
            "procs": procs,
            "parallel_num": self.parallel,
            "prefetch": self.prefetch,
            "worker_rss_kb": rss,
            "workers": results,
        }
        return Measure(n, last - t0, extra)

    @staticmethod
    def _max_id(task: Task) -> int:
        t = task.ledger.table
        with task.engine.connect() as conn:
            return int(conn.execute(select(func.max(t.c.id))).scalar_one() or 0)

    def _wait_done(self, task: Task, n: int, timeout: float, since: int = 0) -> float:
        """Poll until ``n`` rows of the task above id ``since`` are done (a primary-key
        range: cheap even beside a million finished rows); return the latest
        ``updated_at`` (epoch seconds)."""
        t = task.ledger.table
        mine = (t.c.id > since, t.c.task_id == task.task_id, t.c.status == Status.DONE.value)
        done_q = select(func.count()).where(*mine)
        deadline = time.monotonic() + timeout
        count = 0
        while True:
            with task.engine.connect() as conn:
                count = int(conn.execute(done_q).scalar_one())
            if count >= n:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"drain: only {count} of {n} jobs done after {timeout:.0f}s")
            time.sleep(0.1)
        last_q = select(func.max(t.c.updated_at)).where(*mine)
        with task.engine.connect() as conn:
            last: datetime = conn.execute(last_q).scalar_one()
        return last.timestamp()
