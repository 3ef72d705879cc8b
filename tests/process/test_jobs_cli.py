"""``meepo jobs list``, ``meepo jobs delete``, ``meepo push`` and ``meepo purge`` through a
real ``python -m meepo`` process: exit status, the exact one-line message, no traceback.
Database cases run on SQLite, MariaDB and PostgreSQL (``db_url``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from support.backends import TaskFactory
from support.helpers import child_env, wait_for

from meepo import Status, Task
from meepo.connect import engine_for
from meepo.ledger.retention import Retention


def meepo(*argv: str, cwd: Path, db: str | None = None, redis: str | None = None,
          stdin: str | None = None) -> tuple[int, str, str]:  # fmt: skip
    env = child_env(MEEPO_HOME=str(cwd / "home"))
    env.pop("MEEPO_DB_URL", None)
    env.pop("MEEPO_REDIS_URL", None)
    if db is not None:
        env["MEEPO_DB_URL"] = db
    if redis is not None:
        env["MEEPO_REDIS_URL"] = redis
    got = subprocess.run(
        [sys.executable, "-m", "meepo", *argv],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120, input=stdin,
    )  # fmt: skip
    assert "Traceback" not in got.stderr, got.stderr
    return got.returncode, got.stdout, got.stderr


def one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("meepo: error: "), err
    return lines[0].removeprefix("meepo: error: ")


def finish(
    task: Task, ids: list[int], status: Status, age: timedelta, error: str | None = None
) -> None:
    t = task.ledger.table
    store = Retention(task.engine, task.table_name)
    when = store.db_now() - age
    with task.engine.begin() as conn:
        conn.execute(
            update(t)
            .where(t.c.id.in_(ids))
            .values(status=status.value, expires_at=None, dispatch_deadline=None,
                    updated_at=when, last_error=error,
                    commit_id=t.c.commit_id + 1)
        )  # fmt: skip


# -- bad input: exit 2, one line, nothing touched -----------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["jobs", "list", "--status", "bogus"],
         "Invalid value for '--status': unknown status 'bogus': expected one of todo, doing, "
         "done, failed, cancelled (see `meepo jobs list --help`)"),
        (["jobs", "list", "--limit", "0"],
         "Invalid value for '--limit': expected a positive integer, not '0' "
         "(see `meepo jobs list --help`)"),
        (["jobs", "list", "--after-id", "x"],
         "Invalid value for '--after-id': invalid job id 'x': expected a positive integer "
         "(see `meepo jobs list --help`)"),
        (["jobs", "list", "--since", "1h", "--until", "2h"], "--since must be before --until"),
        (["jobs", "list", "--task", "bad task"], None),
        (["jobs", "delete"], "give --id or at least one filter (--task, --status, ...)"),
        (["jobs", "delete", "3"], "unexpected argument 3: job ids go after --id"),
        (["push", "t"], "give one of --payload, --payload-file or --json"),
        (["push", "t", "--payload", "a", "--json", "1"],
         "give one of --payload, --payload-file or --json, not --payload and --json"),
        (["push", "t", "--json", "{nope"], None),
        (["push", "t", "--payload", "x", "--unique-for", "5"], "--unique-for goes with --key"),
        (["push", "t", "--payload-file", "/nonexistent/f"],
         "--payload-file /nonexistent/f: No such file or directory"),
        (["purge"], "Missing option '--task' (see `meepo purge --help`)"),
        (["purge", "--task", "t", "--status", "todo"],
         "Invalid value for '--status': only finished jobs are purged: done, failed or "
         "cancelled, not todo (see `meepo purge --help`)"),
        (["purge", "--task", "t", "--older-than", "7 days"],
         "Invalid value for '--older-than': invalid duration '7 days': use seconds, a "
         "timedelta, or a number with a unit s, m, h, d or w (90s, 30m, 12h, 7d, 2w) "
         "(see `meepo purge --help`)"),
        (["purge", "--task", "t", "--older-than", "0"],
         "Invalid value for '--older-than': the duration must be positive, not '0' "
         "(see `meepo purge --help`)"),
    ],
)  # fmt: skip
def test_bad_input(tmp_path: Path, argv: list[str], message: str | None) -> None:
    code, out, err = meepo(*argv, cwd=tmp_path)
    assert (code, out) == (2, ""), err
    line = one_error(err)
    if message is not None:
        assert line == message
    assert not (tmp_path / "home").exists()  # nothing created


def test_read_only_commands_create_nothing(tmp_path: Path) -> None:
    for argv in (["jobs", "list"], ["jobs", "delete", "--task", "t", "--dry-run"],
                 ["purge", "--task", "t", "--older-than", "1d", "--dry-run"],
                 ["jobs", "delete", "--id", "1", "--yes"]):  # fmt: skip
        code, out, err = meepo(*argv, cwd=tmp_path)
        assert (code, out) == (1, ""), err
        path = tmp_path / "home" / "meepo.sqlite3"
        assert one_error(err) == (
            f"no ledger database at {path}: nothing to read (a worker or `meepo db upgrade` "
            "creates it)"
        )
        assert list(tmp_path.iterdir()) == []
    # stats reads a ledger that is not there yet as an empty one (an overview, not a query)
    code, out, err = meepo("stats", cwd=tmp_path)
    assert code == 0, err
    assert out == (
        f"no jobs in table meepo_jobs: no ledger database at {path} yet (`meepo db upgrade` "
        "or a first push creates it)\n"
    )
    assert list(tmp_path.iterdir()) == []


# -- on every backend ---------------------------------------------------------------------


def test_push_then_list_pages_by_id(
    tmp_path: Path, make_task: TaskFactory, db_url: str, redis_url: str
) -> None:
    task = make_task()
    tid = task.task_id
    code, out, err = meepo("push", tid, "--json", '{"to": "a@b",  "n": [1, 2]}', cwd=tmp_path,
                           db=db_url, redis=redis_url)  # fmt: skip
    assert code == 0, err
    first = int(out.removeprefix("pushed job ").split()[0])
    assert out == f"pushed job {first} to task {tid}\n"
    rec = task.get(first)
    assert rec is not None and rec.payload == b'{"to":"a@b","n":[1,2]}'
    (tmp_path / "p.bin").write_bytes(b"\x00\xffraw")
    ids = [first]
    for argv in (["--payload", "text"], ["--payload-file", str(tmp_path / "p.bin")],
                 ["--payload", "later", "--delay", "3600"],
                 ["--payload", "low", "--priority", "low"]):  # fmt: skip
        code, out, err = meepo("push", tid, *argv, cwd=tmp_path, db=db_url, redis=redis_url)
        assert code == 0, err
        ids.append(int(out.split()[2]))
    assert task.get(ids[2]).payload == b"\x00\xffraw"  # type: ignore[union-attr]
    assert task.get(ids[4]).priority == "low"  # type: ignore[union-attr]
    assert task.get(ids[3]).run_at > task.get(ids[1]).run_at + timedelta(minutes=59)  # type: ignore[union-attr]

    finish(task, [ids[1]], Status.FAILED, timedelta(hours=1), error="ValueError: Bad Address")
    code, out, err = meepo("jobs", "list", "--task", tid, "--limit", "2", cwd=tmp_path, db=db_url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID",
        "TASK",
        "STATUS",
        "PRIORITY",
        "FAILED",
        "UPDATED",
        "LAST",
        "ERROR",
    ]
    assert [int(line.split()[0]) for line in lines[1:]] == ids[:2]
    assert err == f"meepo: more jobs may follow: --after-id {ids[1]}\n"
    code, out, err = meepo("jobs", "list", "--task", tid, "--after-id", str(ids[1]), "--json",
                           cwd=tmp_path, db=db_url)  # fmt: skip
    data = json.loads(out)
    assert [j["id"] for j in data["jobs"]] == ids[2:] and data["next_after_id"] is None
    code, out, _ = meepo("jobs", "list", "--task", tid, "--error-contains", "bad addr", "--json",
                         cwd=tmp_path, db=db_url)  # fmt: skip
    got = json.loads(out)["jobs"]
    assert [(j["id"], j["status"], j["last_error"]) for j in got] == [
        (ids[1], "failed", "ValueError: Bad Address")
    ]
    code, out, _ = meepo("jobs", "list", "--task", tid, "--status", "todo", "--priority", "low",
                         cwd=tmp_path, db=db_url)  # fmt: skip
    assert [int(line.split()[0]) for line in out.splitlines()[1:]] == [ids[4]]
    code, out, _ = meepo("jobs", "list", "--task", tid, "--status", "done", cwd=tmp_path, db=db_url)
    assert (code, out) == (0, "no jobs match\n")


def test_push_with_a_held_key(
    tmp_path: Path, make_task: TaskFactory, db_url: str, redis_url: str
) -> None:
    task = make_task()
    argv = ("push", task.task_id, "--payload", "r", "--key", "daily")
    code, out, _ = meepo(*argv, cwd=tmp_path, db=db_url, redis=redis_url)
    job_id = int(out.split()[2])
    code, out, err = meepo(*argv, cwd=tmp_path, db=db_url, redis=redis_url)
    assert (code, err) == (0, "")
    assert out == f"job {job_id} of task {task.task_id} holds key 'daily': nothing pushed\n"
    code, out, _ = meepo("jobs", "list", "--key", "daily", "--task", task.task_id, "--json",
                         cwd=tmp_path, db=db_url)  # fmt: skip
    assert [j["id"] for j in json.loads(out)["jobs"]] == [job_id]


def test_delete_by_id_and_by_filter(tmp_path: Path, make_task: TaskFactory, db_url: str) -> None:
    task = make_task()
    ids = [task.push(b"%d" % i) for i in range(5)]
    finish(task, ids[:3], Status.FAILED, timedelta(hours=1))
    code, out, err = meepo("jobs", "delete", "--id", str(ids[0]), "999999999", cwd=tmp_path,
                           db=db_url)  # fmt: skip
    assert code == 1 and out == ""
    assert one_error(err) == (
        "no job 999999999 matching in table 'meepo_jobs'; nothing was deleted"
    )
    code, out, err = meepo("jobs", "delete", "--id", str(ids[0]), cwd=tmp_path, db=db_url)
    assert (code, out) == (2, "")
    assert (
        one_error(err)
        == "refusing to delete 1 job(s) from table meepo_jobs without --yes (no terminal to ask)"
    )
    assert task.get(ids[0]) is not None
    code, out, err = meepo("jobs", "delete", "--task", task.task_id, "--status", "failed",
                           "--dry-run", cwd=tmp_path, db=db_url)  # fmt: skip
    assert code == 0, err
    assert out.splitlines()[-1] == "would delete 3 job(s) (dry run: nothing changed)"
    code, out, err = meepo("jobs", "delete", "--id", str(ids[0]), str(ids[3]), "--yes",
                           cwd=tmp_path, db=db_url)  # fmt: skip
    assert (code, err) == (0, "")
    assert out == (
        f"deleted job {ids[0]} (task {task.task_id}, failed)\n"
        f"deleted job {ids[3]} (task {task.task_id}, todo)\n"
        "deleted 2 job(s)\n"
    )
    code, out, err = meepo("jobs", "delete", "--task", task.task_id, "--status", "failed", "-y",
                           cwd=tmp_path, db=db_url)  # fmt: skip
    assert code == 0 and out.splitlines()[-1] == "deleted 2 job(s)"
    assert [task.get(i) is None for i in ids] == [True, True, True, True, False]


def test_a_running_job_is_refused_unless_forced(
    tmp_path: Path, make_task: TaskFactory, db_url: str
) -> None:
    task = make_task()
    job_id = task.push(b"x")
    claimed = task.ledger.claim(task.task_id, [(job_id, 0)], worker="w", lease=timedelta(minutes=1))
    assert claimed
    code, out, err = meepo("jobs", "delete", "--id", str(job_id), "--yes", cwd=tmp_path, db=db_url)
    assert (code, out) == (2, "")
    assert one_error(err) == (
        f"1 job(s) are running (doing): {job_id}; nothing was deleted (--force deletes them "
        "and fences their workers)"
    )
    code, out, err = meepo("jobs", "delete", "--id", str(job_id), "--yes", "--force",
                           cwd=tmp_path, db=db_url)  # fmt: skip
    assert code == 0, err
    assert task.get(job_id) is None


def test_purge_dry_run_then_archive(tmp_path: Path, make_task: TaskFactory, db_url: str) -> None:
    task = make_task()
    old = [task.push(b"%d" % i) for i in range(6)]
    new = [task.push(b"n%d" % i) for i in range(2)]
    finish(task, old[:4], Status.DONE, timedelta(days=8))
    finish(task, old[4:], Status.FAILED, timedelta(days=8))
    finish(task, new, Status.DONE, timedelta(hours=1))
    base = ("purge", "--task", task.task_id)
    code, out, err = meepo(*base, "--status", "done", "--older-than", "7d", "--dry-run",
                           cwd=tmp_path, db=db_url)  # fmt: skip
    assert (code, err) == (0, "")
    assert out == (
        f"would purge 4 done job(s) of task {task.task_id} older than 7d\n"
        "would purge 4 job(s) (dry run: nothing changed)\n"
    )
    code, out, err = meepo(*base, cwd=tmp_path, db=db_url)
    assert (code, out) == (2, "")
    assert one_error(err) == f"give --older-than: task {task.task_id!r} has no stored retention"
    code, out, err = meepo(*base, "--status", "done", "--older-than", "7d", "--archive",
                           cwd=tmp_path, db=db_url)  # fmt: skip
    assert (code, err) == (0, "")
    assert (
        out
        == f"archived into meepo_jobs_archive 4 done job(s) of task {task.task_id} older than 7d\n"
    )
    store = Retention(engine_for(db_url), "meepo_jobs")
    a = store.archive
    with store.engine.begin() as conn:
        archived = conn.execute(select(a.c.id).where(a.c.task_id == task.task_id)).scalars()
        assert sorted(int(i) for i in archived) == old[:4]
    # The stored retention applies without --older-than.
    store.save_policy(task.task_id, {Status.FAILED: 86400.0})
    code, out, err = meepo(*base, cwd=tmp_path, db=db_url)
    assert (code, err) == (0, "")
    assert out == f"purged 2 failed job(s) of task {task.task_id} older than 1d\n"
    t = store.jobs
    with store.engine.begin() as conn:
        left = conn.execute(select(func.count()).where(t.c.task_id == task.task_id)).scalar()
    assert left == 2


# -- stats --------------------------------------------------------------------------------


def test_stats_without_redis_shows_the_ledger_counts(
    tmp_path: Path, make_task: TaskFactory, db_url: str
) -> None:
    from support.helpers import free_port

    task = make_task()
    ids = [task.push(b"x") for _ in range(3)]
    finish(task, ids[:1], Status.DONE, timedelta(minutes=1))
    down = f"redis://127.0.0.1:{free_port()}/0"
    code, out, err = meepo("stats", "--task", task.task_id, cwd=tmp_path, db=db_url, redis=down)
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split()[:5] == ["TASK", "TODO", "DOING", "DONE", "FAILED"]
    cols = row.split()
    assert cols == [task.task_id, "2", "0", "1", "0", "0", cols[6], *["unavailable"] * 3]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meepo: warning: queue depths unavailable: ")
    code, out, err = meepo("stats", "--task", task.task_id, "--json", cwd=tmp_path, db=db_url,
                           redis=down)  # fmt: skip
    data = json.loads(out)
    assert data["redis"].startswith("unavailable: ")
    [summary] = data["tasks"]
    assert summary["counts"] == {"todo": 2, "doing": 0, "done": 1, "failed": 0, "cancelled": 0}
    assert summary["queue_depth"] is None


def test_stats_watch_redraws_until_ctrl_c(
    tmp_path: Path, make_task: TaskFactory, db_url: str, redis_url: str
) -> None:
    import signal
    import time

    task = make_task()
    task.push(b"x")
    env = child_env(MEEPO_DB_URL=db_url, MEEPO_REDIS_URL=redis_url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "meepo", "stats", "--task", task.task_id, "--watch",
         "--interval", "0.2"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        frames = 0
        deadline = time.monotonic() + 60
        while frames < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "stats --watch ended early"
            frames += line.startswith("every 0.2s, ")
        assert frames == 2
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and err == ""


OWNER = """
import sys
from meepo import Task

Task("embedded_stats", init_db=True).push(b"x")
print("pushed", flush=True)
sys.stdin.readline()  # the embedded redis-server lives as long as this process
"""


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server to embed")
def test_stats_on_the_embedded_default_reads_a_running_server_and_never_starts_one(
    tmp_path: Path,
) -> None:
    """On the embedded default (SQLite ledger, embedded Redis), ``meepo stats`` reads the
    queue of a server a running process started; once that process has gone (and its
    server with it), it shows the ledger's counts with the queue depths unavailable,
    and starts no redis-server and writes nothing to do it."""
    from meepo.transport.embedded import running_embedded_url

    env = child_env(MEEPO_HOME=str(tmp_path / "home"))
    env.pop("MEEPO_DB_URL", None)
    env.pop("MEEPO_REDIS_URL", None)
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER], cwd=tmp_path, env=env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert owner.stdout is not None and owner.stdout.readline() == "pushed\n"
        code, out, err = meepo("stats", "--task", "embedded_stats", cwd=tmp_path)
        assert (code, err) == (0, "")
        _header, row = out.splitlines()
        # TASK, the five statuses, OLDEST, then QUEUE and DELAYED: read from the server
        assert row.split()[:6] == ["embedded_stats", "1", "0", "0", "0", "0"]
        assert row.split()[7:9] == ["1", "0"]
    finally:
        owner.communicate("\n", timeout=60)
    assert owner.returncode == 0
    redis_dir = tmp_path / "home" / "redis"
    wait_for(lambda: running_embedded_url(redis_dir) is None, timeout=30,
             message="the owner's redis-server to stop")  # fmt: skip
    before = sorted((p.name, p.stat().st_mtime_ns) for p in redis_dir.iterdir())
    code, out, err = meepo("stats", "--task", "embedded_stats", cwd=tmp_path)
    assert code == 0, err
    _header, row = out.splitlines()
    assert row.split()[:6] == ["embedded_stats", "1", "0", "0", "0", "0"]
    assert row.split()[7:] == ["unavailable"] * 3
    assert err == (
        "meepo: warning: queue depths unavailable: no embedded Redis server is running "
        "(meepo stats does not start one; a worker does, or set MEEPO_REDIS_URL / --redis)\n"
    )
    code, out, err = meepo("stats", "--json", cwd=tmp_path)
    assert code == 0 and json.loads(out)["redis"].startswith("unavailable: no embedded Redis")
    assert running_embedded_url(redis_dir) is None
    assert sorted((p.name, p.stat().st_mtime_ns) for p in redis_dir.iterdir()) == before
