"""Dramatiq: Redis broker, ``dramatiq --processes 2`` (8 threads each, its default)."""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from .base import QUEUE, PeerSettings, settings
from .base import Peer as _Peer

broker = RedisBroker(url=settings().redis_url)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE)
def noop(ts: float = 0.0) -> None:
    from .probe import tick

    tick(ts)


class Peer(_Peer):
    name = "dramatiq"
    config = "Redis broker, 2 processes x 8 threads"

    def __init__(self, s: PeerSettings) -> None:
        super().__init__(s)
        self.noop: Any = noop

    def push(self, ts: float = 0.0) -> None:
        self.noop.send(ts)

    def worker(self) -> None:
        from dramatiq import cli

        args = cli.make_argument_parser().parse_args([__name__, "--processes", "2"])
        raise SystemExit(cli.main(args))

    def close(self) -> None:
        broker.close()
