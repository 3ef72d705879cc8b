"""Huey: ``RedisHuey``, consumer with 2 worker processes (``huey_consumer -k process -w 2``)."""

from __future__ import annotations

import logging
from typing import Any

from huey import RedisHuey

from .base import QUEUE, PeerSettings, settings
from .base import Peer as _Peer
from .probe import tick

huey = RedisHuey(QUEUE, url=settings().redis_url)


@huey.task()
def noop(ts: float = 0.0) -> None:
    tick(ts)


class Peer(_Peer):
    name = "huey"
    config = "Redis, 2 worker processes"

    def __init__(self, s: PeerSettings) -> None:
        super().__init__(s)
        self.noop: Any = noop

    def push(self, ts: float = 0.0) -> None:
        self.noop(ts)

    def worker(self) -> None:
        logging.basicConfig(level=logging.WARNING)
        huey.create_consumer(workers=2, worker_type="process").run()
