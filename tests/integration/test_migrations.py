"""The Alembic migrations: the one schema definition of the ledger, on every backend.

``alembic upgrade head`` (the repo's alembic.ini, URL from MEEPO_DB_URL, table from
``-x table=`` or MEEPO_TABLE), the programmatic runner in meepo.ledger.migrate,
``Task(init_db=True)``, concurrent upgrades from many processes, and the migrated
schema compared with the runtime metadata (meepo.ledger.schema.jobs_table).
Every test uses a fresh table of its own and drops it (and its version table) after.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import uuid
import warnings
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, MetaData, Table, inspect, pool, select
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.schema import DropTable
from support import ROOT
from support.backends import TaskFactory
from support.helpers import child_env, wait_for

from meepo import Task
from meepo.config import DEFAULT_TABLE
from meepo.errors import ConfigError, SchemaError
from meepo.ledger import migrate
from meepo.ledger.engine import make_engine
from meepo.ledger.schema import archive_table, jobs_table, ledger_metadata, version_table_name

HEAD = "0008"


def new_table_name() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"


def drop_ledger_table(url: str, name: str) -> None:
    """Drop a test's ledger table and its Alembic version table, if they exist."""
    engine = make_engine(url, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            for table in (
                f"{name}_archive",
                f"{name}_retention",
                f"{name}_schedules",
                f"{name}_unique",
                name,
                version_table_name(name),
            ):
                conn.execute(DropTable(Table(table, MetaData()), if_exists=True))
    finally:
        engine.dispose()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url, poolclass=pool.NullPool)
    yield eng
    eng.dispose()


@pytest.fixture
def table(db_url: str) -> Iterator[str]:
    """A fresh ledger table name; the table and its version table are dropped after."""
    name = new_table_name()
    yield name
    drop_ledger_table(db_url, name)


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def alembic(db_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the alembic command line from the repository root, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=ROOT,
        env=child_env(MEEPO_DB_URL=db_url, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"alembic failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


# -- the alembic command line ----------------------------------------------------------


def test_alembic_cli_upgrade_current_downgrade(db_url: str, engine: Engine, table: str) -> None:
    ok(alembic(db_url, "-x", f"table={table}", "upgrade", "head"))
    assert table in table_names(engine)
    assert migrate.current(engine, table) == HEAD
    migrate.check(engine, table)

    out = ok(alembic(db_url, "-x", f"table={table}", "current"))
    assert f"{HEAD} (head)" in out

    ok(alembic(db_url, "-x", f"table={table}", "downgrade", "base"))
    assert table not in table_names(engine)
    assert migrate.current(engine, table) is None
    out = ok(alembic(db_url, "-x", f"table={table}", "current"))
    assert HEAD not in out


def test_alembic_cli_table_from_env(db_url: str, engine: Engine, table: str) -> None:
    ok(alembic(db_url, "upgrade", "head", MEEPO_TABLE=table))
    assert table in table_names(engine)
    assert migrate.current(engine, table) == HEAD
    # -x wins over the environment
    other = new_table_name()
    try:
        ok(alembic(db_url, "-x", f"table={other}", "upgrade", "head", MEEPO_TABLE=table))
        assert migrate.current(engine, other) == HEAD
    finally:
        drop_ledger_table(db_url, other)


def test_alembic_cli_offline_sql(db_url: str, table: str) -> None:
    """``--sql`` renders the DDL for the URL's dialect without touching the database."""
    out = ok(alembic(db_url, "-x", f"table={table}", "upgrade", "head", "--sql"))
    assert f"CREATE TABLE {table}" in out
    assert f"CREATE INDEX ix_{table}_task_status_expires" in out
    assert version_table_name(table) in out


@pytest.mark.parametrize("bad", ["meepo_jobs; DROP TABLE x", "x" * 41])
def test_alembic_cli_rejects_bad_table_names(db_url: str, engine: Engine, bad: str) -> None:
    before = table_names(engine)
    result = alembic(db_url, "-x", f"table={bad}", "upgrade", "head")
    assert result.returncode != 0
    assert "invalid table name" in result.stderr
    assert_untouched(engine, before)


# -- the programmatic runner -----------------------------------------------------------


def test_programmatic_upgrade_check_downgrade(engine: Engine, table: str) -> None:
    assert migrate.head() == HEAD
    assert migrate.current(engine, table) is None
    with pytest.raises(SchemaError, match="does not exist"):
        migrate.check(engine, table)

    migrate.upgrade(engine, table)
    assert migrate.current(engine, table) == HEAD
    migrate.check(engine, table)
    migrate.upgrade(engine, table)  # already at head: nothing to do
    assert migrate.current(engine, table) == HEAD
    names = table_names(engine)
    assert {table, version_table_name(table)} <= names

    assert {f"{table}_retention", f"{table}_archive"} <= names

    assert "result" in Table(table, MetaData(), autoload_with=engine).c
    mysql = engine.dialect.name == "mysql"
    columns = set(Table(table, MetaData(), autoload_with=engine).c.keys())
    assert ({"finished_status", "finished_at"} <= columns) is mysql
    assert finished_index(engine, table) == (
        ["task_id", "finished_status", "finished_at"]
        if mysql
        else ["task_id", "status", "updated_at"]
    )
    migrate.downgrade(engine, table)
    assert migrate.current(engine, table) == "0007"
    columns = set(Table(table, MetaData(), autoload_with=engine).c.keys())
    assert {"finished_status", "finished_at"}.isdisjoint(columns)
    assert finished_index(engine, table) == ["task_id", "status", "updated_at"]
    migrate.downgrade(engine, table)
    assert migrate.current(engine, table) == "0006"
    assert {"cancel_requested", "progress", "progress_note"}.isdisjoint(
        Table(table, MetaData(), autoload_with=engine).c.keys()
    )
    migrate.downgrade(engine, table)
    assert migrate.current(engine, table) == "0005"
    assert "result" not in Table(table, MetaData(), autoload_with=engine).c
    assert "result" not in Table(f"{table}_archive", MetaData(), autoload_with=engine).c
    migrate.downgrade(engine, table)
    assert migrate.current(engine, table) == "0004"
    assert "dispatch_deadline" not in Table(table, MetaData(), autoload_with=engine).c
    indexes = {i["name"]: i["column_names"] for i in inspect(engine).get_indexes(table)}
    assert indexes == {
        f"ix_{table}_task_status_expires": ["task_id", "status", "expires_at"],
        f"ix_{table}_finished": ["task_id", "status", "updated_at"],
    }
    migrate.downgrade(engine, table)
    assert migrate.current(engine, table) == "0003"
    assert {f"{table}_retention", f"{table}_archive"}.isdisjoint(table_names(engine))
    indexes = {i["name"]: i["column_names"] for i in inspect(engine).get_indexes(table)}
    assert indexes == {f"ix_{table}_task_status_expires": ["task_id", "status", "expires_at"]}
    migrate.downgrade(engine, table)
    assert migrate.current(engine, table) == "0002"
    assert {"started_at", "orphaned_claims"}.isdisjoint(
        Table(table, MetaData(), autoload_with=engine).c.keys()
    )
    migrate.downgrade(engine, table)
    assert migrate.current(engine, table) == "0001"
    assert {f"{table}_unique", f"{table}_schedules"}.isdisjoint(table_names(engine))
    with pytest.raises(SchemaError, match="is at revision 0001"):
        migrate.check(engine, table)
    migrate.downgrade(engine, table)
    assert table not in table_names(engine)
    assert migrate.current(engine, table) is None
    with pytest.raises(SchemaError):
        migrate.check(engine, table)

    migrate.upgrade(engine, table, HEAD)
    migrate.downgrade(engine, table, "base")
    assert table not in table_names(engine)


def finished_index(engine: Engine, table: str) -> list[str | None]:
    """The columns of ``ix_<table>_finished``."""
    indexes = {i["name"]: i["column_names"] for i in inspect(engine).get_indexes(table)}
    return list(indexes[f"ix_{table}_finished"])


def test_upgrade_keeps_rows_and_gives_them_the_default_priority(engine: Engine, table: str) -> None:
    migrate.upgrade(engine, table, "0001")
    old = Table(table, MetaData(), autoload_with=engine)
    assert "priority" not in old.c
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with engine.begin() as conn:
        conn.execute(
            old.insert(),
            {
                "task_id": "t", "status": "todo", "payload": b"x", "failed_times": 0,
                "commit_id": 0, "created_at": when, "updated_at": when, "run_at": when,
            },
        )  # fmt: skip
    migrate.upgrade(engine, table)
    t = jobs_table(table)
    with engine.connect() as conn:
        row = conn.execute(select(t.c.task_id, t.c.payload, t.c.priority)).one()
    assert (row.task_id, bytes(row.payload), row.priority) == ("t", b"x", "default")


def test_upgrade_to_start_marks_takes_doing_rows_as_started(engine: Engine, table: str) -> None:
    """0003: a doing row was claimed by an older meepo, which charged every expired
    lease: it is taken as started (started_at = updated_at); other rows are not."""
    migrate.upgrade(engine, table, "0002")
    old = Table(table, MetaData(), autoload_with=engine)
    assert "started_at" not in old.c
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    later = datetime(2026, 1, 2, tzinfo=timezone.utc)
    with engine.begin() as conn:
        for status, updated in (("todo", when), ("doing", later), ("done", later)):
            conn.execute(
                old.insert(),
                {
                    "task_id": "t", "status": status, "payload": b"x", "failed_times": 0,
                    "commit_id": 0, "created_at": when, "updated_at": updated, "run_at": when,
                },
            )  # fmt: skip
    migrate.upgrade(engine, table)
    assert migrate.current(engine, table) == HEAD
    t = jobs_table(table)
    with engine.connect() as conn:
        rows = conn.execute(select(t.c.status, t.c.started_at, t.c.orphaned_claims)).all()
    got = {r.status: (r.started_at, r.orphaned_claims) for r in rows}
    assert got == {"todo": (None, 0), "doing": (later, 0), "done": (None, 0)}


def test_tables_migrate_independently(engine: Engine, table: str) -> None:
    """A custom table has its own version table: the default table is untouched."""
    default_before = migrate.current(engine, DEFAULT_TABLE)
    migrate.upgrade(engine, table)
    migrate.downgrade(engine, table, "base")
    assert migrate.current(engine, DEFAULT_TABLE) == default_before == HEAD
    migrate.check(engine, DEFAULT_TABLE)


@pytest.mark.parametrize("bad", ["x; DROP TABLE meepo_jobs", "", "a b", "é", "x" * 41, None, 7])
def test_programmatic_rejects_bad_table_names(engine: Engine, bad: Any) -> None:
    before = table_names(engine)
    with pytest.raises(ConfigError, match="invalid table name"):
        migrate.upgrade(engine, bad)
    with pytest.raises(ConfigError, match="invalid table name"):
        migrate.current(engine, bad)
    assert_untouched(engine, before)


def assert_untouched(engine: Engine, before: set[str]) -> None:
    """Nothing dropped and nothing created under a bad name (other processes may create
    unrelated tables in the shared test database meanwhile)."""
    after = table_names(engine)
    assert {t for t in before if t.startswith("meepo")} <= after
    assert not [t for t in after - before if t.startswith(("x", "meepo"))]


def test_task_rejects_bad_table_name(db_url: str, redis_url: str) -> None:
    with pytest.raises(ConfigError, match="invalid table name"):
        Task("t", db=db_url, redis=redis_url, table_name="jobs; DROP TABLE meepo_jobs")


def test_task_init_db_migrates(make_task: TaskFactory, engine: Engine, table: str) -> None:
    task = make_task(table_name=table, init_db=True)
    assert migrate.current(engine, table) == HEAD
    job_id = task.push(b"hello")
    t = jobs_table(table)
    with engine.connect() as conn:
        assert conn.execute(select(t.c.payload).where(t.c.id == job_id)).scalar_one() == b"hello"


def test_task_without_init_db_reports_missing_table(make_task: TaskFactory, table: str) -> None:
    task = make_task(table_name=table)
    with pytest.raises(SchemaError, match="meepo db upgrade"):
        task.push(b"x")


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from sqlalchemy import pool
    from meepo.ledger import migrate
    from meepo.ledger.engine import make_engine

    url, table, ready, go = sys.argv[1:]
    engine = make_engine(url, poolclass=pool.NullPool)
    Path(ready).touch()
    deadline = time.monotonic() + 60
    while not Path(go).exists():
        if time.monotonic() > deadline:
            sys.exit("no go signal")
        time.sleep(0.002)
    migrate.upgrade(engine, table)
    print(migrate.current(engine, table))
    """
)


def test_concurrent_upgrades(db_url: str, engine: Engine, table: str, tmp_path: Path) -> None:
    """Many processes starting at once on a new table: all succeed, one table at head."""
    n = 4
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, db_url, table, str(tmp_path / f"ready{i}"), str(go)],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    try:
        wait_for(
            lambda: all((tmp_path / f"ready{i}").exists() for i in range(n)),
            timeout=60,
            message="the migrating processes to start",
        )
        go.touch()
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
        assert out.strip() == HEAD
    assert migrate.current(engine, table) == HEAD
    version = Table(version_table_name(table), MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        assert conn.execute(select(version.c.version_num)).scalars().all() == [HEAD]


# -- the migrated schema is the runtime schema -----------------------------------------


@pytest.mark.parametrize("which", ["custom", "default"])
def test_migrated_schema_matches_metadata(engine: Engine, table: str, which: str) -> None:
    name = table if which == "custom" else DEFAULT_TABLE  # the default: db_url migrated it
    if which == "custom":
        migrate.upgrade(engine, name)
    dialect = engine.dialect.name
    metadata = ledger_metadata(name, dialect)
    companions = {
        name, f"{name}_unique", f"{name}_schedules", f"{name}_retention", f"{name}_archive",
    }  # fmt: skip

    def include_name(obj_name: str | None, type_: str, parent: Any) -> bool:
        return type_ != "table" or obj_name in companions

    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "compare_server_default": True,
                "include_name": include_name,
            },
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            diffs = compare_metadata(ctx, metadata)
    assert diffs == []
    # a generated column whose expression differs is only warned about
    assert [str(w.message) for w in caught if "omputed" in str(w.message)] == []

    # compare_type skips what it considers equivalent: check the types that matter.
    insp = inspect(engine)
    cols = {c["name"]: c for c in insp.get_columns(name)}
    assert list(cols) == [c.name for c in jobs_table(name, dialect=dialect).columns]
    assert [c for c in cols if not cols[c]["nullable"]] == [
        "id", "task_id", "status", "payload", "failed_times", "commit_id",
        "created_at", "updated_at", "run_at", "priority", "orphaned_claims",
        "cancel_requested",
    ]  # fmt: skip
    assert insp.get_pk_constraint(name)["constrained_columns"] == ["id"]
    indexes = {i["name"]: i["column_names"] for i in insp.get_indexes(name)}
    assert indexes == {
        f"ix_{name}_task_status_deadlines": [
            "task_id",
            "status",
            "expires_at",
            "dispatch_deadline",
        ],
        f"ix_{name}_finished": (
            ["task_id", "finished_status", "finished_at"]
            if dialect == "mysql"
            else ["task_id", "status", "updated_at"]
        ),
    }
    if dialect == "mysql":
        generated = {c: cols[c].get("computed") for c in ("finished_status", "finished_at")}
        assert all(g is not None and g.get("persisted") for g in generated.values()), generated
    indexes = {i["name"]: i["column_names"] for i in insp.get_indexes(f"{name}_unique")}
    assert indexes == {f"ix_{name}_unique_job": ["job_id"]}
    pk = insp.get_pk_constraint(f"{name}_retention")["constrained_columns"]
    assert pk == ["task_id", "status"]
    assert insp.get_pk_constraint(f"{name}_archive")["constrained_columns"] == ["id"]
    pk = insp.get_pk_constraint(f"{name}_unique")["constrained_columns"]
    assert pk == ["task_id", "key"]
    pk = insp.get_pk_constraint(f"{name}_schedules")["constrained_columns"]
    assert pk == ["task_id", "name"]
    indexes = {i["name"]: i["column_names"] for i in insp.get_indexes(f"{name}_schedules")}
    assert indexes == {f"ix_{name}_schedules_due": ["task_id", "next_fire_at"]}
    for col in ("created_at", "updated_at", "run_at", "expires_at", "dispatch_deadline"):
        typ = cols[col]["type"]
        if dialect == "mysql":
            assert isinstance(typ, mysql.DATETIME) and typ.fsp == 6, (col, typ)
        elif dialect == "postgresql":
            assert isinstance(typ, postgresql.TIMESTAMP) and typ.timezone, (col, typ)
    if dialect == "mysql":
        assert isinstance(cols["payload"]["type"], mysql.LONGBLOB)
        assert isinstance(cols["id"]["type"], mysql.BIGINT)
        assert cols["id"].get("autoincrement") is True
    elif dialect == "postgresql":
        assert isinstance(cols["id"]["type"], postgresql.BIGINT)
        assert isinstance(cols["commit_id"]["type"], postgresql.BIGINT)


# -- packaging -------------------------------------------------------------------------


def test_script_location_holds_the_migrations() -> None:
    where = migrate.script_location()
    assert (where / "env.py").is_file()
    assert (where / "versions" / "0001_jobs_table.py").is_file()
    script = ScriptDirectory.from_config(migrate.alembic_config())
    assert script.get_heads() == [HEAD] == [migrate.head()]
    assert [r.revision for r in script.walk_revisions()][-1] == "0001"


def test_every_package_is_listed_in_pyproject() -> None:
    """pyproject.toml lists packages explicitly (migrations/ ships as meepo._migrations):
    a package added under meepo/ must be added there too, or the wheel misses it."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "meepo").rglob("__init__.py")
    }
    assert on_disk - listed == set(), "add these packages to [tool.setuptools] packages"
    assert {"meepo._migrations", "meepo._migrations.versions"} <= listed
    assert config["package-dir"]["meepo._migrations"] == "migrations"


def test_the_head_revision_is_read_once_when_threads_ask_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tasks starting together ask for the head from several threads; reading the
    migration files in parallel (ast.parse) has crashed CPython's parser, so it is read
    once, under a lock."""
    monkeypatch.setattr(migrate, "_head", None, raising=False)
    reads: list[int] = []
    second = threading.Event()
    real = migrate._revisions

    def slow_revisions(path: Path) -> Any:
        reads.append(threading.get_ident())
        if len(set(reads)) > 1:
            second.set()
        second.wait(0.5)  # long enough for a second thread to come in, if it can
        return real(path)

    monkeypatch.setattr(migrate, "_revisions", slow_revisions)
    heads: list[str] = []
    threads = [threading.Thread(target=lambda: heads.append(migrate.head())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert heads == [HEAD] * 4
    assert len(set(reads)) == 1  # one thread read the files


def test_0004_keeps_rows_and_sqlite_never_reuses_a_deleted_id(engine: Engine, table: str) -> None:
    """0004 rebuilds an SQLite jobs table with AUTOINCREMENT (rows kept): once the
    newest job is purged, the next one must not get its id."""
    migrate.upgrade(engine, table, "0003")
    t = jobs_table(table)
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    row = {
        "task_id": "t", "status": "done", "payload": b"x", "failed_times": 0,
        "commit_id": 1, "created_at": when, "updated_at": when, "run_at": when,
    }  # fmt: skip
    with engine.begin() as conn:
        conn.execute(t.insert(), [row, row])
    migrate.upgrade(engine, table)
    with engine.begin() as conn:
        ids = list(conn.execute(select(t.c.id).order_by(t.c.id)).scalars())
        assert len(ids) == 2
        conn.execute(t.delete().where(t.c.id == ids[-1]))
        key = conn.execute(t.insert().values(**row)).inserted_primary_key
        assert key is not None
        new = key[0]
    assert new > ids[-1]


def test_0005_moves_todo_deadlines_out_of_expires_at_and_back(engine: Engine, table: str) -> None:
    """0005 on a populated ledger: each todo row's redispatch deadline (the epoch for
    one never dispatched) moves from expires_at to dispatch_deadline, doing rows keep
    their leases, finished rows keep neither; the migrated rows then behave (sweep,
    reaper, cleaner's finished rows), and the downgrade moves the deadlines back."""
    from meepo.ledger import NEVER_DISPATCHED, Ledger
    from meepo.ledger.retention import Retention
    from meepo.records import Status

    migrate.upgrade(engine, table, "0004")
    old = Table(table, MetaData(), autoload_with=engine)
    archive = Table(f"{table}_archive", MetaData(), autoload_with=engine)
    assert "dispatch_deadline" not in old.c
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    deadline = datetime(2026, 1, 1, 0, 1, tzinfo=timezone.utc)
    lease_end = datetime(2026, 1, 1, 0, 0, 30, tzinfo=timezone.utc)
    spec = [
        ("todo", deadline),
        ("todo", NEVER_DISPATCHED),
        ("doing", lease_end),
        ("done", None),
        ("failed", None),
    ]
    base = {
        "task_id": "t", "payload": b"x", "failed_times": 0, "commit_id": 2,
        "created_at": when, "updated_at": when, "run_at": when, "priority": "default",
        "orphaned_claims": 0,
    }  # fmt: skip
    with engine.begin() as conn:
        for status, expires in spec:
            conn.execute(old.insert().values(**base, status=status, expires_at=expires))
        conn.execute(
            archive.insert().values(
                **base, id=10_000, status="todo", expires_at=deadline, archived_at=when
            )
        )
    migrate.upgrade(engine, table)
    assert migrate.current(engine, table) == HEAD
    t = jobs_table(table)
    with engine.connect() as conn:
        rows = conn.execute(
            select(t.c.id, t.c.status, t.c.expires_at, t.c.dispatch_deadline).order_by(t.c.id)
        ).all()
        a = archive_table(table)
        moved = conn.execute(select(a.c.expires_at, a.c.dispatch_deadline)).one()
    got = [(r.status, r.expires_at, r.dispatch_deadline) for r in rows]
    assert got == [
        ("todo", None, deadline),
        ("todo", None, NEVER_DISPATCHED),
        ("doing", lease_end, None),
        ("done", None, None),
        ("failed", None, None),
    ]
    assert tuple(moved) == (None, deadline)
    ids = {r.status: r.id for r in rows}

    ledger = Ledger(engine, table)
    after = datetime(2026, 1, 1, 0, 2, tzinfo=timezone.utc)
    zombies = ledger.expired_leases("t", limit=10, now=after)
    assert [z.id for z in zombies] == [ids["doing"]]
    swept = ledger.sweep(
        "t", now=after, cutoffs={"default": after}, limit=10, redispatch_timeout=timedelta(1)
    )
    assert len(swept) == 2
    never_only = NEVER_DISPATCHED + timedelta(microseconds=1)
    page = ledger.todo_page("t", after=None, limit=10)
    assert sorted(m.job_id for m, _ in page) == [rows[0].id, rows[1].id]
    assert (
        ledger.sweep(
            "t",
            now=after,
            cutoffs={"default": never_only},
            limit=10,
            redispatch_timeout=timedelta(1),
        )
        == []
    )
    cleaner = Retention(engine, table)
    assert cleaner.count_older("t", Status.DONE, after) == 1
    assert cleaner.count_older("t", Status.FAILED, after) == 1

    migrate.downgrade(engine, table, "0004")
    assert "dispatch_deadline" not in Table(table, MetaData(), autoload_with=engine).c
    with engine.connect() as conn:
        back = conn.execute(select(t.c.status, t.c.expires_at).order_by(t.c.id)).all()
    assert [r.status for r in back] == ["todo", "todo", "doing", "done", "failed"]
    assert back[2].expires_at == lease_end and back[3].expires_at is None
    assert all(r.expires_at is not None and r.expires_at > after for r in back[:2])


def test_0008_keeps_finished_rows_purgeable_and_back(engine: Engine, table: str) -> None:
    """0008 on a populated 0007 ledger: on MariaDB/MySQL the generated columns hold the
    status and updated_at of finished rows only (NULL for todo and doing rows, also
    after a job finishes), and on every server the cleaner finds and purges the old
    finished rows and nothing else, before the downgrade and after it."""
    from meepo.ledger.retention import Retention
    from meepo.records import Status

    migrate.upgrade(engine, table, "0007")
    old = Table(table, MetaData(), autoload_with=engine)
    assert "finished_status" not in old.c
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    recent = datetime(2026, 1, 3, tzinfo=timezone.utc)
    cutoff = datetime(2026, 1, 2, tzinfo=timezone.utc)
    far = datetime(2027, 1, 1, tzinfo=timezone.utc)
    spec = [
        ("done", when, None, None),
        ("done", when, None, None),
        ("failed", when, None, None),
        ("cancelled", when, None, None),
        ("done", recent, None, None),
        ("todo", when, None, far),
        ("doing", when, far, None),
    ]
    base = {
        "task_id": "t", "payload": b"x", "failed_times": 0, "commit_id": 2,
        "created_at": when, "run_at": when, "priority": "default", "orphaned_claims": 0,
    }  # fmt: skip
    with engine.begin() as conn:
        for status, updated, expires, deadline in spec:
            conn.execute(
                old.insert().values(
                    **base,
                    status=status,
                    updated_at=updated,
                    expires_at=expires,
                    dispatch_deadline=deadline,
                )
            )
    migrate.upgrade(engine, table)
    assert migrate.current(engine, table) == HEAD
    mysql = engine.dialect.name == "mysql"
    t = jobs_table(table, dialect=engine.dialect.name)
    if mysql:
        with engine.begin() as conn:
            got = conn.execute(
                select(t.c.status, t.c.finished_status, t.c.finished_at).order_by(t.c.id)
            ).all()
            assert [tuple(r) for r in got] == [
                ("done", "done", when),
                ("done", "done", when),
                ("failed", "failed", when),
                ("cancelled", "cancelled", when),
                ("done", "done", recent),
                ("todo", None, None),
                ("doing", None, None),
            ]
            # the doing job finishes: its row enters the finished rows' index
            conn.execute(
                t.update()
                .where(t.c.status == "doing")
                .values(status="done", expires_at=None, updated_at=when)
            )
            doing = conn.execute(
                select(t.c.finished_status, t.c.finished_at).where(t.c.id == len(spec))
            )
            assert tuple(doing.one()) == ("done", when)
            conn.execute(
                t.update()
                .where(t.c.id == len(spec))
                .values(status="doing", expires_at=far, updated_at=when)
            )
    cleaner = Retention(engine, table)
    assert cleaner.count_older("t", Status.DONE, cutoff) == 2
    assert cleaner.count_older("t", Status.FAILED, cutoff) == 1
    assert cleaner.count_older("t", Status.CANCELLED, cutoff) == 1
    assert cleaner.count_older("t", Status.DONE, far) == 3
    chunk = cleaner.purge_chunk("t", Status.DONE, cutoff, limit=1)
    assert (chunk.removed, chunk.held) == (1, 0) and chunk.cursor is not None
    chunk = cleaner.purge_chunk("t", Status.DONE, cutoff, after=chunk.cursor, archive=True)
    assert (chunk.removed, chunk.cursor) == (1, None)
    assert cleaner.count_older("t", Status.DONE, far) == 1

    migrate.downgrade(engine, table, "0007")
    assert "finished_status" not in Table(table, MetaData(), autoload_with=engine).c
    assert finished_index(engine, table) == ["task_id", "status", "updated_at"]
    with engine.connect() as conn:
        left = conn.execute(select(old.c.status).order_by(old.c.id)).scalars().all()
    assert left == ["failed", "cancelled", "done", "todo", "doing"]
