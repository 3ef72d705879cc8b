"""Server-specific forms of the hot statements: the same checks, fewer round trips.

:class:`~meepo.ledger.ledger.Ledger` keeps a portable form of every transition (used on
SQLite and on drivers these forms do not cover); the forms here change how a batch
travels, never what it checks. Each still is one compare-and-set per job on
``(id, commit_id)`` and the expected status.

* **PostgreSQL through psycopg** (:class:`PgForms`): a batch travels as two arrays, the
  ids (``id = ANY(ids)``, the primary key) and the ``id:commit_id`` keys of the claims.
  The statement's text does not depend on the batch size, and ``RETURNING`` names the
  winners, so a batch in which some rows moved meanwhile needs no second pass. A
  multi-row INSERT is one ``INSERT … SELECT … FROM unnest(…) WITH ORDINALITY`` with a
  handful of array parameters instead of ten parameters per row. The statements are
  SQL text sent on psycopg's cursor: for a single push or claim on an idle queue,
  building, compiling and binding them through SQLAlchemy cost up to half a round trip.
* **MariaDB/MySQL through PyMySQL** (:class:`MySQLScript`): a transition is one script
  sent in one packet (multi-statements): ``SELECT … FOR UPDATE`` of the named rows by
  primary key, the compare-and-set UPDATEs, ``COMMIT``. The locked read tells which
  pairs win, and the UPDATEs, under those locks, change exactly those rows. Three or
  more round trips become one. A push (one row or a batch) is ``INSERT … RETURNING id``
  and ``COMMIT`` in one packet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Table, func
from sqlalchemy.exc import DBAPIError

from ..errors import PayloadError
from ..records import Job, Message, Status
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


class Coalesce:
    """A SET value meaning "keep the column if set, else ``value``" (``started_at`` of
    a commit: the start mark if the consumer wrote one, else the commit's time)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Coalesce({self.value!r})"


class Raw:
    """A SET value that is SQL text of meepo's own (a script's ``@now``), never user
    input: MariaDB/MySQL scripts only."""

    def __init__(self, sql: str) -> None:
        self.sql = sql

    def __repr__(self) -> str:
        return f"Raw({self.sql!r})"


def sa_values(table: Table, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` for a SQLAlchemy UPDATE: PLUS_ONE becomes ``column + 1``."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if v is PLUS_ONE:
            out[k] = table.c[k] + 1
        elif isinstance(v, Coalesce):
            out[k] = func.coalesce(table.c[k], v.value)
        else:
            out[k] = v
    return out


def _bind(v: Any, *, keep_zone: bool) -> Any:
    """A Python value as the driver should bind it: datetimes in UTC, as
    :class:`~meepo.ledger.types.UTCDateTime` binds them (aware for PostgreSQL's
    timestamptz, naive for MySQL's DATETIME)."""
    if isinstance(v, datetime):
        if v.tzinfo is None:
            raise ValueError(f"naive datetime {v!r}: meepo needs timezone-aware datetimes")
        v = v.astimezone(UTC)
        return v if keep_zone else v.replace(tzinfo=None)
    return v


def _set_clause(
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
        else:
            sets.append(f"{col} = %(v_{col})s" if named else f"{col} = %s")
            args[f"v_{col}"] = v
    return ", ".join(sets), args


# -- the driver's cursor ------------------------------------------------------------------


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


# -- PostgreSQL through psycopg -------------------------------------------------------------


class PgForms:
    """The hot statements of one jobs table as SQL text for psycopg 3, sent on the
    driver's cursor (:func:`driver_cursor`). On an idle queue, building, compiling and
    binding them through SQLAlchemy cost 0.36 ms per single push and 0.18 ms per
    claim, beside round trips of 0.4-0.7 ms."""

    def __init__(self, table: Table, engine: Engine) -> None:
        self.table = table
        self.name = name = engine.dialect.identifier_preparer.format_table(table)
        # The rows are found by primary key, ``id = ANY(ids)``; the compare-and-set on
        # commit_id is ``id || ':' || commit_id = ANY(keys)``, which PostgreSQL checks
        # against a hash of the array (it sees the values: these statements are never
        # prepared, see _run). No join: a join with unnest() is planned from guesses
        # of its size, and a wrong guess costs a nested loop of n x n.
        self.by_pair = (
            "id = ANY(%(ids)s::bigint[]) "
            "AND (id::text || ':' || commit_id::text) = ANY(%(keys)s::text[])"
        )
        # The claim compares status and task_id through coalesce() (NOT NULL columns:
        # the same test) so that the (task_id, status, expires_at) index is no
        # candidate: with statistics that say "few todo rows" (an ANALYZE on a drained
        # table) the planner would otherwise walk every todo row of the task per claim.
        # The claim judges time by the database's clock unless the caller gives one
        # (``now``): the lease ends ``lease`` after it, and a job not due yet (``run_at``
        # after it) is not claimed but returned as early (its run_at, the judged time;
        # a NULL payload marks it), for the consumer to delay again. The fencing token
        # grows by a random step (``step``), so that it cannot repeat after a failover
        # lost the claim's commit. The second read (for early jobs) runs only when the
        # UPDATE did not claim every message: a one-time filter, checked before it
        # reads a row, so that the usual claim reads its rows once.
        todo = (
            f"coalesce(status, '') = '{Status.TODO.value}' AND coalesce(task_id, '') = %(task_id)s"
        )
        self.claim_sql = (
            "WITH c AS (SELECT coalesce(%(now)s::timestamptz, statement_timestamp()) AS db_now), "
            f"u AS (UPDATE {name} SET status = '{Status.DOING.value}', "
            "commit_id = commit_id + %(step)s, updated_at = c.db_now, "
            "expires_at = c.db_now + %(lease)s::interval, worker = %(worker)s, "
            "started_at = NULL FROM c "
            f"WHERE {self.by_pair} AND {todo} AND run_at <= c.db_now "
            "RETURNING id, commit_id, failed_times, payload, priority, orphaned_claims) "
            "SELECT id, commit_id, failed_times, payload, priority, NULL::timestamptz, "
            "NULL::timestamptz, orphaned_claims FROM u UNION ALL "
            "SELECT id, commit_id, failed_times, NULL::bytea, priority, run_at, c.db_now, "
            f"orphaned_claims FROM {name}, c WHERE {self.by_pair} AND {todo} "
            "AND run_at > c.db_now "
            "AND (SELECT count(*) FROM u) < cardinality(%(ids)s::bigint[])"
        )
        # Renewal never waits on another job's row lock: the rows it can lock now are
        # renewed (SKIP LOCKED), and a plain read of the same statement's snapshot tells
        # the others apart: still doing with our commit_id is skipped (locked, retried
        # next beat), anything else is lost.
        self.heartbeat_sql = (
            f"WITH cur AS (SELECT id, commit_id FROM {name} "
            f"WHERE {self.by_pair} AND status = '{Status.DOING.value}'), "
            f"mine AS (SELECT id FROM {name} WHERE {self.by_pair} "
            f"AND status = '{Status.DOING.value}' FOR UPDATE SKIP LOCKED), "
            f"u AS (UPDATE {name} SET expires_at = "
            "coalesce(%(now)s::timestamptz, statement_timestamp()) + %(lease)s::interval "
            f"WHERE id IN (SELECT id FROM mine) RETURNING id) "
            "SELECT cur.id, cur.commit_id, u.id IS NOT NULL FROM cur LEFT JOIN u ON u.id = cur.id"
        )
        # One row: INSERT … VALUES (planned and run in about 0.2 ms less than the
        # batch form below).
        columns = (
            "task_id, status, payload, failed_times, commit_id, "
            "created_at, updated_at, run_at, expires_at, priority"
        )
        self.insert_one_sql = (
            f"INSERT INTO {name} ({columns}) VALUES (%(task_id)s, '{Status.TODO.value}', "
            "%(payload)s, 0, 0, %(now)s, %(now)s, %(run_at)s, %(expires_at)s, %(priority)s) "
            "RETURNING id"
        )
        # A batch is one INSERT … SELECT over arrays: five parameters, not ten per row.
        # The rows come out of unnest in order (ORDER BY ord) and take their ids from
        # the sequence in that order, so the ids sorted ascending are in row order.
        self.insert_sql = (
            f"INSERT INTO {name} ({columns}) "
            f"SELECT %(task_id)s, '{Status.TODO.value}', u.payload, 0, 0, %(now)s, %(now)s, "
            "u.run_at, u.expires_at, u.priority "
            "FROM unnest(%(payloads)s::bytea[], %(run_ats)s::timestamptz[], "
            "%(expires)s::timestamptz[], %(priorities)s::text[]) "
            "WITH ORDINALITY AS u(payload, run_at, expires_at, priority, ord) "
            "ORDER BY u.ord RETURNING id"
        )

    @staticmethod
    def usable(engine: Engine) -> bool:
        """The forms are written for psycopg (3): named ``%(…)s`` parameters, lists
        as arrays."""
        return engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"

    @staticmethod
    def _run(conn: Connection, sql: str, params: dict[str, Any]) -> list[Any]:
        params = {k: _bind(v, keep_zone=True) for k, v in params.items()}
        with driver_cursor(conn, [(sql, params)]) as cur:
            # Never a server-side prepared statement, whatever the engine's
            # prepare_threshold: a generic plan cannot see how many ids an array holds.
            cur.execute(sql, params, prepare=False)
            return list(cur.fetchall())

    @staticmethod
    def _pair_params(pairs: Sequence[Pair]) -> dict[str, Any]:
        return {"ids": [p[0] for p in pairs], "keys": [f"{i}:{c}" for i, c in pairs]}

    def claim(
        self,
        conn: Connection,
        task_id: str,
        pairs: Sequence[Pair],
        *,
        now: datetime | None,
        lease: timedelta,
        step: int,
        worker: str,
    ) -> tuple[list[Job], list[Message], datetime | None]:
        """todo → doing; the jobs that won (with their new commit_id), by id, the
        messages of the jobs not due yet (with their run_at), and the time judged."""
        params = self._pair_params(pairs)
        params.update(task_id=task_id, now=now, lease=lease, step=step, worker=worker)
        got = self._run(conn, self.claim_sql, params)
        jobs = [
            Job(int(r[0]), task_id, bytes(r[3]), int(r[2]), int(r[1]), str(r[4]), int(r[7]))
            for r in got
            if r[3] is not None
        ]
        early = [Message(int(r[0]), int(r[1]), str(r[4]), r[5]) for r in got if r[3] is None]
        judged = next((r[6] for r in got if r[3] is None), None)
        return sorted(jobs, key=lambda j: j.id), sorted(early, key=lambda m: m.job_id), judged

    def heartbeat(
        self, conn: Connection, pairs: Sequence[Pair], now: datetime | None, lease: timedelta
    ) -> tuple[set[Pair], set[Pair]]:
        """Renew the leases that are not locked; returns (renewed, skipped) pairs (the
        others are no longer ours)."""
        params = self._pair_params(pairs)
        params.update(now=now, lease=lease)
        renewed: set[Pair] = set()
        skipped: set[Pair] = set()
        for r in self._run(conn, self.heartbeat_sql, params):
            (renewed if r[2] else skipped).add((int(r[0]), int(r[1])))
        return renewed, skipped

    def transition(
        self,
        conn: Connection,
        pairs: Sequence[Pair],
        statuses: Iterable[Status],
        values: dict[str, Any],
    ) -> set[Pair]:
        """One group's compare-and-set; returns the ``(id, old commit_id)`` that won."""
        sets, args = _set_clause(self.table, values, named=True)
        names = [s.value for s in statuses]
        marks = ", ".join(f"%(s{i})s" for i in range(len(names)))
        sql = (
            f"UPDATE {self.name} SET {sets} WHERE {self.by_pair} AND status IN ({marks}) "
            "RETURNING id, commit_id"
        )
        params = self._pair_params(pairs)
        params.update(args)
        params.update((f"s{i}", n) for i, n in enumerate(names))
        return {(int(r[0]), int(r[1]) - 1) for r in self._run(conn, sql, params)}

    def insert(
        self, conn: Connection, task_id: str, now: datetime, rows: Sequence[dict[str, Any]]
    ) -> list[int]:
        """Insert todo rows (as built by the ledger) in one statement; their ids in order."""
        if len(rows) == 1:
            one = {k: rows[0][k] for k in ("payload", "run_at", "expires_at", "priority")}
            one.update(task_id=task_id, now=now)
            return [int(self._run(conn, self.insert_one_sql, one)[0][0])]
        params = {
            "task_id": task_id,
            "now": now,
            "payloads": [r["payload"] for r in rows],
            "run_ats": [_bind(r["run_at"], keep_zone=True) for r in rows],
            "expires": [_bind(r["expires_at"], keep_zone=True) for r in rows],
            "priorities": [r["priority"] for r in rows],
        }
        return sorted(int(r[0]) for r in self._run(conn, self.insert_sql, params))


# -- MariaDB / MySQL through PyMySQL ------------------------------------------------------


def _ints(values: Iterable[int]) -> str:
    """Integers (ids, commit_ids) written into the statement: ``int()`` makes them
    safe as text, and saves PyMySQL escaping thousands of parameters one by one."""
    return ", ".join([str(int(v)) for v in values])


def _int_pairs(pairs: Iterable[Pair]) -> str:
    return ", ".join([f"({int(i)}, {int(c)})" for i, c in pairs])


def _marks(n: int) -> str:
    return ", ".join(["%s"] * n)


def max_packet(conn: Connection) -> int:
    """The largest packet this MySQL/MariaDB connection can send: the smaller of the
    server's ``max_allowed_packet`` and PyMySQL's, read once per connection."""
    info = conn.connection.info
    got = info.get("meepo_max_packet")
    if got is None:
        query = "SELECT @@max_allowed_packet"
        with driver_cursor(conn, [(query, None)]) as cur:  # a broken connection: DBAPIError
            cur.execute(query)
            server = int(cur.fetchone()[0])
        raw: Any = conn.connection.dbapi_connection
        client = int(getattr(raw, "max_allowed_packet", server))
        got = info["meepo_max_packet"] = min(server, client)
    return int(got)


def packet_budget(conn: Connection) -> int:
    """How much SQL text meepo puts in one packet: ``max_packet`` with room for the
    protocol's framing and for text that is not ASCII."""
    return int(max_packet(conn) * 0.9)


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

    def run(
        self, conn: Connection, parts: Sequence[tuple[str, Sequence[Any]]], commit: bool = True
    ) -> list[Any]:
        """Send the statements as one script ending in COMMIT (unless ``commit`` is
        false: a later script of the same transaction commits); return, per statement,
        its rows (a SELECT) or its row count. An error rolls the transaction back (see
        :func:`driver_cursor`)."""
        bound = [(p[0], tuple(_bind(a, keep_zone=False) for a in p[1])) for p in parts]
        sql = ";\n".join([b[0] for b in bound] + (["COMMIT"] if commit else []))
        args = [a for b in bound for a in b[1]]
        out: list[Any] = []
        with driver_cursor(conn, bound) as cur:
            # no parameters: the text is sent as it is (a literal may hold a "%")
            cur.execute(sql, args or None)
            for _ in parts:
                out.append(cur.fetchall() if cur.description else cur.rowcount)
                cur.nextset()
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
        *,
        step: int = 1,
        where: str = "",
    ) -> tuple[str, list[Any]]:
        sets, named = _set_clause(self.table, values, named=False, step=step)
        args: list[Any] = list(named.values())
        ids = sorted({i for i, _ in pairs})
        sql = (
            f"UPDATE {self.name} FORCE INDEX (PRIMARY) SET {sets} "
            f"WHERE id IN ({_ints(ids)}) AND (id, commit_id) IN ({_int_pairs(pairs)}) "
            f"AND status IN ({_marks(len(statuses))})"
        )
        args += statuses
        if task_id is not None:
            sql += " AND task_id = %s"
            args.append(task_id)
        return sql + where, args

    def insert_many(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> list[int]:
        """``INSERT … RETURNING id`` statements of up to CHUNK rows each and COMMIT, in
        one packet (MariaDB 10.5+): a single push or a batch; the ids in row order.

        The values are escaped by PyMySQL itself (``Connection.escape``), each distinct
        non-payload value once: in a batch most columns repeat (task, status, times,
        priority), and escaping ten values per row one by one was most of the cost.

        A batch whose text would not fit in one packet (see :func:`max_packet`) is split
        into statements and scripts that fit: all but the last script leave the
        transaction open, the last one commits, and an error rolls back the whole batch.
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
                got = seen[key] = str(escape(_bind(v, keep_zone=False)))
            return got

        head = f"INSERT INTO {self.name} ({names}) VALUES "
        tail = " RETURNING id"
        budget = packet_budget(conn)
        statements: list[str] = []
        values: list[str] = []
        size = len(head) + len(tail)
        for r in rows:
            one = "(" + ", ".join([literal(r[c]) for c in cols]) + ")"
            if len(head) + len(one) + len(tail) > budget:
                raise PayloadError(
                    f"a job of {len(r['payload'])} bytes does not fit in one packet of this "
                    f"MySQL/MariaDB connection (max_allowed_packet {max_packet(conn)} bytes; "
                    "the payload is sent as hex): raise max_allowed_packet or lower "
                    "max_payload_bytes"
                )
            if values and (len(values) == CHUNK or size + len(one) + 2 > budget):
                statements.append(head + ", ".join(values) + tail)
                values, size = [], len(head) + len(tail)
            values.append(one)
            size += len(one) + 2
        statements.append(head + ", ".join(values) + tail)
        scripts: list[list[str]] = [[]]
        size = 0
        for statement in statements:
            if scripts[-1] and size + len(statement) + 16 > budget:
                scripts.append([])
                size = 0
            scripts[-1].append(statement)
            size += len(statement) + 2
        ids: list[int] = []
        for n, script in enumerate(scripts):
            last = n == len(scripts) - 1
            parts: list[tuple[str, Sequence[Any]]] = [(statement, []) for statement in script]
            for got in self.run(conn, parts, commit=last):  # each statement's ids ascend
                ids.extend(sorted(int(r[0]) for r in got))
        return ids

    def claim(
        self,
        conn: Connection,
        task_id: str,
        pairs: Sequence[Pair],
        *,
        now: datetime | None,
        lease: timedelta,
        step: int,
        worker: str,
    ) -> tuple[list[Job], list[Message], datetime | None]:
        """todo → doing, judged by the database's clock (``@now``) unless ``now`` is
        given; the jobs that won (with their new commit_id), by id, the messages of the
        jobs not due yet (with their run_at), and the time judged."""
        ids = sorted({i for i, _ in pairs})
        cols = (
            "id, commit_id, status, failed_times, payload, priority, run_at, "
            "run_at <= @now, CAST(@now AS DATETIME(6)), orphaned_claims"
        )
        micros = round(lease / timedelta(microseconds=1))
        values = {
            "status": Status.DOING.value,
            "updated_at": Raw("@now"),
            "expires_at": Raw(f"@now + INTERVAL {int(micros)} MICROSECOND"),
            "worker": worker,
            "started_at": None,  # an attempt is a run: this claim has not started
        }
        _, locked, n = self.run(
            conn,
            [
                ("SET @now = CAST(COALESCE(%s, UTC_TIMESTAMP(6)) AS DATETIME(6))", [now]),
                self._lock(ids, cols, task_id),
                self._update(
                    pairs,
                    [Status.TODO.value],
                    values,
                    task_id,
                    step=step,
                    where=" AND run_at <= @now",
                ),
            ],
        )
        wanted = set(pairs)
        current = [r for r in locked if r[2] == Status.TODO.value and (r[0], r[1]) in wanted]
        won = [r for r in current if r[7]]
        if n != len(won):  # the rows were locked: cannot happen
            raise RuntimeError(f"claim: {n} rows changed under lock, {len(won)} expected")
        early = [
            Message(int(r[0]), int(r[1]), str(r[5]), r[6].replace(tzinfo=UTC))
            for r in current
            if not r[7]
        ]
        judged = locked[0][8].replace(tzinfo=UTC) if locked else None
        jobs = [
            Job(int(r[0]), task_id, bytes(r[4]), int(r[3]), int(r[1]) + step, str(r[5]), int(r[9]))
            for r in won
        ]
        return jobs, early, judged

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
