"""RQ: ``SimpleWorker`` (no fork per job) x 2 processes, bulk ``Queue.enqueue_many``."""

from __future__ import annotations

import logging

from redis import Redis
from rq import Queue, SimpleWorker

from .base import QUEUE, PeerSettings
from .base import Peer as _Peer
from .probe import tick


def noop(ts: float = 0.0) -> None:
    tick(ts)


class Peer(_Peer):
    name = "rq"
    config = "SimpleWorker x2"
    processes = 2
    bulk = "enqueue_many"

    def __init__(self, s: PeerSettings) -> None:
        super().__init__(s)
        self.redis = Redis.from_url(s.redis_url)
        self.queue = Queue(QUEUE, connection=self.redis)

    def push(self, ts: float = 0.0) -> None:
        self.queue.enqueue(noop, ts)

    def push_many(self, n: int) -> None:
        self.queue.enqueue_many([Queue.prepare_data(noop, args=(0.0,)) for _ in range(n)])

    def worker(self) -> None:
        logging.basicConfig(level=logging.WARNING)
        SimpleWorker([self.queue], connection=self.redis).work(logging_level="WARNING")

    def close(self) -> None:
        self.redis.close()
