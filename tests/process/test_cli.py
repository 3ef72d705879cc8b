"""The ``meepo`` command line: in-process through ``main([...])``, the worker as a real
process. Every database test runs on SQLite, MariaDB and PostgreSQL (``db_url``)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import MetaData, Table
from support.backends import TaskFactory, unique_task_id
from support.cli import after_argv_warning, assert_one_error_line, run
from support.helpers import child_env, wait_for

from meepo import JobRecord, Status, Task
from meepo.admin import Admin
from meepo.cli import load_task
from meepo.config import default_prefix
from meepo.connect import engine_for
from meepo.ledger import migrate
from meepo.transport import encode

# -- helpers ----------------------------------------------------------------------------


def queue(task: Task) -> list[bytes]:
    """The messages waiting in a task's Redis queue."""
    return list(task.redis.lrange(task.transport.queue_key, 0, -1))  # type: ignore[arg-type]


def record(task: Task, job_id: int) -> JobRecord:
    rec = task.get(job_id)
    assert rec is not None, job_id
    return rec


# -- bad input: one line, no traceback, exit 2 (usage) or 1 (runtime) ---------------------


@pytest.mark.parametrize(
    "url",
    [
        "mysql+pymysql://root:s3cret@127.0.0.1:1/test",
        "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/test",
    ],
)
def test_unreachable_database_masks_the_password(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    code, _, err = run(capsys, "--db", url, "stats")
    assert code == 1
    line = assert_one_error_line(after_argv_warning(err, "--db"))
    assert "s3cret" not in err
    assert ":***@127.0.0.1:1" in line


def test_runtime_errors_are_one_line_exit_1(
    capsys: pytest.CaptureFixture[str], make_task: TaskFactory, db_url: str, redis_url: str
) -> None:
    task = make_task()
    task.push(b"x")  # so that stats has a task whose queue it must look at
    conn = ["--db", db_url, "--redis", redis_url]
    missing_task = unique_task_id("nosuch")
    cases = [
        (["jobs", "show", "999999999999"], "no job 999999999999"),
        (["jobs", "show", "999999999999", "--task", task.task_id], "no job 999999999999"),
        (["repush", "--id", "999999999999"], "no job 999999999999"),
        (["stats", "--task", missing_task], f"no task {missing_task!r}"),
        (["repush", "--status", "failed", "--task", missing_task], f"no task {missing_task!r}"),
        (["stats", "--table", "never_migrated_zq"], "meepo db upgrade"),
    ]
    for argv, needle in cases:
        code, out, err = run(capsys, *argv, *conn)
        assert code == 1, (argv, err)
        assert out == ""
        assert needle in assert_one_error_line(err), argv
    # a bad task id is a usage error
    code, _, err = run(capsys, "stats", "--task", "bad task!", *conn)
    assert code == 2 and "invalid task id" in assert_one_error_line(err)
    # Redis: unreachable (the ledger's counts still shown, a warning, password masked),
    # or a URL that is not one
    code, out, err = run(
        capsys, "stats", "--db", db_url, "--redis", "redis://:s3cret@127.0.0.1:1/0"
    )
    assert code == 0 and "unavailable" in out
    line = after_argv_warning(err, "--redis").strip()
    assert line.startswith("meepo: warning: queue depths unavailable: ")
    assert "127.0.0.1:1" in line and "s3cret" not in err
    code, _, err = run(capsys, "stats", "--db", db_url, "--redis", "nonsense://u:s3cret@h/0")
    assert code == 2
    line = assert_one_error_line(after_argv_warning(err, "--redis"))
    assert "invalid Redis URL" in line and "s3cret" not in err


# -- worker: loading MODULE:ATTR -----------------------------------------------------------


APP = """
import os
from meepo import Task

def handle(job):
    pass

task = Task(os.environ.get("APP_TASK_ID", "cli_app"), job_func=handle, parallel_num=1,
            db=os.environ.get("APP_DB"), redis=os.environ.get("APP_REDIS"))

def make():
    return task

class holder:
    task = task

producer = Task("cli_app_producer", db=os.environ.get("APP_DB"),
                redis=os.environ.get("APP_REDIS"))
number = 42
"""


@pytest.fixture
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> tuple[str, Path]:
    """A uniquely named app module in a fresh current directory (sys.path restored)."""
    name = f"cliapp_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(APP)
    (tmp_path / f"{name}_broken.py").write_text("raise RuntimeError('broken at import')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    monkeypatch.setenv("APP_DB", f"sqlite:///{tmp_path / 'app.sqlite3'}")
    monkeypatch.setenv("APP_REDIS", redis_url)
    return name, tmp_path


def test_load_task_forms(app_module: tuple[str, Path]) -> None:
    name, tmp_path = app_module
    task = load_task(f"{name}:task")  # found in the current directory
    assert str(tmp_path) in sys.path
    assert load_task(f"{name}:make") is task  # a zero-argument factory
    assert load_task(f"{name}:holder.task") is task  # a dotted attribute


def test_worker_bad_targets(
    capsys: pytest.CaptureFixture[str], app_module: tuple[str, Path]
) -> None:
    name, _ = app_module
    for target, code, needle in [
        (f"{name}:missing", 2, "has no attribute 'missing'"),
        (f"{name}:number", 2, "is a int, not a meepo Task"),
        (f"{name}:producer", 2, "Task without job_func"),
        (f"{name}.sub:task", 2, "no module named"),
    ]:
        got, out, err = run(capsys, "worker", target)
        assert got == code, (target, err)
        assert out == ""
        assert needle in assert_one_error_line(err), target
    # The user's module raised at import: its traceback (the user's code, without
    # importlib's or meepo's frames), then meepo's one line.
    got, out, err = run(capsys, "worker", f"{name}_broken:task")
    assert (got, out) == (1, "")
    head, _, last = err.rstrip("\n").rpartition("\n")
    assert last == (
        f"meepo: error: importing '{name}_broken' failed: RuntimeError: broken at import"
    )
    assert head.startswith("Traceback (most recent call last):\n"), err
    assert f'{name}_broken.py", line 1, in <module>' in head
    assert head.endswith("RuntimeError: broken at import")
    assert "importlib" not in head and "meepo" not in head.replace(name, "")


WORKER_APP = """
import os
from meepo import Task

def handle(job):
    pass

def make():
    return Task(os.environ["APP_TASK_ID"], job_func=handle, parallel_num=1)
"""


def test_worker_runs_pushed_jobs_and_exits_0_on_sigterm(
    tmp_path: Path, make_task: TaskFactory, db_url: str, redis_url: str
) -> None:
    producer = make_task()
    ids = producer.push_many([b"a", b"b", b"c", b"d", b"e"])
    (tmp_path / "worker_app.py").write_text(WORKER_APP)
    env = child_env(MEEPO_DB_URL=db_url, MEEPO_REDIS_URL=redis_url, APP_TASK_ID=producer.task_id)
    proc = subprocess.Popen(
        [sys.executable, "-m", "meepo", "worker", "worker_app:make", "--parallel", "3", "-v"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: (
                proc.poll() is not None
                or all(record(producer, i).status is Status.DONE for i in ids)
            ),
            timeout=60,
            message="the worker to finish the jobs",
        )
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "3 consumer(s) started" in err  # --parallel overrode parallel_num=1
    for i in ids:
        assert f"job {i} claimed" in err
        assert f"job {i} committed done" in err
    assert "SIGTERM received" in err


# -- repush ---------------------------------------------------------------------------------


def test_repush_by_status_dry_run_limit_and_by_id(
    capsys: pytest.CaptureFixture[str], make_task: TaskFactory, db_url: str, redis_url: str
) -> None:
    def fail(job: object) -> None:
        raise RuntimeError("nope")

    task = make_task(job_func=fail, max_failed_times=1, parallel_num=2)
    tid = task.task_id
    ids = task.push_many([b"a", b"b", b"c", b"d"])
    task.start()
    wait_for(
        lambda: all(record(task, i).status is Status.FAILED for i in ids),
        message="every job to fail",
    )
    task.stop()
    assert task.depth() == 0
    conn = ["--db", db_url, "--redis", redis_url]

    code, out, _ = run(capsys, "repush", "--status", "failed", "--task", tid, "--dry-run", *conn)
    assert code == 0
    assert out.splitlines() == [
        *(f"would repush job {i} (task {tid}, failed)" for i in ids),
        "would repush 4 job(s) (dry run: nothing changed)",
    ]
    assert all(record(task, i).status is Status.FAILED for i in ids)
    assert task.depth() == 0

    # --until: only jobs that changed before an hour ago (none)
    code, out, _ = run(capsys, "repush", "--status", "failed", "--task", tid, "--until", "1h",
                       "--dry-run", *conn)  # fmt: skip
    assert code == 0 and out.splitlines() == ["would repush 0 job(s) (dry run: nothing changed)"]

    code, out, _ = run(capsys, "repush", "--status", "failed", "--task", tid, "--since", "1h",
                       "--limit", "2", *conn)  # fmt: skip
    assert code == 0
    assert out.splitlines() == [
        f"repushed job {ids[0]} (task {tid}, was failed)",
        f"repushed job {ids[1]} (task {tid}, was failed)",
        "repushed 2 job(s)",
    ]
    recs = [record(task, i) for i in ids]
    assert [r.status for r in recs] == [Status.TODO, Status.TODO, Status.FAILED, Status.FAILED]
    assert recs[0].failed_times == 0
    assert queue(task) == [encode((r.id, r.commit_id)) for r in recs[:2]]

    # by id alone on the default table: the task is read from the row
    code, out, _ = run(capsys, "repush", "--id", str(ids[3]), *conn)
    assert code == 0
    assert out.splitlines() == [
        f"repushed job {ids[3]} (task {tid}, was failed)",
        "repushed 1 job(s)",
    ]
    rec = record(task, ids[3])
    assert rec.status is Status.TODO
    assert queue(task)[-1] == encode((rec.id, rec.commit_id))
    assert task.depth() == 3


def test_repush_progress_in_chunks(make_task: TaskFactory, db_url: str, redis_url: str) -> None:
    task = make_task()
    ids = task.push_many([b"p"] * 2100)
    admin = Admin(db_url, redis_url)
    calls: list[tuple[int, int | None]] = []

    def progress(done: int, total: int | None) -> None:
        calls.append((done, total))

    dry = admin.repush(ids, task_id=task.task_id, dry_run=True, progress=progress)
    assert dry.count == 2100 and calls == [(1000, 2100), (2000, 2100), (2100, 2100)]
    assert record(task, ids[0]).commit_id == 0

    # todo → todo: paging by id, so the repushed rows are not read again
    calls.clear()
    done = admin.repush(status="todo", task_id=task.task_id, limit=2050, progress=progress)
    assert calls == [(1000, 2050), (2000, 2050), (2050, 2050)]
    assert [j.id for j in done.jobs] == ids[:2050] and not done.skipped
    assert record(task, ids[2049]).commit_id == 1
    assert record(task, ids[2050]).commit_id == 0
    assert task.depth() == 2100 + 2050


# -- stats and jobs show ----------------------------------------------------------------------


def test_stats_lists_every_task(
    capsys: pytest.CaptureFixture[str], make_task: TaskFactory, db_url: str, redis_url: str
) -> None:
    a = make_task(unique_task_id("cli_a"))
    b = make_task(unique_task_id("cli_b"))
    a.push_many([b"1", b"2"])
    a.push(b"urgent", priority="high")
    a.push(b"later", delay=3600)
    b.push(b"3")
    conn = ["--db", db_url, "--redis", redis_url]

    code, out, _ = run(capsys, "stats", "--json", *conn)
    assert code == 0
    data = json.loads(out)
    assert data["table"] == "meepo_jobs"
    tasks = {t["task_id"]: t for t in data["tasks"]}
    for task, n, queues, delayed in (
        (a, 4, {"default": 2, "high": 1}, 1),
        (b, 1, {"default": 1}, 0),
    ):
        row = tasks[task.task_id]
        assert row["counts"] == {"todo": n, "doing": 0, "done": 0, "failed": 0, "cancelled": 0}
        assert row["queue_depth"] == sum(queues.values())
        assert row["queues"] == queues
        assert row["delayed"] == delayed
        assert row["oldest_todo_age"] >= 0

    code, out, _ = run(capsys, "stats", *conn)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "TASK",
        "TODO",
        "DOING",
        "DONE",
        "FAILED",
        "CANCELLED",
        "OLDEST",
        "TODO",
        "QUEUE",
        "DELAYED",
        "QUEUES",
    ]
    mine = {line.split()[0]: line.split() for line in lines[1:]}
    assert mine[a.task_id][1:6] == ["4", "0", "0", "0", "0"]
    assert mine[a.task_id][-4:] == ["3", "1", "default=2", "high=1"]
    assert mine[b.task_id][1:6] == ["1", "0", "0", "0", "0"]
    assert mine[b.task_id][-3:] == ["1", "0", "default=1"]

    code, out, _ = run(capsys, "stats", "--task", a.task_id, *conn)
    assert code == 0 and len(out.splitlines()) == 2 and a.task_id in out


def test_jobs_show(capsys: pytest.CaptureFixture[str], make_task: TaskFactory, db_url: str) -> None:
    task = make_task()
    job_id = task.push(b"hello", priority="low")
    code, out, _ = run(capsys, "jobs", "show", str(job_id), "--db", db_url)
    assert code == 0
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert fields["id:"] == str(job_id)
    assert fields["priority:"] == "low"
    assert fields["task_id:"] == task.task_id
    assert fields["status:"] == "todo"
    assert fields["payload:"] == "'hello' (5 bytes)"

    code, out, _ = run(capsys, "jobs", "show", str(job_id), "--json", "--task", task.task_id,
                       "--db", db_url)  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert data["id"] == job_id and data["status"] == "todo" and data["payload"] == "hello"
    assert data["commit_id"] == 0 and data["failed_times"] == 0 and data["priority"] == "low"

    other = unique_task_id("other")
    code, out, err = run(capsys, "jobs", "show", str(job_id), "--task", other, "--db", db_url)
    assert code == 1 and out == ""
    assert f"no job {job_id} in task {other!r}" in assert_one_error_line(err)


# -- db -------------------------------------------------------------------------------------


def test_db_commands_on_a_custom_table(
    capsys: pytest.CaptureFixture[str], make_task: TaskFactory, db_url: str, redis_url: str
) -> None:
    table = f"cli_{uuid.uuid4().hex[:12]}"
    head = migrate.head()
    conn = ["--db", db_url, "--redis", redis_url]
    try:
        code, out, _ = run(capsys, "db", "current", "--table", table, *conn)
        assert (code, out) == (0, f"table {table}: none (not migrated) (head is {head})\n")

        code, out, _ = run(capsys, "db", "upgrade", "--table", table, *conn)
        assert (code, out) == (0, f"table {table}: upgraded from none to {head}\n")
        code, out, _ = run(capsys, "db", "current", "--table", table, *conn)
        assert (code, out) == (0, f"table {table}: {head} (head)\n")
        code, out, _ = run(capsys, "db", "upgrade", "--table", table, *conn)
        assert (code, out) == (0, f"table {table}: {head} (head): nothing to do\n")

        code, _, err = run(capsys, "db", "upgrade", "--table", table, "--revision", "nope", *conn)
        assert code == 2 and "revision 'nope'" in assert_one_error_line(err)

        # a task of that table: jobs show and repush find it by id, in its own queue
        task = make_task(table_name=table)
        assert task.transport.queue_key == f"{default_prefix(table)}{{{task.task_id}}}:queue"
        assert default_prefix(table) == f"meepo:{table}:"
        job_id = task.push(b"own table")
        code, out, _ = run(capsys, "jobs", "show", str(job_id), "--table", table, *conn)
        assert code == 0 and task.task_id in out
        code, out, _ = run(capsys, "repush", "--id", str(job_id), "--table", table, *conn)
        assert code == 0 and out.endswith("repushed 1 job(s)\n")
        assert record(task, job_id).commit_id == 1
        assert queue(task) == [
            encode((job_id, 0)),
            encode((job_id, 1)),
        ]
        code, out, _ = run(capsys, "stats", "--table", table, "--json", *conn)
        assert code == 0
        assert [t["task_id"] for t in json.loads(out)["tasks"]] == [task.task_id]

        code, out, err = run(capsys, "db", "downgrade", "--table", table, "--revision", "base",
                             *conn)  # fmt: skip
        assert (code, out) == (2, "")  # no terminal to ask on: refused
        assert assert_one_error_line(err) == (
            f"meepo: error: db downgrade to base drops table {table} and every job in it: "
            "add --yes to confirm (no terminal to ask on)"
        )
        code, out, _ = run(capsys, "db", "downgrade", "--table", table, "--revision", "base",
                           "--yes", *conn)  # fmt: skip
        assert (code, out) == (0, f"table {table}: downgraded from {head} to none\n")
        code, out, _ = run(capsys, "db", "current", "--table", table, *conn)
        assert out == f"table {table}: none (not migrated) (head is {head})\n"
    finally:
        engine = engine_for(db_url)
        for name in (table, f"{table}_version"):
            Table(name, MetaData()).drop(engine, checkfirst=True)


def test_python_dash_m_meepo(tmp_path: Path) -> None:
    got = subprocess.run(
        [sys.executable, "-m", "meepo", "repush", "--status", "bogus"],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert got.returncode == 2 and got.stdout == ""
    assert got.stderr.startswith(
        "meepo: error: Invalid value for '--status': unknown status 'bogus'"
    )
    assert len(got.stderr.splitlines()) == 1


def test_meepo_alone_prints_help_and_exits_0(tmp_path: Path) -> None:
    got = subprocess.run(
        [sys.executable, "-m", "meepo"],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert got.returncode == 0 and got.stderr == ""
    assert got.stdout.startswith("Usage: meepo [OPTIONS] [COMMAND]")
    for command in ("worker", "repush", "stats", "jobs", "schedules", "db"):
        assert f"  {command} " in got.stdout


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shell_completion(tmp_path: Path, shell: str) -> None:
    """click's completion: ``_MEEPO_COMPLETE={shell}_source`` prints the script, and a
    completion request lists the commands."""
    got = subprocess.run(
        [sys.executable, "-m", "meepo"],
        cwd=tmp_path, env=child_env(_MEEPO_COMPLETE=f"{shell}_source"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert got.returncode == 0 and "_MEEPO_COMPLETE" in got.stdout
    if shell == "bash":
        got = subprocess.run(
            [sys.executable, "-m", "meepo"],
            cwd=tmp_path,
            env=child_env(_MEEPO_COMPLETE="bash_complete", COMP_WORDS="meepo sch", COMP_CWORD="1"),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert got.returncode == 0 and "plain,schedules" in got.stdout


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_the_console_script_prints_a_completion_script_and_completes_subcommands(
    tmp_path: Path, shell: str
) -> None:
    """``_MEEPO_COMPLETE={shell}_source meepo`` (the installed console script, as
    docs/cli.md says to run it) prints the shell's script; completing ``meepo jobs l``
    and ``meepo jobs list --st`` finds the subcommand and its option, which a worker's
    start-up does not import."""
    script = Path(sys.executable).with_name("meepo")
    if not script.exists():
        pytest.skip("no meepo console script beside this interpreter")
    got = subprocess.run(
        [str(script)], cwd=tmp_path, env=child_env(_MEEPO_COMPLETE=f"{shell}_source"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (got.returncode, got.stderr) == (0, "")
    marker = {"bash": "complete -o nosort -F _meepo_completion meepo",
              "zsh": "compdef _meepo_completion meepo",
              "fish": "complete --no-files --command meepo"}[shell]  # fmt: skip
    assert marker in got.stdout
    for words, cword, want in (
        ("meepo jobs l", "2", "plain,list"),
        ("meepo jobs list --st", "3", "plain,--status"),
    ):
        got = subprocess.run(
            [str(script)], cwd=tmp_path,
            env=child_env(_MEEPO_COMPLETE="bash_complete", COMP_WORDS=words, COMP_CWORD=cword),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert got.returncode == 0 and want in got.stdout.splitlines(), (words, got.stdout)
