"""The interface every peer module implements, and the settings it reads.

A peer module (``rq_peer.py``, …) defines ``Peer``, a subclass of :class:`Peer`, and
its no-op job, which calls :func:`benchmarks.peers.probe.tick`. Modules whose queue
library wants module-level objects (a Celery app, a Dramatiq broker, a Huey instance)
build them at import from :func:`settings`: the driver sets the environment before it
imports a peer module, and the worker processes inherit it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

REDIS_ENV = "MEEPO_PEER_REDIS"
PG_ENV = "MEEPO_PEER_PG"
#: the I/O-bound workload (``benchmarks/io_bound.py``): how long each job awaits
#: (``asyncio.sleep``; 0: a no-op job) and the worker's concurrency per process (unset:
#: the peer's no-op configuration). Only the async peers (arq, SAQ, taskiq) read them.
SLEEP_ENV = "MEEPO_PEER_SLEEP"
CONCURRENCY_ENV = "MEEPO_PEER_CONCURRENCY"
#: one queue name for every peer: Redis db and tables are the benchmark's own
QUEUE = "meepo_bench"


@dataclass(frozen=True)
class PeerSettings:
    redis_url: str
    pg_url: str  # a libpq URL (postgresql://…), for Procrastinate
    sleep: float = 0.0  # seconds each job awaits (the I/O-bound workload)
    concurrency: int | None = None  # jobs at once per worker process (None: the default)


def settings() -> PeerSettings:
    concurrency = os.environ.get(CONCURRENCY_ENV)
    return PeerSettings(
        os.environ.get(REDIS_ENV, "redis://127.0.0.1:6379/11"),
        os.environ.get(PG_ENV, "postgresql://postgres@127.0.0.1:5432/bench"),
        float(os.environ.get(SLEEP_ENV) or 0.0),
        int(concurrency) if concurrency else None,
    )


class Peer:
    """One peer queue: its producer side (in the benchmark process) and its worker
    (``worker()`` runs in a process the driver started, until SIGTERM)."""

    #: short name (the table's row)
    name = "?"
    #: the worker configuration, as printed in the table
    config = ""
    #: "redis" or "postgres": what the driver must clean between measurements
    store = "redis"
    #: worker processes the driver starts (a peer whose runner forks a pool: 1)
    processes = 1
    #: the name of the bulk enqueue call, or "" when the peer has none
    bulk = ""

    def __init__(self, s: PeerSettings) -> None:
        self.s = s

    def push(self, ts: float = 0.0) -> None:
        """Enqueue one no-op job (``ts``: the producer's clock, for latency)."""
        raise NotImplementedError

    def push_many(self, n: int) -> None:
        """Enqueue ``n`` no-op jobs in one bulk call (only when ``bulk``)."""
        raise NotImplementedError

    def enqueued(self) -> None:
        """After the jobs of a drain were enqueued, before the workers start (a peer on
        SQL refreshes its planner statistics here, as the benchmark does for meepo)."""

    def clean(self) -> None:
        """Remove every job and queue this peer left in a database (Redis is flushed
        by the driver)."""

    def worker(self) -> None:
        """Run the peer's worker, the way its users start it, until SIGTERM."""
        raise NotImplementedError

    def close(self) -> None:
        pass
