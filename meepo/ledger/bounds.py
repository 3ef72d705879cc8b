"""Bounded waits for meepo's own database sessions (docs/design.md invariant 9).

The service engine (heartbeat, claim, committer, reaper, scheduler: see
``meepo.connect.service_engine_for``) never waits without a bound, on a row lock, a slow
statement or a silent network peer. The bounds derive from the lease, so that a lease
renewal that fails still leaves time for the next one:

* ``lock_wait`` (a sixth of the lease, at least 0.5 s): PostgreSQL ``lock_timeout``,
  MariaDB/MySQL ``innodb_lock_wait_timeout`` (whole seconds, at least 1);
* ``statement`` (a quarter, at least 1.5 s): PostgreSQL ``statement_timeout``, MariaDB
  ``max_statement_time`` (MySQL ``max_execution_time``, which bounds SELECTs only);
* ``network`` (a third, at least 2 s): how long a connection may stay silent before it
  is treated as dead. psycopg: ``connect_timeout``, TCP keepalives, ``tcp_user_timeout``
  and a client-side deadline on every checkout of a pooled connection (a peer that
  vanished behind a router acknowledges nothing and answers nothing: only the client
  can notice); PyMySQL: ``connect_timeout``, ``read_timeout`` and ``write_timeout``.
  The pool's checkout wait is bounded by it too.

The floors keep a loaded server from being mistaken for a dead one with very short
leases. Migrations and the handlers' own engine (``task.engine``) are not bounded.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, event

log = logging.getLogger("meepo.ledger")


@dataclass(frozen=True)
class Bounds:
    """The waits a service session allows itself, in seconds."""

    lock_wait: float
    statement: float
    network: float

    @classmethod
    def from_lease(cls, lease: float) -> Bounds:
        return cls(
            lock_wait=_ms(max(0.5, lease / 6)),
            statement=_ms(max(1.5, lease / 4)),
            network=_ms(max(2.0, lease / 3)),
        )

    # -- what each driver is given ----------------------------------------------------

    def psycopg_connect_args(self) -> dict[str, Any]:
        net = self.network
        return {
            "connect_timeout": max(2, math.ceil(net)),  # libpq: whole seconds, at least 2
            "keepalives": 1,
            "keepalives_idle": max(1, int(net / 2)),
            "keepalives_interval": max(1, int(net / 4)),
            "keepalives_count": 2,
            "tcp_user_timeout": int(net * 1000),
        }

    def pymysql_connect_args(self) -> dict[str, Any]:
        return {
            "connect_timeout": self.network,
            "read_timeout": self.network,
            "write_timeout": self.network,
        }

    def postgres_session(self) -> list[str]:
        return [
            f"SET lock_timeout = {int(self.lock_wait * 1000)}",
            f"SET statement_timeout = {int(self.statement * 1000)}",
            f"SET idle_in_transaction_session_timeout = {int(self.network * 1000)}",
        ]

    def mysql_session(self, mariadb: bool) -> list[str]:
        lock = max(1, int(self.lock_wait))
        if mariadb:
            limit = f"max_statement_time = {self.statement:.3f}"
        else:
            limit = f"max_execution_time = {int(self.statement * 1000)}"
        return [f"SET SESSION innodb_lock_wait_timeout = {lock}, {limit}"]


def _ms(seconds: float) -> float:
    """``seconds`` rounded down to the millisecond (never above the fraction asked)."""
    return math.floor(seconds * 1000) / 1000


def apply_bounds(engine: Engine, bounds: Bounds) -> None:
    """Set ``bounds`` on every new connection of ``engine`` (its session settings) and,
    for psycopg, arm a client-side deadline on every checkout."""
    backend = engine.dialect.name
    if backend not in ("postgresql", "mysql"):
        return

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            if backend == "postgresql":
                statements = bounds.postgres_session()
            else:
                statements = bounds.mysql_session("mariadb" in dbapi_conn.get_server_info().lower())
            for s in statements:
                cur.execute(s)
        finally:
            cur.close()
        # A SET inside a transaction that rolls back is undone (PostgreSQL).
        dbapi_conn.commit()
        if backend == "postgresql":
            record.info["meepo_socket"] = _dup_socket(dbapi_conn)

    if backend != "postgresql":
        return  # PyMySQL's read_timeout/write_timeout are its client-side deadline
    limit = bounds.network

    @event.listens_for(engine, "checkout")
    def _on_checkout(_dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        sock = record.info.get("meepo_socket")
        if sock is not None:
            DEADLINES.arm(id(record), time.monotonic() + limit, sock)

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        DEADLINES.disarm(id(record))

    def _forget(_dbapi_conn: Any, record: Any, *_rest: Any) -> None:
        DEADLINES.disarm(id(record))
        sock = record.info.pop("meepo_socket", None)
        if sock is not None:
            sock.close()  # our duplicate only: the driver's own descriptor is its own

    event.listen(engine, "invalidate", _forget)
    event.listen(engine, "close", _forget)


def _dup_socket(dbapi_conn: Any) -> socket.socket | None:
    """A duplicate of the connection's socket descriptor: shutting it down ends the
    driver's connection too (one socket, two descriptors), and it can never name another
    socket after the driver closed its own."""
    try:
        return socket.socket(fileno=os.dup(dbapi_conn.fileno()))
    except (OSError, AttributeError, ValueError):
        return None


class Deadlines:
    """One thread that shuts down the socket of a connection checked out for longer than
    its deadline: the blocked driver call then fails at once (the connection reads as
    closed by the server) and SQLAlchemy invalidates it.

    A checkout costs a dict entry under a lock. The thread looks every ``TICK`` seconds
    while connections are checked out (a deadline is met within that much) and sleeps
    once a look finds none; a checkout wakes it only from that sleep, so a pool checked
    out and in many times a second wakes it about once a tick, not once a checkout."""

    TICK = 0.25

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._armed: dict[int, tuple[float, socket.socket]] = {}
        self._thread: threading.Thread | None = None
        self._idle = False  # the thread sleeps until a checkout wakes it
        #: Connections cut by a deadline (tests and logs read it).
        self.fired = 0

    def arm(self, key: int, deadline: float, sock: socket.socket) -> None:
        with self._lock:
            self._armed[key] = (deadline, sock)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="meepo-db-deadlines", daemon=True
                )
                self._thread.start()
            elif self._idle:
                self._idle = False
                self._lock.notify()

    def disarm(self, key: int) -> None:
        with self._lock:
            self._armed.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._armed:
                    self._idle = True
                    while self._idle:
                        self._lock.wait()
                self._lock.wait(self.TICK)  # nothing notifies it here
                now = time.monotonic()
                late = [k for k, (deadline, _) in self._armed.items() if deadline <= now]
                for key in late:
                    _, sock = self._armed.pop(key)
                    self.fired += 1
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            if late:
                log.warning(
                    "%d database connection(s) of meepo's service pool checked out past "
                    "their deadline (a silent network or server): shut down",
                    len(late),
                )

    def _after_fork(self) -> None:
        # The parent's connections are not the child's to cut; its thread is gone.
        self._lock = threading.Condition()
        self._armed.clear()
        self._thread = None
        self._idle = False


DEADLINES = Deadlines()
os.register_at_fork(after_in_child=DEADLINES._after_fork)
