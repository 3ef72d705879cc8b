"""Celery: Redis broker, no result backend, prefork pool ``-c 2``."""

from __future__ import annotations

from typing import Any

from celery import Celery

from .base import QUEUE, PeerSettings, settings
from .base import Peer as _Peer
from .probe import tick

app = Celery("meepo_bench", broker=settings().redis_url)
app.conf.update(task_default_queue=QUEUE, worker_hijack_root_logger=False)


@app.task(name="noop")
def noop(ts: float = 0.0) -> None:
    tick(ts)


class Peer(_Peer):
    name = "celery"
    config = "Redis broker, prefork -c 2"

    def __init__(self, s: PeerSettings) -> None:
        super().__init__(s)
        self.noop: Any = noop

    def push(self, ts: float = 0.0) -> None:
        self.noop.delay(ts)

    def worker(self) -> None:
        app.worker_main(
            [
                "worker",
                "-P",
                "prefork",
                "-c",
                "2",
                "-Q",
                QUEUE,
                "-l",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )

    def close(self) -> None:
        app.close()
