"""The PostgreSQL driver (psycopg 3): the hot statements as SQL text on psycopg's
cursor, the rest inherited from the portable driver.

* A batch travels as two arrays, the ids (``id = ANY(ids)``, the primary key) and the
  ``id:commit_id`` keys of the claims, each sent as one comma-separated text that the
  server splits (:data:`IDS`, :data:`KEYS`). The statement's text does not depend on the
  batch size, and ``RETURNING`` names the winners, so a batch in which some rows moved
  meanwhile needs no second pass.
* Other arrays (an INSERT's payloads, times and priorities; stored results) and single
  payloads are bound in binary (``%(name)b``), and rows come back in binary: psycopg's
  text dumpers cost 1-5 µs per element (a bytea or a timestamptz), the binary ones a
  tenth of that.
* A multi-row INSERT is one ``INSERT … SELECT … FROM unnest(…) WITH ORDINALITY`` with a
  handful of array parameters instead of ten parameters per row.
* A single statement (a push, a claim, a start mark, a one-chunk commit) runs in
  autocommit: no BEGIN and COMMIT round trips.
* The statements are never prepared (a generic plan cannot see how many ids an array
  holds). Building, compiling and binding them through SQLAlchemy cost up to half a
  round trip for a single push or claim on an idle queue (0.36 ms per push, 0.18 ms per
  claim, beside round trips of 0.4-0.7 ms): they are written once, at construction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine

from ...records import Job, Message, Pair, Status
from ..driver import ROWS_PER_STATEMENT, Claimed, FromStatus, Group, Renewal, from_statuses
from ..engine import translate_errors
from .portable import PortableDriver
from .raw import bind, driver_cursor, set_clause


def pair_params(pairs: Sequence[Pair]) -> dict[str, Any]:
    return {
        "ids": ",".join([str(i) for i, _ in pairs]),
        "keys": ",".join([f"{i}:{c}" for i, c in pairs]),
    }


#: A batch's ids and its ``id:commit_id`` keys travel as one comma-separated text each:
#: joining them costs the client about a tenth of what psycopg's array dumpers do per
#: element, and the server splits them as cheaply as it parses an array.
IDS = "string_to_array(%(ids)s, ',')::bigint[]"
KEYS = "string_to_array(%(keys)s, ',')"


def _run(conn: Connection, sql: str, params: dict[str, Any]) -> list[Any]:
    params = {k: bind(v, keep_zone=True) for k, v in params.items()}
    with driver_cursor(conn, [(sql, params)]) as cur:
        # Never a server-side prepared statement, whatever the engine's
        # prepare_threshold: a generic plan cannot see how many ids an array holds.
        cur.execute(sql, params, prepare=False, binary=True)
        return list(cur.fetchall())


class PostgresDriver(PortableDriver):
    """PostgreSQL through psycopg 3 (see the module docstring)."""

    name = "postgres"

    @staticmethod
    def usable(engine: Engine) -> bool:
        """The forms are written for psycopg (3): named ``%(…)s`` and ``%(…)b``
        parameters, lists as arrays."""
        return engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"

    def __init__(self, engine: Engine, table_name: str) -> None:
        super().__init__(engine, table_name)
        # A single-statement transition needs no BEGIN/COMMIT around it.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.qname = name = engine.dialect.identifier_preparer.format_table(self.table)
        # The rows are found by primary key, ``id = ANY(ids)``; the compare-and-set on
        # commit_id is ``id || ':' || commit_id = ANY(keys)``, which PostgreSQL checks
        # against a hash of the array (it sees the values: these statements are never
        # prepared). No join: a join with unnest() is planned from guesses of its size,
        # and a wrong guess costs a nested loop of n x n.
        self.by_pair = f"id = ANY({IDS}) AND (id::text || ':' || commit_id::text) = ANY({KEYS})"
        # The claim compares status and task_id through coalesce() (NOT NULL columns:
        # the same test) so that the task index (task_id, status, …) is no
        # candidate: with statistics that say "few todo rows" (an ANALYZE on a drained
        # table) the planner would otherwise walk every todo row of the task per claim.
        todo = (
            f"coalesce(status, '') = '{Status.TODO.value}' AND coalesce(task_id, '') = %(task_id)s"
        )
        #: claim: todo → doing judged by the database's clock (or ``now``), commit_id +
        #: a random step; the not-yet-due rows come back too (a NULL payload marks them,
        #: with their run_at and the judged time). That second read runs only when the
        #: UPDATE did not claim every message: a one-time filter, checked before it
        #: reads a row, so that the usual claim reads its rows once.
        self.claim_sql = (
            "WITH c AS (SELECT coalesce(%(now)s::timestamptz, statement_timestamp()) AS db_now), "
            f"u AS (UPDATE {name} SET status = '{Status.DOING.value}', "
            "commit_id = commit_id + %(step)s, updated_at = c.db_now, "
            "expires_at = c.db_now + %(lease)s::interval, dispatch_deadline = NULL, "
            "worker = %(worker)s, "
            "started_at = NULL, progress = NULL, progress_note = NULL FROM c "
            f"WHERE {self.by_pair} AND {todo} AND run_at <= c.db_now "
            "RETURNING id, commit_id, failed_times, payload, priority, orphaned_claims) "
            "SELECT id, commit_id, failed_times, payload, priority, NULL::timestamptz, "
            "NULL::timestamptz, orphaned_claims FROM u UNION ALL "
            "SELECT id, commit_id, failed_times, NULL::bytea, priority, run_at, c.db_now, "
            f"orphaned_claims FROM {name}, c WHERE {self.by_pair} AND {todo} "
            "AND run_at > c.db_now "
            f"AND (SELECT count(*) FROM u) < cardinality({IDS})"
        )
        #: heartbeat: renew the leases whose rows can be locked now (SKIP LOCKED); a
        #: plain read of the same snapshot tells skipped (still doing under our
        #: commit_id, locked) from lost (absent), and which jobs someone cancelled.
        self.heartbeat_sql = (
            f"WITH cur AS (SELECT id, commit_id, cancel_requested FROM {name} "
            f"WHERE {self.by_pair} AND status = '{Status.DOING.value}'), "
            f"mine AS (SELECT id FROM {name} WHERE {self.by_pair} "
            f"AND status = '{Status.DOING.value}' FOR UPDATE SKIP LOCKED), "
            f"u AS (UPDATE {name} SET expires_at = "
            "coalesce(%(now)s::timestamptz, statement_timestamp()) + %(lease)s::interval "
            f"WHERE id IN (SELECT id FROM mine) RETURNING id) "
            "SELECT cur.id, cur.commit_id, u.id IS NOT NULL, cur.cancel_requested "
            "FROM cur LEFT JOIN u ON u.id = cur.id"
        )
        #: start marks: started_at = the database's time (or ``now``) for doing rows
        #: under these commit_ids, not marked yet, whose lease has not expired.
        at = "coalesce(%(now)s::timestamptz, statement_timestamp())"
        self.start_sql = (
            f"UPDATE {name} SET started_at = {at} WHERE {self.by_pair} "
            f"AND status = '{Status.DOING.value}' AND started_at IS NULL AND expires_at > {at} "
            "RETURNING id"
        )
        columns = (
            "task_id, status, payload, failed_times, commit_id, "
            "created_at, updated_at, run_at, dispatch_deadline, priority"
        )
        #: push of one row: INSERT … VALUES (planned and run in about 0.2 ms less than
        #: the batch form).
        self.insert_one_sql = (
            f"INSERT INTO {name} ({columns}) VALUES (%(task_id)s, '{Status.TODO.value}', "
            "%(payload)b, 0, 0, %(now)s, %(now)s, %(run_at)s, %(dispatch_deadline)s, "
            "%(priority)s) "
            "RETURNING id"
        )
        #: push of a batch: one INSERT … SELECT over arrays (five parameters, not ten per
        #: row). The rows come out of unnest in order and take their ids from the
        #: sequence in that order, so the ids sorted ascending are in row order.
        self.insert_sql = (
            f"INSERT INTO {name} ({columns}) "
            f"SELECT %(task_id)s, '{Status.TODO.value}', u.payload, 0, 0, %(now)s, %(now)s, "
            "u.run_at, u.dispatch_deadline, u.priority "
            "FROM unnest(%(payloads)b::bytea[], %(run_ats)b::timestamptz[], "
            "%(deadlines)b::timestamptz[], %(priorities)b::text[]) "
            "WITH ORDINALITY AS u(payload, run_at, dispatch_deadline, priority, ord) "
            "ORDER BY u.ord RETURNING id"
        )

    @contextlib.contextmanager
    def _autocommit_connection(self) -> Iterator[Connection]:
        with translate_errors(self.url, self.table_name), self._autocommit.connect() as conn:
            yield conn

    def one_statement(self) -> contextlib.AbstractContextManager[Connection]:
        """A connection in autocommit: the one statement is its own transaction."""
        return self._autocommit_connection()

    # -- producer -----------------------------------------------------------------------

    def insert_rows(self, conn: Connection, rows: list[dict[str, Any]]) -> list[int]:
        """INSERT … VALUES for one row, INSERT … SELECT FROM unnest per chunk of a batch."""
        ids: list[int] = []
        if not rows:
            return ids
        task_id, now = rows[0]["task_id"], rows[0]["created_at"]
        if len(rows) == 1:
            one = {k: rows[0][k] for k in ("payload", "run_at", "dispatch_deadline", "priority")}
            one.update(task_id=task_id, now=now)
            return [int(_run(conn, self.insert_one_sql, one)[0][0])]
        for i in range(0, len(rows), ROWS_PER_STATEMENT):
            chunk = rows[i : i + ROWS_PER_STATEMENT]
            params = {
                "task_id": task_id,
                "now": now,
                "payloads": [r["payload"] for r in chunk],
                "run_ats": [bind(r["run_at"], keep_zone=True) for r in chunk],
                "deadlines": [bind(r["dispatch_deadline"], keep_zone=True) for r in chunk],
                "priorities": [r["priority"] for r in chunk],
            }
            ids.extend(sorted(int(r[0]) for r in _run(conn, self.insert_sql, params)))
        return ids

    def push(self, rows: list[dict[str, Any]]) -> list[int]:
        """One statement (up to a chunk of rows) in autocommit, else one transaction."""
        with self.one_statement() if len(rows) <= ROWS_PER_STATEMENT else self.begin() as conn:
            return self.insert_rows(conn, rows)

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
        """``claim_sql`` in autocommit: one round trip."""
        params = pair_params(pairs)
        params.update(task_id=task_id, now=now, lease=lease, step=step, worker=worker)
        with self.one_statement() as conn:
            got = _run(conn, self.claim_sql, params)
        jobs = [
            Job(int(r[0]), task_id, bytes(r[3]), int(r[2]), int(r[1]), str(r[4]), int(r[7]))
            for r in got
            if r[3] is not None
        ]
        early = [Message(int(r[0]), int(r[1]), str(r[4]), r[5]) for r in got if r[3] is None]
        judged = next((r[6] for r in got if r[3] is None), None)
        return Claimed(
            sorted(jobs, key=lambda j: j.id), sorted(early, key=lambda m: m.job_id), judged
        )

    def heartbeat(
        self, pairs: Sequence[Pair], *, lease: timedelta, now: datetime | None
    ) -> Renewal:
        """``heartbeat_sql`` per chunk, in one transaction."""
        out = Renewal()
        with self.begin() as conn:
            for i in range(0, len(pairs), ROWS_PER_STATEMENT):
                chunk = pairs[i : i + ROWS_PER_STATEMENT]
                params = pair_params(chunk)
                params.update(now=now, lease=lease)
                renewed: set[Pair] = set()
                skipped: set[Pair] = set()
                for r in _run(conn, self.heartbeat_sql, params):
                    pair = (int(r[0]), int(r[1]))
                    (renewed if r[2] else skipped).add(pair)
                    if r[3]:
                        out.cancel.add(pair)
                out.renewed |= renewed
                out.skipped |= skipped
                out.lost.update(p for p in chunk if p not in renewed and p not in skipped)
        return out

    def start(self, pairs: Sequence[Pair], *, now: datetime | None) -> int:
        """``start_sql`` per chunk; one chunk in autocommit."""
        marked = 0
        with self.one_statement() if len(pairs) <= ROWS_PER_STATEMENT else self.begin() as conn:
            for i in range(0, len(pairs), ROWS_PER_STATEMENT):
                params = pair_params(pairs[i : i + ROWS_PER_STATEMENT])
                params["now"] = now
                marked += len(_run(conn, self.start_sql, params))
        return marked

    def transition(self, groups: Sequence[Group]) -> set[Pair]:
        """One ``UPDATE … RETURNING`` per group chunk (it names its winners); a single
        chunk in autocommit, several in one transaction."""
        chunks = [
            (pairs[i : i + ROWS_PER_STATEMENT], statuses, values)
            for pairs, statuses, values in groups
            for i in range(0, len(pairs), ROWS_PER_STATEMENT)
        ]
        with self.one_statement() if len(chunks) == 1 else self.begin() as conn:
            return {w for p, s, v in chunks for w in self._cas_returning(conn, p, s, v)}

    def _cas_returning(
        self,
        conn: Connection,
        pairs: Sequence[Pair],
        statuses: Iterable[FromStatus],
        values: dict[str, Any],
    ) -> set[Pair]:
        """One group's compare-and-set; the ``(id, old commit_id)`` that won."""
        sets, args = set_clause(self.table, values, named=True)
        names, flag = from_statuses(statuses)
        marks = ", ".join(f"%(s{i})s" for i in range(len(names)))
        guard = (
            "" if flag is None else " AND cancel_requested" if flag else " AND NOT cancel_requested"
        )
        sql = (
            f"UPDATE {self.qname} SET {sets} WHERE {self.by_pair} AND status IN ({marks})"
            f"{guard} RETURNING id, commit_id"
        )
        params = pair_params(pairs)
        params.update(args)
        params.update((f"s{i}", n) for i, n in enumerate(names))
        return {(int(r[0]), int(r[1]) - 1) for r in _run(conn, sql, params)}
