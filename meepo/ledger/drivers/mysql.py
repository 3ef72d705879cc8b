"""The MariaDB/MySQL driver: one-packet scripts through PyMySQL, primary-key hints
everywhere a statement locks, the rest inherited from the portable driver.

* **Scripts** (PyMySQL with multi-statements, which meepo's own engines allow; see
  :func:`..engine.make_engine`): a transition is one script sent in one packet:
  ``SELECT … FOR UPDATE`` of the named rows by primary key, the compare-and-set
  UPDATEs, ``COMMIT``. The locked read tells which pairs win, and the UPDATEs, under
  those locks, change exactly those rows. Three or more round trips become one. A push
  (one row or a batch) is ``INSERT … RETURNING id`` and ``COMMIT`` in one packet
  (MariaDB 10.5+). A caller's engine without multi-statements runs the portable forms
  (with the hints below).
* **Hints**: InnoDB locks every row a statement scans, and on a small table it prefers
  a full scan to a range of primary keys; every locking read and UPDATE that names its
  rows forces the primary key, so that it touches only those rows (a frozen consumer's
  locked rows then delay its own jobs only).
* Start marks: the UPDATE and COMMIT in one packet. Heartbeat: the SKIP LOCKED read,
  the UPDATE of the rows it locked (a prepared statement built in the script) and a
  plain read of the rest, in one packet.
* Claims and transitions (commits, releases) of a batch: the UPDATEs first, then
  COMMIT (a claim: the read of its rows and COMMIT) when every pair won; the locked
  script only when one did not (see ``OPTIMISTIC_PAIRS``).
* Time: ``UTC_TIMESTAMP(6)``, in the statement itself (no separate read).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Select, Update, literal_column
from sqlalchemy.sql.elements import ColumnElement

from ...errors import PayloadError
from ...records import Job, Message, Pair, Status
from ..driver import ROWS_PER_STATEMENT, Claimed, Group, Renewal, from_statuses
from ..engine import translate_errors
from ..schema import jobs_table
from ..types import UTC
from .portable import PortableDriver
from .raw import Raw, bind, driver_cursor, set_clause

#: A generous size of a row's SQL text besides its payload (packets).
ROW_TEXT = 512
PK = "FORCE INDEX (PRIMARY)"
#: From this many pairs on, a claim or a transition tries its UPDATEs alone first (no
#: locked read; the rest in a second packet; see ``MySQLDriver._claim_script`` and
#: ``_transition_script``): one more round trip (about 60 µs of CPU, client and server)
#: against a locking read and the decoding of each row (several µs per row).
OPTIMISTIC_PAIRS = 32
#: Up to this many distinct commit_ids, a statement names its pairs by commit_id (see
#: :func:`_current`).
COMMIT_ID_GROUPS = 4


def _ints(values: Iterable[int]) -> str:
    """Integers (ids, commit_ids) written into the statement: ``int()`` makes them
    safe as text, and saves PyMySQL escaping thousands of parameters one by one."""
    return ", ".join([str(int(v)) for v in values])


def _int_pairs(pairs: Iterable[Pair]) -> str:
    return ", ".join([f"({int(i)}, {int(c)})" for i, c in pairs])


def _current(pairs: Sequence[Pair]) -> str:
    """``(id, commit_id) IN (…)`` of ``pairs``, for a statement that also has
    ``id IN`` (their ids): the same rows, in the cheapest form for the server.

    A batch's pairs mostly share a commit_id (fresh jobs have 0, the jobs of one claim
    its commit_id): one distinct commit_id is ``commit_id = c``, a few are an OR of
    ``commit_id = c AND id IN (…)``, and only more than :data:`COMMIT_ID_GROUPS` are
    the row comparison, whose constant rows the server builds, sorts and probes for
    each row it reads."""
    ids_of: dict[int, list[int]] = {}
    for i, c in pairs:
        ids_of.setdefault(int(c), []).append(int(i))
    if len(ids_of) == 1:
        return f"commit_id = {next(iter(ids_of))}"
    if len(ids_of) <= COMMIT_ID_GROUPS:
        return (
            "("
            + " OR ".join(f"commit_id = {c} AND id IN ({_ints(ids)})" for c, ids in ids_of.items())
            + ")"
        )
    return f"(id, commit_id) IN ({_int_pairs(pairs)})"


def _marks(n: int) -> str:
    return ", ".join(["%s"] * n)


def max_packet(conn: Connection) -> int:
    """The largest packet this connection can send: the smaller of the server's
    ``max_allowed_packet`` and PyMySQL's, read once per connection."""
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


def scripts_usable(conn: Connection) -> bool:
    """Is ``conn`` a PyMySQL connection that allows multi-statements?"""
    raw = conn.connection.dbapi_connection
    try:
        from pymysql.connections import Connection as PyMySQLConnection
        from pymysql.constants import CLIENT
    except ImportError:  # pragma: no cover - the mysql extra installs PyMySQL
        return False
    return isinstance(raw, PyMySQLConnection) and bool(raw.client_flag & CLIENT.MULTI_STATEMENTS)


class MySQLDriver(PortableDriver):
    """MariaDB/MySQL (see the module docstring)."""

    name = "mysql"

    def __init__(self, engine: Engine, table_name: str) -> None:
        super().__init__(engine, table_name)
        self.qname = engine.dialect.identifier_preparer.format_table(self.table)
        #: With the generated ``finished_status``/``finished_at`` (migration 0008).
        self.scanned = jobs_table(table_name, dialect="mysql")
        #: Does the engine's driver run scripts? Learnt on the first connection.
        self.scripts: bool | None = None

    @contextlib.contextmanager
    def script(self) -> Iterator[Connection | None]:
        """A connection that runs one-packet scripts, or None."""
        if self.scripts is False:
            yield None
            return
        with translate_errors(self.url, self.table_name), self.engine.connect() as conn:
            if self.scripts is None:
                self.scripts = scripts_usable(conn)
            yield conn if self.scripts else None

    def run(
        self, conn: Connection, parts: Sequence[tuple[str, Sequence[Any]]], commit: bool = True
    ) -> list[Any]:
        """Send the statements as one script ending in COMMIT (unless ``commit`` is
        false: a later script of the same transaction commits); return, per statement,
        its rows (a SELECT) or its row count. An error rolls the transaction back (see
        :func:`.raw.driver_cursor`)."""
        bound = [(p[0], tuple(bind(a, keep_zone=False) for a in p[1])) for p in parts]
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

    # -- the portable forms' hooks --------------------------------------------------------

    def finished_where(
        self, task_id: str, status: Status, cutoff: datetime
    ) -> list[ColumnElement[bool]]:
        """``task_id = ? AND finished_status = ? AND finished_at < cutoff``: the
        generated columns are NULL unless both deadlines are (schema.FINISHED), so
        these are the portable form's rows, found by a range of the finished rows'
        index (MariaDB/MySQL has no partial index)."""
        t = self.scanned
        return [
            t.c.task_id == task_id,
            t.c.finished_status == status.value,
            t.c.finished_at < cutoff,
        ]

    def finished_at(self) -> ColumnElement[datetime]:
        """``finished_at`` (a finished row's ``updated_at``)."""
        return self.scanned.c.finished_at

    def by_finished_index(self, stmt: Select[Any]) -> Select[Any]:
        """FORCE INDEX (ix_<table>_finished): MariaDB would rather read ``(task_id,
        status)`` in the task index and sort, where the finished rows' index is already
        in the chunk's order."""
        hint = f"FORCE INDEX (ix_{self.table_name}_finished)"
        return stmt.with_hint(self.scanned, hint, "mysql")

    def by_primary_key(self, stmt: Select[Any]) -> Select[Any]:
        """FORCE INDEX (PRIMARY) on the jobs table."""
        return stmt.with_hint(self.table, PK, "mysql")

    def update_by_primary_key(self, stmt: Update) -> Update:
        """FORCE INDEX (PRIMARY) on the UPDATE's table."""
        return stmt.with_hint(PK, dialect_name="mysql")

    def lease_end(self, conn: Connection, now: datetime | None, lease: timedelta) -> Any:
        """``UTC_TIMESTAMP(6) + INTERVAL … MICROSECOND`` (no separate read of the time)."""
        if now is not None:
            return now + lease
        micros = round(lease / timedelta(microseconds=1))
        return literal_column(
            f"UTC_TIMESTAMP(6) + INTERVAL {int(micros)} MICROSECOND",
            type_=self.table.c.expires_at.type,
        )

    def chunks(
        self, conn: Connection, rows: list[dict[str, Any]]
    ) -> Iterator[list[dict[str, Any]]]:
        """Slices of at most a chunk of rows, each small enough for one packet
        (SQLAlchemy sends each slice as one statement, payloads as hex)."""
        budget = packet_budget(conn)
        chunk: list[dict[str, Any]] = []
        size = 0
        for row in rows:
            one = 2 * len(row["payload"]) + ROW_TEXT
            if chunk and (len(chunk) == ROWS_PER_STATEMENT or size + one > budget):
                yield chunk
                chunk, size = [], 0
            chunk.append(row)
            size += one
        if chunk:
            yield chunk

    # -- script pieces ------------------------------------------------------------------

    def _lock(self, ids: Sequence[int], columns: str, task_id: str | None) -> tuple[str, list[Any]]:
        sql = f"SELECT {columns} FROM {self.qname} {PK} WHERE id IN ({_ints(ids)})"
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
        flag: bool | None = None,
    ) -> tuple[str, list[Any]]:
        sets, named = set_clause(self.table, values, named=False, step=step)
        args: list[Any] = list(named.values())
        ids = sorted({i for i, _ in pairs})
        sql = (
            f"UPDATE {self.qname} {PK} SET {sets} "
            f"WHERE id IN ({_ints(ids)}) AND {_current(pairs)} "
            f"AND status IN ({_marks(len(statuses))})"
        )
        args += statuses
        if flag is not None:  # LIVE or CANCEL_REQUESTED
            sql += " AND cancel_requested" if flag else " AND NOT cancel_requested"
        if task_id is not None:
            sql += " AND task_id = %s"
            args.append(task_id)
        return sql + where, args

    # -- producer -----------------------------------------------------------------------

    def push(self, rows: list[dict[str, Any]]) -> list[int]:
        """``INSERT … RETURNING id`` and COMMIT in one packet (MariaDB 10.5+), else the
        portable form."""
        with self.script() as sc:
            if sc is not None and self.insert_returning:
                return self._insert_script(sc, rows)
        return super().push(rows)

    def _insert_script(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> list[int]:
        """``INSERT … RETURNING id`` statements of up to a chunk of rows each and
        COMMIT, in one packet; the ids in row order.

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
                got = seen[key] = str(escape(bind(v, keep_zone=False)))
            return got

        head = f"INSERT INTO {self.qname} ({names}) VALUES "
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
            if values and (len(values) == ROWS_PER_STATEMENT or size + len(one) + 2 > budget):
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

    # -- consumer -----------------------------------------------------------------------

    def claim(
        self,
        task_id: str,
        pairs: Sequence[Pair],
        *,
        now: datetime | None,
        lease: timedelta,
        step: int,
        worker: str,
    ) -> Claimed:
        """One script: ``SET @now`` (the database's clock unless ``now`` is given),
        ``SELECT … FOR UPDATE`` of the rows by primary key, the UPDATE of the current
        and due ones, COMMIT. From :data:`OPTIMISTIC_PAIRS` pairs on, the UPDATE goes
        first, alone: when it changed every pair's row, a plain read of those rows
        and COMMIT follow (no locked read, half the columns); otherwise it is rolled
        back and the script runs. Without scripts: the portable locked form."""
        with self.script() as sc:
            if sc is not None:
                return self._claim_script(sc, task_id, pairs, now, lease, step, worker)
        return super().claim(task_id, pairs, now=now, lease=lease, step=step, worker=worker)

    def _claim_script(
        self,
        conn: Connection,
        task_id: str,
        pairs: Sequence[Pair],
        now: datetime | None,
        lease: timedelta,
        step: int,
        worker: str,
    ) -> Claimed:
        ids = sorted({i for i, _ in pairs})
        # run_at and the judged time only for the rows not due yet: a NULL costs PyMySQL
        # no conversion, and decoding the rows is most of a claim's time in Python.
        cols = (
            "id, commit_id, status, failed_times, payload, priority, "
            "IF(run_at <= @now, NULL, run_at), run_at <= @now, orphaned_claims, "
            "IF(run_at <= @now, NULL, CAST(@now AS DATETIME(6)))"
        )
        micros = round(lease / timedelta(microseconds=1))
        values = {
            "status": Status.DOING.value,
            "updated_at": Raw("@now"),
            "expires_at": Raw(f"@now + INTERVAL {int(micros)} MICROSECOND"),
            "dispatch_deadline": Raw("NULL"),  # a doing row has a lease, not a deadline
            "worker": worker,
            "started_at": None,  # an attempt is a run: this claim has not started
            "progress": None,  # a run reports its own progress
            "progress_note": None,
        }
        clock = ("SET @now = CAST(COALESCE(%s, UTC_TIMESTAMP(6)) AS DATETIME(6))", [now])
        claim = self._update(
            pairs, [Status.TODO.value], values, task_id, step=step, where=" AND run_at <= @now"
        )
        wanted = set(pairs)
        lead: list[tuple[str, Sequence[Any]]] = []
        if len(wanted) >= OPTIMISTIC_PAIRS:
            _, n = self.run(conn, [clock, claim], commit=False)
            if n == len(wanted):  # every pair won (so no two share an id)
                return Claimed(self._claimed_rows(conn, task_id, dict(wanted), step))
            lead = [("ROLLBACK", [])]  # someone moved a job, or one is not due yet
        *_, locked, n = self.run(conn, [*lead, clock, self._lock(ids, cols, task_id), claim])
        current = [r for r in locked if r[2] == Status.TODO.value and (r[0], r[1]) in wanted]
        won = [r for r in current if r[7]]
        if n != len(won):  # the rows were locked: cannot happen
            raise RuntimeError(f"claim: {n} rows changed under lock, {len(won)} expected")
        early = [
            Message(int(r[0]), int(r[1]), str(r[5]), r[6].replace(tzinfo=UTC))
            for r in current
            if not r[7]
        ]
        judged = next((r[9].replace(tzinfo=UTC) for r in current if not r[7]), None)
        jobs = [
            Job(int(r[0]), task_id, bytes(r[4]), int(r[3]), int(r[1]) + step, str(r[5]), int(r[8]))
            for r in won
        ]
        return Claimed(jobs, early, judged)

    def _claimed_rows(
        self, conn: Connection, task_id: str, commit_ids: dict[int, int], step: int
    ) -> list[Job]:
        """The jobs of an optimistic claim whose UPDATE changed every row (see
        :meth:`_claim_script`): a plain read of those rows, now this transaction's own
        (the read view begins here, after the UPDATE), and COMMIT, in one packet."""
        sql = (
            f"SELECT id, failed_times, payload, priority, orphaned_claims FROM {self.qname} "
            f"{PK} WHERE id IN ({_ints(sorted(commit_ids))}) ORDER BY id"
        )
        (rows,) = self.run(conn, [(sql, [])])
        if len(rows) != len(commit_ids):  # the rows are locked: cannot happen
            raise RuntimeError(f"claim: {len(rows)} rows read back, {len(commit_ids)} changed")
        return [
            Job(int(i), task_id, bytes(p), int(f), commit_ids[int(i)] + step, str(q), int(o))
            for i, f, p, q, o in rows
        ]

    def heartbeat(
        self, pairs: Sequence[Pair], *, lease: timedelta, now: datetime | None
    ) -> Renewal:
        """Up to a chunk of pairs: one script (see :meth:`_heartbeat_script`); more, or
        without scripts: the portable form (three round trips per chunk)."""
        if len(pairs) <= ROWS_PER_STATEMENT:
            with self.script() as sc:
                if sc is not None:
                    return self._heartbeat_script(sc, pairs, lease, now)
        return super().heartbeat(pairs, lease=lease, now=now)

    def _heartbeat_script(
        self, conn: Connection, pairs: Sequence[Pair], lease: timedelta, now: datetime | None
    ) -> Renewal:
        """Lease renewal in one packet, never waiting on a row lock:

        1. ``SELECT GROUP_CONCAT(id) INTO @meepo_mine … FOR UPDATE SKIP LOCKED``: the
           rows still doing under these commit_ids that can be locked now;
        2. the UPDATE of exactly those ids, as a prepared statement built from
           ``@meepo_mine`` (an UPDATE cannot skip locked rows, and one that named a
           locked row would wait on it: it names only the rows this script holds);
        3. a plain read of the pairs still doing (it waits on no lock), each flagged
           renewed or not: renewed; current but not renewed is skipped; absent is lost;
           with its ``cancel_requested`` (the running handler is told of a cancel).

        ``group_concat_max_len`` is raised for the session (MySQL's default, 1024
        bytes, holds about a hundred ids; a chunk has up to a thousand).
        """
        ids = _ints(sorted({i for i, _ in pairs}))
        where = f"WHERE id IN ({ids}) AND {_current(pairs)} AND status = '{Status.DOING.value}'"
        micros = round(lease / timedelta(microseconds=1))
        renew = (
            f"UPDATE {self.qname} {PK} SET expires_at = @meepo_now + INTERVAL {micros} "
            f"MICROSECOND WHERE id IN (', COALESCE(@meepo_mine, 'NULL'), ') "
            f"AND status = ''{Status.DOING.value}''"
        )
        *_, rows = self.run(
            conn,
            [
                (
                    "SET SESSION group_concat_max_len = GREATEST(@@group_concat_max_len, 1048576)",
                    [],
                ),
                ("SET @meepo_now = CAST(COALESCE(%s, UTC_TIMESTAMP(6)) AS DATETIME(6))", [now]),
                (
                    f"SELECT GROUP_CONCAT(id) INTO @meepo_mine FROM {self.qname} {PK} "
                    f"{where} FOR UPDATE SKIP LOCKED",
                    [],
                ),
                (f"SET @meepo_renew = CONCAT('{renew}')", []),
                ("PREPARE meepo_renew FROM @meepo_renew", []),
                ("EXECUTE meepo_renew", []),
                ("DEALLOCATE PREPARE meepo_renew", []),
                (
                    f"SELECT id, commit_id, FIND_IN_SET(id, COALESCE(@meepo_mine, '')) > 0, "
                    f"cancel_requested FROM {self.qname} {PK} {where}",
                    [],
                ),
            ],
        )
        out = Renewal()
        current: set[Pair] = set()
        for i, c, renewed, flagged in rows:
            pair = (int(i), int(c))
            current.add(pair)
            (out.renewed if renewed else out.skipped).add(pair)
            if flagged:  # someone cancelled the running job: its handler is told
                out.cancel.add(pair)
        out.lost.update(p for p in pairs if p not in current)
        return out

    def start(self, pairs: Sequence[Pair], *, now: datetime | None) -> int:
        """Up to a chunk of pairs: the start marks' UPDATE and COMMIT in one packet
        (``UTC_TIMESTAMP(6)`` unless ``now`` is given); more, or without scripts: the
        portable form."""
        if len(pairs) <= ROWS_PER_STATEMENT:
            with self.script() as sc:
                if sc is not None:
                    at = "CAST(COALESCE(%s, UTC_TIMESTAMP(6)) AS DATETIME(6))"
                    ids = sorted({i for i, _ in pairs})
                    sql = (
                        f"UPDATE {self.qname} {PK} SET started_at = {at} "
                        f"WHERE id IN ({_ints(ids)}) AND {_current(pairs)} "
                        f"AND status = '{Status.DOING.value}' AND started_at IS NULL "
                        f"AND expires_at > {at}"
                    )
                    (n,) = self.run(sc, [(sql, [now, now])])
                    return int(n)
        return super().start(pairs, now=now)

    def transition(self, groups: Sequence[Group]) -> set[Pair]:
        """Up to a chunk of pairs: one script (locked read, every group's UPDATE,
        COMMIT); more, or without scripts: the portable form."""
        if sum(len(p) for p, _, _ in groups) <= ROWS_PER_STATEMENT:
            with self.script() as sc:
                if sc is not None:
                    return self._transition_script(sc, groups)
        return super().transition(groups)

    def _transition_script(self, conn: Connection, groups: Sequence[Group]) -> set[Pair]:
        """Fewer than :data:`OPTIMISTIC_PAIRS` pairs: :meth:`_locked_transition`, one
        packet. More: optimistic first, every group's UPDATE left uncommitted; when each
        one changed as many rows as its group has pairs, every pair won: COMMIT (a
        second packet). Otherwise (someone moved a job meanwhile) the UPDATEs are
        rolled back and :meth:`_locked_transition` runs, in the same packet as the
        ROLLBACK.

        The optimistic form reads no row back: the locked read costs the server a
        locking read of every row and the client the decoding of each one, which over
        a batch costs more than the COMMIT's own packet. The UPDATEs lock the rows in
        primary-key order, as the locked read does."""
        named = [(list(pairs), *from_statuses(statuses), v) for pairs, statuses, v in groups]
        updates = [self._update(p, s, v, flag=flag) for p, s, flag, v in named]
        if sum(len(p) for p, *_ in named) < OPTIMISTIC_PAIRS:
            return self._locked_transition(conn, named, updates)
        counts = self.run(conn, updates, commit=False)
        if all(n == len(set(p)) for (p, *_), n in zip(named, counts, strict=True)):
            self.run(conn, [], commit=True)
            return {pair for p, *_ in named for pair in p}
        return self._locked_transition(conn, named, updates, rollback=True)

    def _locked_transition(
        self,
        conn: Connection,
        named: Sequence[tuple[list[Pair], list[str], bool | None, dict[str, Any]]],
        updates: Sequence[tuple[str, Sequence[Any]]],
        *,
        rollback: bool = False,
    ) -> set[Pair]:
        """The locked read and every group's UPDATE, COMMIT, in one packet (after a
        ROLLBACK of the optimistic UPDATEs with ``rollback``). The winners are worked
        out from the locked read, group after group (a pair that a group moved has a
        new commit_id, so no later group matches it): under those locks each UPDATE
        changes exactly those rows, which its count confirms."""
        ids = sorted({i for pairs, *_ in named for i, _ in pairs})
        parts: list[tuple[str, Sequence[Any]]] = [("ROLLBACK", [])] if rollback else []
        parts.append(self._lock(ids, "id, commit_id, status, cancel_requested", None))
        parts += updates
        got = self.run(conn, parts)
        locked, *counts = got[1:] if rollback else got
        state = {(int(r[0]), int(r[1])): str(r[2]) for r in locked}
        flagged = {(int(r[0]), int(r[1])) for r in locked if r[3]}
        won: set[Pair] = set()
        for (pairs, statuses, flag, values), n in zip(named, counts, strict=True):
            mine = {
                p
                for p in pairs
                if state.get(p) in statuses and (flag is None or (p in flagged) == flag)
            }
            if n != len(mine):  # the rows were locked: cannot happen
                raise RuntimeError(f"transition: {n} rows changed under lock, {len(mine)} expected")
            for i, c in mine:
                status = state.pop((i, c))
                state[(i, c + 1)] = str(values.get("status", status))
                if (i, c) in flagged:
                    flagged.discard((i, c))
                    if values.get("cancel_requested", True):
                        flagged.add((i, c + 1))
            won |= mine
        return won
