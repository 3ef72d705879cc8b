"""Passwords never show: the masking of URLs, the password files, and the argv of a
worker that re-executes itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from sqlalchemy.engine import make_url
from support.helpers import free_port

from meepo.cli import main
from meepo.config import mask_url, with_password
from meepo.errors import ConfigError
from meepo.runtime.recycle import without_secrets

SECRET = "Zq7sekritPw"


def test_mask_url_forms() -> None:
    cases = {
        f"postgresql+psycopg://u:{SECRET}@h/db": "postgresql+psycopg://u:***@h/db",
        f"redis://:{SECRET}@h:6379/0": "redis://:***@h:6379/0",
        f"postgresql://u@h/db?sslmode=require&password={SECRET}&x=1": (
            "postgresql://u@h/db?sslmode=require&password=***&x=1"
        ),
        f"mysql+pymysql://u@h/db?PASSWD={SECRET}": "mysql+pymysql://u@h/db?PASSWD=***",
        f"redis://h/0?Pass={SECRET}": "redis://h/0?Pass=***",
        f"rediss://h/0?pwd={SECRET}#frag": "rediss://h/0?pwd=***#frag",
        f"on 'redis://h/0?password={SECRET}': down": "on 'redis://h/0?password=***': down",
        "sqlite:///x.db?passive=1&bypass=2": "sqlite:///x.db?passive=1&bypass=2",
    }
    for given, shown in cases.items():
        assert mask_url(given) == shown


def test_with_password() -> None:
    url = with_password("redis://h:6379/2?password=old&db=1", "p@ss/w:x")
    assert url == "redis://:p%40ss%2Fw%3Ax@h:6379/2?db=1"

    assert redis.Redis.from_url(url).connection_pool.connection_kwargs["password"] == "p@ss/w:x"
    assert make_url(with_password("postgresql+psycopg://us%40r:old@h/db", "n&w")).password == (
        "n&w"
    )
    with pytest.raises(ConfigError, match="SQLite URL takes no password"):
        with_password("sqlite:///x.db", "pw")


def test_bad_files_and_a_password_on_argv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEEPO_DB_URL", raising=False)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    missing = tmp_path / "missing"
    cases = [
        (["stats", "--db-file", str(missing)], f"--db-file: no such file '{missing}'"),
        (["stats", "--redis-file", str(empty)], f"--redis-file: the file '{empty}' is empty"),
        (["stats", "--db-password-file", str(empty), "--db", "postgresql://u@h/d"], "is empty"),
        (["stats", "--db-password-file", str(tmp_path), "--db", "mysql://h/d"], "a directory"),
        (["stats", "--db", "x", "--db-file", str(empty)], "give --db or --db-file, not both"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("meepo: error: ") and message in err and err.count("\n") == 1
    pw = tmp_path / "pw"
    pw.write_text(SECRET)
    assert main(["stats", "--db-password-file", str(pw)]) == 2
    assert "needs a URL to go with" in capsys.readouterr().err
    monkeypatch.setenv("MEEPO_DB_URL_FILE", str(missing))
    assert main(["stats"]) == 2
    assert "$MEEPO_DB_URL_FILE: no such file" in capsys.readouterr().err
    # A password on the command line: a warning (masked), then the usual error.
    url = f"mysql+pymysql://u:{SECRET}@127.0.0.1:{free_port()}/d?password={SECRET}"
    assert main(["stats", "--db", url]) == 1
    err = capsys.readouterr().err
    assert "meepo: warning: the --db URL holds a password" in err
    assert SECRET not in err


def test_without_secrets() -> None:
    argv = ["-m", "meepo", "--db", "u1", "worker", "--redis=u2", "app:t", "--db-file", "f"]
    assert without_secrets(argv) == ["-m", "meepo", "worker", "app:t", "--db-file", "f"]
    assert without_secrets(["worker", "--", "--db"]) == ["worker", "--", "--db"]
