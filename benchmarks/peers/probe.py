"""How a peer's no-op job tells the benchmark it ran, without slowing it down.

The job calls :func:`tick` (``tick(ts)`` with the producer's ``time.time()`` at push for
a latency measurement). ``tick`` only counts in memory; a daemon thread of the worker
process (one per process, started on the first tick, so forked pool children get their
own) flushes the count, the time of the latest tick and the latencies to Redis every
``FLUSH`` seconds. The parent reads them with :class:`Probe`.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import redis

FLUSH = 0.02
#: where the job side flushes; the worker wrapper sets it for the peer's processes
URL_ENV = "MEEPO_PEER_REDIS"
KEY_ENV = "MEEPO_PEER_PROBE"


class _Local:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.count = 0
        self.last = 0.0
        self.lat: list[float] = []
        self.client = redis.Redis.from_url(os.environ[URL_ENV])
        self.key = os.environ[KEY_ENV]
        threading.Thread(target=self._flush_loop, name="bench-probe", daemon=True).start()

    def _flush_loop(self) -> None:
        while True:
            time.sleep(FLUSH)
            with self.lock:
                count, last, lat = self.count, self.last, self.lat
                self.count, self.lat = 0, []
            if not count:
                continue
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(f"{self.key}:last", str(self.pid), repr(last))
            if lat:
                pipe.rpush(f"{self.key}:lat", *[repr(x) for x in lat])
            pipe.incrby(f"{self.key}:done", count)  # last: the parent waits on it
            pipe.execute()


_local: _Local | None = None
_init = threading.Lock()


def tick(ts: float = 0.0) -> None:
    """One job started (a no-op job is done when it starts)."""
    global _local
    now = time.time()
    st = _local
    if st is None or st.pid != os.getpid():
        with _init:
            if _local is None or _local.pid != os.getpid():
                _local = _Local()
            st = _local
    with st.lock:
        st.count += 1
        st.last = now
        if ts:
            st.lat.append(now - ts)


class Probe:
    """The parent's side: reset, wait for ``n`` ticks, read the results."""

    def __init__(self, redis_url: str, key: str) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.key = key

    def reset(self) -> None:
        self.client.delete(f"{self.key}:done", f"{self.key}:last", f"{self.key}:lat")

    def done(self) -> int:
        return int(self.client.get(f"{self.key}:done") or 0)

    def wait(self, n: int, timeout: float, alive: Any = None) -> float:
        """Wait until ``n`` jobs ran; returns the time of the last one. ``alive()``
        (optional) raises when the workers died."""
        from ..common import BenchError

        deadline = time.monotonic() + timeout
        while True:
            done = self.done()
            if done >= n:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"only {done} of {n} jobs ran within {timeout:.0f}s")
            if alive is not None:
                alive()
            time.sleep(0.05)
        last = self.client.hvals(f"{self.key}:last")
        return max(float(x) for x in last)

    def latencies(self) -> list[float]:
        return [float(x) for x in self.client.lrange(f"{self.key}:lat", 0, -1)]

    def close(self) -> None:
        self.client.close()


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def warm_up(push: Any, probe: Probe, n: int, timeout: float = 60.0, alive: Any = None) -> None:
    """Push ``n`` jobs and wait until they ran (the workers are up and idle after)."""
    probe.reset()
    for _ in range(n):
        push(0.0)
    probe.wait(n, timeout, alive)
    time.sleep(0.5)
    probe.reset()


def measure_latency(
    push: Any, probe: Probe, n: int, rate: float, timeout: float, alive: Any = None
) -> tuple[float, dict[str, Any]]:
    """Push ``n`` jobs at ``rate`` per second, each carrying its push time; wait until
    they ran. Returns (seconds, {p50_ms, p99_ms, max_ms})."""
    probe.reset()
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        push(time.time())
    probe.wait(n, timeout, alive)
    seconds = time.perf_counter() - start
    lat = sorted(probe.latencies())
    if len(lat) < n:
        from ..common import BenchError

        raise BenchError(f"latency: {len(lat)} of {n} samples")
    return seconds, {
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "max_ms": lat[-1] * 1000,
        "rate": rate,
    }
