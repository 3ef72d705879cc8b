"""Names, URLs, options and records: the pure parts (no server is contacted here)."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from support.helpers import free_port

from meepo import (
    CommitModeError,
    ConfigError,
    Job,
    JobNotFoundError,
    JobRecord,
    LedgerUnavailableError,
    MeepoError,
    PayloadError,
    SchemaError,
    StaleCommitError,
    Status,
    Task,
    TransportUnavailableError,
    UnavailableError,
)
from meepo import config as cfg
from meepo.config import Options, mask_url

# -- mask_url --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("postgresql+psycopg://user:secret@db:5432/x", "postgresql+psycopg://user:***@db:5432/x"),
        ("mysql+pymysql://root:pa%40ss@127.0.0.1/test", "mysql+pymysql://root:***@127.0.0.1/test"),
        ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
        ("rediss://default:tok:en@cache/1", "rediss://default:***@cache/1"),
        ("postgresql://u:@h/db", "postgresql://u:***@h/db"),
        ("mysql+pymysql://root@127.0.0.1/test", "mysql+pymysql://root@127.0.0.1/test"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("sqlite:////tmp/x.sqlite3", "sqlite:////tmp/x.sqlite3"),
        (
            "cannot reach postgresql://a:b@h/d nor redis://:c@h2/0 (timeout)",
            "cannot reach postgresql://a:***@h/d nor redis://:***@h2/0 (timeout)",
        ),
        ("no url here: user:pass@host", "no url here: user:pass@host"),
    ],
)
def test_mask_url(text: str, masked: str) -> None:
    assert mask_url(text) == masked


# -- names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "my_task_0831", "A-z_0.9", "x" * 64, "0", "..."])
def test_check_task_id_accepts(name: str) -> None:
    assert cfg.check_task_id(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "x" * 65, "a b", "a{b}", "a:b", "a/b", "tâche", "a\n", "a;b", "a'b", 5, None, b"abc"],
)
def test_check_task_id_rejects(name: Any) -> None:
    with pytest.raises(ConfigError, match="invalid task id"):
        cfg.check_task_id(name)


@pytest.mark.parametrize("name", ["meepo_jobs", "_private", "Jobs2", "a" * 40])
def test_check_table_name_accepts(name: str) -> None:
    assert cfg.check_table_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "a" * 41, "1jobs", "a-b", "a.b", "jobs; DROP TABLE x", 'jobs"', "jobs ", "é", None],
)
def test_check_table_name_rejects(name: Any) -> None:
    with pytest.raises(ConfigError, match="invalid table name"):
        cfg.check_table_name(name)


@pytest.mark.parametrize("prefix", ["", "meepo:", "app.v1-x:", "a" * 64])
def test_check_prefix_accepts(prefix: str) -> None:
    assert cfg.check_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["a{b", "a}b", "a b", "a" * 65, "a\nb", "*", None])
def test_check_prefix_rejects(prefix: Any) -> None:
    with pytest.raises(ConfigError, match="prefix"):
        cfg.check_prefix(prefix)


# -- durations and counts --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1.0), (0.25, 0.25), (timedelta(minutes=2), 120.0), (timedelta(milliseconds=5), 0.005)],
)
def test_seconds_accepts(value: Any, expected: float) -> None:
    assert cfg.seconds(value, "x") == expected


@pytest.mark.parametrize("value", [0, 0.0, -1, timedelta(0), float("nan"), True, "1", None])
def test_seconds_rejects(value: Any) -> None:
    with pytest.raises(ConfigError, match="period"):
        cfg.seconds(value, "period")


def test_seconds_allow_zero() -> None:
    assert cfg.seconds(0, "grace", allow_zero=True) == 0.0
    with pytest.raises(ConfigError):
        cfg.seconds(-0.1, "grace", allow_zero=True)


@pytest.mark.parametrize("value", [0, -3, True, 1.5, "3", None])
def test_positive_int_rejects(value: Any) -> None:
    with pytest.raises(ConfigError, match="parallel_num"):
        cfg.positive_int(value, "parallel_num")


def test_positive_int_accepts() -> None:
    assert cfg.positive_int(7, "n") == 7


def test_options_defaults_and_heartbeat() -> None:
    opts = Options()
    assert opts.zombie_dst_status is Status.TODO
    assert opts.auto_commit is True
    assert dataclasses.replace(opts, lease=3.0).heartbeat_interval == 1.0


# -- environment defaults --------------------------------------------------------------


def test_env_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(cfg.DB_ENV, raising=False)
    monkeypatch.delenv(cfg.REDIS_ENV, raising=False)
    monkeypatch.setenv(cfg.HOME_ENV, str(tmp_path))
    assert cfg.home_dir() == tmp_path
    assert cfg.default_db_url() == f"sqlite:///{tmp_path / 'meepo.sqlite3'}"
    assert cfg.default_redis_url() is None
    monkeypatch.setenv(cfg.DB_ENV, "postgresql+psycopg://u@h/db")
    monkeypatch.setenv(cfg.REDIS_ENV, "redis://h:1/2")
    assert cfg.default_db_url() == "postgresql+psycopg://u@h/db"
    assert cfg.default_redis_url() == "redis://h:1/2"
    monkeypatch.delenv(cfg.HOME_ENV)
    assert cfg.home_dir() == Path(".meepo").absolute()


# -- Status and records ----------------------------------------------------------------


def test_status_values_and_parsing() -> None:
    assert [s.value for s in Status] == ["todo", "doing", "done", "failed", "cancelled"]
    assert Status.parse("todo") is Status.TODO
    assert Status.parse("DONE") is Status.DONE
    assert Status.parse(Status.FAILED) is Status.FAILED
    assert Status("doing") is Status.DOING
    assert str(Status.DONE) == "done" and f"{Status.TODO}" == "todo"
    assert Status.TODO == "todo"  # type: ignore[comparison-overlap]  # a str enum: compares with the stored strings
    assert [s.terminal for s in Status] == [False, False, True, True, True]
    with pytest.raises(ValueError, match="todo, doing, done, failed, cancelled"):
        Status.parse("finished")
    with pytest.raises(ValueError):
        Status.parse("")


def test_job_and_record_are_frozen_and_hide_payloads() -> None:
    job = Job(id=1, task_id="t", payload=b"secret-payload", failed_times=0, commit_id=1)
    assert "secret-payload" not in repr(job)
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.id = 2  # type: ignore[misc]
    now = datetime.now(timezone.utc)
    rec = JobRecord(
        id=1,
        task_id="t",
        status=Status.TODO,
        payload=b"secret-payload",
        failed_times=0,
        commit_id=0,
        created_at=now,
        updated_at=now,
        run_at=now,
        expires_at=None,
        worker=None,
        last_error=None,
    )
    assert "secret-payload" not in repr(rec)
    assert {f.name for f in dataclasses.fields(JobRecord)} >= {
        "id",
        "task_id",
        "status",
        "payload",
        "failed_times",
        "commit_id",
        "created_at",
        "updated_at",
        "last_error",
    }


def test_error_tree() -> None:
    for err in (
        ConfigError,
        PayloadError,
        JobNotFoundError,
        StaleCommitError,
        CommitModeError,
        SchemaError,
        LedgerUnavailableError,
        TransportUnavailableError,
    ):
        assert issubclass(err, MeepoError)
    assert issubclass(ConfigError, ValueError)
    assert issubclass(PayloadError, ValueError)
    assert issubclass(JobNotFoundError, LookupError)
    assert issubclass(LedgerUnavailableError, UnavailableError)
    assert issubclass(TransportUnavailableError, UnavailableError)
    exc = StaleCommitError(12, 3)
    assert (exc.job_id, exc.commit_id) == (12, 3)
    assert "12" in str(exc) and "stale" in str(exc)


# -- Task options (validated before any I/O: the servers named here do not exist) -------


def dead(**kwargs: Any) -> Task:
    port = free_port()
    kwargs.setdefault("db", f"postgresql+psycopg://meepo:pgsecret@127.0.0.1:{port}/none")
    kwargs.setdefault("redis", f"redis://:redissecret@127.0.0.1:{port}/0")
    return Task(kwargs.pop("task_id", "cfg_task"), **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"parallel_num": 0},
        {"max_failed_times": 0},
        {"zombie_dst_status": "doing"},
        {"zombie_dst_status": "bogus"},
        {"zombie_period": -1},
        {"zombie_timeout": 0},
        {"zombie_limit": 0},
        {"lease": 0},
        {"prefetch": -1},
        {"poll_interval": "fast"},
        {"max_payload_bytes": 0},
        {"job_func": 5},
        {"db": 123},
        {"redis": 123},
        {"db": "not a url"},
        {"db": "nosuchdriver://x/y"},
        {"redis": "http://not-redis/0"},
    ],
)
def test_task_rejects_bad_options(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        dead(**kwargs)


def test_task_accepts_timedeltas_and_derives_defaults() -> None:
    task = dead(zombie_timeout=timedelta(seconds=3), parallel_num=4, zombie_dst_status="FAILED")
    assert task.options.redispatch_timeout == 3.0
    assert task.options.zombie_timeout == 3.0  # the parameter's name reads it too
    assert task.options.lease == 3.0  # the lease defaults to zombie_timeout
    assert task.options.prefetch == 16  # and prefetch to 4 x parallel_num
    assert task.options.zombie_dst_status is Status.FAILED
    assert task.table_name == "meepo_jobs"
    assert task.list_name_prefix == "meepo:"
    own = dead(table_name="my_jobs", lease=1.5)
    assert own.options.lease == 1.5
    assert own.list_name_prefix == "meepo:my_jobs:"  # a table of its own: keys of its own
    assert "{cfg_task}" in own.transport.queue_key  # the hash tag


def test_task_repr_masks_passwords() -> None:
    text = repr(dead())
    assert "pgsecret" not in text and "redissecret" not in text
    assert "cfg_task" in text


def test_producer_task_cannot_start() -> None:
    with pytest.raises(ConfigError, match="job_func"):
        dead().start()
