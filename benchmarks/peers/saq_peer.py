"""SAQ: Redis queue, its worker (``concurrency=10``, the default) x 2 processes.

For the I/O-bound workload (``MEEPO_PEER_CONCURRENCY``, ``MEEPO_PEER_SLEEP``: see
``base.py``) the worker's ``concurrency`` is that one and each job awaits
``asyncio.sleep``."""

from __future__ import annotations

import asyncio
from typing import Any

from saq import Queue

from .base import QUEUE, PeerSettings
from .base import Peer as _Peer
from .base import settings as peer_settings
from .probe import tick

SLEEP = peer_settings().sleep
CONCURRENCY = peer_settings().concurrency or 10  # SAQ's default


async def noop(_ctx: Any, *, ts: float = 0.0) -> None:
    if SLEEP:
        await asyncio.sleep(SLEEP)
    tick(ts)


#: what ``saq benchmarks.peers.saq_peer.settings`` would run
settings = {
    "queue": Queue.from_url(peer_settings().redis_url, name=QUEUE),
    "functions": [noop],
    "concurrency": CONCURRENCY,
}


class Peer(_Peer):
    name = "saq"
    config = f"Redis, concurrency {CONCURRENCY}, 2 processes"
    processes = 2

    def __init__(self, s: PeerSettings) -> None:
        super().__init__(s)
        self.loop = asyncio.new_event_loop()
        self.queue: Any = None

    def push(self, ts: float = 0.0) -> None:
        if self.queue is None:
            self.queue = Queue.from_url(self.s.redis_url, name=QUEUE)
            self.loop.run_until_complete(self.queue.connect())
        self.loop.run_until_complete(self.queue.enqueue("noop", ts=ts))

    def worker(self) -> None:
        from saq.worker import start

        start(f"{__name__}.settings")

    def close(self) -> None:
        if self.queue is not None:
            self.loop.run_until_complete(self.queue.disconnect())
        self.loop.close()
