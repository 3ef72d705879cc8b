"""The start-up warnings about Redis settings that make it lose queue keys,
against throwaway redis-servers configured each way."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from support.helpers import RedisServer, wait_for

from meepo import Task
from meepo.runtime import redis_check

pytestmark = pytest.mark.timeout(120)

TaskFactory = Callable[..., Task]

DURABLE = ("--maxmemory-policy", "noeviction", "--save", "3600 1")


def start_worker(make_task: TaskFactory, server: RedisServer) -> Task:
    task = make_task(redis=server.url, job_func=lambda job: None, poll_interval=0.1)
    task.start()
    wait_for(lambda: task.transport.where in redis_check._checked, message="the Redis check")
    return task


def warnings_about(caplog: pytest.LogCaptureFixture, server: RedisServer) -> list[str]:
    where = f"127.0.0.1:{server.port}"
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and where in r.getMessage()
    ]


def test_eviction_policy_is_warned_about_once(
    make_task: TaskFactory, servers: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="meepo")
    server = servers("--maxmemory-policy", "allkeys-lru", "--appendonly", "yes")
    start_worker(make_task, server)
    start_worker(make_task, server)  # a second task in the process: not said again
    (line,) = warnings_about(caplog, server)
    assert "maxmemory-policy allkeys-lru" in line
    assert "zombie_timeout" in line and "noeviction" in line


def test_no_persistence_is_warned_about(
    make_task: TaskFactory, servers: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = servers("--maxmemory-policy", "noeviction")  # and the helper's --save ""
    start_worker(make_task, server)
    (line,) = warnings_about(caplog, server)
    assert "persists nothing" in line and "re-dispatches them from the ledger" in line


def test_both_are_warned_about(
    make_task: TaskFactory, servers: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = servers("--maxmemory-policy", "volatile-lru")
    start_worker(make_task, server)
    lines = warnings_about(caplog, server)
    assert len(lines) == 2


@pytest.mark.parametrize("durable", [DURABLE, ("--appendonly", "yes")])
def test_durable_noeviction_redis_is_not_warned_about(
    make_task: TaskFactory,
    servers: Callable[..., RedisServer],
    caplog: pytest.LogCaptureFixture,
    durable: tuple[str, ...],
) -> None:
    server = servers(*durable)
    start_worker(make_task, server)
    assert warnings_about(caplog, server) == []


def test_config_disabled_is_skipped_at_debug(
    make_task: TaskFactory, servers: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="meepo")
    server = servers("--maxmemory-policy", "allkeys-lru", "--rename-command", "CONFIG", "")
    task = start_worker(make_task, server)
    assert warnings_about(caplog, server) == []
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("refuses CONFIG GET" in m for m in debug)
    job_id = task.push(b"still works")
    wait_for(lambda: task.get(job_id) is not None and task.get(job_id).status.terminal)  # type: ignore[union-attr]
