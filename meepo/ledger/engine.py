"""Engines and driver-error translation for the ledger."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from ..config import PASSWORD_PARAMS, mask_url
from ..errors import ConfigError, LedgerUnavailableError, SchemaError


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An Engine for ``url`` set up for meepo's access pattern.

    SQLite: WAL journal, a busy timeout, and ``BEGIN IMMEDIATE`` for every transaction,
    so that the consumer's threads queue for the write lock instead of failing with
    "database is locked" when a read transaction tries to upgrade. Servers: no reset
    (ROLLBACK) when a connection goes back to the pool. PyMySQL: multi-statements
    allowed, so a transition travels as one script (``fastpath.MySQLScript``: values
    are bound or escaped by PyMySQL, ids written as integers).

    A password in the query string (``?password=``, which libpq and PyMySQL accept) is
    moved out of the engine's URL into its ``connect_args``, so that ``repr(engine)``
    and ``engine.url`` never show it (SQLAlchemy masks only the userinfo password).
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"invalid database URL {mask_url(str(url))!r}: {exc}") from None
    backend = parsed.get_backend_name()
    secrets: dict[str, str] = {}
    if backend != "sqlite":
        for key, value in parsed.query.items():
            if key.lower() in PASSWORD_PARAMS:
                secrets[key] = value if isinstance(value, str) else value[-1]
        if secrets:
            parsed = parsed.difference_update_query(secrets)
    options: dict[str, Any] = {}
    if backend == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        options["connect_args"] = {"check_same_thread": False, "timeout": 30}
    elif backend == "mysql":
        options["pool_recycle"] = 3600
    elif backend == "postgresql" and parsed.get_driver_name() == "psycopg":
        # No server-side prepared statements: every statement is planned with its
        # values (the hot path's own statements ask for that themselves, see
        # fastpath.PgForms; this covers the reaper's and the admin's too).
        options["connect_args"] = {"prepare_threshold": None}
    if backend in ("mysql", "postgresql"):
        # Every use of a connection ends its transaction itself (``engine.begin()``
        # commits or rolls back; a Connection closed mid-transaction rolls back), so the
        # pool's own ROLLBACK on return is one more round trip for nothing: 13% of a
        # single push on MariaDB.
        options["pool_reset_on_return"] = None
    options.update(kwargs)
    if secrets:
        # The driver gets the same keyword it would have read from the query string.
        options["connect_args"] = {**options.get("connect_args", {}), **secrets}
    try:
        engine = create_engine(parsed, **options)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise ConfigError(f"cannot use database URL {mask_url(str(url))!r}: {exc}") from None
    except ImportError as exc:
        raise ConfigError(
            f"the driver for {parsed.drivername!r} is not installed ({exc}); "
            "for PostgreSQL: pip install 'meepo[postgres]'"
        ) from None
    if backend == "sqlite":
        _tune_sqlite(engine)
    elif backend == "mysql" and parsed.get_driver_name() == "pymysql":
        _allow_scripts(engine)
    return engine


def _allow_scripts(engine: Engine) -> None:
    from pymysql.constants import CLIENT

    @event.listens_for(engine, "do_connect")
    def _on_connect(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        cparams["client_flag"] = cparams.get("client_flag", 0) | CLIENT.MULTI_STATEMENTS


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let SQLAlchemy's begin event own BEGIN
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


_MISSING_TABLE_MARKERS = (
    "no such table",  # SQLite
    "doesn't exist",  # MySQL / MariaDB (1146)
    "does not exist",  # PostgreSQL (42P01)
    "undefinedtable",
)


@contextlib.contextmanager
def translate_errors(url: str, table: str | None = None) -> Iterator[None]:
    """Turn driver errors into meepo errors, the URL's password masked."""
    try:
        yield
    except DBAPIError as exc:
        text = str(exc.orig) if exc.orig is not None else str(exc)
        if table is not None and any(m in text.lower() for m in _MISSING_TABLE_MARKERS):
            raise SchemaError(
                f"the ledger table {table!r} does not exist in {mask_url(url)}: "
                "run `meepo db upgrade` (or pass init_db=True)"
            ) from exc
        raise LedgerUnavailableError(
            f"database error on {mask_url(url)}: {mask_url(text.strip().splitlines()[0])}"
        ) from exc
    except SQLAlchemyError as exc:
        raise LedgerUnavailableError(f"database error on {mask_url(url)}: {exc}") from exc
