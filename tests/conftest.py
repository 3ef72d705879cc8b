"""Shared fixtures: every database test runs on SQLite, MariaDB and PostgreSQL.

Server URLs come from the environment (defaults: the local servers). A server that is
unreachable is a skip, unless MEEPO_REQUIRE_SERVERS=1 (set by .ci/run) makes it a
failure.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import RedisServer
from sqlalchemy import text

from meepo import Task
from meepo.connect import engine_for
from meepo.ledger import migrate

MARIADB_URL = os.environ.get("MEEPO_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
POSTGRES_URL = os.environ.get(
    "MEEPO_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("MEEPO_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
REQUIRE = os.environ.get("MEEPO_REQUIRE_SERVERS") == "1"

BACKENDS = ["sqlite", "mariadb", "postgres"]
SERVERS = ["mariadb", "postgres"]  # the backends with a server (and row locks)

_reachable: dict[str, str | None] = {}
_counter = itertools.count()


def unreachable(what: str, why: object) -> None:
    msg = f"{what} is unreachable: {why}"
    if REQUIRE:
        pytest.fail(msg + " (MEEPO_REQUIRE_SERVERS=1)")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'ledger.sqlite3'}"


def _prepare(url: str) -> None:
    engine = engine_for(url)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    migrate.upgrade(engine)


def backend_url(backend: str, sqlite_url: str) -> str:
    """The migrated ledger database URL of ``backend`` (skip or fail if unreachable)."""
    url = {"sqlite": sqlite_url, "mariadb": MARIADB_URL, "postgres": POSTGRES_URL}[backend]
    if backend not in _reachable:
        try:
            _prepare(url)
            _reachable[backend] = None
        except Exception as exc:
            _reachable[backend] = str(exc).splitlines()[0]
    why = _reachable[backend]
    if why is not None:
        unreachable(backend, why)
    return url


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """A migrated ledger database URL, one per backend.

    A module whose tests cannot apply to SQLite (no server to lose, no row locks)
    overrides this fixture with ``params=SERVERS``."""
    return backend_url(request.param, sqlite_url)


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        unreachable("redis", exc)
    finally:
        client.close()
    return REDIS_URL


def unique_task_id(prefix: str = "t") -> str:
    return f"{prefix}_{os.getpid()}_{int(time.time() * 1000) % 10**9}_{next(_counter)}"


TaskFactory = Callable[..., Task]


@pytest.fixture
def make_task(db_url: str, redis_url: str) -> Iterator[TaskFactory]:
    """Build Tasks on the test's database with a fresh task id; stopped at teardown."""
    made: list[Task] = []
    ids: dict[str, str] = {}

    def factory(task_id: str | None = None, **kwargs: Any) -> Task:
        kwargs.setdefault("db", db_url)
        kwargs.setdefault("redis", redis_url)
        if task_id is None:
            task_id = ids.setdefault("default", unique_task_id())
        task = Task(task_id, **kwargs)
        made.append(task)
        return task

    yield factory
    for task in made:
        task.stop(wait=True, grace=5)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start throwaway redis-servers (``servers(*args)``, in the test's temporary
    folder, on free ports); all are stopped at teardown."""
    started: list[RedisServer] = []

    def start(*args: str) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(started)}", *args).start()
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
