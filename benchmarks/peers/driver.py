"""Measures any peer the same way, as a benchmark ``System`` on the "peers" backend.

For each peer (a module of this package, see ``base.Peer``):

* ``push``       ``--single`` jobs enqueued one call each
* ``push_many``  ``--jobs`` jobs through the peer's bulk call, in batches of ``--batch``
  (only where the peer has one: RQ ``enqueue_many``, Procrastinate ``batch_defer``)
* ``drain_2``    ``--jobs`` no-op jobs enqueued first, then the peer's worker started
  (2 processes or a pool of 2); from the start signal to the last job run
* ``latency``    idle queue, workers warm: ``--latency`` jobs pushed at ~100/s, the
  time from before the push call to the handler's start, p50/p99

Done is seen through ``probe.py`` (the no-op job counts itself in memory; a thread of
each worker process flushes to Redis every 20 ms). Between measurements the driver
flushes the benchmark's Redis database (it is its own) and the peer's tables.
Workers are process groups the driver started, ended by their pid.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from ..common import (
    BenchError,
    Child,
    Context,
    Measure,
    Metric,
    System,
    drain_metric,
    fresh_name,
    start_together,
)
from . import PEERS
from .base import PG_ENV, REDIS_ENV, Peer
from .probe import KEY_ENV, URL_ENV, Probe, measure_latency, warm_up

PEERS_BACKEND = "peers"
#: the worker process count every peer runs with (its own way: processes or a pool)
PROCS = 2


def libpq_url(sqlalchemy_url: str) -> str:
    """``postgresql+psycopg://…`` -> ``postgresql://…`` (what libpq takes)."""
    parts = urlsplit(sqlalchemy_url)
    return urlunsplit(parts._replace(scheme=parts.scheme.split("+")[0]))


class PeerSystem(System):
    """One peer queue. Its library is imported on first use: a peer that is not
    installed (or whose import fails) fails its setup, reported in the table."""

    backends = (PEERS_BACKEND,)

    def __init__(self, key: str, pg_url: str) -> None:
        self.key = key
        self.name = key
        self.pg_url = libpq_url(pg_url)
        self.peer: Peer | None = None
        self.config = ""
        self.unavailable: str | None = None

    def env(self, ctx: Context) -> dict[str, str]:
        return {REDIS_ENV: ctx.redis_url, PG_ENV: self.pg_url}

    def load(self, ctx: Context) -> Peer:
        if self.peer is None:
            import os

            os.environ.update(self.env(ctx))
            try:
                module = importlib.import_module(f"{__package__}.{PEERS[self.key]}")
                self.peer = module.Peer(_settings())
            except Exception as exc:
                self.unavailable = f"{type(exc).__name__}: {exc}"
                raise BenchError(f"{self.key} is not available ({self.unavailable})") from exc
            self.config = self.peer.config
        return self.peer

    # -- System -----------------------------------------------------------------------

    def metrics(self, ctx: Context) -> list[Metric]:
        s = ctx.settings
        peer = self.load(ctx)
        out: list[Metric] = [("push", partial(self.push, n=s.single))]
        if peer.bulk:
            out.append(("push_many", partial(self.push_many, n=s.jobs)))
        out.append((drain_metric(PROCS), partial(self.drain, n=s.jobs)))
        if s.latency:
            out.append(("latency", partial(self.latency, n=s.latency)))
        return out

    def setup(self, ctx: Context) -> None:
        self.load(ctx)
        self.clean(ctx)

    def teardown(self, ctx: Context) -> None:
        self.clean(ctx)

    def clean(self, ctx: Context) -> None:
        client = redis.Redis.from_url(ctx.redis_url)
        try:
            client.flushdb()  # the benchmark's own Redis database
        finally:
            client.close()
        if self.peer is not None:
            self.peer.clean()

    # -- measurements -----------------------------------------------------------------

    def push(self, ctx: Context, n: int) -> Measure:
        peer = self.load(ctx)
        self.clean(ctx)
        for _ in range(20):
            peer.push()
        t = time.perf_counter()
        for _ in range(n):
            peer.push()
        seconds = time.perf_counter() - t
        self.clean(ctx)
        return Measure(n, seconds)

    def push_many(self, ctx: Context, n: int) -> Measure:
        peer = self.load(ctx)
        batch = ctx.settings.batch
        self.clean(ctx)
        peer.push_many(20)
        t = time.perf_counter()
        done = 0
        while done < n:
            k = min(batch, n - done)
            peer.push_many(k)
            done += k
        seconds = time.perf_counter() - t
        self.clean(ctx)
        return Measure(n, seconds, {"batch": batch, "call": peer.bulk})

    def _enqueue(self, peer: Peer, n: int, batch: int) -> None:
        if peer.bulk:
            for i in range(0, n, batch):
                peer.push_many(min(batch, n - i))
        else:
            for _ in range(n):
                peer.push()

    def _workers(self, ctx: Context, probe_key: str, tag: str) -> list[Child]:
        peer = self.load(ctx)
        env = {**self.env(ctx), URL_ENV: ctx.redis_url, KEY_ENV: probe_key}
        log = ctx.workdir / f"peer-{self.key}-{tag}"
        return [
            Child(
                "benchmarks.peers.worker",
                [self.key],
                log.with_suffix(f".{k}.log"),
                env=env,
                group=True,
            )
            for k in range(peer.processes)
        ]

    @contextlib.contextmanager
    def _session(self, ctx: Context, purpose: str) -> Iterator[tuple[Peer, Probe, list[Child]]]:
        """The peer loaded on clean stores, a fresh probe and its worker processes (not
        started yet); afterwards the workers' groups are ended and the stores cleaned."""
        peer = self.load(ctx)
        self.clean(ctx)
        probe_key = f"probe:{fresh_name(self.key)}"
        probe = Probe(ctx.redis_url, probe_key)
        children = self._workers(ctx, probe_key, purpose)
        try:
            yield peer, probe, children
        finally:
            for child in children:
                child.stop_group()
            probe.close()
            self.clean(ctx)

    def drain(self, ctx: Context, n: int) -> Measure:
        with self._session(ctx, "drain") as (peer, probe, children):
            self._enqueue(peer, n, ctx.settings.batch)
            if ctx.settings.analyze:
                peer.enqueued()
            probe.reset()
            t0 = start_together(children)
            last = probe.wait(n, ctx.timeout, _alive(children))
            return Measure(n, last - t0, {"procs": PROCS, "config": peer.config})

    def latency(self, ctx: Context, n: int) -> Measure:
        s = ctx.settings
        with self._session(ctx, "latency") as (peer, probe, children):
            start_together(children)
            alive = _alive(children)
            warm_up(peer.push, probe, 5 * len(children), 120.0, alive)
            seconds, extra = measure_latency(
                peer.push, probe, n, s.latency_rate, n / s.latency_rate + 60, alive
            )
            return Measure(n, seconds, extra)


def _settings() -> Any:
    from .base import settings

    return settings()


def _alive(children: list[Child]) -> Callable[[], None]:
    def check() -> None:
        for child in children:
            child.check_alive()

    return check


def peer_systems(names: str | None, pg_url: str) -> list[PeerSystem]:
    wanted = list(PEERS) if names is None else [n.strip() for n in names.split(",") if n]
    unknown = [n for n in wanted if n not in PEERS]
    if unknown:
        raise BenchError(f"unknown peer(s) {unknown}: choose from {', '.join(PEERS)}")
    return [PeerSystem(n, pg_url) for n in wanted]
