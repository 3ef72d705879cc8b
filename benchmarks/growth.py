"""The growth case: does meepo's drain slow down as the ledger fills with history?

``drain_2`` (``--jobs`` no-op jobs, 2 worker processes) on a table that already holds
``--growth`` finished rows of the same task (default 1,000,000), beside the same drain on
an empty table, alternately in each run so that both see the same machine load. The
full table is ``bench_growth_<N>``, kept between runs (filled once, with one
``INSERT … SELECT`` over a cross join, then vacuumed/analyzed; refilled when it holds
fewer than N or more than 1.2 N rows, dropped with ``--drop-growth``): each drain adds
its own finished rows to the history. The empty table is made per run.
"""

from __future__ import annotations

import warnings
from datetime import datetime, timezone
from functools import partial
from typing import Any

from sqlalchemy import (
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

from .common import Context, Measure, Metric, analyze, delete_keys
from .meepo_bench import Meepo

GROWTH_TASK = "growth"
EMPTY, GROWN = "drain_2_empty", "drain_2_grown"


def growth_table(n: int) -> str:
    return f"bench_growth_{n}"


class MeepoGrowth(Meepo):
    backends = ("mariadb", "postgres")

    def __init__(self, parallel: int, prefetch: int | None) -> None:
        super().__init__(parallel, prefetch, name="meepo growth", pushes=False)
        self.filled: dict[str, int] = {}  # backend -> the largest id of the fill

    def metrics(self, ctx: Context) -> list[Metric]:
        n = ctx.settings.jobs
        grown, empty = partial(self.drain_grown, n=n), partial(self.drain_empty, n=n)
        # alternate which one goes first, so that neither always follows the other
        first = [(EMPTY, empty), (GROWN, grown)]
        return first if ctx.run % 2 == 0 else first[::-1]

    def setup(self, ctx: Context) -> None:
        pass

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

    def fill(self, ctx: Context, task: Task) -> int:
        """Make the table hold exactly N done rows of the task; returns the largest id."""
        n = ctx.settings.growth
        t = task.ledger.table
        with task.engine.begin() as conn:
            count, top = conn.execute(select(func.count(), func.max(t.c.id))).one()
            if n <= count <= n * 1.2:  # the drains' own rows add to the history
                return int(top)
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
            count, top = conn.execute(select(func.count(), func.max(t.c.id))).one()
        if task.engine.dialect.name == "postgresql":  # as autovacuum would have, by now
            with task.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text(f"VACUUM ANALYZE {t.name}"))
        else:
            analyze(task.engine, t.name)
        print(f" {count:,} rows", flush=True)
        return int(top)

    def drain_grown(self, ctx: Context, n: int) -> Measure:
        task = self.grown_task(ctx)
        self.fill(ctx, task)
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
            with task.engine.begin() as conn:
                for name in (table, f"{table}_version"):
                    conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
            delete_keys(ctx.redis_url, f"{task.list_name_prefix}*")
        m.extra["finished_rows"] = 0
        return m


def drop_growth(url: str, n: int) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for name in (growth_table(n), f"{growth_table(n)}_version"):
                conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
    finally:
        engine.dispose()
