"""Running the Alembic migrations in ``migrations/`` (programmatically or from alembic).

Every ledger table has its own Alembic version table (``<table>_version``), so tasks
with their own ``table_name`` migrate independently of the shared ``meepo_jobs``.
Concurrent upgrades (many processes starting with ``init_db=True``) are serialised by
a database lock: ``pg_advisory_lock`` on PostgreSQL, ``GET_LOCK`` on MySQL/MariaDB and
the ``BEGIN IMMEDIATE`` write lock on SQLite.

Alembic (and Mako, which it loads) is imported only where migrations run: a worker's
start-up check (:func:`check`) reads the version table with plain SQL and the head
revision from the migration files, which keeps ~7 MB of modules out of every worker.
"""

from __future__ import annotations

import ast
import os
import threading
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    MetaData,
    String,
    Table,
    pool,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError

from ..config import DEFAULT_TABLE, check_table_name, default_db_url, mask_url
from ..errors import SchemaError
from .engine import check_connection_server, is_missing_table, make_engine, translate_errors
from .schema import version_table_name

if TYPE_CHECKING:
    from alembic.config import Config

TABLE_ATTR = "meepo_table"
TABLE_ENV = "MEEPO_TABLE"


def script_location() -> Path:
    """The migrations folder: packaged as ``meepo/_migrations`` or, in a source checkout,
    ``migrations/`` at the top of the repository."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise SchemaError("meepo's migrations folder is missing from this installation")


def alembic_config(table: str = DEFAULT_TABLE, connection: Connection | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    cfg.attributes[TABLE_ATTR] = check_table_name(table)
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def table_name() -> str:
    """The ledger table the running migration applies to (called by migration scripts)."""
    from alembic import context

    return str(context.config.attributes[TABLE_ATTR])


def _revisions(path: Path) -> tuple[str | None, set[str]]:
    """A migration file's ``revision`` and the revisions it follows, read with ``ast``
    (no import: nothing of Alembic is loaded). Only the lines that assign them are
    parsed (a worker reads every file at start-up); the whole file if those lines alone
    are not valid Python (a value that spans lines)."""
    source = path.read_text(encoding="utf-8")
    lines = [ln for ln in source.splitlines() if ln.startswith(("revision", "down_revision"))]
    try:
        module = ast.parse("\n".join(lines))
    except SyntaxError:
        module = ast.parse(source)
    revision: str | None = None
    follows: set[str] = set()
    for node in module.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name, value = node.target.id, node.value
        elif (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            name, value = node.targets[0].id, node.value
        else:
            continue
        if value is None:
            continue
        literal = ast.literal_eval(value)
        if name == "revision":
            revision = str(literal)
        elif name == "down_revision" and literal is not None:
            follows.update([literal] if isinstance(literal, str) else literal)
    return revision, follows


_head_lock = threading.Lock()
_head: str | None = None


def head() -> str:
    """The head revision of the migrations folder, read once per process.

    Read under a lock: the first calls can come from several threads at once (tasks
    starting together), and CPython's ``ast`` can fail with "SystemError: AST constructor
    recursion depth mismatch" when threads parse at the same time."""
    global _head
    with _head_lock:
        if _head is None:
            _head = _read_head()
        return _head


def _read_head() -> str:
    revisions: set[str] = set()
    followed: set[str] = set()
    for path in sorted((script_location() / "versions").glob("*.py")):
        revision, follows = _revisions(path)
        if revision is not None:
            revisions.add(revision)
            followed |= follows
    heads = revisions - followed
    if len(heads) == 1:
        return heads.pop()
    # an unusual history (branches, merges): let Alembic decide (and complain)
    from alembic.script import ScriptDirectory

    return str(ScriptDirectory.from_config(alembic_config()).get_heads()[0])


def _lock(conn: Connection, table: str) -> None:
    name = conn.dialect.name
    if name == "postgresql":
        key = zlib.crc32(f"meepo-migrate:{table}".encode())
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
    elif name == "mysql":
        got = conn.execute(
            text("SELECT GET_LOCK(:n, 120)"), {"n": f"meepo-migrate:{table}"}
        ).scalar()
        if got != 1:
            raise SchemaError(f"timed out waiting for the migration lock of {table!r}")


def _unlock(conn: Connection, table: str) -> None:
    name = conn.dialect.name
    if name == "postgresql":
        key = zlib.crc32(f"meepo-migrate:{table}".encode())
        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    elif name == "mysql":
        conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": f"meepo-migrate:{table}"})


def run_env(context: Any) -> None:
    """The body of ``migrations/env.py``."""
    cfg: Config = context.config
    table = cfg.attributes.get(TABLE_ATTR)
    if table is None:
        table = context.get_x_argument(as_dictionary=True).get("table")
    table = check_table_name(table or os.environ.get(TABLE_ENV) or DEFAULT_TABLE)
    cfg.attributes[TABLE_ATTR] = table
    version_table = version_table_name(table)

    if context.is_offline_mode():
        url = cfg.get_main_option("sqlalchemy.url") or default_db_url()
        context.configure(url=url, literal_binds=True, version_table=version_table)
        with context.begin_transaction():
            context.run_migrations()
        return

    given: Connection | None = cfg.attributes.get("connection")
    if given is not None:
        _run_online(context, given, table, version_table)
        return
    url = cfg.get_main_option("sqlalchemy.url") or default_db_url()
    engine = make_engine(url, poolclass=pool.NullPool)
    try:
        with translate_errors(url), engine.connect() as conn:
            _run_online(context, conn, table, version_table)
    finally:
        engine.dispose()


def _run_online(context: Any, conn: Connection, table: str, version_table: str) -> None:
    if conn.in_transaction():
        conn.commit()
    if conn.dialect.name == "sqlite":
        # The lock is SQLite's write lock: the engine begins with ``BEGIN IMMEDIATE``
        # and every step runs inside this one transaction (alembic joins it), so a
        # second process waits, then finds the table at head and does nothing.
        with conn.begin():
            context.configure(connection=conn, version_table=version_table)
            context.run_migrations()
        return
    _lock(conn, table)
    try:
        conn.commit()  # the lock belongs to the session, not to this transaction
        context.configure(connection=conn, version_table=version_table)
        with context.begin_transaction():
            context.run_migrations()
        if conn.in_transaction():
            conn.commit()
    finally:
        if conn.in_transaction():
            conn.rollback()
        _unlock(conn, table)
        conn.commit()


def upgrade(engine: Engine, table: str = DEFAULT_TABLE, revision: str = "head") -> None:
    """Bring ``table`` (and its companions) to ``revision`` through the migrations."""
    from alembic import command

    with translate_errors(str(engine.url)), engine.connect() as conn:
        command.upgrade(alembic_config(table, conn), revision)


def downgrade(engine: Engine, table: str = DEFAULT_TABLE, revision: str = "-1") -> None:
    from alembic import command

    with translate_errors(str(engine.url)), engine.connect() as conn:
        command.downgrade(alembic_config(table, conn), revision)


def _revision(conn: Connection, table: str) -> str | None:
    """The revision in ``table``'s version table (None: no table, or no row), in one
    statement: a missing version table is the statement's error, not a catalog query."""
    name = version_table_name(table)
    versions = Table(name, MetaData(), Column("version_num", String(32), nullable=False))
    try:
        rows = [str(r) for r in conn.execute(select(versions.c.version_num)).scalars()]
    except DBAPIError as exc:
        if not is_missing_table(exc):
            raise
        conn.rollback()
        return None
    if conn.in_transaction():
        conn.commit()
    if len(rows) > 1:
        raise SchemaError(f"the ledger table {table!r} has several heads {sorted(rows)}")
    return rows[0] if rows else None


def current(engine: Engine, table: str = DEFAULT_TABLE) -> str | None:
    """The revision ``table`` is at, or None when it was never migrated."""
    check_table_name(table)
    with translate_errors(str(engine.url)), engine.connect() as conn:
        return _revision(conn, table)


def check(engine: Engine, table: str = DEFAULT_TABLE) -> None:
    """Raise SchemaError unless ``table`` is at the head revision, and
    UnsupportedServerError on a MariaDB/MySQL server meepo cannot run on: a worker's
    start-up check, one connection and one statement (the server's version comes with
    the connection's handshake)."""
    check_table_name(table)
    with translate_errors(str(engine.url)), engine.connect() as conn:
        check_connection_server(conn)
        rev = _revision(conn, table)
    want = head()
    if rev != want:
        where = mask_url(str(engine.url.render_as_string(hide_password=True)))
        state = "does not exist" if rev is None else f"is at revision {rev}, not {want}"
        raise SchemaError(
            f"the ledger table {table!r} in {where} {state}: "
            "run `meepo db upgrade` (or pass init_db=True)"
        )


__all__ = [
    "alembic_config",
    "check",
    "current",
    "downgrade",
    "head",
    "run_env",
    "script_location",
    "table_name",
    "upgrade",
]
