"""Throwaway servers owned by the harness: Redis, PostgreSQL and MariaDB.

Each runs from a temporary directory on a free loopback port, so the harness can crash
and restart it without touching the shared servers other people use. Every process is
started by this module and stopped by its pid.

The database servers trade durability against an operating-system crash for speed
(PostgreSQL ``fsync=off``, InnoDB ``flush_log_at_trx_commit=2``): a committed
transaction is still written to the kernel before the commit returns, so it survives the
server process being killed, which is the fault the harness injects.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(probe: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if probe():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


class Server:
    """One server process: start, stop (clean), crash (hard), restart on the same port."""

    name = "server"
    crash_signal = signal.SIGKILL

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"

    # subclasses
    def command(self) -> list[str]:
        raise NotImplementedError

    def popen_kwargs(self) -> dict[str, Any]:
        return {}

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def url(self) -> str:
        raise NotImplementedError

    def prepare(self) -> None:
        """One-time setup before the first start (data directory)."""

    # lifecycle
    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **self.popen_kwargs(),
            )
        finally:
            log.close()
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {proc.returncode} at start; see {self.log_path}"
                )
            return self.ready()

        wait_until(up, timeout, f"{self.name} on port {self.port}")

    def _wait_exit(self, timeout: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def crash(self) -> None:
        """Stop the server at once, as a crash would (no clean shutdown)."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(self.crash_signal)
            self._wait_exit(30)
        self.proc = None

    def stop(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.terminate()
            self._wait_exit(30)
        self.proc = None


class RedisServer(Server):
    """redis-server with no persistence at all: a restart loses every key."""

    name = "redis"

    def command(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        return [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=5)

    def ready(self) -> bool:
        c = self.client()
        try:
            return bool(c.ping())
        except redis.RedisError:
            return False
        finally:
            c.close()

    def flushall(self) -> None:
        c = self.client()
        try:
            c.flushall()
        finally:
            c.close()


def _sql_ready(url: str) -> bool:
    engine = create_engine(url, poolclass=NullPool, connect_args=_connect_timeout(url))
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except SQLAlchemyError:
        return False
    finally:
        engine.dispose()


def _connect_timeout(url: str) -> dict[str, Any]:
    return {"connect_timeout": 2}


def _drop_root() -> dict[str, Any]:
    """Popen arguments that run a database server as an unprivileged user when we are root
    (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return {}
    return {"user": "postgres", "group": "postgres"}


class PostgresServer(Server):
    """A PostgreSQL cluster made with initdb in a temporary directory (trust auth)."""

    name = "postgres"
    crash_signal = signal.SIGQUIT  # immediate shutdown: no checkpoint, crash recovery next

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
        if not found and shutil.which("postgres") is None:
            raise RuntimeError("no PostgreSQL server binaries found")
        self.bindir = Path(found[-1]).parent if found else Path(shutil.which("postgres") or "")
        self.datadir = workdir / "pgdata"

    def prepare(self) -> None:
        self.workdir.chmod(0o755)
        self.datadir.mkdir()
        kwargs = _drop_root()
        if kwargs:
            shutil.chown(self.datadir, "postgres", "postgres")
            self.log_path.touch()
            shutil.chown(self.log_path, "postgres", "postgres")
        subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D", str(self.datadir),
                "-A", "trust",
                "-U", "postgres",
                "-E", "UTF8",
                "--no-sync",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            **kwargs,
        )  # fmt: skip

    def command(self) -> list[str]:
        return [
            str(self.bindir / "postgres"),
            "-D", str(self.datadir),
            "-p", str(self.port),
            "-k", str(self.datadir),
            "-c", "listen_addresses=127.0.0.1",
            "-c", "fsync=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=400",
            "-c", "shared_buffers=128MB",
        ]  # fmt: skip

    def popen_kwargs(self) -> dict[str, Any]:
        return _drop_root()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def ready(self) -> bool:
        return _sql_ready(self.url)


class MariaDBServer(Server):
    """A MariaDB server made with mariadb-install-db in a temporary directory
    (``--skip-grant-tables``: anyone on loopback may connect)."""

    name = "mariadb"
    crash_signal = signal.SIGKILL

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.server = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
        self.install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
        if not Path(self.server).exists() or self.install is None:
            raise RuntimeError("no MariaDB server binaries found")
        self.datadir = workdir / "mydata"
        self._user = ["--user=root"] if os.geteuid() == 0 else []

    def prepare(self) -> None:
        self.datadir.mkdir()
        assert self.install is not None
        subprocess.run(
            [
                self.install,
                "--no-defaults",
                f"--datadir={self.datadir}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                *self._user,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def command(self) -> list[str]:
        return [
            self.server,
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.workdir / 'mariadb.sock'}",
            f"--pid-file={self.workdir / 'mariadb.pid'}",
            *self._user,
            "--skip-grant-tables",
            "--skip-log-bin",
            "--innodb-flush-log-at-trx-commit=2",
            "--innodb-buffer-pool-size=256M",
            "--max-connections=500",
        ]

    @property
    def url(self) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/chaos"

    def ready(self) -> bool:
        if not _sql_ready(f"mysql+pymysql://root@127.0.0.1:{self.port}/mysql"):
            return False
        engine = create_engine(f"mysql+pymysql://root@127.0.0.1:{self.port}/mysql")
        try:
            with engine.begin() as conn:
                conn.execute(text("CREATE DATABASE IF NOT EXISTS chaos"))
        finally:
            engine.dispose()
        return True


def database_server(backend: str, workdir: Path) -> Server:
    if backend == "postgres":
        return PostgresServer(workdir)
    if backend == "mariadb":
        return MariaDBServer(workdir)
    raise ValueError(f"unknown backend {backend!r}: expected mariadb or postgres")
