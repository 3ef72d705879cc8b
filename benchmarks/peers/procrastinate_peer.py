"""Procrastinate (PostgreSQL only): ``batch_defer`` for bulk, 2 worker processes with
``concurrency=10`` and LISTEN/NOTIFY (its default)."""

from __future__ import annotations

from typing import Any

from procrastinate import App, PsycopgConnector

from .base import QUEUE, PeerSettings, settings
from .base import Peer as _Peer

app = App(connector=PsycopgConnector(conninfo=settings().pg_url))


@app.task(name="noop", queue=QUEUE)
async def noop(ts: float = 0.0) -> None:
    from .probe import tick

    tick(ts)


class Peer(_Peer):
    name = "procrastinate"
    config = "PostgreSQL, concurrency 10, 2 processes"
    store = "postgres"
    processes = 2
    bulk = "batch_defer"

    def __init__(self, s: PeerSettings) -> None:
        super().__init__(s)
        self.noop: Any = noop
        self.opened = False

    def _open(self) -> None:
        if not self.opened:
            app.open()
            self.opened = True
            row = app.connector.get_sync_connector().execute_query_one(
                "SELECT to_regclass('procrastinate_jobs') IS NOT NULL AS present"
            )
            if not row["present"]:
                app.schema_manager.apply_schema()

    def push(self, ts: float = 0.0) -> None:
        self._open()
        self.noop.defer(ts=ts)

    def push_many(self, n: int) -> None:
        self._open()
        self.noop.batch_defer(*[{"ts": 0.0}] * n)

    def enqueued(self) -> None:
        self._open()
        app.connector.get_sync_connector().execute_query("ANALYZE procrastinate_jobs")

    def clean(self) -> None:
        self._open()
        app.connector.get_sync_connector().execute_query("TRUNCATE procrastinate_jobs CASCADE")

    def worker(self) -> None:
        app.run_worker(queues=[QUEUE], concurrency=10)

    def close(self) -> None:
        if self.opened:
            app.close()
