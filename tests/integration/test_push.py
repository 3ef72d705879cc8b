"""Producing jobs: ledger first, then Redis.

Every test runs on SQLite, MariaDB and PostgreSQL (the ``db_url`` fixture).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from support.backends import unique_task_id
from support.helpers import free_port, record, wait_for

from meepo import (
    ConfigError,
    Job,
    JobRecord,
    LedgerUnavailableError,
    PayloadError,
    Status,
    Task,
)
from meepo.transport.transport import decode

pytestmark = pytest.mark.timeout(120)

TaskFactory = Callable[..., Task]
DEAD_PASSWORD = "s3cret-pw"


def dead_redis_url() -> str:
    return f"redis://:{DEAD_PASSWORD}@127.0.0.1:{free_port()}/0"


def dead_db_url(db_url: str, tmp_path: Path) -> str:
    """A URL of the same backend that cannot be reached (with a password to mask)."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        return f"sqlite:///{tmp_path}"  # a directory: "unable to open database file"
    return url.set(port=free_port(), password=DEAD_PASSWORD).render_as_string(hide_password=False)


def rows_of(task: Task) -> list[tuple[int, str, int, Status]]:
    return task.ledger.find(task_id=task.task_id)


def queued(task: Task) -> list[tuple[int, int]]:
    raw: list[bytes] = task.redis.lrange(task.transport.queue_key, 0, -1)  # type: ignore[assignment]
    return [p for p in (decode(bytes(m)) for m in raw) if p is not None]


def assert_utc(value: Any) -> None:
    assert value.tzinfo is not None
    assert value.utcoffset() == timedelta(0)


# -- push ------------------------------------------------------------------------------


def test_push_commits_todo_row_then_dispatches(make_task: TaskFactory) -> None:
    task = make_task()
    payload = bytes(range(256)) + b"\x00 tail"
    job_id = task.push(payload)

    rec = task.get(job_id)
    assert isinstance(rec, JobRecord)
    assert rec.id == job_id
    assert rec.task_id == task.task_id
    assert rec.status is Status.TODO
    assert rec.commit_id == 0
    assert rec.failed_times == 0
    assert rec.payload == payload
    assert rec.last_error is None
    for when in (rec.created_at, rec.updated_at, rec.run_at):
        assert_utc(when)
    assert rec.expires_at is None  # no lease: not claimed
    assert rec.dispatch_deadline is not None
    assert_utc(rec.dispatch_deadline)
    assert rec.run_at <= rec.dispatch_deadline
    assert queued(task) == [(job_id, 0)]
    assert task.depth() == 1


def test_row_is_committed_before_the_message_is_visible(make_task: TaskFactory) -> None:
    """A listener that BLPOPs the queue on its own connection and reads the ledger the
    moment the message arrives always finds the committed todo row."""
    task = make_task()
    seen: list[tuple[int, int, JobRecord | None]] = []
    ready = threading.Event()
    n = 5

    def listen() -> None:
        client = task.redis.__class__(connection_pool=task.redis.connection_pool)
        ready.set()
        for _ in range(n):
            got: Any = client.blpop([task.transport.queue_key], timeout=20)
            assert got is not None
            pair = decode(bytes(got[1]))
            assert pair is not None
            seen.append((pair[0], pair[1], task.get(pair[0])))

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    ready.wait(5)
    ids = [task.push(b"p%d" % i) for i in range(n)]
    listener.join(30)
    assert not listener.is_alive()
    assert [s[0] for s in seen] == ids
    for job_id, commit_id, rec in seen:
        assert commit_id == 0
        assert rec is not None, f"message for job {job_id} arrived before its row committed"
        assert rec.status is Status.TODO
        assert rec.commit_id == 0


def test_push_sql_unreachable_raises_masked_and_redis_untouched(
    db_url: str, redis_url: str, tmp_path: Path, make_task: TaskFactory
) -> None:
    bad = dead_db_url(db_url, tmp_path)
    task = make_task(db=bad)
    with pytest.raises(LedgerUnavailableError) as info:
        task.push(b"lost?")
    assert DEAD_PASSWORD not in str(info.value)
    assert info.value.__cause__ is not None  # the driver's error is chained
    with pytest.raises(LedgerUnavailableError):
        task.push_many([b"a", b"b"])
    assert task.redis.exists(task.transport.queue_key, task.transport.epoch_key) == 0
    assert task.depth() == 0
    assert DEAD_PASSWORD not in repr(task)


def test_push_redis_unreachable_is_dispatched_later_by_the_sweep(
    make_task: TaskFactory,
) -> None:
    producer = make_task(redis=dead_redis_url())
    job_id = producer.push(b"survives")
    assert isinstance(job_id, int)
    more = producer.push_many([b"m1", b"m2"])
    assert [r[0] for r in rows_of(producer)] == [job_id, *more]
    assert {r[3] for r in rows_of(producer)} == {Status.TODO}

    runs: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def handler(job: Job) -> None:
        with lock:
            runs.append((job.id, job.payload))

    consumer = make_task(job_func=handler, parallel_num=2, poll_interval=0.1)
    assert consumer.depth() == 0  # nothing reached the live Redis
    consumer.start()
    wait_for(lambda: len(runs) >= 3, message="the sweep to dispatch the jobs")
    wait_for(lambda: all(r[3] is Status.DONE for r in rows_of(consumer)), message="jobs to be done")
    assert sorted(runs) == [(job_id, b"survives"), (more[0], b"m1"), (more[1], b"m2")]
    assert len(rows_of(consumer)) == 3  # never a second row


def test_push_many_returns_ids_in_order(make_task: TaskFactory) -> None:
    task = make_task()
    payloads = [b"job-%03d" % i for i in range(25)]
    ids = task.push_many(payloads)
    assert len(ids) == len(set(ids)) == 25
    assert ids == sorted(ids)
    for job_id, payload in zip(ids, payloads, strict=True):
        rec = task.get(job_id)
        assert rec is not None and rec.payload == payload and rec.status is Status.TODO
    assert len(rows_of(task)) == 25
    assert queued(task) == [(i, 0) for i in ids]
    assert task.push_many([]) == []


def test_push_accepts_bytearray_and_memoryview(make_task: TaskFactory) -> None:
    task = make_task()
    a = task.push(bytearray(b"ba"))
    b = task.push(memoryview(b"mv"))
    assert task.get(a).payload == b"ba"  # type: ignore[union-attr]
    assert task.get(b).payload == b"mv"  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", ["text", 12, None, {"a": 1}])
def test_payload_not_bytes_is_type_error(make_task: TaskFactory, bad: Any) -> None:
    task = make_task()
    with pytest.raises(TypeError, match=type(bad).__name__):
        task.push(bad)
    with pytest.raises(TypeError, match=type(bad).__name__):
        task.push_many([b"ok", bad])
    with pytest.raises(TypeError):
        task.push_many(b"one payload, not a list")
    assert rows_of(task) == []
    assert task.depth() == 0


def test_oversize_payload_writes_nothing(make_task: TaskFactory) -> None:
    task = make_task(max_payload_bytes=16)
    with pytest.raises(PayloadError):
        task.push(b"x" * 17)
    with pytest.raises(PayloadError):
        task.push_many([b"small", b"y" * 17])
    assert rows_of(task) == []
    assert task.depth() == 0
    assert task.redis.exists(task.transport.epoch_key) == 0
    job_id = task.push(b"z" * 16)  # the limit itself is fine
    assert task.get(job_id) is not None


def test_large_payload_round_trips(make_task: TaskFactory) -> None:
    task = make_task()
    payload = bytes(range(256)) * 1024  # 256 KiB, past MySQL's 64 KiB BLOB
    job_id = task.push(payload)
    assert task.get(job_id).payload == payload  # type: ignore[union-attr]


@pytest.mark.parametrize("transactional", [False, True])
def test_push_many_larger_than_a_packet(make_task: TaskFactory, transactional: bool) -> None:
    """20 payloads of 1 MiB (each within max_payload_bytes) are 40 MiB of SQL text on
    MySQL/MariaDB, past the default 16 MiB max_allowed_packet: split, all or nothing."""
    task = make_task()
    payloads = [bytes([i]) * (1024 * 1024) for i in range(20)]
    if transactional:
        with task.engine.begin() as conn:
            ids = task.push_many(payloads, connection=conn)
    else:
        ids = task.push_many(payloads)
    assert len(ids) == 20 and ids == sorted(ids)
    for job_id, payload in zip(ids, payloads, strict=True):
        assert record(task, job_id).payload == payload


def test_push_many_of_many_small_jobs(make_task: TaskFactory) -> None:
    """100,000 payloads of 200 bytes: 40 MiB of text on MySQL/MariaDB."""
    task = make_task()
    payloads = [b"%06d" % i + b"x" * 194 for i in range(100_000)]
    ids = task.push_many(payloads)
    assert len(ids) == 100_000 and ids == sorted(ids)
    for i in (0, 1, 54_321, 99_999):
        assert record(task, ids[i]).payload == payloads[i]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"task_id": "has space"},
        {"task_id": ""},
        {"task_id": "x" * 65},
        {"task_id": "semi;colon"},
        {"task_id": "brace{x}"},
        {"table_name": "jobs; DROP TABLE x"},
        {"table_name": "1starts_with_digit"},
        {"table_name": "a" * 41},
        {"list_name_prefix": "pre{fix}"},
        {"list_name_prefix": "has space"},
    ],
)
def test_invalid_names_fail_before_any_io(
    db_url: str, tmp_path: Path, kwargs: dict[str, Any]
) -> None:
    kwargs = dict(kwargs)
    task_id = kwargs.pop("task_id", "valid_id")
    with pytest.raises(ValueError):
        Task(task_id, db=dead_db_url(db_url, tmp_path), redis=dead_redis_url(), **kwargs)


def test_sixty_four_character_task_id(make_task: TaskFactory) -> None:
    long_id = (unique_task_id("long") + "_" + "x" * 64)[:64]
    task = make_task(long_id)
    job_id = task.push(b"long id")
    rec = task.get(job_id)
    assert rec is not None and rec.task_id == long_id


# -- transactional push ----------------------------------------------------------------


def test_transactional_push_connection_commit(make_task: TaskFactory) -> None:
    runs: list[bytes] = []
    task = make_task(job_func=lambda job: runs.append(job.payload), poll_interval=0.1)
    with task.engine.begin() as conn:
        ids = [task.push(b"tx-1", connection=conn), *task.push_many([b"tx-2"], connection=conn)]
        assert task.depth() == 0  # nothing dispatched before the commit
    for job_id in ids:
        assert task.get(job_id).status is Status.TODO  # type: ignore[union-attr]
    task.start()
    wait_for(
        lambda: all(task.get(i).status is Status.DONE for i in ids),  # type: ignore[union-attr]
        message="connection-pushed jobs to run",
    )
    assert sorted(runs) == [b"tx-1", b"tx-2"]


def test_transactional_push_connection_rollback(make_task: TaskFactory) -> None:
    task = make_task()
    ids: list[int] = []
    with pytest.raises(RuntimeError, match="abort"), task.engine.begin() as conn:
        ids.append(task.push(b"never", connection=conn))
        raise RuntimeError("abort")
    assert task.get(ids[0]) is None
    assert rows_of(task) == []
    task.reaper.run_once(reap=True)
    assert task.depth() == 0


def test_transactional_push_session_commit(make_task: TaskFactory) -> None:
    runs: list[bytes] = []
    task = make_task(job_func=lambda job: runs.append(job.payload))
    with Session(task.engine) as session:
        job_id = task.push(b"orm", connection=session)
        assert task.depth() == 0
        session.commit()
    assert queued(task) == [(job_id, 0)]  # dispatched right after the commit
    task.start()
    wait_for(
        lambda: task.get(job_id).status is Status.DONE,  # type: ignore[union-attr]
        message="session-pushed job to run",
    )
    assert runs == [b"orm"]


def test_transactional_push_session_rollback(make_task: TaskFactory) -> None:
    task = make_task()
    with Session(task.engine) as session:
        job_id = task.push(b"orm-never", connection=session)
        session.rollback()
        # the session is usable again and a later commit sends nothing stale
        session.commit()
    assert task.get(job_id) is None
    assert rows_of(task) == []
    assert task.depth() == 0
    task.reaper.run_once(reap=True)
    assert task.depth() == 0


def test_transactional_push_savepoints(make_task: TaskFactory) -> None:
    """A savepoint rolled back drops only the pushes made inside it; a savepoint released
    sends nothing yet; the outer commit sends every surviving job at once."""
    task = make_task()
    with Session(task.engine) as session:
        outer = task.push(b"outer", connection=session)
        inner = session.begin_nested()
        dropped = task.push(b"rolled back", connection=session)
        inner.rollback()
        kept_sp = session.begin_nested()
        nested = session.begin_nested()
        kept = task.push(b"released", connection=session)
        nested.commit()
        kept_sp.commit()
        assert task.depth() == 0  # not committed yet: nothing sent
        session.commit()
    assert sorted(queued(task)) == sorted([(outer, 0), (kept, 0)])  # sent at the commit
    # (SQLite may give the rolled-back job's id to a later push: compare payloads)
    assert sorted(record(task, r[0]).payload for r in rows_of(task)) == [b"outer", b"released"]
    assert dropped == kept or task.get(dropped) is None


def test_transactional_push_outer_savepoint_rollback_drops_released_inner(
    make_task: TaskFactory,
) -> None:
    task = make_task()
    with Session(task.engine) as session:
        first = task.push(b"first", connection=session)
        outer_sp = session.begin_nested()
        inner_sp = session.begin_nested()
        task.push(b"inner", connection=session)
        inner_sp.commit()
        outer_sp.rollback()  # takes the released inner savepoint with it
        session.commit()
    assert queued(task) == [(first, 0)]
    assert [r[0] for r in rows_of(task)] == [first]


def test_transactional_push_session_closed_without_commit(make_task: TaskFactory) -> None:
    task = make_task()
    session = Session(task.engine)
    job_id = task.push(b"never", connection=session)
    session.close()
    with session.begin():  # the session used again: nothing stale is sent
        pass
    assert task.get(job_id) is None and task.depth() == 0


def test_transactional_push_rejects_other_connection_types(make_task: TaskFactory) -> None:
    task = make_task()
    with pytest.raises(TypeError, match="object"):
        task.push(b"x", connection=object())
    assert rows_of(task) == []


# -- reading ---------------------------------------------------------------------------


def test_get_unknown_and_foreign_ids(make_task: TaskFactory, db_url: str) -> None:
    task = make_task()
    assert task.get(10**15) is None
    other = make_task("other_" + task.task_id[:50])
    foreign = other.push(b"theirs")
    assert task.get(foreign) is None
    assert other.get(foreign) is not None


def test_config_error_is_a_value_error(db_url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Task("ok", db=dead_db_url(db_url, tmp_path), redis=dead_redis_url(), parallel_num=0)
