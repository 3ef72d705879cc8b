"""What every benchmark shares: backends, measurements, worker processes.

Worker processes speak a line protocol on stdin/stdout, so that several can be started
together once they are all connected:

* the worker connects to its servers, then prints ``ready``;
* the parent writes ``go`` to every worker (the clock starts here);
* a worker that ends by itself prints one JSON line and exits; a worker that runs until
  told (meepo's) waits for ``stop`` on stdin, then prints its JSON line and exits.

Its stderr goes to a log file in the run's work directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis
from sqlalchemy import Engine, text

REPO = Path(__file__).resolve().parent.parent

#: Local servers (the same defaults as the tests), overridable from the environment.
DEFAULT_URLS = {
    "mariadb": os.environ.get("MEEPO_BENCH_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
    "postgres": os.environ.get(
        "MEEPO_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    ),
}
#: Its own Redis database number, away from the tests' db 9.
DEFAULT_REDIS_URL = os.environ.get("MEEPO_BENCH_REDIS_URL", "redis://127.0.0.1:6379/10")

BACKENDS = ("sqlite", "mariadb", "postgres")


class BenchError(Exception):
    """A measurement could not be made (a worker died, a deadline passed, …)."""


@dataclass(frozen=True)
class Backend:
    name: str  # sqlite | mariadb | postgres
    url: str


@dataclass
class Settings:
    """The command's options, as every system sees them."""

    jobs: int = 20_000  # push_many and drains
    single: int = 2_000  # single push, and the unbatched floor's drain
    batch: int = 1_000  # push_many batch size
    procs: tuple[int, ...] = (1, 2)  # drain worker processes
    pop_count: int = 100  # the batched floor's LPOP count
    analyze: bool = True  # refresh the planner's statistics after enqueueing, before a drain
    profile: Path | None = None  # py-spy one meepo drain worker per drain, into this folder
    latency: int = 1_000  # jobs of the idle-latency measurement (0: none)
    latency_rate: float = 100.0  # their push rate, jobs per second
    growth: int = 1_000_000  # finished rows already in the table for the growth case


@dataclass
class Context:
    """One run of one system on one backend."""

    backend: Backend
    redis_url: str
    workdir: Path
    settings: Settings
    name: str  # unique per run: the table name and Redis key prefix of this run
    run: int = 0  # which run (0-based)

    @property
    def timeout(self) -> float:
        """A generous deadline for one drain (slow machines, loaded machines)."""
        return 120.0 + self.settings.jobs / 100


@dataclass
class Measure:
    """``n`` jobs in ``seconds``; ``extra`` holds anything else worth keeping."""

    n: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")


def fresh_name(prefix: str = "bench") -> str:
    return f"{prefix}_{secrets.token_hex(4)}"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def peak_rss_kb() -> int:
    """Peak resident set size of this process in KiB: ``VmHWM`` of /proc/self/status.

    Not ``getrusage().ru_maxrss``: Linux carries it across ``execve``, so a worker
    started by a big parent (this benchmark, with every peer imported) would report the
    parent's size, not its own (that inflated the figures of the first README table)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def delete_keys(redis_url: str, pattern: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=pattern, count=1000))
        return int(client.delete(*keys)) if keys else 0
    finally:
        client.close()


def drop_ledger(engine: Engine, table: str) -> None:
    """Drop a meepo ledger table and its companions (unique keys, schedules, the
    Alembic version table)."""
    with engine.begin() as conn:
        for suffix in ("_unique", "_schedules", "", "_version"):
            conn.execute(text(f"DROP TABLE IF EXISTS {table}{suffix}"))


def analyze(engine: Engine, table: str) -> None:
    """Refresh the planner's statistics of ``table``.

    Without it, PostgreSQL plans the claim on a table filled since its last ANALYZE
    with the (task_id, status, …) task index instead of the primary key, scanning
    every todo row per statement: drains then measure autovacuum's timing."""
    with engine.begin() as conn:
        if conn.dialect.name == "mysql":
            conn.execute(text(f"ANALYZE TABLE {table}")).all()
        else:
            conn.execute(text(f"ANALYZE {table}"))


# -- the worker side of the protocol ------------------------------------------------------


def announce_ready() -> bool:
    """Print ``ready`` and wait for ``go``; False if the parent said anything else."""
    print("ready", flush=True)
    return sys.stdin.readline().strip() == "go"


def report(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


# -- the parent side ----------------------------------------------------------------------


class Child:
    """A worker process (``python -m <module> <args>``) driven by the line protocol, or
    (``protocol=False``) a program that does not speak it, such as ``meepo worker``
    itself, watched through :meth:`wait_until` and ended by :meth:`terminate`."""

    def __init__(
        self,
        module: str,
        args: Sequence[str],
        log_path: Path,
        wrap: Sequence[str] = (),
        env: dict[str, str] | None = None,
        group: bool = False,
        *,
        cwd: Path = REPO,
        protocol: bool = True,
        drop_env: Sequence[str] = (),
    ) -> None:
        """``wrap`` prefixes the command (a profiler: ``py-spy record -o … --``);
        ``env`` adds to the environment and ``drop_env`` removes from it; ``group``:
        the child leads a process group of its own (a peer worker that forks a pool),
        ended with :meth:`stop_group`; ``protocol=False``: stdout goes to the log too
        and stdin is not a pipe."""
        self.module = module
        self.log_path = log_path
        self.group = group
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        environ = {**os.environ, **(env or {})}
        for name in drop_env:
            environ.pop(name, None)
        self.proc = subprocess.Popen(
            [*wrap, sys.executable, "-m", module, *args],
            stdin=subprocess.PIPE if protocol else subprocess.DEVNULL,
            stdout=subprocess.PIPE if protocol else self._log,
            stderr=self._log,
            cwd=cwd,
            env=environ,
            start_new_session=group,
        )
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _fail(self, what: str) -> BenchError:
        tail = ""
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
            tail = ("\n    " + "\n    ".join(lines[-8:])) if lines else ""
        except OSError:
            pass
        return BenchError(f"{self.module} worker {self.pid}: {what} (log {self.log_path}){tail}")

    def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"no answer within {timeout:.0f}s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise self._fail(f"exited with status {self.proc.wait()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        if not line.strip() or line.startswith(b"py-spy>"):  # a wrapping profiler talks too
            return self.readline(max(0.0, deadline - time.monotonic()) + 1.0)
        return line.decode(errors="replace").strip()

    def expect(self, word: str, timeout: float) -> None:
        line = self.readline(timeout)
        if line != word:
            raise self._fail(f"said {line[:200]!r}, expected {word!r}")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._fail("stdin closed") from None

    def result(self, timeout: float) -> dict[str, Any]:
        line = self.readline(timeout)
        try:
            value = json.loads(line)
        except ValueError:
            raise self._fail(f"said {line[:200]!r}, expected a JSON result") from None
        if not isinstance(value, dict):
            raise self._fail(f"said {line[:200]!r}, expected a JSON object")
        return value

    def check_alive(self) -> None:
        """Raise (with the log's tail) if the process has exited."""
        if self.proc.poll() is not None:
            raise self._fail(f"exited with status {self.proc.returncode}")

    def wait_until(
        self, condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.002
    ) -> None:
        """Poll ``condition`` every ``poll`` seconds until it holds; raise (with the log's
        tail) if the process exits first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not condition():
            self.check_alive()
            if time.monotonic() > deadline:
                raise self._fail(f"{what}: not within {timeout:.0f}s")
            time.sleep(poll)

    def terminate(self, timeout: float = 30.0) -> None:
        """SIGTERM (a graceful stop), then :meth:`close`: killed after ``timeout``."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        self.close(timeout)

    def stop_group(self, timeout: float = 10.0) -> None:
        """SIGTERM the child's process group (its pid, it is ours), SIGKILL what is left
        after ``timeout``; then close."""
        assert self.group, "stop_group needs group=True"
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        # pool children may outlive a leader that exited, or the leader hung
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.close(timeout=5.0)

    def close(self, timeout: float = 10.0) -> None:
        """Wait for the process to exit; kill it (by pid, it is ours) after ``timeout``."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self._log.close()


def compile_package(package: str = "meepo") -> None:
    """Write the bytecode cache of ``package``'s modules, as pip does when it installs a
    package (an editable install and ``PYTHONDONTWRITEBYTECODE`` leave none)."""
    import compileall
    import importlib.util

    spec = importlib.util.find_spec(package)
    for where in (spec.submodule_search_locations or []) if spec is not None else []:
        compileall.compile_dir(where, quiet=1)


def py_spy(out: Path, *options: str) -> list[str]:
    """The command prefix that records a py-spy profile of the child into ``out``."""
    exe = os.environ.get("PY_SPY") or shutil.which("py-spy")
    if exe is None:
        raise BenchError("--profile needs py-spy (pip install py-spy, or set PY_SPY=/path)")
    return [exe, "record", "--rate", "250", "--format", "raw", "-o", str(out), *options, "--"]


def start_together(children: Sequence[Child], timeout: float = 60.0) -> float:
    """Wait until every child is connected, then start them all; returns the start time
    (``time.time()``, comparable with timestamps taken in the children)."""
    for child in children:
        child.expect("ready", timeout)
    t0 = time.time()
    for child in children:
        child.send("go")
    return t0


def machine() -> dict[str, Any]:
    import platform

    import sqlalchemy

    try:
        import hiredis

        hiredis_version: str | None = getattr(hiredis, "__version__", "yes")
    except ImportError:
        hiredis_version = None
    return {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "redis_py": redis.__version__,
        "hiredis": hiredis_version,
        "loadavg_start": list(os.getloadavg()),
    }


# -- the systems under test ---------------------------------------------------------------

Metric = tuple[str, Callable[[Context], Measure]]


def drain_metric(procs: int) -> str:
    return f"drain_{procs}"


class System:
    """One queue under test: the metrics it measures (``push``, ``push_many``,
    ``drain_<procs>``) and how, on one backend. Subclasses set ``name`` and implement
    ``metrics``; ``setup``/``teardown`` bracket one run of its metrics on one backend."""

    name = "?"
    #: Which backends it runs on (a peer that only uses Redis would name one).
    backends: tuple[str, ...] = BACKENDS

    def metrics(self, ctx: Context) -> list[Metric]:
        raise NotImplementedError

    def setup(self, ctx: Context) -> None:
        """Before this system's metrics on one backend (one run)."""

    def teardown(self, ctx: Context) -> None:
        """After them, even when one failed: drop what setup and the metrics made."""
