"""SQL text sent on the DB-API cursor, past SQLAlchemy's execute: what the PostgreSQL
and MySQL drivers share (binding, SET lists, the cursor with SQLAlchemy's events)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.exc import DBAPIError

from ..driver import PLUS_ONE, Coalesce, PerRow, case_text
from ..types import UTC


class Raw:
    """A SET value that is SQL text of meepo's own (a script's ``@now``), never user
    input: MariaDB/MySQL scripts only."""

    def __init__(self, sql: str) -> None:
        self.sql = sql

    def __repr__(self) -> str:
        return f"Raw({self.sql!r})"


def bind(v: Any, *, keep_zone: bool) -> Any:
    """A Python value as the driver should bind it: datetimes in UTC, as
    :class:`~meepo.ledger.types.UTCDateTime` binds them (aware for PostgreSQL's
    timestamptz, naive for MySQL's DATETIME)."""
    if isinstance(v, datetime):
        if v.tzinfo is None:
            raise ValueError(f"naive datetime {v!r}: meepo needs timezone-aware datetimes")
        v = v.astimezone(UTC)
        return v if keep_zone else v.replace(tzinfo=None)
    return v


def set_clause(
    table: Table, values: dict[str, Any], *, named: bool, step: int = 1
) -> tuple[str, dict[str, Any]]:
    """A transition's SET list (``commit_id`` plus ``step``, then ``values``) and its
    parameters: named ``%(v_col)s`` or positional ``%s`` (in order)."""
    sets = [f"commit_id = commit_id + {int(step)}"]
    args: dict[str, Any] = {}
    for k, v in values.items():
        col = table.c[k].name  # a known column, never user text
        if v is PLUS_ONE:
            sets.append(f"{col} = {col} + 1")
        elif isinstance(v, Raw):
            sets.append(f"{col} = {v.sql}")
        elif isinstance(v, Coalesce):
            mark = f"%(v_{col})s" if named else "%s"
            sets.append(f"{col} = COALESCE({col}, {mark})")
            args[f"v_{col}"] = v.value
        elif isinstance(v, PerRow):
            rows = sorted(v.values.items())
            if named:  # PostgreSQL: two arrays; the text does not depend on the batch size
                sets.append(
                    f"{col} = (%(v_{col}_vals)b::bytea[])"
                    f"[array_position(%(v_{col}_ids)b::bigint[], id)]"
                )
                args[f"v_{col}_vals"] = [r for _, r in rows]
                args[f"v_{col}_ids"] = [i for i, _ in rows]
            else:  # MariaDB/MySQL: a search tree of CASEs, the values bound in id order
                sets.append(f"{col} = {case_text('id', [i for i, _ in rows], lambda _: '%s')}")
                for n, (_, r) in enumerate(rows):
                    args[f"v_{col}_{n}"] = r
        else:
            sets.append(f"{col} = %(v_{col})s" if named else f"{col} = %s")
            args[f"v_{col}"] = v
    return ", ".join(sets), args


@contextlib.contextmanager
def driver_cursor(conn: Connection, statements: Sequence[tuple[str, Any]]) -> Iterator[Any]:
    """The DB-API cursor of ``conn``, for ``statements`` (SQL text and its parameters)
    sent past SQLAlchemy's execute: as one packet, or as one statement with less Python
    around it.

    SQLAlchemy's ``before_cursor_execute``/``after_cursor_execute`` events see each
    statement with its own parameters, as if SQLAlchemy ran it (SQL instrumentation
    keeps working; the plan tests EXPLAIN them). An error is raised as SQLAlchemy's
    DBAPIError; a broken connection, or one left between the results of a script, is
    invalidated; a transaction SQLAlchemy does not know of is rolled back (one that it
    does know of is its owner's to end).
    """
    raw = conn.connection.dbapi_connection
    assert raw is not None
    cur = raw.cursor()
    events = conn.dispatch
    for statement, params in statements:
        events.before_cursor_execute(conn, cur, statement, params, None, False)
    try:
        yield cur
        for statement, params in statements:
            events.after_cursor_execute(conn, cur, statement, params, None, False)
    except Exception as exc:
        dbapi = conn.dialect.loaded_dbapi
        if not isinstance(exc, dbapi.Error):
            # Not the driver's error (interrupted between a script's results, say): the
            # stream's state is unknown, so the connection is dropped (the server rolls
            # back what did not commit).
            conn.invalidate(exc)
            raise
        if conn.dialect.is_disconnect(exc, raw, cur):
            conn.invalidate(exc)
        elif not conn.in_transaction():
            with contextlib.suppress(Exception):
                raw.rollback()
        sql = ";\n".join(s for s, _ in statements)
        params = [p for _, p in statements]
        raise DBAPIError.instance(sql, params, exc, dbapi.Error, dialect=conn.dialect) from exc
    finally:
        with contextlib.suppress(Exception):
            cur.close()
