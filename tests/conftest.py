"""Fixtures only: every database test runs on SQLite, MariaDB and PostgreSQL.

What the fixtures use (server URLs from the environment, one database and Redis db per
xdist worker, skip or fail when a server is unreachable) lives in the ``support``
package; test modules import from there, never from this file.

The unit tier runs with no server and no redis-server binary (``make test-fast``): a
test under tests/unit that asks for a server's fixture is a collection error, not a skip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from support import TESTS, backends
from support.backends import BACKENDS, TaskFactory, backend_url, unique_task_id, unreachable
from support.helpers import RedisServer

from meepo import Task


@pytest.fixture(autouse=True)
def _close_idle_connections() -> Iterator[None]:
    """Under xdist, close the idle pooled connections of every engine after each test
    (torn down last, after the Tasks stopped). A process keeps one pool per URL and
    lease (up to 20 + 6 per lease idle connections): N workers would hold N times what a
    serial run holds, past PostgreSQL's default 100 clients. A serial run keeps its
    pools, as before."""
    yield
    if backends.WORKER is not None:
        backends.close_idle_connections()


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'ledger.sqlite3'}"


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """A migrated ledger database URL, one per backend.

    A module whose tests cannot apply to SQLite (no server to lose, no row locks)
    overrides this fixture with ``params=SERVERS``."""
    return backend_url(request.param, sqlite_url)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """This worker's Redis URL (its own db under xdist, see support.backends)."""
    try:
        url = backends.redis_url()
    except ValueError as exc:
        pytest.fail(str(exc))
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        unreachable("redis", exc)
    finally:
        client.close()
    return url


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


UNIT = TESTS / "unit"
SERVER_FIXTURES = {"db_url", "sqlite_url", "redis_url", "make_task", "servers"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        wanted = SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if wanted and item.path.is_relative_to(UNIT):
            raise pytest.UsageError(
                f"{item.nodeid} uses {', '.join(sorted(wanted))}: a test that needs a "
                "server belongs in tests/integration or tests/process, not tests/unit"
            )
