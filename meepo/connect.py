"""Turning ``db=`` and ``redis=`` arguments into shared, fork-safe clients.

Tasks in one process that name the same URL share one Engine (one connection pool) and
one Redis client. meepo's own threads (claim, committer, heartbeat, reaper, scheduler)
use a second, small Engine per URL and lease bounds (``service_engine_for``), so that
they never queue behind handlers holding ``task.engine`` connections, and every wait of
theirs is bounded (:mod:`meepo.ledger.bounds`). After ``fork`` the child drops the
parent's pooled connections (redis-py does this by itself on the first command in the
child).
"""

from __future__ import annotations

import os
import threading

import redis as redis_lib
from sqlalchemy import Engine

from .config import default_db_url, default_redis_url, home_dir
from .errors import ConfigError
from .ledger import make_engine
from .ledger.bounds import Bounds
from .transport import make_client
from .urls import check_db_url, check_redis_url

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_clients: dict[tuple[str, float | None], redis_lib.Redis] = {}
_service_engines: dict[tuple[str, Bounds], Engine] = {}

#: The service pool: the claim, the committer, the heartbeat and the starter of a Task
#: each hold at most one connection at a time (the reaper and the scheduler briefly, once
#: a tick): six stay open, so none of them reconnects on every checkout; shared by the
#: Tasks of a process with the same URL and lease (one service pool per lease value).
SERVICE_POOL_SIZE = 6
SERVICE_MAX_OVERFLOW = 17


def engine_for(db: str | Engine | None) -> Engine:
    if isinstance(db, Engine):
        return db
    if db is None:
        db = default_db_url()
    if not isinstance(db, str):
        raise ConfigError(f"db must be a URL or a sqlalchemy Engine, not {type(db).__name__}")
    with _lock:
        engine = _engines.get(db)
        if engine is None:
            check_db_url(db)
            engine = _engines[db] = make_engine(db, pool_size=20, max_overflow=20)
        return engine


def service_engine_for(db: str | Engine | None, bounds: Bounds) -> Engine:
    """The Engine meepo's own threads use for ``db``: one per URL and bounds per
    process, apart from the handlers' ``engine_for(db)``.

    A caller's own Engine is used as it is (meepo cannot rebuild its connect arguments),
    and so is an SQLite database (one writer at a time whichever pool asks; an in-memory
    one exists in one connection only).
    """
    engine = engine_for(db)
    if isinstance(db, Engine) or engine.dialect.name == "sqlite":
        return engine
    # The URL as given, not engine.url: make_engine moves a ?password= out of that.
    url = db if isinstance(db, str) else default_db_url()
    with _lock:
        found = _service_engines.get((url, bounds))
        if found is None:
            found = _service_engines[(url, bounds)] = make_engine(
                url,
                bounds,
                pool_size=SERVICE_POOL_SIZE,
                max_overflow=SERVICE_MAX_OVERFLOW,
            )
        return found


def redis_for(
    client: str | redis_lib.Redis | None, timeout: float | None = None
) -> redis_lib.Redis:
    """The shared client of a URL (one per URL and ``timeout``, the per-attempt socket
    timeout, see :func:`meepo.transport.transport.io_timeout`); a client passed in is
    used as it is, with its own timeouts."""
    if isinstance(client, redis_lib.Redis):
        return client
    if client is None:
        client = default_redis_url()
        if client is None:
            from .transport.embedded import embedded_redis_url

            client = embedded_redis_url(home_dir() / "redis")
    if not isinstance(client, str):
        raise ConfigError(
            f"redis must be a URL or a redis.Redis client, not {type(client).__name__}"
        )
    with _lock:
        found = _clients.get((client, timeout))
        if found is None:
            check_redis_url(client)
            kwargs = {} if timeout is None else {"timeout": timeout}
            found = _clients[(client, timeout)] = make_client(client, **kwargs)
        return found


def _after_fork() -> None:
    for engine in [*_engines.values(), *_service_engines.values()]:
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork)
