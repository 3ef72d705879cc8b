"""The growth case: does meepo's drain slow down as the ledger fills with history?

``drain_2`` (``--jobs`` no-op jobs, 2 worker processes) on a table that already holds
``--growth`` finished rows of the same task (default 1,000,000), beside the same drain on
an empty table, alternately in each run so that both see the same machine load. The
full table is ``bench_growth_<N>``, kept between runs (filled once, before anything is
timed, with one ``INSERT … SELECT`` over a cross join, then vacuumed/analyzed and written
out; refilled when it holds fewer than N or more than 1.2 N rows; dropped, with its
companion tables, by ``--drop-growth``): each drain adds
its own finished rows to the history. The empty table is made per run.
"""

from __future__ import annotations

import time
import warnings
from datetime import datetime, timezone
from functools import partial
from typing import Any

from sqlalchemy import (
    Engine,
    delete,
    func,
    insert,
    literal,
    literal_column,
    select,
    text,
    true,
    union_all,
)
from sqlalchemy.exc import SAWarning

from meepo import Status, Task

from .common import Context, Measure, Metric, analyze, delete_keys, drop_ledger
from .meepo_bench import Meepo

GROWTH_TASK = "growth"
EMPTY, GROWN = "drain_2_empty", "drain_2_grown"


def growth_table(n: int) -> str:
    return f"bench_growth_{n}"


class MeepoGrowth(Meepo):
    backends = ("mariadb", "postgres")

    def __init__(self, parallel: int, prefetch: int | None) -> None:
        super().__init__(parallel, prefetch, name="meepo growth", pushes=False)

    def metrics(self, ctx: Context) -> list[Metric]:
        n = ctx.settings.jobs
        grown, empty = partial(self.drain_grown, n=n), partial(self.drain_empty, n=n)
        # alternate which one goes first, so that neither always follows the other
        first = [(EMPTY, empty), (GROWN, grown)]
        return first if ctx.run % 2 == 0 else first[::-1]

    def setup(self, ctx: Context) -> None:
        """Fill the history before anything is timed, then let the server write it out:
        a drain measured while the fill's million rows are still being flushed measures
        the fill (on 2026-12-01 the first run's ratios were 0.71-0.75, the next ones'
        0.80-1.03)."""
        task = self.grown_task(ctx)
        try:
            if self.fill(ctx, task):
                settle(task.engine)
        finally:
            task.engine.dispose()

    def teardown(self, ctx: Context) -> None:
        pass

    def grown_task(self, ctx: Context) -> Task:
        return Task(
            GROWTH_TASK,
            db=ctx.backend.url,
            redis=ctx.redis_url,
            table_name=growth_table(ctx.settings.growth),
            init_db=True,  # (the Redis prefix follows the table: the workers' too)
        )

    def fill(self, ctx: Context, task: Task) -> bool:
        """Make the table hold N done rows of the task (N to 1.2 N: the drains' own rows
        add to the history); True if it had to be filled."""
        n = ctx.settings.growth
        t = task.ledger.table
        with task.engine.begin() as conn:
            count = conn.execute(select(func.count()).select_from(t)).scalar_one()
            if n <= count <= n * 1.2:
                return False
            print(f"\n    filling {t.name} with {n:,} done rows …", end="", flush=True)
            conn.execute(delete(t))
            digits = union_all(*[select(literal_column(str(d)).label("d")) for d in range(10)])
            sources = [digits.subquery(f"d{k}") for k in range(max(1, len(str(n - 1))))]
            joined: Any = sources[0]
            for src in sources[1:]:
                joined = joined.join(src, true())  # a cross join: 10**k rows
            now = datetime.now(timezone.utc)
            ts = t.c.created_at.type
            stmt = select(
                literal(GROWTH_TASK, t.c.task_id.type),
                literal(Status.DONE.value, t.c.status.type),
                literal(b"", t.c.payload.type),
                literal(0, t.c.failed_times.type),
                literal(2, t.c.commit_id.type),
                literal(now, ts),
                literal(now, ts),
                literal(now, ts),
                literal("fill", t.c.worker.type),
            ).select_from(joined)
            cols = ["task_id", "status", "payload", "failed_times", "commit_id"]
            cols += ["created_at", "updated_at", "run_at", "worker"]
            with warnings.catch_warnings():  # the cross join is meant
                warnings.simplefilter("ignore", SAWarning)
                conn.execute(insert(t).from_select(cols, stmt.limit(n)))
            count = conn.execute(select(func.count()).select_from(t)).scalar_one()
        if task.engine.dialect.name == "postgresql":  # as autovacuum would have, by now
            with task.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text(f"VACUUM ANALYZE {t.name}"))
        else:
            analyze(task.engine, t.name)
        print(f" {count:,} rows", flush=True)
        return True

    def drain_grown(self, ctx: Context, n: int) -> Measure:
        task = self.grown_task(ctx)
        try:
            m = self.drain(ctx, n, 2, task=task)
        finally:
            delete_keys(ctx.redis_url, f"{task.list_name_prefix}*")
        m.extra["finished_rows"] = ctx.settings.growth
        return m

    def drain_empty(self, ctx: Context, n: int) -> Measure:
        table = f"{ctx.name}_growth_empty"
        task = Task(
            GROWTH_TASK, db=ctx.backend.url, redis=ctx.redis_url, table_name=table, init_db=True
        )
        try:
            m = self.drain(ctx, n, 2, task=task)
        finally:
            drop_ledger(task.engine, table)
            delete_keys(ctx.redis_url, f"{task.list_name_prefix}*")
        m.extra["finished_rows"] = 0
        return m


def drop_growth(url: str, n: int) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(url)
    try:
        drop_ledger(engine, growth_table(n))
    finally:
        engine.dispose()


def settle(engine: Engine, timeout: float = 120.0) -> None:
    """Wait until the server has written out what a fill dirtied: a CHECKPOINT on
    PostgreSQL; on MariaDB, until InnoDB's dirty pages are down to 1% of its buffer
    pool (or ``timeout``)."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("CHECKPOINT"))
        return
    query = text(
        "SELECT variable_name, variable_value FROM information_schema.global_status "
        "WHERE variable_name IN ('INNODB_BUFFER_POOL_PAGES_DIRTY', "
        "'INNODB_BUFFER_POOL_PAGES_TOTAL')"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            status = {str(k).upper(): int(v) for k, v in conn.execute(query)}
        if (
            status["INNODB_BUFFER_POOL_PAGES_DIRTY"]
            <= status["INNODB_BUFFER_POOL_PAGES_TOTAL"] / 100
        ):
            return
        time.sleep(0.5)
