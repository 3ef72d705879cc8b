"""A worker started while Redis is down consumes once Redis starts, against a
throwaway redis-server started late; on every database."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from support.helpers import RedisServer, Runs, messages, record, wait_for

from meepo import Status, Task

pytestmark = pytest.mark.timeout(180)

TaskFactory = Callable[..., Task]


def test_worker_started_with_redis_down_consumes_once_it_starts(
    make_task: TaskFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="meepo")
    server = RedisServer(tmp_path / "redis")  # not started yet
    try:
        runs = Runs()
        worker = make_task(redis=server.url, job_func=runs, poll_interval=0.2)
        worker.start()  # does not raise
        producer = make_task(redis=server.url)
        ids = producer.push_many([b"a", b"b"])  # committed; not dispatched
        wait_for(lambda: messages(caplog, "cannot pop"), message="the fetcher's retry line")
        server.start()
        wait_for(lambda: all(record(producer, i).status is Status.DONE for i in ids), timeout=30)
        later = producer.push(b"later")
        wait_for(lambda: record(producer, later).status is Status.DONE)
    finally:
        server.stop()
