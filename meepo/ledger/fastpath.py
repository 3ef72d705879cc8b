"""Server-specific forms of the hot statements: the same checks, fewer round trips.

:class:`~meepo.ledger.ledger.Ledger` keeps a portable form of every transition (used on
SQLite and on drivers these forms do not cover); the forms here change how a batch
travels, never what it checks. Each still is one compare-and-set per job on
``(id, commit_id)`` and the expected status.

* **PostgreSQL** (:class:`PgForms`): a batch travels as two arrays, the ids
  (``id = ANY(:ids)``, the primary key) and the ``id:commit_id`` keys of the claims.
  The statement's text no longer depends on the batch size, so SQLAlchemy compiles it
  once and psycopg parses it once (an ``IN`` list of a new length was a new statement
  each time). ``RETURNING`` names the winners, so a batch in which some rows moved
  meanwhile needs no second pass. A multi-row INSERT is one
  ``INSERT … SELECT … FROM unnest(…) WITH ORDINALITY`` with a handful of array
  parameters instead of ten parameters per row.
* **MariaDB/MySQL through PyMySQL** (:class:`MySQLScript`): a transition is one script
  sent in one packet (multi-statements): ``SELECT … FOR UPDATE`` of the named rows by
  primary key, the compare-and-set UPDATEs, ``COMMIT``. The locked read tells which
  pairs win, and the UPDATEs, under those locks, change exactly those rows. Three or
  more round trips become one. A push (one row or a batch) is ``INSERT … RETURNING id``
  and ``COMMIT`` in one packet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    LargeBinary,
    String,
    Table,
    Text,
    and_,
    any_,
    bindparam,
    cast,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, TIMESTAMP
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.elements import ColumnElement

from ..records import Status
from .types import UTC

Pair = tuple[int, int]

#: Rows per statement for batched transitions and inserts (keeps lists and packets
#: bounded).
CHUNK = 1000

Group = tuple[Sequence[Pair], Iterable[Status], dict[str, Any]]


class PlusOne:
    """A SET value meaning "this column plus one" (``failed_times``), in every form."""

    def __repr__(self) -> str:
        return "PLUS_ONE"


PLUS_ONE = PlusOne()


def sa_values(table: Table, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` for a SQLAlchemy UPDATE: PLUS_ONE becomes ``column + 1``."""
    return {k: (table.c[k] + 1 if v is PLUS_ONE else v) for k, v in values.items()}


# -- PostgreSQL -------------------------------------------------------------------------


class PgForms:
    """Array-parameter statements for one jobs table on PostgreSQL."""

    def __init__(self, table: Table) -> None:
        self.t = t = table
        # The rows are found by primary key, ``id = ANY(:ids)``; the compare-and-set on
        # commit_id is ``id || ':' || commit_id = ANY(:keys)``, which PostgreSQL checks
        # against a hash of the array (it sees the values: meepo's engines do not
        # prepare statements, see engine.py). No join: a join with unnest() is planned
        # from guesses of its size, and a wrong guess costs a nested loop of n x n.
        # The claim compares status and task_id through coalesce() (NOT NULL columns:
        # the same test) so that the (task_id, status, expires_at) index is no
        # candidate: with statistics that say "few todo rows" (an ANALYZE on a drained
        # table) the planner would otherwise walk every todo row of the task per claim.
        self.by_id = t.c.id == any_(bindparam("ids", type_=ARRAY(BigInteger)))
        key = cast(t.c.id, Text) + ":" + cast(t.c.commit_id, Text)
        self.by_pair = and_(self.by_id, key == any_(bindparam("keys", type_=ARRAY(Text))))
        self.claim_stmt = (
            update(t)
            .where(
                self.by_pair,
                func.coalesce(t.c.status, "") == Status.TODO.value,
                func.coalesce(t.c.task_id, "") == bindparam("b_task_id", type_=String),
            )
            .values(
                status=Status.DOING.value,
                commit_id=t.c.commit_id + 1,
                updated_at=bindparam("b_now", type_=t.c.updated_at.type),
                expires_at=bindparam("b_lease_until", type_=t.c.expires_at.type),
                worker=bindparam("b_worker", type_=String),
            )
            .returning(t.c.id, t.c.commit_id, t.c.failed_times, t.c.payload, t.c.priority)
        )
        self.heartbeat_stmt = (
            update(t)
            .where(self.by_pair, t.c.status == Status.DOING.value)
            .values(expires_at=bindparam("b_lease_until", type_=t.c.expires_at.type))
            .returning(t.c.id, t.c.commit_id)
        )
        stamp = TIMESTAMP(timezone=True)
        rows = (
            func.unnest(
                bindparam("payloads", type_=ARRAY(LargeBinary)),
                bindparam("run_ats", type_=ARRAY(stamp)),
                bindparam("expires", type_=ARRAY(stamp)),
                bindparam("priorities", type_=ARRAY(String)),
            )
            .table_valued("payload", "run_at", "expires_at", "priority", with_ordinality="ord")
            .render_derived(name="u")
        )
        now = bindparam("b_now", type_=stamp)
        columns = [
            "task_id",
            "status",
            "payload",
            "failed_times",
            "commit_id",
            "created_at",
            "updated_at",
            "run_at",
            "expires_at",
            "priority",
        ]
        source = select(
            bindparam("b_task_id", type_=String),
            literal(Status.TODO.value, String),
            rows.c.payload,
            literal(0, BigInteger),
            literal(0, BigInteger),
            now,
            now,
            rows.c.run_at,
            rows.c.expires_at,
            rows.c.priority,
        ).order_by(rows.c.ord)
        self.insert_stmt = insert(t).from_select(columns, source).returning(t.c.id)

    @staticmethod
    def _pair_params(pairs: Sequence[Pair]) -> dict[str, Any]:
        return {"ids": [p[0] for p in pairs], "keys": [f"{i}:{c}" for i, c in pairs]}

    def claim(
        self,
        conn: Connection,
        task_id: str,
        pairs: Sequence[Pair],
        *,
        now: datetime,
        lease_until: datetime,
        worker: str,
    ) -> list[Any]:
        params: dict[str, Any] = self._pair_params(pairs)
        params.update(b_task_id=task_id, b_now=now, b_lease_until=lease_until, b_worker=worker)
        return list(conn.execute(self.claim_stmt, params).all())

    def heartbeat(
        self, conn: Connection, pairs: Sequence[Pair], lease_until: datetime
    ) -> set[Pair]:
        """Renew the leases; return the pairs that are still ours."""
        params: dict[str, Any] = self._pair_params(pairs)
        params["b_lease_until"] = lease_until
        return {(int(r[0]), int(r[1])) for r in conn.execute(self.heartbeat_stmt, params)}

    def transition(
        self,
        conn: Connection,
        pairs: Sequence[Pair],
        statuses: Iterable[Status],
        values: dict[str, Any],
    ) -> set[Pair]:
        """One group's compare-and-set; returns the ``(id, old commit_id)`` that won."""
        t = self.t
        names = [s.value for s in statuses]
        cond: ColumnElement[bool] = (
            t.c.status == names[0] if len(names) == 1 else t.c.status.in_(names)
        )
        stmt = (
            update(t)
            .where(self.by_pair, cond)
            .values(commit_id=t.c.commit_id + 1, **sa_values(t, values))
            .returning(t.c.id, t.c.commit_id)
        )
        got = conn.execute(stmt, self._pair_params(pairs))
        return {(int(r[0]), int(r[1]) - 1) for r in got}

    def insert(
        self, conn: Connection, task_id: str, now: datetime, rows: list[dict[str, Any]]
    ) -> list[int]:
        """Insert todo rows (as built by the ledger) in one statement; their ids in order.

        The rows come out of ``unnest`` in order (``ORDER BY ord``) and take their ids
        from the sequence in that order, so the ids sorted ascending are in row order.
        """
        params = {
            "b_task_id": task_id,
            "b_now": now,
            "payloads": [r["payload"] for r in rows],
            "run_ats": [r["run_at"] for r in rows],
            "expires": [r["expires_at"] for r in rows],
            "priorities": [r["priority"] for r in rows],
        }
        return sorted(int(x) for x in conn.execute(self.insert_stmt, params).scalars())


# -- MariaDB / MySQL through PyMySQL ------------------------------------------------------


def _sql_value(v: Any) -> Any:
    """A Python value as PyMySQL should bind it (datetimes as naive UTC, like
    :class:`~meepo.ledger.types.UTCDateTime`)."""
    if isinstance(v, datetime):
        if v.tzinfo is None:
            raise ValueError(f"naive datetime {v!r}: meepo needs timezone-aware datetimes")
        return v.astimezone(UTC).replace(tzinfo=None)
    return v


def _ints(values: Iterable[int]) -> str:
    """Integers (ids, commit_ids) written into the statement: ``int()`` makes them
    safe as text, and saves PyMySQL escaping thousands of parameters one by one."""
    return ", ".join([str(int(v)) for v in values])


def _int_pairs(pairs: Iterable[Pair]) -> str:
    return ", ".join([f"({int(i)}, {int(c)})" for i, c in pairs])


def _marks(n: int) -> str:
    return ", ".join(["%s"] * n)


class MySQLScript:
    """Transitions of one jobs table as one-packet scripts on a PyMySQL connection that
    allows multi-statements (meepo's own engines do; see :func:`.engine.make_engine`)."""

    def __init__(self, table: Table, engine: Engine) -> None:
        self.table = table
        self.name = engine.dialect.identifier_preparer.format_table(table)

    @staticmethod
    def usable(conn: Connection) -> bool:
        raw = conn.connection.dbapi_connection
        try:
            from pymysql.connections import Connection as PyMySQLConnection
            from pymysql.constants import CLIENT
        except ImportError:  # pragma: no cover - the mysql extra installs PyMySQL
            return False
        return isinstance(raw, PyMySQLConnection) and bool(
            raw.client_flag & CLIENT.MULTI_STATEMENTS
        )

    def run(self, conn: Connection, parts: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
        """Send the statements as one script ending in COMMIT; return, per statement,
        its rows (a SELECT) or its row count. Any error rolls the transaction back and
        is raised as SQLAlchemy's DBAPIError (a broken connection is invalidated).

        SQLAlchemy's ``before_cursor_execute``/``after_cursor_execute`` events see each
        statement of the script with its own parameters, as if it ran alone (SQL
        instrumentation keeps working; the plan tests EXPLAIN them)."""
        bound = [(p[0], tuple(_sql_value(a) for a in p[1])) for p in parts]
        sql = ";\n".join([b[0] for b in bound] + ["COMMIT"])
        args = [a for b in bound for a in b[1]]
        raw = conn.connection.dbapi_connection
        assert raw is not None
        cur = raw.cursor()
        events = conn.dispatch
        for statement, params in bound:
            events.before_cursor_execute(conn, cur, statement, params, None, False)
        out: list[Any] = []
        try:
            # no parameters: the text is sent as it is (a literal may hold a "%")
            cur.execute(sql, args or None)
            for _ in parts:
                out.append(cur.fetchall() if cur.description else cur.rowcount)
                cur.nextset()
            for statement, params in bound:
                events.after_cursor_execute(conn, cur, statement, params, None, False)
        except Exception as exc:
            dbapi = conn.dialect.loaded_dbapi
            if not isinstance(exc, dbapi.Error):
                # Interrupted between results: the stream's state is unknown, so the
                # connection is dropped (the server rolls back what did not commit).
                conn.invalidate(exc)
                raise
            if conn.dialect.is_disconnect(exc, raw, cur):
                conn.invalidate(exc)
            else:
                with contextlib.suppress(Exception):
                    raw.rollback()
            raise DBAPIError.instance(sql, args, exc, dbapi.Error, dialect=conn.dialect) from exc
        finally:
            with contextlib.suppress(Exception):
                cur.close()
        return out

    def _lock(self, ids: Sequence[int], columns: str, task_id: str | None) -> tuple[str, list[Any]]:
        sql = f"SELECT {columns} FROM {self.name} FORCE INDEX (PRIMARY) WHERE id IN ({_ints(ids)})"
        args: list[Any] = []
        if task_id is not None:
            sql += " AND task_id = %s"
            args.append(task_id)
        return sql + " ORDER BY id FOR UPDATE", args

    def _update(
        self,
        pairs: Sequence[Pair],
        statuses: Sequence[str],
        values: dict[str, Any],
        task_id: str | None = None,
    ) -> tuple[str, list[Any]]:
        sets = ["commit_id = commit_id + 1"]
        args: list[Any] = []
        for k, v in values.items():
            col = self.table.c[k].name  # a known column, never user text
            if v is PLUS_ONE:
                sets.append(f"{col} = {col} + 1")
            else:
                sets.append(f"{col} = %s")
                args.append(v)
        ids = sorted({i for i, _ in pairs})
        sql = (
            f"UPDATE {self.name} FORCE INDEX (PRIMARY) SET {', '.join(sets)} "
            f"WHERE id IN ({_ints(ids)}) AND (id, commit_id) IN ({_int_pairs(pairs)}) "
            f"AND status IN ({_marks(len(statuses))})"
        )
        args += statuses
        if task_id is not None:
            sql += " AND task_id = %s"
            args.append(task_id)
        return sql, args

    def insert_many(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> list[int]:
        """``INSERT … RETURNING id`` statements of up to CHUNK rows each and COMMIT, in
        one packet (MariaDB 10.5+): a single push or a batch; the ids in row order.

        The values are escaped by PyMySQL itself (``Connection.escape``), each distinct
        non-payload value once: in a batch most columns repeat (task, status, times,
        priority), and escaping ten values per row one by one was most of the cost.
        """
        raw = conn.connection.dbapi_connection
        assert raw is not None
        escape = raw.escape
        cols = list(rows[0])
        names = ", ".join(self.table.c[k].name for k in cols)  # known columns
        seen: dict[tuple[type, Any], str] = {}

        def literal(v: Any) -> str:
            if isinstance(v, bytes):  # PyMySQL writes X'…' (or '…' under NO_BACKSLASH_ESCAPES)
                text = str(escape(v))
                return "_binary" + text if text.startswith("'") else text
            key = (type(v), v)
            got = seen.get(key)
            if got is None:
                got = seen[key] = str(escape(_sql_value(v)))
            return got

        parts: list[tuple[str, Sequence[Any]]] = []
        for i in range(0, len(rows), CHUNK):
            values = ", ".join(
                "(" + ", ".join([literal(r[c]) for c in cols]) + ")" for r in rows[i : i + CHUNK]
            )
            parts.append((f"INSERT INTO {self.name} ({names}) VALUES {values} RETURNING id", []))
        ids: list[int] = []
        for got in self.run(conn, parts):  # each statement's ids ascend in row order
            ids.extend(sorted(int(r[0]) for r in got))
        return ids

    def claim(
        self,
        conn: Connection,
        task_id: str,
        pairs: Sequence[Pair],
        *,
        now: datetime,
        lease_until: datetime,
        worker: str,
    ) -> list[Any]:
        """todo → doing; returns the locked rows that won (their old commit_id)."""
        ids = sorted({i for i, _ in pairs})
        cols = "id, commit_id, status, failed_times, payload, priority"
        values = {
            "status": Status.DOING.value,
            "updated_at": now,
            "expires_at": lease_until,
            "worker": worker,
        }
        locked, n = self.run(
            conn,
            [
                self._lock(ids, cols, task_id),
                self._update(pairs, [Status.TODO.value], values, task_id),
            ],
        )
        wanted = set(pairs)
        won = [r for r in locked if r[2] == Status.TODO.value and (r[0], r[1]) in wanted]
        if n != len(won):  # the rows were locked: cannot happen
            raise RuntimeError(f"claim: {n} rows changed under lock, {len(won)} expected")
        return won

    def transition(self, conn: Connection, groups: Sequence[Group]) -> set[Pair]:
        """Every group's compare-and-set in one script; returns the pairs that won.

        The winners are worked out from the locked read, group after group (a pair
        that a group moved has a new commit_id, so no later group matches it): under
        those locks each UPDATE changes exactly those rows, which its count confirms.
        """
        ids = sorted({i for pairs, _, _ in groups for i, _ in pairs})
        parts = [self._lock(ids, "id, commit_id, status", None)]
        named = [(list(pairs), [s.value for s in statuses], v) for pairs, statuses, v in groups]
        parts += [self._update(p, s, v) for p, s, v in named]
        locked, *counts = self.run(conn, parts)
        state = {(int(r[0]), int(r[1])): str(r[2]) for r in locked}
        won: set[Pair] = set()
        for (pairs, statuses, values), n in zip(named, counts, strict=True):
            mine = {p for p in pairs if state.get(p) in statuses}
            if n != len(mine):  # the rows were locked: cannot happen
                raise RuntimeError(f"transition: {n} rows changed under lock, {len(mine)} expected")
            for i, c in mine:
                status = state.pop((i, c))
                state[(i, c + 1)] = str(values.get("status", status))
            won |= mine
        return won
