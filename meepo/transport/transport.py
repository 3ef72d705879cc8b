"""Every Redis command meepo sends for a task.

Key layout (``P`` is the list name prefix, ``meepo:`` by default, ``meepo:<table>:``
for a task with a table of its own; ``{task}`` is the task id as a Redis Cluster hash
tag, so all of a task's keys share one slot):

``P{task}:queue``     LIST of messages ``b"<job id>:<commit_id>"`` of the ``default``
                      priority. Producers RPUSH, consumers pop ``count`` at a time.
``P{task}:queue:<p>`` the same for every other priority ``p`` of the task. Consumers
                      LMPOP the task's queues in priority order (BLMPOP only when all
                      are empty), so the first non-empty queue always goes first.
                      A message is only a hint: the consumer's compare-and-set claim
                      in the ledger decides, so stale and duplicate messages are harmless.
``P{task}:delayed``   ZSET of ``b"<job id>:<commit_id>:<priority>"`` scored by due time
                      (Unix seconds). Every consuming process runs :meth:`promote` every
                      few tens of milliseconds: one Lua script moves the due members to
                      their queues, atomically, so each is promoted once.
``P{task}:epoch``     STRING, a random token set (NX) with every push and by every
                      consumer. When Redis loses its data (restart without persistence,
                      FLUSHALL, failover to an empty replica) the key vanishes or comes
                      back with another token; consumers notice and re-dispatch every
                      ``todo`` job from the ledger (due ones to their queues, later ones
                      to the delayed set).
``P{task}:epoch:counter`` INTEGER incremented by every reaper tick: lower than a
                      reaper saw last means Redis went back in time (an RDB/AOF restore,
                      a failover to a lagging replica) though the epoch token survived;
                      the reaper then replaces the token, and the re-dispatch runs.
``P{task}:recovery:<epoch>``  STRING with a TTL: taken (NX) by the one process that
                      runs the re-dispatch for that epoch, renewed page by page, released
                      if it fails, ``done`` once finished.
``P{task}:wake:<worker>:<token>``  LIST with a TTL: one consumer's blocking pops watch it
                      after the queues; its stop RPUSHes to it, so the pop ends at once.
``P{task}:done``      pub/sub CHANNEL: after each group commit that finished jobs, one
                      PUBLISH of their ids (``b"12,13,20"``), for ``Task.wait``
                      (:mod:`meepo.transport.notify`).

Nothing here is durable state: everything can be rebuilt from the ledger.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.connection import AbstractConnection
from redis.retry import Retry

from ..config import PRIORITY_RE, mask_url
from ..errors import ConfigError, TransportUnavailableError
from ..records import DEFAULT_PRIORITY, Message, Pair
from .notify import Listener, Publisher, encode_ids

#: Messages per RPUSH / LPOP call (a Redis command's size; the ledger's statements have
#: their own, ``meepo.ledger.ROWS_PER_STATEMENT``).
MESSAGES_PER_CALL = 1000
#: How long the recovery lock of one epoch is held without renewal (seconds): the
#: re-dispatch renews it after every page, so a process that dies half-way is taken over
#: this long after.
RECOVERY_LOCK_TTL = 15
#: The largest id or commit_id a message may carry (BIGINT columns).
MAX_INT64 = 2**63 - 1
#: Delayed messages moved per promote call.
PROMOTE_LIMIT = 1000
#: Seconds a consumer's wake key (see :meth:`Transport.wake`) lives when no pop took it.
WAKE_TTL = 30

# KEYS: the delayed set, then the task's queues in priority order.
# ARGV: now (Unix seconds), limit, the index (1-based, into the queues) of the default
# queue, then the priority names in the same order as the queues.
# Moves due members to their queues; returns {moved, score of the next member or false}.
_PROMOTE_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #due > 0 then
  local index = {}
  for i = 4, #ARGV do index[ARGV[i]] = i - 2 end
  local fallback = tonumber(ARGV[3]) + 1
  for _, member in ipairs(due) do
    local pair, prio = string.match(member, '^(%d+:%d+):(.*)$')
    if pair then
      redis.call('RPUSH', KEYS[index[prio] or fallback], pair)
    end
  end
  redis.call('ZREM', KEYS[1], unpack(due))
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if nxt[2] then return {#due, nxt[2]} end
return {#due, false}
"""

# KEYS: the epoch key. ARGV: the old token, a new one. Replaces the token if still old.
_ROTATE_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return ARGV[2]
end
return cur
"""

# KEYS: a recovery lock. ARGV: the holder's token, the new value, a TTL. Acts only
# while the holder's token is the value.
_SWAP_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""

# KEYS: a recovery lock. ARGV: the holder's token. Deletes the lock if still the
# holder's; allowed while Redis is out of memory (it frees some). The flag needs Redis 7;
# an older server refuses the script, and the lock then expires on its own.
_RELEASE_LUA = """#!lua flags=allow-oom
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


#: Bounds of the per-attempt socket timeout of meepo's Redis connections (seconds).
MIN_IO_TIMEOUT = 1.0
MAX_IO_TIMEOUT = 10.0
#: Retries redis-py makes after a connection error or timeout (not for pops).
RETRIES = 2


def io_timeout(lease: float) -> float:
    """The socket timeout (connect, send, read) of the Redis connections of a task with
    ``lease``: a silent Redis (a partition, a host that vanished without a reset) fails a
    command, its retries included, within about a third of the lease, so no service
    thread waits on it longer than that. Kept between :data:`MIN_IO_TIMEOUT` and
    :data:`MAX_IO_TIMEOUT` per attempt (leases under 9 s get the floor)."""
    return min(MAX_IO_TIMEOUT, max(MIN_IO_TIMEOUT, lease / (3 * (RETRIES + 1))))


def make_client(url: str, *, timeout: float = MAX_IO_TIMEOUT) -> redis.Redis:
    """A redis-py client for ``url`` with timeouts and reconnect retries set for meepo:
    ``timeout`` bounds each attempt to connect, send or read (see :func:`io_timeout`);
    TCP keepalives notice a dead idle connection about as fast."""
    extra: dict[str, Any] = {}
    if not url.startswith("unix:"):
        # TCP only: redis-py's unix socket connections reject socket_keepalive.
        extra["socket_keepalive"] = True
        idle = max(1, int(timeout))
        opts = {
            getattr(socket, name): value
            for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", idle), ("TCP_KEEPCNT", 3))
            if hasattr(socket, name)
        }
        if opts:
            extra["socket_keepalive_options"] = opts
    try:
        return redis.Redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,  # a blocking pop waits its own timeout on top
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), RETRIES),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            **extra,
        )
    except ValueError as exc:
        raise ConfigError(f"invalid Redis URL {mask_url(url)!r}: {exc}") from None


#: redis-py 6 and later read a reply within a timeout of the caller's
#: (``read_response(timeout=)``); 5.3-5.x only within the socket's own.
READ_TAKES_TIMEOUT = "timeout" in inspect.signature(AbstractConnection.read_response).parameters


def _read_within(conn: Any, wait: float | None) -> Any:
    """redis-py before 6: a blocking pop's reply, read with the socket's timeout set to
    ``wait`` for this read (then set back), as ``read_response(timeout=)`` does later."""
    sock = conn._sock
    if sock is None:  # not connected: nothing sent can be read
        return conn.read_response()
    sock.settimeout(wait)
    try:
        return conn.read_response()
    finally:
        if conn._sock is not None:
            conn._sock.settimeout(conn.socket_timeout)


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


def _text(key: Any) -> str:
    return key.decode() if isinstance(key, bytes) else str(key)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def new_epoch() -> bytes:
    return os.urandom(8).hex().encode()


class Transport:
    """The Redis side of one task."""

    def __init__(
        self,
        client: redis.Redis,
        task_id: str,
        prefix: str,
        priorities: Sequence[str] = (DEFAULT_PRIORITY,),
        default_priority: str = DEFAULT_PRIORITY,
        *,
        route_any: bool = False,
    ) -> None:
        self.client = client
        self.route_any = route_any
        self.task_id = task_id
        self.priorities = list(priorities)
        self.default_priority = default_priority
        base = self._base = f"{prefix}{{{task_id}}}"
        self.queue_key = f"{base}:queue"
        self.queue_keys = {p: self._queue_key(base, p) for p in self.priorities}
        self._pop_keys = list(self.queue_keys.values())
        self._key_priority = {k: p for p, k in self.queue_keys.items()}
        self.delayed_key = f"{base}:delayed"
        self.epoch_key = f"{base}:epoch"
        self.counter_key = f"{base}:epoch:counter"
        self._recovery_base = f"{base}:recovery:"
        self.done_channel = f"{base}:done"
        self._listener: Listener | None = None
        self._listener_lock = threading.Lock()
        #: Finish notices, sent off the committer's thread (see notify.Publisher).
        self.notices = Publisher(self.publish_done, task_id)
        self._promote = client.register_script(_PROMOTE_LUA)
        self._rotate = client.register_script(_ROTATE_LUA)
        self._swap = client.register_script(_SWAP_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._promote_args: list[Any] = [
            PROMOTE_LIMIT,
            self.priorities.index(default_priority) + 1,
            *self.priorities,
        ]
        kwargs = client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        self.where = f"redis {where} db {kwargs.get('db', 0)}"

    def _queue_key(self, base: str, priority: str) -> str:
        if priority == DEFAULT_PRIORITY:
            return f"{base}:queue"
        return f"{base}:queue:{priority}"

    def key_for(self, priority: str) -> str:
        """The queue of ``priority``. A priority the task does not list goes to its
        default queue, unless this transport routes any priority to its own queue (an
        admin tool that does not know the task's list)."""
        key = self.queue_keys.get(priority)
        if key is not None:
            return key
        if self.route_any and PRIORITY_RE.fullmatch(priority):
            return self._queue_key(self._base, priority)
        return self.queue_keys[self.default_priority]

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as exc:
            raise TransportUnavailableError(
                f"{what} failed on {self.where}: {mask_url(str(exc))}"
            ) from exc

    def send(self, messages: Sequence[Message], now: datetime | None = None) -> None:
        """RPUSH due messages to their priority queues, ZADD later ones (``run_at`` after
        ``now``) to the delayed set, and make sure the epoch key exists: one round trip
        (a non-transactional pipeline)."""
        if not messages:
            return
        queues: dict[str, list[bytes]] = {}
        delayed: dict[bytes, float] = {}
        for m in messages:
            if m.run_at is not None and now is not None and m.run_at > now:
                member = b"%d:%d:%s" % (m.job_id, m.commit_id, m.priority.encode())
                delayed[member] = m.run_at.timestamp()
            else:
                queues.setdefault(self.key_for(m.priority), []).append(
                    encode((m.job_id, m.commit_id))
                )
        with self._errors("dispatch"):
            pipe = self.client.pipeline(transaction=False)
            for key, encoded in queues.items():
                for i in range(0, len(encoded), MESSAGES_PER_CALL):
                    pipe.rpush(key, *encoded[i : i + MESSAGES_PER_CALL])
            if delayed:
                pipe.zadd(self.delayed_key, delayed)
            pipe.set(self.epoch_key, new_epoch(), nx=True)
            pipe.execute()

    def publish_done(self, ids: Sequence[int]) -> int:
        """One PUBLISH of finished jobs' ids on :attr:`done_channel`; returns how many
        subscribers (processes with waiters) received it."""
        with self._errors("finish notice"):
            return int(self.client.publish(self.done_channel, encode_ids(list(ids))))

    @property
    def listener(self) -> Listener:
        """This transport's shared subscription for waiters (made on first use)."""
        with self._listener_lock:
            if self._listener is None:
                self._listener = Listener(self.client, self.where)
            return self._listener

    def send_pairs(self, pairs: Sequence[Pair]) -> None:
        """Messages for ``pairs`` to the default queue (tests and tools)."""
        self.send([Message(i, c, self.default_priority) for i, c in pairs])

    def pop(self, count: int, timeout: float, wake: str | None = None) -> tuple[str, list[bytes]]:
        """Up to ``count`` messages from the first non-empty queue in priority order, and
        that queue's priority; waits up to ``timeout`` seconds (BLPOP/BLMPOP) only when
        all are empty (a BLPOP returns the one message it woke up for).

        ``wake`` (a key from :meth:`wake_key`) is watched last by the blocking pop:
        :meth:`wake` pushes to it, and the pop returns at once with no message (a
        stopping consumer does not wait out its pop timeout).

        Each pop is sent once, never retried: a pop whose reply was lost (a reset, a
        timeout) may have removed messages on the server, and a retry would return
        later ones while those are silently gone. The error is raised instead
        (:class:`TransportUnavailableError`); such messages are lost from Redis, never
        from the ledger: the reaper's sweep re-sends their rows once their dispatch
        deadline (``zombie_timeout``) has passed."""
        keys = self._pop_keys
        waiting = keys if wake is None else [*keys, wake]
        with self._errors("pop (sent once; messages it may have taken are re-sent by the sweep)"):
            got: Any
            if len(keys) == 1:
                prio = self.priorities[0]
                got = self._once(0, "LPOP", keys[0], count)
                if got:
                    return prio, list(got)
                if timeout <= 0:
                    return prio, []
                one: Any = self._once(timeout, "BLPOP", *waiting, timeout)
                if not one or _text(one[0]) == wake:
                    return prio, []
                # The one message that woke us goes to its claim at once (an idle
                # queue's latency); if more came, the next call's LPOP takes them.
                return prio, [one[1]]
            got = self._once(0, "LMPOP", len(keys), *keys, "LEFT", "COUNT", count)
            if not got and timeout > 0:
                got = self._once(
                    timeout, "BLMPOP", timeout, len(waiting), *waiting, "LEFT", "COUNT", count
                )
            if not got or _text(got[0]) == wake:
                return self.default_priority, []
            return self._key_priority[_text(got[0])], list(got[1])

    def wake_key(self, token: str) -> str:
        """A key of this task's (same hash slot) that one consumer's blocking pops watch
        besides its queues: see :meth:`wake`. ``token`` names the consumer."""
        return f"{self._base}:wake:{token}"

    def wake(self, key: str) -> None:
        """End the blocking pop watching ``key`` now (it returns no message). The key
        expires by itself (WAKE_TTL) if no pop was waiting: at most one later pop then
        returns early, with nothing lost."""
        with self._errors("wake"):
            pipe = self.client.pipeline(transaction=False)
            pipe.rpush(key, b"1")
            pipe.expire(key, WAKE_TTL)
            pipe.execute()

    def _once(self, block: float, *args: Any) -> Any:
        """Send one command exactly once on a pooled connection and read its raw reply
        (redis-py's retry would send it again after a lost reply). ``block``: how long
        the server may hold the reply (a blocking pop), on top of the socket timeout."""
        pool = self.client.connection_pool
        conn: Any = pool.get_connection()  # redis-py leaves its connections untyped
        try:
            conn.send_command(*args)
            if block > 0:
                base = pool.connection_kwargs.get("socket_timeout")
                wait = None if base is None else base + block
                if READ_TAKES_TIMEOUT:
                    return conn.read_response(timeout=wait)
                return _read_within(conn, wait)
            return conn.read_response()
        except redis.ResponseError:  # the server answered: the connection is fine
            raise
        except BaseException:  # the reply may be half-read: never reuse the connection
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def promote(self, now: datetime) -> tuple[int, float | None]:
        """Move due delayed messages to their queues. Returns how many moved and the due
        time (Unix seconds) of the next one, if any."""
        with self._errors("promote"):
            args: list[Any] = [repr(now.timestamp()), *self._promote_args]
            moved, nxt = self._promote(keys=[self.delayed_key, *self._pop_keys], args=args)
            return int(moved), None if not nxt else float(nxt)

    def head(self) -> tuple[int, Pair | None]:
        """The default queue's length and its first message (None if empty or not
        meepo's)."""
        return self.heads()[self.default_priority]

    def heads(self) -> dict[str, tuple[int, Pair | None]]:
        """Each priority queue's length and first message, in one round trip."""
        with self._errors("queue head"):
            pipe = self.client.pipeline(transaction=False)
            for key in self._pop_keys:
                pipe.llen(key)
                pipe.lindex(key, 0)
            got = pipe.execute()
        out: dict[str, tuple[int, Pair | None]] = {}
        for i, prio in enumerate(self.priorities):
            length, first = got[2 * i], got[2 * i + 1]
            out[prio] = int(length), None if first is None else decode(bytes(first))
        return out

    def depth(self) -> int:
        """Messages waiting in all of the task's queues (not the delayed set)."""
        return sum(self.depths().values())

    def depths(self) -> dict[str, int]:
        """Messages waiting per priority queue, in priority order."""
        with self._errors("LLEN"):
            pipe = self.client.pipeline(transaction=False)
            for key in self._pop_keys:
                pipe.llen(key)
            return {p: int(n) for p, n in zip(self.priorities, pipe.execute(), strict=True)}

    def all_depths(self) -> dict[str, int]:
        """Every non-empty queue of the task found in Redis (SCAN), by priority: for
        tools that do not know the task's list of priorities."""
        with self._errors("SCAN"):
            keys = sorted(
                k.decode() if isinstance(k, bytes) else str(k)
                for k in self.client.scan_iter(match=f"{_glob_escape(self.queue_key)}*")
            )
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.llen(key)
            lengths = pipe.execute()
        out: dict[str, int] = {}
        for key, n in zip(keys, lengths, strict=True):
            suffix = key[len(self.queue_key) :]
            if suffix == "":
                out[DEFAULT_PRIORITY] = int(n)
            elif suffix.startswith(":") and PRIORITY_RE.fullmatch(suffix[1:]):
                out[suffix[1:]] = int(n)
        return out

    def delayed_depth(self) -> int:
        with self._errors("ZCARD"):
            return int(self.client.zcard(self.delayed_key))

    def epoch(self) -> bytes | None:
        with self._errors("epoch check"):
            value: Any = self.client.get(self.epoch_key)
            return None if value is None else bytes(value)

    def ensure_epoch(self) -> tuple[bytes, bool, int]:
        """The current epoch token, creating one if missing, whether this call made it,
        and the epoch counter after incrementing it (one round trip). The counter only
        grows while Redis keeps its writes: a lower one than a reaper saw last means
        Redis went back in time (a restore, a failover to a lagging replica)."""
        with self._errors("epoch check"):
            token = new_epoch()
            pipe = self.client.pipeline(transaction=False)
            pipe.set(self.epoch_key, token, nx=True)
            pipe.get(self.epoch_key)
            pipe.incr(self.counter_key)
            created, current, counter = pipe.execute()
            return bytes(current if current is not None else token), bool(created), int(counter)

    def rotate_epoch(self, old: bytes) -> bytes:
        """Replace the epoch token ``old`` by a new one (unless another process already
        did); returns the token now current. Every reaper then sees the epoch change."""
        with self._errors("epoch rotation"):
            got: Any = self._rotate(keys=[self.epoch_key], args=[old, new_epoch()])
            return bytes(got)

    def _recovery_key(self, epoch: bytes) -> str:
        return self._recovery_base + epoch.decode()

    def take_recovery(self, epoch: bytes) -> tuple[str, bytes | None]:
        """Try to take the re-dispatch of ``epoch``: ``("taken", token)`` for the one
        caller that should run it (the lock expires after :data:`RECOVERY_LOCK_TTL`
        seconds unless renewed with :meth:`hold_recovery`), ``("running", None)`` while
        another process holds it, ``("done", None)`` once one finished it."""
        with self._errors("recovery lock"):
            key = self._recovery_key(epoch)
            token = b"running:" + new_epoch()
            pipe = self.client.pipeline(transaction=False)
            pipe.set(key, token, nx=True, ex=RECOVERY_LOCK_TTL)
            pipe.get(key)
            taken, current = pipe.execute()
        if taken:
            return "taken", token
        if current is not None and bytes(current) == b"done":
            return "done", None
        return "running", None

    def hold_recovery(self, epoch: bytes, token: bytes) -> None:
        """Renew the recovery lock (after each page sent)."""
        with self._errors("recovery lock"):
            self._swap(keys=[self._recovery_key(epoch)], args=[token, token, RECOVERY_LOCK_TTL])

    def finish_recovery(self, epoch: bytes, token: bytes) -> None:
        """Mark the re-dispatch of ``epoch`` done (kept for a day, then forgotten)."""
        with self._errors("recovery lock"):
            self._swap(keys=[self._recovery_key(epoch)], args=[token, b"done", 86400])

    def release_recovery(self, epoch: bytes, token: bytes) -> None:
        """Give up the recovery lock (the re-dispatch failed), if still ours."""
        with self._errors("recovery lock"):
            self._release(keys=[self._recovery_key(epoch)], args=[token])

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
        if self._listener is not None:
            self._listener.close()
        self.client.close()
