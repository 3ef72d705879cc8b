"""taskiq with the taskiq-redis broker its README starts with (``RedisStreamBroker``:
acknowledged messages), ``taskiq worker --workers 2`` (its default) with
``--max-async-tasks`` 100 (its default; ``MEEPO_PEER_CONCURRENCY`` sets it, see
``base.py``). For the I/O-bound workload each job awaits ``asyncio.sleep``."""

from __future__ import annotations

import asyncio
from typing import Any

from taskiq_redis import RedisStreamBroker

from .base import QUEUE, PeerSettings
from .base import Peer as _Peer
from .base import settings as peer_settings
from .probe import tick

SLEEP = peer_settings().sleep
CONCURRENCY = peer_settings().concurrency or 100  # taskiq's default

broker = RedisStreamBroker(url=peer_settings().redis_url, queue_name=QUEUE)


@broker.task(task_name="noop")
async def noop(ts: float = 0.0) -> None:
    if SLEEP:
        await asyncio.sleep(SLEEP)
    tick(ts)


class Peer(_Peer):
    name = "taskiq"
    config = f"Redis streams, {CONCURRENCY} async tasks x 2 workers"
    processes = 1  # `taskiq worker` forks its own worker processes

    def __init__(self, s: PeerSettings) -> None:
        super().__init__(s)
        self.loop = asyncio.new_event_loop()
        self.started = False
        self.task: Any = noop

    def push(self, ts: float = 0.0) -> None:
        if not self.started:
            # declares the consumer group, so that jobs sent before the workers start
            # are delivered to them
            self.loop.run_until_complete(broker.startup())
            self.started = True
        self.loop.run_until_complete(self.task.kiq(ts))

    def clean(self) -> None:
        """The driver flushed Redis, the stream's consumer group with it: declare it
        again, or the workers (which declare it at ``$``) would skip the jobs sent
        before they started."""
        if self.started:
            self.loop.run_until_complete(broker._declare_consumer_group())

    def worker(self) -> None:
        from taskiq.cli.worker.args import WorkerArgs
        from taskiq.cli.worker.run import run_worker

        args = [f"{__name__}:broker", "--workers", "2", "--log-level", "WARNING"]
        args += ["--max-async-tasks", str(CONCURRENCY)]
        run_worker(WorkerArgs.from_cli(args))

    def close(self) -> None:
        if self.started:
            self.loop.run_until_complete(broker.shutdown())
        self.loop.close()
