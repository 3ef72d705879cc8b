"""The servers the tests use, and one database and Redis db per xdist worker.

Server URLs come from the environment (defaults: the local servers). A server that is
unreachable is a skip, unless MEEPO_REQUIRE_SERVERS=1 (set by .ci/run) makes it a
failure.

Under pytest-xdist (``-n N``) every worker gets databases and a Redis db of its own, so
that tests that own a whole table or database (migrations that downgrade, purges, schema
plans, counts of every row) cannot see another worker's rows: worker ``gwN`` uses the
configured database name plus ``_gwN`` on MariaDB and PostgreSQL (created when missing:
``CREATE DATABASE IF NOT EXISTS`` on MariaDB, through the ``postgres`` maintenance
database on PostgreSQL) and Redis db ``R + N``, where R is the configured db (it must
stay below 16). A serial run (no xdist, or ``-n 0``) uses the configured URLs as they
are.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from meepo import Task
from meepo.connect import engine_for
from meepo.ledger import migrate

REQUIRE = os.environ.get("MEEPO_REQUIRE_SERVERS") == "1"
BACKENDS = ["sqlite", "mariadb", "postgres"]
SERVERS = ["mariadb", "postgres"]  # the backends with a server (and row locks)
REDIS_DBS = 16  # a default redis-server's ``databases``

TaskFactory = Callable[..., Task]  # the ``make_task`` fixture


def worker_index() -> int | None:
    """This xdist worker's number (``gw3`` is 3), None in a serial run."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else None


def for_worker(url: str, worker: int | None) -> str:
    """``url`` with the worker's database name (``<name>_gwN``); as is when serial."""
    if worker is None:
        return url
    u = make_url(url)
    return u.set(database=f"{u.database}_gw{worker}").render_as_string(hide_password=False)


def redis_for_worker(url: str, worker: int | None) -> str:
    """``url`` with db ``R + worker``; as is when serial. Past db 15 is a ValueError."""
    if worker is None:
        return url
    parts = urlsplit(url)
    base = int(parts.path.strip("/") or 0)
    db = base + worker
    if db >= REDIS_DBS:
        raise ValueError(
            f"MEEPO_TEST_REDIS_URL uses db {base}: xdist worker gw{worker} would need db {db}, "
            f"past Redis's {REDIS_DBS} databases; use a lower db or fewer workers (-n)"
        )
    return urlunsplit(parts._replace(path=f"/{db}"))


WORKER = worker_index()
MARIADB_URL = for_worker(
    os.environ.get("MEEPO_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"), WORKER
)
POSTGRES_URL = for_worker(
    os.environ.get("MEEPO_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    WORKER,
)
_REDIS_BASE = os.environ.get("MEEPO_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


def redis_url() -> str:
    """This worker's Redis URL (a ValueError if the worker has no db left)."""
    return redis_for_worker(_REDIS_BASE, WORKER)


_reachable: dict[str, str | None] = {}
_counter = itertools.count()


def unreachable(what: str, why: object) -> None:
    msg = f"{what} is unreachable: {why}"
    if REQUIRE:
        pytest.fail(msg + " (MEEPO_REQUIRE_SERVERS=1)")
    pytest.skip(msg)


def ensure_database(url: str) -> None:
    """Create a worker's database when it is missing (a serial run's must exist)."""
    if WORKER is None:
        return
    u = make_url(url)
    name = u.database
    if u.get_backend_name() == "mysql":
        engine = create_engine(u.set(database="information_schema"))
        try:
            with engine.begin() as conn:
                conn.execute(text(f"CREATE DATABASE IF NOT EXISTS `{name}`"))
        finally:
            engine.dispose()
    elif u.get_backend_name() == "postgresql":
        engine = create_engine(u.set(database="postgres"), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                found = conn.execute(
                    text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
                ).first()
                if found is None:
                    conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()


def prepare(url: str) -> None:
    """Reach the database of ``url`` (creating a worker's) and migrate it to head."""
    ensure_database(url)
    engine = engine_for(url)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    migrate.upgrade(engine)


def backend_url(backend: str, sqlite_url: str) -> str:
    """The migrated ledger database URL of ``backend`` (skip or fail if unreachable)."""
    url = {"sqlite": sqlite_url, "mariadb": MARIADB_URL, "postgres": POSTGRES_URL}[backend]
    if backend not in _reachable:
        try:
            prepare(url)
            _reachable[backend] = None
        except Exception as exc:
            _reachable[backend] = str(exc).splitlines()[0]
    why = _reachable[backend]
    if why is not None:
        unreachable(backend, why)
    return url


def unique_task_id(prefix: str = "t") -> str:
    return f"{prefix}_{os.getpid()}_{int(time.time() * 1000) % 10**9}_{next(_counter)}"


def close_idle_connections() -> None:
    """Close the pooled, checked-in connections of every engine meepo built in this
    process (``Engine.dispose()``: the engines stay usable and reconnect on demand;
    connections checked out now are left alone)."""
    from meepo import connect

    with connect._lock:
        engines = [*connect._engines.values(), *connect._service_engines.values()]
    for engine in engines:
        engine.dispose(close=True)
