"""The start-up check of the Redis server's settings that matter to meepo.

meepo loses no job to Redis (the ledger keeps them all), but two settings make Redis
lose queue keys, and each costs latency while the reaper rebuilds what was lost:

* ``maxmemory-policy`` other than ``noeviction``: under memory pressure Redis may evict
  a queue list; the sweep re-sends its messages once their dispatch deadline
  (``zombie_timeout``) has passed.
* no persistence (no RDB save points and no AOF): a restart empties every queue; the
  reaper sees the epoch token gone and re-dispatches every due job from the ledger.

Each is said once per process and Redis server, when its reaper first reaches Redis.
Managed services often disable CONFIG: the check is then skipped (logged at DEBUG).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ..config import home_dir
from ..errors import UnavailableError
from .transport import Transport

log = logging.getLogger("meepo")

_lock = threading.Lock()
_checked: set[str] = set()


def check_redis_config(transport: Transport, redispatch_timeout: float) -> bool:
    """Warn about eviction and persistence settings of ``transport``'s server, once per
    process and server; False if Redis could not be reached (try again later)."""
    where = transport.where
    with _lock:
        if where in _checked:
            return True
    try:
        settings = transport.config_get("maxmemory-policy", "save", "appendonly")
    except UnavailableError:
        return False
    with _lock:
        if where in _checked:
            return True
        _checked.add(where)
    if settings is None:
        log.debug("%s refuses CONFIG GET: not checking its eviction and persistence", where)
        return True
    policy = settings.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        log.warning(
            "%s has maxmemory-policy %s: under memory pressure it may evict meepo's queue "
            "keys. No job is lost (the ledger keeps them) but an evicted message is only "
            "re-sent by the reaper's sweep after the job's dispatch deadline "
            "(zombie_timeout=%gs). Use maxmemory-policy noeviction for meepo's Redis.",
            where,
            policy,
            redispatch_timeout,
        )
    save = settings.get("save", "").strip()
    aof = settings.get("appendonly", "no").strip().lower()
    if not save and aof != "yes" and not _embedded(transport):
        log.warning(
            "%s persists nothing (no RDB save points, appendonly no): a Redis restart "
            "loses every queued message. No job is lost: meepo re-dispatches them from "
            "the ledger once it sees the data gone, at the cost of a burst of re-sends. "
            "Enable RDB snapshots or AOF to keep the queues across restarts.",
            where,
        )
    return True


def _embedded(transport: Transport) -> bool:
    """The embedded development server, which keeps nothing on disk by design."""
    from .embedded import SOCKET_NAME

    path = transport.client.connection_pool.connection_kwargs.get("path")
    if not path:
        return False
    try:
        return Path(path).resolve() == (home_dir() / "redis" / SOCKET_NAME).resolve()
    except OSError:
        return False
