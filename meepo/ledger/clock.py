"""The one clock: the database's (docs/design.md, invariant 8).

Every comparison of time inside a transition (a lease's end, reaping, ``run_at`` at
claim) is made in SQL by the database's own clock, which every host shares: a worker's
clock only schedules its timers. Where meepo needs the time in Python (the promotion of
delayed messages in Redis, a push's due time, a retry's backoff), :class:`ServerClock`
gives the host's clock corrected by its offset from the database, measured with the
least round-trip time of three samples and refreshed in the background every
``refresh`` seconds. An offset above ``warn_above`` seconds is logged as a warning that
names it. SQLite is embedded (one host): its clock is the host's, offset 0.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from sqlalchemy import Connection, Engine

log = logging.getLogger("meepo.clock")

UTC = timezone.utc

#: How often the offset is measured again (seconds).
REFRESH = 60.0
#: An offset above this many seconds is warned about.
WARN_ABOVE = 1.0


def host_now() -> datetime:
    return datetime.now(UTC)


def now_sql(dialect: str) -> str | None:
    """The SQL for the database's current time (UTC) on ``dialect`` (an expression the
    drivers' statements embed); None for SQLite and other embedded databases (the
    host's clock is theirs)."""
    if dialect == "postgresql":
        return "statement_timestamp()"
    if dialect == "mysql":
        return "UTC_TIMESTAMP(6)"
    return None


class ServerClock:
    """The host's clock plus its measured offset from the database's clock.

    :meth:`now` never waits on the database and never raises: the first call (and one
    every ``refresh`` seconds) starts a background measurement, and until one succeeds
    the offset is 0. :meth:`measure` measures at once (a consumer does it at start).

    ``read_now`` reads the database's time in a connection: the ledger driver's
    ``db_now`` (the statement is the driver's, docs/drivers.md)."""

    def __init__(
        self,
        engine: Engine,
        read_now: Callable[[Connection], datetime],
        *,
        refresh: float = REFRESH,
        warn_above: float = WARN_ABOVE,
    ) -> None:
        self.engine = engine
        self.read_now = read_now
        self.refresh = refresh
        self.warn_above = warn_above
        self.embedded = now_sql(engine.dialect.name) is None
        self.offset = 0.0  # seconds: database clock minus host clock
        self.rtt: float | None = None  # round trip of the sample the offset came from
        self._measured_at = float("-inf")  # monotonic
        self._lock = threading.Lock()
        self._measuring = False

    def now(self) -> datetime:
        """The database's time as this host estimates it (aware UTC)."""
        if not self.embedded and time.monotonic() - self._measured_at >= self.refresh:
            self._refresh_in_background()
        return host_now() + timedelta(seconds=self.offset)

    __call__ = now

    def _refresh_in_background(self) -> None:
        with self._lock:
            if self._measuring:
                return
            self._measuring = True
            # set now: a database that is down is tried again a refresh later, not on
            # every call
            self._measured_at = time.monotonic()

        def run() -> None:
            try:
                self.measure()
            except Exception as exc:  # a background thread must not die loudly
                log.debug("could not measure the database clock's offset: %s", exc)
            finally:
                with self._lock:
                    self._measuring = False

        threading.Thread(target=run, name="meepo-clock", daemon=True).start()

    def measure(self, samples: int = 3) -> float:
        """Measure the offset (the sample with the least round trip wins); returns it
        in seconds (database minus host). Raises the database's error if it cannot be
        reached (translated by the caller)."""
        if self.embedded:
            self._measured_at = time.monotonic()
            return 0.0
        best: tuple[float, float] | None = None
        with self.engine.connect() as conn:
            for _ in range(samples):
                t0 = time.monotonic()
                h0 = host_now()
                db = self.read_now(conn)
                rtt = time.monotonic() - t0
                mid = h0 + timedelta(seconds=rtt / 2)
                offset = (db - mid).total_seconds()
                if best is None or rtt < best[0]:
                    best = (rtt, offset)
            conn.rollback()
        assert best is not None
        self.rtt, self.offset = best
        self._measured_at = time.monotonic()
        if abs(self.offset) > self.warn_above:
            log.warning(
                "this host's clock is %+.3fs off the database's (%s; measured with a %.1f ms "
                "round trip): meepo judges leases and due times by the database's clock, "
                "but fix the host's clock (NTP)",
                -self.offset,
                self.engine.url.render_as_string(hide_password=True),
                self.rtt * 1000,
            )
        return self.offset
