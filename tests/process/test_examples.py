"""The examples run to completion the way users run them: each in a process of its own,
the quickstart on the embedded default (no URLs), and every example on every database
with the shared Redis."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT
from support.helpers import child_env

EXAMPLES = ROOT / "examples"
TIMEOUT = 180

#: The line each example prints when everything it checks held.
KEY_LINES = {
    "quickstart": "quickstart finished in",
    "async_handler": "async_handler: 200 jobs done in",
    "auto_commit": "auto_commit: 100 jobs finished",
    "cron": "one job per fire time",
    "delayed": "delayed: every job ran on time, in priority order, exactly as planned",
    "manual_commit": "manual_commit: 100 jobs finished",
    "transactional_push": "transactional_push: 3 committed jobs ran, rolled-back jobs ran: 0",
    "testing_handlers": "testing_handlers: 6 tests passed, no Redis used",
    "results_and_wait": "results_and_wait: results stored, waits woken, bad values refused",
}

pytestmark = pytest.mark.timeout(2 * TIMEOUT)


def run_example(name: str, cwd: Path, **env: str) -> str:
    environ = child_env(MEEPO_HOME=str(cwd / ".meepo"), **env)
    if "MEEPO_DB_URL" not in env:
        environ.pop("MEEPO_DB_URL", None)
    if "MEEPO_REDIS_URL" not in env:
        environ.pop("MEEPO_REDIS_URL", None)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py")],
        cwd=cwd,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=TIMEOUT,
        check=False,
    )
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{out[-4000:]}"
    assert KEY_LINES[name] in out, f"{name} did not print {KEY_LINES[name]!r}:\n{out[-4000:]}"
    return out


needs_redis_server = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="no redis-server binary to embed"
)


@needs_redis_server
def test_quickstart_on_the_embedded_default_twice(tmp_path: Path) -> None:
    """`make demo`: no URLs at all, and a second run over the first one's .meepo dir."""
    first = run_example("quickstart", tmp_path)
    assert (tmp_path / ".meepo" / "meepo.sqlite3").exists()
    for out in (first, run_example("quickstart", tmp_path)):
        assert "(embedded default)" in out
        assert "failed_times=1" in out  # the retried failure and the reaped zombie
        assert "re-queued" in out  # the reaper's own report of the zombie
        assert "is stale" in out  # the late commit was fenced off
        last = out.rstrip("\n").splitlines()[-3:]
        assert [line.split()[:2] for line in last] == [
            ["next:", ".venv/bin/meepo"] if "VIRTUAL_ENV" not in os.environ else ["next:", "meepo"]
        ] * 3
    # two runs, two tasks: the runs share their task ids
    env = child_env(MEEPO_HOME=str(tmp_path / ".meepo"))
    for name in ("MEEPO_DB_URL", "MEEPO_REDIS_URL"):
        env.pop(name, None)
    got = subprocess.run(
        [sys.executable, "-m", "meepo", "stats", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    tasks = {t["task_id"]: t["total"] for t in json.loads(got.stdout)["tasks"]}
    assert tasks == {"quickstart_auto": 8, "quickstart_manual": 4}


@needs_redis_server
def test_quickstart_ctrl_c_is_quiet(tmp_path: Path) -> None:
    env = child_env(MEEPO_HOME=str(tmp_path / ".meepo"))
    for name in ("MEEPO_DB_URL", "MEEPO_REDIS_URL"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        for line in proc.stdout:  # bounded by the test's timeout
            seen.append(line)
            if "consumers started" in line:
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(seen) + rest
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    assert out.rstrip("\n").splitlines()[-1] == "quickstart: interrupted"


def test_testing_handlers_needs_no_redis_at_all(tmp_path: Path) -> None:
    """The inline example on the embedded default with no redis-server on PATH, as a
    script and as a pytest module (the plugin's fixtures)."""
    empty = tmp_path / "bin"
    empty.mkdir()
    run_example("testing_handlers", tmp_path, PATH=str(empty))
    env = child_env(MEEPO_HOME=str(tmp_path / ".meepo"), PATH=str(empty))
    for name in ("MEEPO_DB_URL", "MEEPO_REDIS_URL"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
         str(EXAMPLES / "testing_handlers.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 passed" in proc.stdout
    assert not (tmp_path / ".meepo" / "redis").exists()


@needs_redis_server
def test_async_handler_on_the_embedded_default(tmp_path: Path) -> None:
    out = run_example("async_handler", tmp_path)
    assert "last_error='JobTimeout: timed out after 1s (job_timeout)'" in out


@needs_redis_server
def test_cron_on_the_embedded_default(tmp_path: Path) -> None:
    out = run_example("cron", tmp_path)
    assert "schedule heartbeat: every '2'" in out


@needs_redis_server
def test_results_and_wait_on_the_embedded_default(tmp_path: Path) -> None:
    out = run_example("results_and_wait", tmp_path)
    assert "result {'words': 4, 'first': 'the'}" in out
    assert 'payload["tags"]: set is not JSON' in out
    assert "result of 5014 bytes exceeds max_result_bytes=1024" in out


@pytest.mark.parametrize("name", sorted(KEY_LINES))
def test_example_on_servers(name: str, db_url: str, redis_url: str, tmp_path: Path) -> None:
    out = run_example(name, tmp_path, MEEPO_DB_URL=db_url, MEEPO_REDIS_URL=redis_url)
    if name == "quickstart":
        assert "(MEEPO_DB_URL)" in out
