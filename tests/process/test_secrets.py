"""Passwords in URLs never show: not in reprs, errors or log lines
(userinfo and ``?password=`` alike), not in ``repr(task.engine)``, and not on the argv of
a worker started from files, before or after it recycles."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from support import TESTS
from support.backends import SERVERS, backend_url, unique_task_id
from support.helpers import RedisServer, child_env, free_port, record, wait_for

from meepo import Status, Task
from meepo.cli import main
from meepo.errors import MeepoError

pytestmark = pytest.mark.timeout(180)

SECRET = "Zq7sekritPw"


@pytest.fixture(params=SERVERS)
def db_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    return backend_url(request.param, sqlite_url)


@pytest.fixture
def secret_db(db_url: str) -> str:
    """``db_url`` as a user whose password is SECRET, given as ``?password=``: on MariaDB
    a user made for it (a wrong password fails), on PostgreSQL (trust) the same user."""
    url = make_url(db_url)
    if url.get_backend_name() == "mysql":
        user = f"meepo_secret_{url.database}"
        engine = create_engine(db_url)
        with engine.begin() as conn:
            conn.execute(text(f"CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED BY '{SECRET}'"))
            conn.execute(text(f"GRANT ALL ON `{url.database}`.* TO '{user}'@'%'"))
        engine.dispose()
        url = url.set(username=user)
    return url.update_query_dict({"password": SECRET}).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def secret_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway Redis that requires SECRET; its URL with ``?password=``."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()  # (its readiness check pings without a password)
    client = redis.Redis.from_url(server.url)
    client.config_set("requirepass", SECRET)
    client.close()
    yield f"{server.url}?password={SECRET}"
    server.stop()


def test_task_repr_engine_and_logs_hide_a_query_password(
    secret_db: str, secret_redis: str, caplog: pytest.LogCaptureFixture
) -> None:
    task = Task(unique_task_id("sec"), db=secret_db, redis=secret_redis, job_func=lambda j: None)
    try:
        shown = [repr(task), repr(task.engine), str(task.engine.url), task.ledger.url]
        assert not [s for s in shown if SECRET in s]
        job_id = task.push(b"x")  # the password still reaches the drivers
        with caplog.at_level(logging.INFO, logger="meepo"):
            task.start()
            wait_for(lambda: record(task, job_id).status is Status.DONE, message="job done")
        assert "consumer(s) started" in caplog.text
        assert SECRET not in caplog.text
    finally:
        task.stop(wait=True, grace=5)


def test_database_errors_hide_a_query_password(db_url: str, redis_url: str) -> None:
    url = make_url(db_url).set(port=free_port()).update_query_dict({"password": SECRET})
    task = Task(
        unique_task_id("sec"),
        db=url.render_as_string(hide_password=False),
        redis=redis_url,
        init_db=False,
    )
    assert SECRET not in repr(task) and SECRET not in repr(task.engine)
    with pytest.raises(MeepoError) as info:
        task.push(b"x")
    assert "database error on" in str(info.value)
    assert SECRET not in str(info.value)


# -- the command line -------------------------------------------------------------------


def test_url_and_password_files(
    secret_db: str,
    secret_redis: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db_file = tmp_path / "db.url"
    db_file.write_text(secret_db + "\n")
    redis_file = tmp_path / "redis.url"
    redis_file.write_text(secret_redis)
    assert main(["stats", "--db-file", str(db_file), "--redis-file", str(redis_file)]) == 0
    assert capsys.readouterr().err == ""
    # The password alone in a file, the URL without it (from the environment).
    pw_file = tmp_path / "pw"
    pw_file.write_text(SECRET + "\n")
    bare_db = secret_db.replace(f"password={SECRET}", "").rstrip("?&")
    bare_redis = secret_redis.split("?")[0]
    monkeypatch.setenv("MEEPO_DB_URL", bare_db)
    argv = ["db", "current", "--db-password-file", str(pw_file)]
    assert main([*argv, "--redis", bare_redis, "--redis-password-file", str(pw_file)]) == 0
    out = capsys.readouterr()
    assert "table meepo_jobs" in out.out and out.err == ""
    # ... and both through the environment.
    monkeypatch.delenv("MEEPO_DB_URL")
    monkeypatch.setenv("MEEPO_DB_URL_FILE", str(db_file))
    monkeypatch.setenv("MEEPO_REDIS_URL", bare_redis)
    monkeypatch.setenv("MEEPO_REDIS_PASSWORD_FILE", str(pw_file))
    assert main(["stats"]) == 0
    assert capsys.readouterr().err == ""


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@pytest.mark.parametrize("how", ["files", "argv"])
def test_worker_argv_shows_no_password_and_recycles(
    secret_db: str, secret_redis: str, tmp_path: Path, how: str
) -> None:
    """Started from files, the worker's argv never holds the password; started with it
    on argv (warned), the recycled image's argv no longer does. Both keep consuming."""
    task_id = unique_task_id("secw")
    log = tmp_path / "runs.log"
    log.touch()
    db_file, redis_file = tmp_path / "db.url", tmp_path / "redis.url"
    db_file.write_text(secret_db)
    redis_file.write_text(secret_redis)
    if how == "files":
        conn = ["--db-file", str(db_file), "--redis-file", str(redis_file)]
    else:
        conn = ["--db", secret_db, "--redis", secret_redis]
    stderr = tmp_path / "worker.stderr"
    env = child_env(RECYCLE_LOG=str(log), RECYCLE_TASK=task_id)
    for name in ("MEEPO_DB_URL", "MEEPO_REDIS_URL"):
        env.pop(name, None)
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meepo", "worker", "support.recycle_app:task", *conn, "-v",
             "--parallel", "1", "--max-jobs", "2"],
            cwd=TESTS, env=env, stderr=err, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    producer = Task(task_id, db=secret_db, redis=secret_redis)
    try:
        if how == "files":
            assert SECRET not in _cmdline(proc.pid)
        ids = producer.push_many([b"job %d" % i for i in range(5)])

        def generations() -> set[str]:
            done = all(record(producer, i).status is Status.DONE for i in ids)
            return {line.split()[3] for line in log.read_text().splitlines()} if done else set()

        assert len(wait_for(generations, timeout=90, message="jobs over 3 generations")) == 3
        assert proc.poll() is None
        assert SECRET not in _cmdline(proc.pid)  # the recycled image's argv
        text_err = stderr.read_text()
        assert SECRET not in text_err
        assert ("holds a password" in text_err) == (how == "argv")
    finally:
        text_err = stderr.read_text()
        wait_for(
            lambda: (
                stderr.read_text().count("consumer(s) started")
                == stderr.read_text().count(": recycling after ") + 1
            ),
            timeout=30,
            message="the worker to finish recycling",
        )
        proc.terminate()
        proc.wait(60)
        producer.stop()
    assert os.path.exists(log)
