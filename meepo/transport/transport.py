"""Every Redis command meepo sends for a task.

Key layout (``P`` is the list name prefix, ``meepo:`` by default, ``meepo:<table>:``
for a task with a table of its own; ``{task}`` is the task id as a Redis Cluster hash
tag, so all of a task's keys share one slot):

``P{task}:queue``     LIST of messages ``b"<job id>:<commit_id>"``. Producers RPUSH,
                      consumers LPOP ``count`` (BLPOP only when the list is empty).
                      A message is only a hint: the consumer's compare-and-set claim
                      in the ledger decides, so stale and duplicate messages are harmless.
``P{task}:epoch``     STRING, a random token set (NX) with every push and by every
                      consumer. When Redis loses its data (restart without persistence,
                      FLUSHALL, failover to an empty replica) the key vanishes or comes
                      back with another token; consumers notice and re-dispatch every due
                      ``todo`` job from the ledger.
``P{task}:recovery:<epoch>``  STRING with a TTL: taken (NX) by the one process that
                      runs the re-dispatch for that epoch.

Nothing here is durable state: everything can be rebuilt from the ledger.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ..config import mask_url
from ..errors import ConfigError, TransportUnavailableError

Pair = tuple[int, int]

#: Messages per RPUSH / LPOP call.
CHUNK = 1000
#: How long the recovery lock of one epoch is held (seconds).
RECOVERY_LOCK_TTL = 60
#: The largest id or commit_id a message may carry (BIGINT columns).
MAX_INT64 = 2**63 - 1


def make_client(url: str) -> redis.Redis:
    """A redis-py client for ``url`` with timeouts and reconnect retries set for meepo."""
    extra: dict[str, Any] = {}
    if not url.startswith("unix:"):
        # TCP only: redis-py's unix socket connections reject socket_keepalive.
        extra["socket_keepalive"] = True
    try:
        return redis.Redis.from_url(
            url,
            socket_connect_timeout=5,
            socket_timeout=30,  # above the BLPOP timeout
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), 2),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            **extra,
        )
    except ValueError as exc:
        raise ConfigError(f"invalid Redis URL {mask_url(url)!r}: {exc}") from None


def encode(pair: Pair) -> bytes:
    return b"%d:%d" % pair


def decode(message: bytes) -> Pair | None:
    """``b"12:3"`` → ``(12, 3)``; None for anything else (including numbers past a
    64-bit column, which the database drivers refuse to bind)."""
    head, sep, tail = message.partition(b":")
    if not sep or not head.isdigit() or not tail.isdigit():
        return None
    job_id, commit_id = int(head), int(tail)
    if job_id > MAX_INT64 or commit_id > MAX_INT64:
        return None
    return job_id, commit_id


def new_epoch() -> bytes:
    return os.urandom(8).hex().encode()


class Transport:
    """The Redis side of one task."""

    def __init__(self, client: redis.Redis, task_id: str, prefix: str) -> None:
        self.client = client
        self.task_id = task_id
        base = f"{prefix}{{{task_id}}}"
        self.queue_key = f"{base}:queue"
        self.epoch_key = f"{base}:epoch"
        self._recovery_base = f"{base}:recovery:"
        kwargs = client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        self.where = f"redis {where} db {kwargs.get('db', 0)}"

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as exc:
            raise TransportUnavailableError(
                f"{what} failed on {self.where}: {mask_url(str(exc))}"
            ) from exc

    def send(self, pairs: Sequence[Pair]) -> None:
        """RPUSH messages for ``pairs`` and make sure the epoch key exists: one round
        trip (a non-transactional pipeline)."""
        if not pairs:
            return
        with self._errors("dispatch"):
            pipe = self.client.pipeline(transaction=False)
            for i in range(0, len(pairs), CHUNK):
                pipe.rpush(self.queue_key, *[encode(p) for p in pairs[i : i + CHUNK]])
            pipe.set(self.epoch_key, new_epoch(), nx=True)
            pipe.execute()

    def pop(self, count: int, timeout: float) -> list[bytes]:
        """Up to ``count`` messages; waits up to ``timeout`` seconds (BLPOP) only when the
        list is empty."""
        with self._errors("pop"):
            got: Any = self.client.lpop(self.queue_key, count)
            if got:
                return list(got)
            if timeout <= 0:
                return []
            one: Any = self.client.blpop([self.queue_key], timeout=timeout)
            if not one:
                return []
            out = [one[1]]
            if count > 1:
                more: Any = self.client.lpop(self.queue_key, count - 1)
                if more:
                    out.extend(more)
            return out

    def head(self) -> tuple[int, Pair | None]:
        """The queue's length and its first message (None if empty or not meepo's)."""
        with self._errors("queue head"):
            pipe = self.client.pipeline(transaction=False)
            pipe.llen(self.queue_key)
            pipe.lindex(self.queue_key, 0)
            length, first = pipe.execute()
            return int(length), None if first is None else decode(bytes(first))

    def depth(self) -> int:
        with self._errors("LLEN"):
            return int(self.client.llen(self.queue_key))

    def epoch(self) -> bytes | None:
        with self._errors("epoch check"):
            value: Any = self.client.get(self.epoch_key)
            return None if value is None else bytes(value)

    def ensure_epoch(self) -> tuple[bytes, bool]:
        """The current epoch token, creating one if missing; True when this call made it."""
        with self._errors("epoch check"):
            token = new_epoch()
            pipe = self.client.pipeline(transaction=False)
            pipe.set(self.epoch_key, token, nx=True)
            pipe.get(self.epoch_key)
            created, current = pipe.execute()
            return bytes(current if current is not None else token), bool(created)

    def take_recovery(self, epoch: bytes) -> bool:
        """True for the one caller that should re-dispatch for ``epoch``."""
        with self._errors("recovery lock"):
            key = self._recovery_base + epoch.decode()
            return bool(self.client.set(key, b"1", nx=True, ex=RECOVERY_LOCK_TTL))

    def config_get(self, *names: str) -> dict[str, str] | None:
        """``CONFIG GET`` of each name (one pipelined round trip); None when the server
        refuses CONFIG (disabled or not permitted, as on many managed services)."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.config_get(name)
            replies = pipe.execute()
        except redis.ResponseError:
            return None
        except redis.RedisError as exc:
            raise TransportUnavailableError(
                f"CONFIG GET failed on {self.where}: {mask_url(str(exc))}"
            ) from exc
        out: dict[str, str] = {}
        for reply in replies:
            for key, value in dict(reply).items():
                k = key.decode() if isinstance(key, bytes) else str(key)
                out[k] = value.decode() if isinstance(value, bytes) else str(value)
        return out

    def info(self) -> dict[str, Any]:
        with self._errors("INFO"):
            return dict(self.client.info())

    def close(self) -> None:
        self.client.close()
