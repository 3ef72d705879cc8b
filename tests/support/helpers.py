"""Test helpers: waiting on conditions with deadlines, throwaway Redis servers."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

import pytest
import redis

from meepo import Job, JobRecord, Status, Task
from meepo.transport.transport import decode
from support import ROOT, TESTS

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 15.0,
    interval: float = 0.02,
    message: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class Clock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(timezone.utc) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


def record(task: Task, job_id: int) -> JobRecord:
    rec = task.get(job_id)
    assert rec is not None
    return rec


def wait_status(task: Task, job_id: int, status: Status) -> JobRecord:
    wait_for(lambda: record(task, job_id).status is status, message=f"job {job_id} {status}")
    return record(task, job_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throwaway redis-server on a free loopback port (no persistence unless ``args``
    say otherwise), stopped by pid."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.workdir = workdir
        self.args = args  # more redis-server options, e.g. "--maxmemory-policy", "allkeys-lru"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            wait_for(lambda: _ping(client), timeout=10, message=f"redis on port {self.port}")
        finally:
            client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port: all data is gone."""
        self.stop()
        self.start()


class TcpProxy:
    """A TCP forwarder from a loopback port to a real server, for outages.

    ``close()`` resets every open connection and every new one at once, as a server
    that went away would look to its clients; ``open()`` forwards again. It starts
    closed. ``blackhole()`` makes it go silent instead, without a reset: open
    connections stay open but nothing more is forwarded either way, and new ones are
    accepted and then ignored (a partition, or a host that vanished behind a load
    balancer); ``open()`` heals it (what was held back is delivered).
    ``lose_next_reply()`` drops the next data the server sends (on any connection) and
    resets that connection: the command reached the server and ran, its reply is lost
    (a reset or timeout after a command was sent). The port stays
    bound from construction to ``stop()``, so that no other process (tests run in
    parallel) can take it during an outage. ``url(real_url)`` is a SQLAlchemy URL
    ``real_url`` rewritten to go through the proxy.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._up = False
        self._silent = False
        self._lose_reply = False
        self._heal = threading.Condition(self._lock)
        self._held: list[socket.socket] = []  # accepted while silent, not yet forwarded
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @classmethod
    def to(cls, url: str) -> TcpProxy:
        from sqlalchemy.engine import make_url

        u = make_url(url)
        return cls(u.host or "127.0.0.1", int(u.port or 0))

    def url(self, url: str) -> str:
        from sqlalchemy.engine import make_url

        return make_url(url).set(host="127.0.0.1", port=self.port).render_as_string(False)

    def open(self) -> TcpProxy:
        with self._lock:
            self._up = True
            self._silent = False
            held, self._held = self._held, []
            self._heal.notify_all()
        for client in held:
            self._forward(client)
        return self

    def blackhole(self) -> None:
        """Stop forwarding without a reset (see the class docstring)."""
        with self._lock:
            self._up = True
            self._silent = True

    def lose_next_reply(self) -> None:
        """Drop the server's next reply and reset its connection (see the class
        docstring)."""
        with self._lock:
            self._lose_reply = True

    def close(self) -> None:
        with self._lock:
            self._up = False
            self._silent = False
            conns, self._conns = self._conns, set()
            held, self._held = self._held, []
            self._heal.notify_all()
        for c in [*conns, *held]:
            _reset(c)

    def stop(self) -> None:
        self.close()
        self._stopped.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                up, silent = self._up, self._silent
                if up and silent:
                    self._held.append(client)
                    continue
            if not up:
                _reset(client)
                continue
            self._forward(client)

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _reset(client)
            return
        client.settimeout(None)
        upstream.settimeout(None)
        with self._lock:
            if not self._up:
                _reset(client)
                _reset(upstream)
                return
            self._conns.update((client, upstream))
        for a, b, reply in ((client, upstream, False), (upstream, client, True)):
            threading.Thread(target=self._pump, args=(a, b, reply), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, reply: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:  # silent: hold the data back until healed or closed
                    while self._silent and self._up:
                        self._heal.wait()
                    if not self._up:
                        break
                    if reply and self._lose_reply:  # dropped, and the connection reset
                        self._lose_reply = False
                        break
                dst.sendall(data)
        except OSError:
            pass
        _reset(src)
        _reset(dst)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), so the peer sees the connection die."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test starts: this one's, plus ``extra``, with the
    repository and ``tests/`` (for ``support.*``) on its PYTHONPATH."""
    env = dict(os.environ)
    paths = (str(ROOT), str(TESTS), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(extra)
    return env


# -- jobs in flight, as the integration tests drive them -----------------------------


def queued(task: Task) -> Counter[tuple[int, int]]:
    """The (job id, commit id) pairs waiting in a task's Redis queue, with counts."""
    raw: list[bytes] = task.redis.lrange(task.transport.queue_key, 0, -1)  # type: ignore[assignment]
    return Counter(p for p in (decode(bytes(m)) for m in raw) if p is not None)


def claim_and_die(
    task: Task, ids: list[int], lease: float = 5.0, *, started: bool = True
) -> list[Job]:
    """What a consumer does before it is SIGKILLed: pop the messages, claim the jobs,
    and (``started``) record that their handlers began."""
    task.redis.delete(task.transport.queue_key)
    rows = {r[0]: r[2] for r in task.ledger.find(task_id=task.task_id, ids=ids)}
    now = task.clock()
    jobs = task.ledger.claim(
        task.task_id,
        [(i, rows[i]) for i in ids],
        now=now,
        lease=timedelta(seconds=lease),
        worker="dead-host:1",
    )
    assert sorted(j.id for j in jobs) == sorted(ids)
    if started:
        assert task.ledger.start([(j.id, j.commit_id) for j in jobs], now=now) == len(jobs)
    return jobs


class Runs:
    """A handler that records the jobs it ran (after ``delay`` seconds each)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.jobs: list[Job] = []
        self.delay = delay
        self.stop = threading.Event()

    def __call__(self, job: Job) -> None:
        if self.delay:
            self.stop.wait(self.delay)
        with self.lock:
            self.jobs.append(job)

    def claims(self) -> set[tuple[int, int]]:
        with self.lock:
            return {(j.id, j.commit_id) for j in self.jobs}


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    """The log messages captured so far that contain ``text``."""
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]
