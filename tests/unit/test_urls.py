"""Database and Redis URLs checked before anything connects: one ConfigError that names
the problem and the fix, and never shows the password."""

from __future__ import annotations

import pytest

from meepo.errors import ConfigError
from meepo.urls import check_db_url, check_redis_url


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://u:p@127.0.0.1:5432/db",
        "postgresql+psycopg://u@[::1]:5432/db",
        "mysql+pymysql://root@127.0.0.1/db",
        "sqlite:///relative.sqlite3",
        "sqlite:////abs/path.sqlite3",
        "postgresql+psycopg://u:p%40ss@h/db",
    ],
)
def test_good_database_urls_pass(url: str) -> None:
    check_db_url(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("oracle://u@h/db", "unknown scheme 'oracle://'; use postgresql+psycopg://"),
        ("127.0.0.1:5432/db", "no scheme://"),
        ("sqlite://", "in-memory SQLite database"),
        ("sqlite:///:memory:", "in-memory SQLite database"),
        ("sqlite:///file::memory:?cache=shared", "in-memory SQLite database"),
        ("postgresql+psycopg://u@h:port/db", "the port of host 'h' in the database URL"),
        ("mysql+pymysql://u@[::1]:x/db", "the port of host '::1'"),
        ("postgresql+nosuch://u@h/db", "unknown driver 'postgresql+nosuch'"),
        ("mysql+mysqldb://u@h/db", "write mysql+pymysql://"),
        ("postgresql+psycopg2://u@h/db", "meepo uses psycopg 3"),
    ],
)
def test_bad_database_urls_name_the_problem(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=_escape(message)):
        check_db_url(url)


@pytest.mark.parametrize(
    "url",
    ["postgresql+psycopg://u:p@ss@h/db", "mysql+pymysql://u:pa/ss@h/db", "redis://:a:b@h/0"],
)
def test_a_password_to_encode_is_named_without_showing_it(url: str) -> None:
    check = check_redis_url if url.startswith("redis") else check_db_url
    with pytest.raises(ConfigError) as info:
        check(url)
    text = str(info.value)
    assert "must be percent-encoded" in text and "password file" in text
    password = url.split("//", 1)[1].rsplit("@", 1)[0].split(":", 1)[1]
    assert password not in text


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://h:6380/1", "unix:///run/redis.sock"]
)
def test_good_redis_urls_pass(url: str) -> None:
    check_redis_url(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h:6379/0", "invalid Redis URL 'http://h:6379/0': unknown scheme 'http://'"),
        ("h:6379", "no scheme://"),
        ("redis://h:63a9/0", "the port of host 'h' in the Redis URL is not a number"),
        ("redis://:s3cret@h/0?x=1x", None),  # a password alone is fine
    ],
)
def test_bad_redis_urls_name_the_problem(url: str, message: str | None) -> None:
    if message is None:
        check_redis_url(url)
        return
    with pytest.raises(ConfigError, match=_escape(message)):
        check_redis_url(url)


def _escape(text: str) -> str:
    import re

    return re.escape(text)
