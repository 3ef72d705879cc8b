"""Bad input named in one line, through a real ``meepo`` process: URLs (unknown scheme,
in-memory SQLite, a missing database, a missing driver, a port that is not a number, a
password that needs percent-encoding, never shown), ``db downgrade`` to base without
``--yes``, and read-only commands that create no file or directory."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from support import ROOT
from support.backends import SERVERS, backend_url
from support.helpers import child_env

MIGRATIONS = ROOT / "migrations" / "versions"
SECRET_PART = "Zq9"  # in every password below: it must never show


def meepo(cwd: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = child_env(MEEPO_HOME=str(cwd / ".meepo"), **env)
    for name in ("MEEPO_DB_URL", "MEEPO_REDIS_URL"):
        if name not in env:
            environ.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "meepo", *argv],
        cwd=cwd, env=environ, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def error_line(got: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in got.stderr.splitlines() if not ln.startswith("meepo: warning: ")]
    assert len(lines) == 1, got.stderr
    assert "Traceback" not in got.stderr
    return lines[0]


ENCODE = (
    "meepo: error: the password in the {what} URL holds a character that must be "
    "percent-encoded (@ # / ? : are %40 %23 %2F %3F %3A): percent-encode it (python3 -c "
    "\"import urllib.parse; print(urllib.parse.quote(input(), safe=''))\") or give it in a "
    "password file ({flag}-password-file, ${env}), where meepo encodes it"
)
DB_ENCODE = ENCODE.format(what="database", flag="--db", env="MEEPO_DB_PASSWORD_FILE")
REDIS_ENCODE = ENCODE.format(what="Redis", flag="--redis", env="MEEPO_REDIS_PASSWORD_FILE")
MEMORY = (
    "is an in-memory SQLite database: each connection has its own, so meepo's threads, "
    "workers and commands would not share the ledger; use a file: "
    "sqlite:///relative/path.sqlite3 or sqlite:////absolute/path.sqlite3"
)


@pytest.mark.parametrize(
    "option, url, line",
    [
        ("--db", f"nonsense://u:{SECRET_PART}@h/x",
         "meepo: error: invalid database URL 'nonsense://u:***@h/x': unknown scheme "
         "'nonsense://'; use postgresql+psycopg://, mysql+pymysql:// (MariaDB, MySQL), "
         "sqlite:///PATH"),
        ("--db", "sqlite://", f"meepo: error: 'sqlite://' {MEMORY}"),
        ("--db", "sqlite:///:memory:", f"meepo: error: 'sqlite:///:memory:' {MEMORY}"),
        ("--db", "mysql://root@127.0.0.1/x",
         "meepo: error: the driver of mysql:// is not installed: write mysql+pymysql:// "
         "(PyMySQL comes with meepo)"),
        ("--db", "postgresql+asyncpg://u@h/x",
         "meepo: error: the driver of postgresql+asyncpg:// is not installed: meepo uses "
         "psycopg 3: write postgresql+psycopg:// and pip install 'meepo-queue[postgres]'"),
        ("--db", "postgresql+psycopg://u@h:5x32/x",
         "meepo: error: the port of host 'h' in the database URL is not a number: write "
         "HOST:PORT with digits (or leave the port out for the default)"),
        ("--db", f"postgresql+psycopg://u:p@{SECRET_PART}@h/x", DB_ENCODE),
        ("--db", f"mysql+pymysql://u:p#{SECRET_PART}@h/x", DB_ENCODE),
        ("--db", f"mysql+pymysql://u:p/{SECRET_PART}@h/x", DB_ENCODE),
        ("--db", f"mysql+pymysql://u:p:{SECRET_PART}@h/x", DB_ENCODE),
        ("--redis", f"redis://:p#{SECRET_PART}@127.0.0.1:6379/0", REDIS_ENCODE),
        ("--redis", f"redis://:p/{SECRET_PART}@127.0.0.1:6379/0", REDIS_ENCODE),
        ("--redis", "redis://127.0.0.1:port/0",
         "meepo: error: the port of host '127.0.0.1' in the Redis URL is not a number: write "
         "HOST:PORT with digits (or leave the port out for the default)"),
        ("--redis", "http://127.0.0.1:6379/0",
         "meepo: error: invalid Redis URL 'http://127.0.0.1:6379/0': unknown scheme "
         "'http://'; use redis://HOST:PORT/DB, rediss://HOST:PORT/DB (TLS) or "
         "unix:///PATH/redis.sock"),
    ],
)  # fmt: skip
def test_bad_urls_are_named_with_the_fix(
    tmp_path: Path, sqlite_url: str, option: str, url: str, line: str
) -> None:
    argv = ["stats", option, url]
    if option == "--redis":
        argv += ["--db", sqlite_url]
    got = meepo(tmp_path, *argv)
    assert got.returncode == 2 and got.stdout == ""
    assert error_line(got) == line
    assert SECRET_PART not in got.stderr


@pytest.mark.parametrize("backend", SERVERS)
def test_a_missing_database_is_not_a_missing_table(
    tmp_path: Path, sqlite_url: str, backend: str
) -> None:
    name = f"nosuch_{uuid.uuid4().hex[:8]}"
    url = make_url(backend_url(backend, sqlite_url)).set(database=name)
    shown = url.render_as_string(hide_password=True)
    for argv in (["db", "current"], ["stats"], ["db", "upgrade"]):
        got = meepo(tmp_path, *argv, "--db", url.render_as_string(hide_password=False))
        assert got.returncode == 2, got.stderr
        assert error_line(got) == (
            f"meepo: error: database {name!r} does not exist on {shown}: create it "
            f"(CREATE DATABASE {name}) or fix the URL"
        )


def test_downgrade_to_base_wants_yes_without_a_terminal(tmp_path: Path, db_url: str) -> None:
    table = f"dg_{uuid.uuid4().hex[:10]}"
    conn = ["--db", db_url, "--table", table]
    assert meepo(tmp_path, "db", "upgrade", *conn).returncode == 0
    try:
        steps = len(list(MIGRATIONS.glob("0*.py")))  # -N from the head reaches base
        for revision in (["--revision", "base"], ["--revision", f"-{steps}"]):
            got = meepo(tmp_path, "db", "downgrade", *conn, *revision)
            assert got.returncode == 2 and got.stdout == ""
            assert error_line(got) == (
                f"meepo: error: db downgrade to base drops table {table} and every job in "
                "it: add --yes to confirm (no terminal to ask on)"
            )
        got = meepo(tmp_path, "db", "downgrade", *conn)  # one step: no question
        head, below = f"{steps:04d}", f"{steps - 1:04d}"
        assert got.returncode == 0 and f"downgraded from {head} to {below}" in got.stdout
        got = meepo(tmp_path, "db", "downgrade", *conn, "--revision", "base", "--yes")
        assert got.returncode == 0 and got.stdout.endswith("to none\n")
    finally:
        meepo(tmp_path, "db", "downgrade", *conn, "--revision", "base", "--yes")


@pytest.mark.parametrize(
    "argv, out",
    [
        (["stats"], "no jobs in table meepo_jobs: "),
        (["schedules", "list"], "no schedules in table meepo_jobs: "),
        (["db", "current"], "table meepo_jobs: none (not migrated: "),
    ],
)  # fmt: skip
def test_read_only_commands_create_nothing(tmp_path: Path, argv: list[str], out: str) -> None:
    path = tmp_path / ".meepo" / "meepo.sqlite3"
    got = meepo(tmp_path, *argv)
    assert got.returncode == 0 and got.stderr == ""
    assert got.stdout.startswith(f"{out}no ledger database at {path} yet")
    assert list(tmp_path.iterdir()) == []
    got = meepo(tmp_path, *argv, "--db", "sqlite:///sub/dir/x.sqlite3")
    assert got.returncode == 0 and list(tmp_path.iterdir()) == []
    got = meepo(tmp_path, "jobs", "show", "7")
    assert got.returncode == 1
    assert error_line(got).startswith(f"meepo: error: no job 7: no ledger database at {path}")
    assert list(tmp_path.iterdir()) == []
