"""Engines and driver-error translation for the ledger."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from ..config import PASSWORD_PARAMS, mask_url
from ..errors import ConfigError, LedgerUnavailableError, SchemaError, UnsupportedServerError
from .bounds import Bounds, apply_bounds


def make_engine(url: str, bounds: Bounds | None = None, **kwargs: Any) -> Engine:
    """An Engine for ``url`` set up for meepo's access pattern.

    SQLite: WAL journal, a busy timeout, and ``BEGIN IMMEDIATE`` for every transaction,
    so that the consumer's threads queue for the write lock instead of failing with
    "database is locked" when a read transaction tries to upgrade. Servers: no reset
    (ROLLBACK) when a connection goes back to the pool. PyMySQL: multi-statements
    allowed, so a transition travels as one script (``drivers.mysql.MySQLDriver``: values
    are bound or escaped by PyMySQL, ids written as integers).

    A password in the query string (``?password=``, which libpq and PyMySQL accept) is
    moved out of the engine's URL into its ``connect_args``, so that ``repr(engine)``
    and ``engine.url`` never show it (SQLAlchemy masks only the userinfo password).

    ``bounds`` (for meepo's service engine, see :mod:`meepo.ledger.bounds`): lock
    waits, statements, silent connections and the pool's checkout wait are bounded.
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
        # drivers.postgres; this covers the reaper's and the admin's too).
        options["connect_args"] = {"prepare_threshold": None}
    if bounds is not None and backend in ("mysql", "postgresql"):
        driver = parsed.get_driver_name()
        args = options.setdefault("connect_args", {})
        if backend == "postgresql" and driver == "psycopg":
            args.update(bounds.psycopg_connect_args())
        elif backend == "mysql" and driver == "pymysql":
            args.update(bounds.pymysql_connect_args())
        options["pool_timeout"] = bounds.network
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
            "for PostgreSQL: pip install 'meepo-queue[postgres]'"
        ) from None
    if backend == "sqlite":
        _tune_sqlite(engine)
    elif backend == "mysql" and parsed.get_driver_name() == "pymysql":
        _allow_scripts(engine)
    if bounds is not None:
        apply_bounds(engine, bounds)
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


#: The first server versions with ``SELECT … FOR UPDATE SKIP LOCKED``, which the claim
#: path and the reaper's locked step rely on.
SKIP_LOCKED_SINCE = {"MariaDB": (10, 6), "MySQL": (8, 0)}


def skip_locked_problem(version: str) -> str | None:
    """Why a MariaDB/MySQL server reporting ``version`` (``SELECT VERSION()``) cannot
    run meepo, or None."""
    found = re.match(r"\s*(\d+)\.(\d+)", version)
    if found is None:
        return None  # unknown form: let the server speak for itself
    have = (int(found.group(1)), int(found.group(2)))
    kind = "MariaDB" if "mariadb" in version.lower() else "MySQL"
    need = SKIP_LOCKED_SINCE[kind]
    if have >= need:
        return None
    return (
        f"{kind} {version} does not support SELECT ... FOR UPDATE SKIP LOCKED, which "
        f"meepo needs: use {kind} >= {need[0]}.{need[1]}"
    )


def check_server(engine: Engine) -> None:
    """Fail at start, naming the version, on a server meepo cannot run on (rather than
    on every tick of the claim and the reaper)."""
    if engine.dialect.name != "mysql":
        return
    url = engine.url.render_as_string(hide_password=True)
    with translate_errors(url), engine.connect() as conn:
        check_connection_server(conn)


def server_version(conn: Connection) -> str:
    """A MariaDB/MySQL server's version as ``SELECT VERSION()`` reports it, read from
    the connection's handshake when the driver keeps it (PyMySQL, mysqlclient: no round
    trip). MariaDB's handshake prefixes ``5.5.5-`` for old clients; it is dropped."""
    get = getattr(conn.connection.dbapi_connection, "get_server_info", None)
    if get is None:
        return str(conn.exec_driver_sql("SELECT VERSION()").scalar())
    version = get()
    version = version.decode() if isinstance(version, bytes) else str(version)
    if version.startswith("5.5.5-") and "mariadb" in version.lower():
        version = version[len("5.5.5-") :]
    return version


def check_connection_server(conn: Connection) -> None:
    """:func:`check_server` on a connection already open."""
    if conn.dialect.name != "mysql":
        return
    problem = skip_locked_problem(server_version(conn))
    if problem is not None:
        url = conn.engine.url.render_as_string(hide_password=True)
        raise UnsupportedServerError(f"{mask_url(url)}: {problem}")


_MISSING_TABLE_MARKERS = (
    "no such table",  # SQLite
    "doesn't exist",  # MySQL / MariaDB (1146)
    "does not exist",  # PostgreSQL (42P01)
    "undefinedtable",
)


def is_missing_table(exc: DBAPIError) -> bool:
    """Whether a driver error says a table does not exist (not a missing database)."""
    text = str(exc.orig) if exc.orig is not None else str(exc)
    if _missing_database(text) is not None:
        return False
    return any(m in text.lower() for m in _MISSING_TABLE_MARKERS)


_MISSING_DATABASE = (
    re.compile(r'database "([^"]+)" does not exist'),  # PostgreSQL (3D000)
    re.compile(r"Unknown database '([^']+)'"),  # MySQL / MariaDB (1049)
)


def _missing_database(text: str) -> str | None:
    """The database a connection error says is missing (not a table), or None."""
    for pattern in _MISSING_DATABASE:
        found = pattern.search(text)
        if found:
            return found.group(1)
    return None


@contextlib.contextmanager
def translate_errors(url: str, table: str | None = None) -> Iterator[None]:
    """Turn driver errors into meepo errors, the URL's password masked."""
    try:
        yield
    except DBAPIError as exc:
        text = str(exc.orig) if exc.orig is not None else str(exc)
        missing = _missing_database(text)
        if missing is not None:
            raise ConfigError(
                f"database {missing!r} does not exist on {mask_url(url)}: create it "
                f"(CREATE DATABASE {missing}) or fix the URL"
            ) from exc
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
