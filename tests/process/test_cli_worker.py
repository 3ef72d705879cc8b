"""``meepo worker`` as a real process: its start and shutdown lines at the default log
level, ``--log-level``/``-v``, several Tasks in one process (``MODULE:ATTR ...`` and
``MODULE`` alone), and a user's import error shown with its traceback. On SQLite,
MariaDB and PostgreSQL (``db_url``)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.backends import TaskFactory, unique_task_id
from support.helpers import child_env, record, wait_for

from meepo import Job, Status

pytestmark = pytest.mark.timeout(180)

APP = """
import os
from meepo import Task

def handle(job):
    pass

mails = Task(os.environ["MAILS"], job_func=handle, parallel_num=2)
reports = Task(os.environ["REPORTS"], job_func=handle, parallel_num=3)
producer = Task(os.environ["MAILS"] + "_producer")
"""

START = re.compile(
    r"INFO meepo\.worker: meepo \S+ worker (\d+) starting: (tasks?) (.*) on (\S+) and (.+)$"
)
STOP = re.compile(
    r"INFO meepo\.worker: meepo worker (\d+) stopped \(on a signal\): finished (\d+) job\(s\)"
    r"(.*) \((\d+) done, (\d+) failed, (\d+) to retry\), handed (\d+) claimed job\(s\) back "
    r"to the queue$"
)


def start_worker(tmp_path: Path, db_url: str, redis_url: str, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "meepo", "worker", *argv],
        cwd=tmp_path,
        env=child_env(MEEPO_DB_URL=db_url, MEEPO_REDIS_URL=redis_url, **_ids(tmp_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _ids(tmp_path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (tmp_path / "ids").read_text().splitlines())


@pytest.fixture
def app(tmp_path: Path) -> tuple[Path, str, str]:
    mails, reports = unique_task_id("mails"), unique_task_id("reports")
    (tmp_path / "multi_app.py").write_text(APP)
    (tmp_path / "ids").write_text(f"MAILS={mails}\nREPORTS={reports}\n")
    return tmp_path, mails, reports


def stop(proc: subprocess.Popen[str]) -> str:
    try:
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("form", ["attrs", "module"])
def test_one_worker_serves_several_tasks_and_talks_at_the_default_level(
    app: tuple[Path, str, str], make_task: TaskFactory, db_url: str, redis_url: str, form: str
) -> None:
    tmp_path, mails, reports = app
    m, r = make_task(mails), make_task(reports)
    ids_m = m.push_many([b"m"] * 4)
    ids_r = r.push_many([b"r"] * 3)
    targets = ["multi_app:mails", "multi_app:reports"] if form == "attrs" else ["multi_app"]
    proc = start_worker(tmp_path, db_url, redis_url, *targets)
    wait_for(
        lambda: (
            proc.poll() is not None
            or (
                all(record(m, i).status is Status.DONE for i in ids_m)
                and all(record(r, i).status is Status.DONE for i in ids_r)
            )
        ),
        timeout=60,
        message="both tasks' jobs done",
    )
    err = stop(proc)
    lines = err.splitlines()
    starts = [START.search(line) for line in lines if "starting:" in line]
    stops = [STOP.search(line) for line in lines if "stopped (" in line]
    assert len(starts) == 1 and starts[0] is not None, err
    assert len(stops) == 1 and stops[0] is not None, err
    s, e = starts[0], stops[0]
    assert int(s.group(1)) == proc.pid == int(e.group(1))
    assert s.group(2) == "tasks"
    assert s.group(3) == f"{mails} (parallel_num 2), {reports} (parallel_num 3)"
    assert "***" not in s.group(4) and s.group(4).split("://")[0] in db_url
    assert (e.group(2), e.group(4), e.group(5), e.group(6)) == ("7", "7", "0", "0")
    assert e.group(3) == f" [{mails} 4, {reports} 3]"
    assert e.group(7) == "0"
    # default level: no per-job lines
    assert "claimed" not in err.replace("claimed job(s)", "")


def test_log_level_and_v(
    app: tuple[Path, str, str], make_task: TaskFactory, db_url: str, redis_url: str
) -> None:
    tmp_path, mails, _ = app
    m = make_task(mails)
    job = m.push(b"x")
    proc = start_worker(tmp_path, db_url, redis_url, "multi_app:mails", "-v")
    wait_for(lambda: record(m, job).status is Status.DONE, timeout=60, message="job done")
    err = stop(proc)
    assert f"job {job} committed done" in err and "starting:" in err
    proc = start_worker(tmp_path, db_url, redis_url, "multi_app:mails", "--log-level", "error")
    job = m.push(b"y")
    wait_for(lambda: record(m, job).status is Status.DONE, timeout=60, message="job done")
    err = stop(proc)
    assert err == ""


def test_a_module_without_a_consuming_task(app: tuple[Path, str, str], tmp_path: Path) -> None:
    (tmp_path / "only_producers.py").write_text("from meepo import Task\np = Task('p_only')\n")
    got = subprocess.run(
        [sys.executable, "-m", "meepo", "worker", "only_producers"],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert got.returncode == 2 and got.stdout == ""
    assert got.stderr == (
        "meepo: error: module 'only_producers' has no Task with a job_func (1 without "
        "job_func, which can push but not consume): name one as MODULE:ATTR\n"
    )


def test_an_import_error_in_the_users_module_shows_its_traceback(tmp_path: Path) -> None:
    (tmp_path / "user_app.py").write_text("import helper_zq\n\ndef handle(job):\n    pass\n")
    (tmp_path / "helper_zq.py").write_text("def setup():\n    return 1 / 0\n\nsetup()\n")
    got = subprocess.run(
        [sys.executable, "-m", "meepo", "worker", "user_app:task"],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert got.returncode == 1 and got.stdout == ""
    lines = got.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == (
        "meepo: error: importing 'user_app' failed: ZeroDivisionError: division by zero"
    )
    assert lines[-2] == "ZeroDivisionError: division by zero"
    files = [ln.split('"')[1] for ln in lines if ln.startswith('  File "')]
    assert [Path(f).name for f in files] == ["user_app.py", "helper_zq.py", "helper_zq.py"]


HANG_APP = """
import threading
from meepo import Task

def handle(job):
    threading.Event().wait(120)  # outlasts the grace period

task = Task("hang_embedded", job_func=handle, parallel_num=1, init_db=True)
"""


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server to embed")
def test_second_signal_on_the_embedded_default_stops_its_redis_server(tmp_path: Path) -> None:
    """A worker on the embedded default exits at once on a second SIGTERM (os._exit: no
    atexit hook runs) and its redis-server stops all the same."""
    (tmp_path / "hang_app.py").write_text(HANG_APP)
    env = child_env(MEEPO_HOME=str(tmp_path / ".meepo"))
    for name in ("MEEPO_DB_URL", "MEEPO_REDIS_URL"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "meepo", "worker", "hang_app:task", "-v"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        producer_env_home = tmp_path / ".meepo"
        pid_file = producer_env_home / "redis" / "redis.pid"
        wait_for(lambda: pid_file.exists() or proc.poll() is not None, timeout=60,
                 message="the embedded redis-server to start")  # fmt: skip
        assert proc.poll() is None
        server = int(wait_for(lambda: pid_file.read_text().strip(), message="its pid"))
        push = subprocess.run(
            [sys.executable, "-c", "from meepo import Task; Task('hang_embedded').push(b'x')"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert push.returncode == 0, push.stderr
        assert proc.stderr is not None
        seen = ""
        for line in proc.stderr:  # bounded by the test's timeout
            seen += line
            if " claimed" in line:
                break
        proc.send_signal(signal.SIGTERM)
        for line in proc.stderr:
            seen += line
            if "SIGTERM received" in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 1, seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_for(lambda: not Path(f"/proc/{server}").exists(), timeout=30,
             message=f"redis-server {server} to stop")  # fmt: skip


def test_runner_recycles_after_max_jobs_without_touching_the_handler(
    make_task: TaskFactory,
) -> None:
    """The Runner counts handler runs through a middleware it adds for the run (the
    task's own hooks come back after it) and returns "recycle" after max_jobs; the
    handler is never wrapped."""
    from meepo.runtime.runner import Runner

    ran: list[int] = []

    def handle(job: Job) -> None:
        ran.append(job.id)

    task = make_task(job_func=handle, parallel_num=1, prefetch=0)
    hooks_before = task.hooks
    ids = task.push_many([b"a", b"b", b"c", b"d"])
    runner = Runner([task], max_jobs=2)
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run()))
    thread.start()  # not the main thread: no signal handlers
    thread.join(60)
    assert outcome == ["recycle"]
    assert runner.reason == "2 jobs (--max-jobs 2)"
    assert task.job_func is handle and task.hooks is hooks_before
    assert len(ran) == 2 and set(ran) <= set(ids)
    assert sorted(record(task, i).status.value for i in ids) == ["done", "done", "todo", "todo"]


# -- several Tasks, one thread per duty ---------------------------------------------------


class _Counting:
    """A service whose ticks are counted; it raises while ``failing``."""

    def __init__(self, wait: float, failing: bool = False) -> None:
        import logging

        from meepo.runtime.service import Backoff

        self.wait, self.failing, self.ticks, self.failures = wait, failing, 0, 0
        self.backoff = Backoff(first=0.05, cap=0.2)
        self.log = logging.getLogger("test")

    def tick(self) -> float:
        self.ticks += 1
        if self.failing:
            raise RuntimeError("down")
        return self.wait

    def failed(self, exc: Exception) -> None:
        self.failures += 1


def test_a_shared_loop_runs_each_member_on_its_own_schedule_and_isolates_failures() -> None:
    """One pass ticks every due member once (a member with more to do at once, wait 0,
    takes turns with the others); a failing member backs off alone, doubling its wait;
    an inactive member is skipped."""
    from typing import Any, cast

    from meepo.runtime.shared import IDLE, SharedLoop

    busy, slow, failing, idle = _Counting(0.0), _Counting(10.0), _Counting(0.0, True), _Counting(0)
    members: list[tuple[Any, Any]] = [
        (busy, lambda: True), (slow, lambda: True), (failing, lambda: True), (idle, lambda: False),
    ]  # fmt: skip
    loop = SharedLoop("test", cast(Any, members))
    due = [0.0] * 4
    loop.run_once(time.monotonic(), due)  # every active member is due at first
    assert (busy.ticks, slow.ticks, failing.failures, idle.ticks) == (1, 1, 1, 0)
    loop.run_once(time.monotonic(), due)  # only the busy one is due again at once
    assert (busy.ticks, slow.ticks, failing.failures) == (2, 1, 1)
    now = time.monotonic() + 0.06  # the failing one's first backoff (0.05 s) is over
    loop.run_once(now, due)
    assert (busy.ticks, slow.ticks, failing.failures) == (3, 1, 2)
    assert failing.backoff.next == 0.2  # 0.05, then 0.1: doubling, capped at 0.2
    assert due[1] - now > 9.0  # the slow one waits its 10 s
    assert due[3] >= now + IDLE - 0.07  # the inactive one is looked at again later


MANY_APP = """
import os
from meepo import Task

a = Task(os.environ["TASK_A"], job_func=lambda job: None, parallel_num=1)
b = Task(os.environ["TASK_B"], job_func=lambda job: None, parallel_num=1)
"""


def test_tasks_on_the_same_servers_share_one_thread_per_duty(
    make_task: TaskFactory, db_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Two Tasks on one database and Redis run by one Runner: one reaper, promoter,
    scheduler and cleaner thread for both (none of their own), and each duty works for
    each Task: delayed jobs are promoted and run, schedules fire, every reaper and
    cleaner ticks; after the stop no shared thread is left."""
    from meepo.runtime.runner import Runner

    a, b = (
        make_task(unique_task_id("a"), job_func=lambda job: None, parallel_num=1),
        make_task(unique_task_id("b"), job_func=lambda job: None, parallel_num=1),
    )
    runner = Runner([a, b])
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run()))
    thread.start()  # not the main thread: no signal handlers
    try:
        wait_for(lambda: a.consumer is not None and b.consumer is not None, timeout=60,
                 message="both consumers")  # fmt: skip
        delayed = [a.push(b"d", delay=0.3), b.push(b"d", delay=0.3)]
        a.schedule_every("tick", 1, b"s")
        b.schedule_every("tick", 1, b"s")
        wait_for(
            lambda: all(
                record(t, i).status is Status.DONE for t, i in zip((a, b), delayed, strict=True)
            ),
            timeout=60,
            message="both tasks' delayed jobs done",
        )
        wait_for(lambda: a.scheduler.fired > 0 and b.scheduler.fired > 0, timeout=60,
                 message="both tasks' schedules fired")  # fmt: skip
        names = {t.name for t in threading.enumerate()}
        for kind in ("reaper", "promoter", "scheduler", "cleaner"):
            assert f"meepo-shared0-{kind}" in names, names
            assert not any(n.endswith(f"-{kind}") and "shared" not in n for n in names), names
        for task in (a, b):
            assert not task.reaper.running and not task.promoter.running
        loops, shared = runner.shared_loops()
        assert shared == {a, b} and len(loops) == 4
    finally:
        runner.stop()
        thread.join(60)
    assert outcome == ["stopped"]
    assert not any("shared" in t.name for t in threading.enumerate())
    assert [loop.kind for loop in runner.loops] == ["reaper", "promoter", "scheduler", "cleaner"]
    assert all(n > 0 for loop in runner.loops for n in loop.ticks)  # every Task's duty ran


def test_a_multi_task_worker_process_runs_one_thread_per_duty(
    make_task: TaskFactory, db_url: str, redis_url: str, tmp_path: Path
) -> None:
    """``meepo worker app:a app:b`` on one database and Redis: the two Tasks' delayed
    jobs run (one promoter thread serves both), and the process has one reaper,
    promoter, scheduler and cleaner thread in all (`-v` names them at start)."""
    ta, tb = unique_task_id("a"), unique_task_id("b")
    (tmp_path / "many_app.py").write_text(MANY_APP)
    (tmp_path / "ids").write_text(f"TASK_A={ta}\nTASK_B={tb}\n")
    a, b = make_task(ta), make_task(tb)
    proc = start_worker(tmp_path, db_url, redis_url, "many_app:a", "many_app:b", "-v")
    jobs = [a.push(b"x", delay=0.3), b.push(b"y", delay=0.3)]
    wait_for(
        lambda: (
            proc.poll() is not None
            or all(record(t, i).status is Status.DONE for t, i in zip((a, b), jobs, strict=True))
        ),
        timeout=60,
        message="both delayed jobs done",
    )
    err = stop(proc)
    assert "shared reaper, promoter, scheduler and cleaner threads for 2 tasks" in err, err
