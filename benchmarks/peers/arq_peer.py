"""arq: its defaults (``max_jobs=10``, ``poll_delay=0.5``), 2 worker processes.

For the I/O-bound workload (``MEEPO_PEER_CONCURRENCY``, ``MEEPO_PEER_SLEEP``: see
``base.py``) ``max_jobs`` is that concurrency and each job awaits ``asyncio.sleep``."""

from __future__ import annotations

import asyncio
from typing import Any

from arq import Worker, create_pool
from arq.connections import RedisSettings

from .base import QUEUE, PeerSettings
from .base import Peer as _Peer
from .base import settings as peer_settings
from .probe import tick

SLEEP = peer_settings().sleep


async def noop(_ctx: Any, ts: float = 0.0) -> None:
    if SLEEP:
        await asyncio.sleep(SLEEP)
    tick(ts)


class Peer(_Peer):
    name = "arq"
    config = "defaults, 2 processes"
    processes = 2

    def __init__(self, s: PeerSettings) -> None:
        super().__init__(s)
        self.settings = RedisSettings.from_dsn(s.redis_url)
        self.loop = asyncio.new_event_loop()
        self.pool: Any = None
        self.max_jobs = s.concurrency or 10  # arq's default
        if s.concurrency:
            self.config = f"max_jobs={s.concurrency}, 2 processes"

    def push(self, ts: float = 0.0) -> None:
        if self.pool is None:
            self.pool = self.loop.run_until_complete(
                create_pool(self.settings, default_queue_name=QUEUE)
            )
        self.loop.run_until_complete(self.pool.enqueue_job("noop", ts))

    def worker(self) -> None:
        Worker(
            functions=[noop],
            redis_settings=self.settings,
            queue_name=QUEUE,
            max_jobs=self.max_jobs,
        ).run()

    def close(self) -> None:
        if self.pool is not None:
            self.loop.run_until_complete(self.pool.aclose())
        self.loop.close()
