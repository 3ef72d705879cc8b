"""What a purge costs a busy drain (``python -m benchmarks.purge --help``).

The claim: purging 1,000,000 finished rows of one task while 2 worker processes drain
another task of the same table slows the drain by less than 10%.

Each round drains ``--jobs`` no-op jobs of task ``busy`` with 2 worker processes
(``benchmarks.worker``) twice, alternating which goes first: once alone, once while
``meepo purge --task history --older-than 7d`` removes ``--rows`` finished rows of task
``history`` (filled before the drain starts, untimed, and refilled for every round). A
drain is timed from the workers' start to the last job's commit, as the ledger counts
it. The result is the median of each, their ratio, and whether the purge was still
running when the drain ended (if not, the drain was not covered and the round says so).

A smoke run on a loaded machine: ``--rows 20000 --jobs 2000 --rounds 1``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select

from meepo import Status, Task
from meepo.ledger.retention import Retention

from .common import REPO, Child, analyze, delete_keys, start_together

BUSY, HISTORY = "busy", "history"
#: ``meepo purge`` in a process that has imported meepo and waits for a line on stdin.
PURGER = (
    "import sys; from meepo.cli import main; sys.stdin.readline(); sys.exit(main(sys.argv[1:]))"
)
#: Rows per INSERT when filling the history.
FILL_CHUNK = 10_000
#: Rows of the history that finished together (a group commit's size).
GROUP = 300


def fill(engine: Engine, table: str, n: int) -> None:
    """Make task ``history`` hold exactly ``n`` done rows, finished about 30 days ago as
    a worker finishes them: in group commits of up to GROUP rows that share their
    ``updated_at``, one group a millisecond after the other. (Rows that all share one
    time are no real history: a purge's keyset cursor then re-reads the ties it has
    already removed, on PostgreSQL, whose index of finished rows ends with the time.)"""
    store = Retention(engine, table)
    t = store.jobs
    start = datetime.now(timezone.utc) - timedelta(days=30)
    with engine.begin() as conn:
        conn.execute(delete(t).where(t.c.task_id == HISTORY))
    for i in range(0, n, FILL_CHUNK):
        rows = []
        for k in range(i, min(i + FILL_CHUNK, n)):
            when = start + timedelta(milliseconds=k // GROUP)
            rows.append({
                "task_id": HISTORY, "status": Status.DONE.value, "payload": b"",
                "failed_times": 0, "commit_id": 2, "created_at": when, "updated_at": when,
                "run_at": when, "expires_at": None, "priority": "default",
            })  # fmt: skip
        with engine.begin() as conn:
            conn.execute(insert(t), rows)
    # As every benchmark drain does: the planner's statistics include the new rows (a
    # purge planned on statistics that say "no finished rows" sorts them all per chunk).
    analyze(engine, table)


def done_count(engine: Engine, table: str) -> int:
    t = Retention(engine, table).jobs
    with engine.begin() as conn:
        stmt = select(func.count()).where(t.c.task_id == BUSY, t.c.status == Status.DONE.value)
        return int(conn.execute(stmt).scalar_one())


def drain(args: argparse.Namespace, task: Task, log_dir: Path, purge: bool) -> dict[str, Any]:
    """Push the jobs, start 2 workers (and the purge), time until every job is done."""
    t = task.ledger.table
    with task.engine.begin() as conn:
        conn.execute(delete(t).where(t.c.task_id == BUSY))
    delete_keys(args.redis, f"{task.list_name_prefix}*")
    for i in range(0, args.jobs, 1000):
        task.push_many([b""] * min(1000, args.jobs - i))
    wargs = ["--db", args.db, "--redis", args.redis, "--task", BUSY, "--table", args.table]
    workers = [Child("benchmarks.worker", wargs, log_dir / f"worker{n}.log") for n in range(2)]
    purger: subprocess.Popen[bytes] | None = None
    if purge:
        # Imported before the clock starts, waiting for "go": the drain pays for the
        # purge, not for an interpreter's start.
        purger = subprocess.Popen(
            [sys.executable, "-c", PURGER, "--db", args.db, "purge", "--task", HISTORY,
             "--older-than", "7d", "--table", args.table],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        t0 = start_together(workers)
        if purger is not None:
            assert purger.stdin is not None
            purger.stdin.write(b"go\n")
            purger.stdin.flush()
        deadline = time.monotonic() + args.timeout
        while done_count(task.engine, args.table) < args.jobs:
            if time.monotonic() > deadline:
                raise SystemExit(f"the drain did not finish within {args.timeout}s")
            time.sleep(0.05)
        elapsed = time.time() - t0
        covered = purger is not None and purger.poll() is None
        for w in workers:
            w.send("stop")
        for w in workers:
            w.result(60)
    finally:
        for w in workers:
            w.close()
    out: dict[str, Any] = {"drain_s": elapsed, "jobs_per_s": args.jobs / elapsed}
    if purger is not None:
        text, _ = purger.communicate(timeout=args.timeout)
        out["purge_covered_drain"] = covered
        out["purge_output"] = text.decode(errors="replace").strip().splitlines()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--db", required=True, help="a PostgreSQL or MariaDB URL")
    p.add_argument("--redis", required=True)
    p.add_argument("--table", default="bench_purge")
    p.add_argument("--rows", type=int, default=1_000_000, help="finished rows to purge")
    p.add_argument("--jobs", type=int, default=50_000, help="jobs each drain runs")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1800.0)
    args = p.parse_args(argv)
    task = Task(BUSY, db=args.db, redis=args.redis, table_name=args.table, init_db=True)
    alone: list[float] = []
    beside: list[float] = []
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="meepo-purge-bench-") as tmp:
        for r in range(args.rounds):
            order = [False, True] if r % 2 == 0 else [True, False]
            for purge in order:
                if purge:
                    fill(task.engine, args.table, args.rows)
                got = drain(args, task, Path(tmp), purge)
                got.update(round=r, purge=purge)
                rounds.append(got)
                (beside if purge else alone).append(got["drain_s"])
                print(json.dumps(got), file=sys.stderr, flush=True)
    cost = statistics.median(beside) / statistics.median(alone) - 1
    result = {
        "rows": args.rows,
        "jobs": args.jobs,
        "drain_alone_s": statistics.median(alone),
        "drain_with_purge_s": statistics.median(beside),
        "cost": round(cost, 4),
        "target": "< 0.10",
        "met": cost < 0.10,
        "every_drain_covered": all(r.get("purge_covered_drain", True) for r in rounds),
        "rounds": rounds,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
