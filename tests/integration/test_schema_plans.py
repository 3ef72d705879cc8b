"""Query plans of the hot path and the reaper on a ledger table of realistic size.

The statements are the ledger's own: each transition is run once through
meepo.ledger.Ledger on a filled table while the SQL it sends is recorded, and every
recorded SELECT/UPDATE is then EXPLAINed (EXPLAIN QUERY PLAN on SQLite) after ANALYZE.

* id-based statements (claim, heartbeat, finish, reap, the sweep's re-claim, and the
  row locks the reaper and the sweep take on their candidates) use the primary key;
* the reaper's expired-lease SELECT, the sweep SELECT (one cutoff, or one per
  priority) and the recovery's todo_page use the
  ``(task_id, status, expires_at, dispatch_deadline)`` index - a range that never reads
  finished rows (the reaper's over the lease ends of doing rows, the others over the
  dispatch deadlines of todo rows).

None may scan the table (or a whole index).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, MetaData, Table, event, insert, pool, text
from sqlalchemy.schema import DropTable

from meepo.ledger import NEVER_DISPATCHED, ROWS_PER_STATEMENT, Ledger, Outcome, migrate
from meepo.ledger.engine import make_engine
from meepo.ledger.schema import jobs_table, version_table_name
from meepo.ledger.types import UTC
from meepo.records import Status

TASK = "plans_a"
OTHER = "plans_b"
LEASE = timedelta(seconds=20)
REDISPATCH = timedelta(seconds=60)
NOW = datetime.now(UTC).replace(microsecond=0)

#: (task, status, rows, deadline, run_at): finished rows dominate, as in production. The
#: deadline is a todo row's dispatch_deadline, a doing row's lease end (expires_at).
ROWS: list[tuple[str, Status, int, datetime | None, datetime]] = [
    (TASK, Status.DONE, 18_000, None, NOW - timedelta(hours=1)),
    (TASK, Status.FAILED, 2_000, None, NOW - timedelta(hours=1)),
    (OTHER, Status.DONE, 5_000, None, NOW - timedelta(hours=1)),
    (OTHER, Status.TODO, 100, NOW + REDISPATCH, NOW),
    (TASK, Status.TODO, 400, NOW + REDISPATCH, NOW - timedelta(seconds=1)),  # queued
    (TASK, Status.TODO, 40, NEVER_DISPATCHED, NOW - timedelta(seconds=1)),  # never sent
    (TASK, Status.TODO, 40, NOW + timedelta(hours=1), NOW + timedelta(hours=1)),  # delayed
    (TASK, Status.DOING, 200, NOW + LEASE, NOW - timedelta(seconds=5)),  # running
    # a dead consumer's leases: as many as the reaper's default zombie_limit
    (TASK, Status.DOING, 1_000, NOW - timedelta(seconds=10), NOW - timedelta(seconds=40)),
]

#: Statements whose SELECT is id-based (the rest of the SELECTs use the task index).
ID_SELECTS = {"claim"}


@dataclass
class Prepared:
    table: str
    statements: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)


def fill(
    conn: Connection,
    table: Table,
    rows_spec: Sequence[tuple[str, Status, int, datetime | None, datetime]] = ROWS,
) -> None:
    payload = b"x" * 200
    rows: list[dict[str, Any]] = []
    for task_id, status, n, deadline, run_at in rows_spec:
        commit_id = 0 if status is Status.TODO and deadline is not None else 2
        todo = status is Status.TODO
        rows.extend(
            {
                "task_id": task_id,
                "status": status.value,
                "payload": payload,
                "failed_times": 0,
                "commit_id": commit_id,
                "created_at": run_at,
                "updated_at": run_at,
                "run_at": run_at,
                "expires_at": None if todo else deadline,
                "dispatch_deadline": deadline if todo else None,
                "worker": None if status is Status.TODO else "host:1",
            }
            for _ in range(n)
        )
    for i in range(0, len(rows), ROWS_PER_STATEMENT):
        conn.execute(insert(table), rows[i : i + ROWS_PER_STATEMENT])


def analyze(conn: Connection, name: str) -> None:
    dialect = conn.dialect.name
    if dialect == "sqlite":
        conn.exec_driver_sql("ANALYZE")
    elif dialect == "postgresql":
        conn.exec_driver_sql(f"ANALYZE {name}")
    else:
        conn.exec_driver_sql(f"ANALYZE TABLE {name}").all()


def record_statements(engine: Engine, table: str) -> dict[str, list[tuple[str, Any]]]:
    """Run every hot-path and reaper transition once; return the SQL each one sent."""
    recorded: dict[str, list[tuple[str, Any]]] = {}
    label: list[str] = []

    def listener(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        if label and re.match(r"\s*(SELECT|UPDATE|WITH)\b", statement, re.IGNORECASE):
            recorded.setdefault(label[0], []).append((statement, params))

    def run(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        label[:] = [name]
        try:
            return fn(*args, **kwargs)
        finally:
            label.clear()

    ledger = Ledger(engine, table)
    t = ledger.table
    with engine.connect() as conn:
        queued = conn.execute(
            t.select()
            .with_only_columns(t.c.id, t.c.commit_id)
            .where(t.c.task_id == TASK, t.c.status == "todo", t.c.dispatch_deadline > NOW)
            .order_by(t.c.id)
            .limit(10)
        ).all()
    event.listen(engine, "before_cursor_execute", listener)
    try:
        pairs = [(r.id, r.commit_id) for r in queued]
        jobs = run("claim", ledger.claim, TASK, pairs, now=NOW, lease=LEASE, worker="w")
        assert len(jobs) == 10
        mine = [(j.id, j.commit_id) for j in jobs]
        renewal = run("heartbeat", ledger.heartbeat, mine, now=NOW, lease=2 * LEASE)
        assert renewal.lost == set() and renewal.renewed == set(mine)
        assert run("start", ledger.start, mine, now=NOW) == len(mine)
        outcomes = [Outcome(j.id, j.commit_id, Status.DONE) for j in jobs]
        won = run("finish", ledger.finish, outcomes, now=NOW, redispatch_timeout=REDISPATCH)
        assert won == set(mine)
        zombies = run("expired_leases", ledger.expired_leases, TASK, now=NOW, limit=1000)
        assert len(zombies) == 1000
        requeued, closed, _ = run(
            "reap",
            ledger.reap,
            zombies,
            dst=Status.TODO,
            max_failed_times=3,
            now=NOW,
            redispatch_timeout=REDISPATCH,
        )
        assert (len(requeued), closed) == (1000, 0)
        swept = run(
            "sweep",
            ledger.sweep,
            TASK,
            now=NOW,
            cutoffs={"default": NOW},
            limit=1000,
            redispatch_timeout=REDISPATCH,
        )
        assert len(swept) == 40
        run(
            "sweep_by_priority",
            ledger.sweep,
            TASK,
            now=NOW,
            cutoffs={"high": NOW, "default": NOW - LEASE, "low": NOW},
            limit=1000,
            redispatch_timeout=REDISPATCH,
        )
        page = run("todo_page", ledger.todo_page, TASK, after=None, limit=100)
        assert len(page) == 100
        after = (page[-1][1], page[-1][0].job_id)
        run("todo_page_next", ledger.todo_page, TASK, after=after, limit=100)
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    return recorded


_prepared: dict[str, Prepared] = {}


@pytest.fixture(scope="module")
def prepared_tables() -> Iterator[dict[str, Prepared]]:
    yield _prepared
    for url, prep in _prepared.items():
        engine = make_engine(url, poolclass=pool.NullPool)
        try:
            with engine.begin() as conn:
                for name in (prep.table, version_table_name(prep.table)):
                    conn.execute(DropTable(Table(name, MetaData()), if_exists=True))
        finally:
            engine.dispose()
    _prepared.clear()


@pytest.fixture
def plan_engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url, poolclass=pool.NullPool)
    yield engine
    engine.dispose()


@pytest.fixture
def prepared(db_url: str, plan_engine: Engine, prepared_tables: dict[str, Prepared]) -> Prepared:
    """A filled, analyzed table per backend (built once) and the statements recorded."""
    if db_url not in prepared_tables:
        name = f"t_{uuid.uuid4().hex[:16]}"
        prep = prepared_tables[db_url] = Prepared(name)
        migrate.upgrade(plan_engine, name)
        with plan_engine.begin() as conn:
            fill(conn, jobs_table(name))
        prep.statements = record_statements(plan_engine, name)
        with plan_engine.begin() as conn:
            analyze(conn, name)
    return prepared_tables[db_url]


# -- plans, per dialect ----------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """How one statement reads the jobs table: by which index, or by a full scan."""

    indexes: frozenset[str]
    full_scan: bool
    plan: str


def sqlite_access(conn: Connection, table: str, sql: str, params: Any) -> Access:
    rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params).all()
    details = [str(r[-1]) for r in rows]
    indexes: set[str] = set()
    full = False
    for d in details:
        m = re.match(rf"(SEARCH|SCAN) (?:TABLE )?{table}\b(.*)", d)
        if m is None:
            continue
        if m.group(1) == "SCAN":
            full = True
        elif "INTEGER PRIMARY KEY" in m.group(2):
            indexes.add("pk")
        else:
            idx = re.search(r"INDEX (\w+)", m.group(2))
            if idx:
                indexes.add(idx.group(1))
    return Access(frozenset(indexes), full, "\n".join(details))


def postgres_access(conn: Connection, table: str, sql: str, params: Any) -> Access:
    plan = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {sql}", params).scalar_one()
    if isinstance(plan, str):
        plan = json.loads(plan)
    indexes: set[str] = set()
    full = False

    def walk(node: dict[str, Any]) -> None:
        nonlocal full
        if node.get("Relation Name") == table and node["Node Type"] == "Seq Scan":
            full = True
        if "Index Name" in node:
            name = node["Index Name"]
            indexes.add("pk" if name == f"{table}_pkey" else name)
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    return Access(frozenset(indexes), full, json.dumps(plan, indent=1))


def mariadb_access(conn: Connection, table: str, sql: str, params: Any) -> Access:
    result = conn.exec_driver_sql(f"EXPLAIN {sql}", params)
    rows = [dict(r._mapping) for r in result]
    indexes: set[str] = set()
    full = False
    for r in rows:
        if r["table"] != table:
            continue
        if r["type"] in ("ALL", "index") or r["key"] is None:
            full = True
        elif r["key"] == "PRIMARY":
            indexes.add("pk")
        else:
            indexes.add(r["key"])
    return Access(frozenset(indexes), full, "\n".join(map(str, rows)))


def access(conn: Connection, table: str, sql: str, params: Any) -> Access:
    explain = {"sqlite": sqlite_access, "postgresql": postgres_access, "mysql": mariadb_access}
    return explain[conn.dialect.name](conn, table, sql, params)


#: A SELECT by primary key: the reaper's and the sweep's row locks (FOR UPDATE SKIP
#: LOCKED on the candidates the task-index SELECT found).
BY_ID = re.compile(r"\bWHERE\s+(\w+\.)?id\s+IN\b", re.IGNORECASE)


def expected_index(table: str, label: str, sql: str) -> str:
    # a WITH is PostgreSQL's claim or heartbeat: by primary key in every part
    by_pk = sql.lstrip().upper().startswith(("UPDATE", "WITH"))
    if by_pk or label in ID_SELECTS or BY_ID.search(sql):
        return "pk"
    return f"ix_{table}_task_status_deadlines"


STATEMENTS = [
    "claim",
    "heartbeat",
    "start",
    "finish",
    "expired_leases",
    "reap",
    "sweep",
    "sweep_by_priority",
    "todo_page",
    "todo_page_next",
]


@pytest.mark.parametrize("label", STATEMENTS)
def test_statement_uses_its_index(prepared: Prepared, plan_engine: Engine, label: str) -> None:
    recorded: Sequence[tuple[str, Any]] = prepared.statements.get(label, [])
    assert recorded, f"{label} sent no SELECT/UPDATE"
    table = prepared.table
    with plan_engine.connect() as conn:
        for sql, params in recorded:
            got = access(conn, table, sql, params)
            want = expected_index(table, label, sql)
            where = f"{label}: {sql}\n-- plan:\n{got.plan}"
            assert not got.full_scan, f"full scan of {table} in {where}"
            assert want in got.indexes, f"{want} not used in {where}"
            if label == "todo_page_next" and conn.dialect.name == "postgresql":
                # the next page's scan starts at the cursor, not at the backlog's start
                assert re.search(r"Index Cond[^\n]*dispatch_deadline >=", got.plan), where
        conn.rollback()


def test_finished_rows_are_most_of_the_table(prepared: Prepared, plan_engine: Engine) -> None:
    """The plans above are meaningful only on a table dominated by finished rows."""
    with plan_engine.connect() as conn:
        counts: dict[str, int] = dict(
            conn.execute(
                text(f"SELECT status, COUNT(*) FROM {prepared.table} GROUP BY status")
            ).all()
        )
    assert counts["done"] + counts["failed"] > 10 * (counts["todo"] + counts["doing"])


def test_claim_uses_the_primary_key_when_statistics_say_there_is_no_todo_row(
    db_url: str, plan_engine: Engine
) -> None:
    """Statistics taken when the task had no todo row (a drained queue), then a backlog
    arrives: the claim still finds its rows by primary key, never by walking the task's
    todo rows in the task index."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    migrate.upgrade(plan_engine, name)
    table = jobs_table(name)
    try:
        with plan_engine.begin() as conn:
            fill(conn, table, [(TASK, Status.DONE, 20_000, None, NOW - timedelta(hours=1))])
        with plan_engine.begin() as conn:
            analyze(conn, name)
        backlog = [(TASK, Status.TODO, 2_000, NOW + REDISPATCH, NOW)]
        with plan_engine.begin() as conn:
            fill(conn, table, backlog)
            todo = conn.execute(
                table.select()
                .with_only_columns(table.c.id, table.c.commit_id)
                .where(table.c.status == "todo")
                .order_by(table.c.id)
                .limit(300)
            ).all()
        recorded: list[tuple[str, Any]] = []

        def listener(
            conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
        ) -> None:
            if re.match(r"\s*(SELECT|UPDATE|WITH)\b", statement, re.IGNORECASE):
                recorded.append((statement, params))

        ledger = Ledger(plan_engine, name)
        event.listen(plan_engine, "before_cursor_execute", listener)
        try:
            jobs = ledger.claim(
                TASK,
                [(r.id, r.commit_id) for r in todo],
                now=NOW,
                lease=LEASE,
                worker="w",
            )
        finally:
            event.remove(plan_engine, "before_cursor_execute", listener)
        assert len(jobs) == 300 and recorded
        with plan_engine.connect() as conn:
            for sql, params in recorded:
                got = access(conn, name, sql, params)
                where = f"claim: {sql}\n-- plan:\n{got.plan}"
                assert not got.full_scan, f"full scan of {name} in {where}"
                assert got.indexes == {"pk"}, f"not by primary key only in {where}"
            conn.rollback()
    finally:
        with plan_engine.begin() as conn:
            for n in (name, version_table_name(name)):
                conn.execute(DropTable(Table(n, MetaData()), if_exists=True))


#: The cleaner's table: finished rows past their retention and newer ones, of two tasks.
PURGE_ROWS: list[tuple[str, Status, int, datetime | None, datetime]] = [
    (TASK, Status.DONE, 4_000, None, NOW - timedelta(days=10)),
    (TASK, Status.DONE, 12_000, None, NOW - timedelta(hours=1)),
    (TASK, Status.FAILED, 2_000, None, NOW - timedelta(days=10)),
    (OTHER, Status.DONE, 4_000, None, NOW - timedelta(days=10)),
    (TASK, Status.TODO, 400, NOW + REDISPATCH, NOW - timedelta(days=10)),
    (TASK, Status.DOING, 400, NOW + LEASE, NOW - timedelta(days=10)),
]


def test_the_cleaner_reads_the_finished_rows_index(db_url: str, plan_engine: Engine) -> None:
    """A purge chunk's SELECT (first and next chunk) and ``count_older`` read
    ``ix_<table>_finished`` by a range (on MariaDB/MySQL over the generated
    ``finished_status, finished_at``, already in the chunk's order: no filesort)."""
    from meepo.ledger.retention import Retention

    name = f"t_{uuid.uuid4().hex[:16]}"
    migrate.upgrade(plan_engine, name)
    try:
        with plan_engine.begin() as conn:
            fill(conn, jobs_table(name), PURGE_ROWS)
        with plan_engine.begin() as conn:
            analyze(conn, name)
        recorded: list[tuple[str, str, Any]] = []
        label: list[str] = []

        def listener(
            conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
        ) -> None:
            jobs = name in statement and f"{name}_unique" not in statement
            if label and jobs and re.match(r"\s*SELECT\b", statement, re.IGNORECASE):
                recorded.append((label[0], statement, params))

        store = Retention(plan_engine, name)
        cutoff = NOW - timedelta(days=1)
        event.listen(plan_engine, "before_cursor_execute", listener)
        try:
            label[:] = ["count_older"]
            assert store.count_older(TASK, Status.DONE, cutoff) == 4_000
            label[:] = ["purge_chunk"]
            first = store.purge_chunk(TASK, Status.DONE, cutoff, limit=100)
            label[:] = ["purge_chunk_next"]
            store.purge_chunk(TASK, Status.DONE, cutoff, after=first.cursor, limit=100)
        finally:
            event.remove(plan_engine, "before_cursor_execute", listener)
        assert [r[0] for r in recorded] == ["count_older", "purge_chunk", "purge_chunk_next"]
        with plan_engine.connect() as conn:
            for what, sql, params in recorded:
                got = access(conn, name, sql, params)
                where = f"{what}: {sql}\n-- plan:\n{got.plan}"
                assert not got.full_scan, f"full scan of {name} in {where}"
                assert got.indexes == {f"ix_{name}_finished"}, f"not by the index in {where}"
                if conn.dialect.name == "mysql":
                    assert "filesort" not in got.plan, where
                    assert "'type': 'range'" in got.plan, where
                if conn.dialect.name == "postgresql" and what == "purge_chunk_next":
                    # the next chunk's scan starts at the cursor, not at the first
                    # (purged, dead) entry of the index
                    assert re.search(r"Index Cond[^\n]*updated_at >=", got.plan), where
            conn.rollback()
    finally:
        with plan_engine.begin() as conn:
            for n in (name, version_table_name(name)):
                conn.execute(DropTable(Table(n, MetaData()), if_exists=True))
