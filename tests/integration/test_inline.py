"""The inline test mode (meepo.testing, the pytest plugin) and a prompt stop().

Inline tasks are pointed at a closed Redis port: nothing they do may need Redis. Every
ledger test runs on SQLite, MariaDB and PostgreSQL."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session
from support.backends import unique_task_id
from support.helpers import Clock, child_env, wait_for

import meepo.testing
from meepo import ConfigError, Job, Middleware, Status, Task
from meepo.ledger import Outcome
from meepo.runtime import fetcher as fetcher_mod
from meepo.transport.local import LocalTransport

pytest_plugins = ["pytester"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def dead_redis() -> str:
    """A Redis URL nothing listens on."""
    return f"redis://127.0.0.1:{closed_port()}/0"


@pytest.fixture
def inline_task(db_url: str, dead_redis: str) -> Iterator[Any]:
    made: list[Task] = []

    def make(job_func: Any = None, **kwargs: Any) -> Task:
        kwargs.setdefault("db", db_url)
        kwargs.setdefault("redis", dead_redis)
        task = Task(unique_task_id("inl"), job_func=job_func, inline=True, **kwargs)
        made.append(task)
        return task

    yield make
    for t in made:
        t.stop()


def rec(task: Task, job_id: int) -> Any:
    got = task.get(job_id)
    assert got is not None
    return got


# -- push runs the handler ---------------------------------------------------------------


def test_inline_push_runs_the_handler_before_it_returns(inline_task: Any) -> None:
    seen: list[tuple[int, bytes, str]] = []
    task = inline_task(
        lambda job: seen.append((job.id, job.payload, threading.current_thread().name))
    )
    job_id = task.push(b"hello")
    assert seen == [(job_id, b"hello", threading.current_thread().name)]
    r = rec(task, job_id)
    assert (r.status, r.failed_times, r.last_error) == (Status.DONE, 0, None)
    assert r.started_at is not None  # the commit recorded the run's start, as a worker's does
    assert task.inline and isinstance(task.transport, LocalTransport)
    assert set(task.depths().values()) == {0}


def test_wait_and_stored_results_work_inline(inline_task: Any) -> None:
    """The in-process transport carries the finish notices too: ``wait`` returns the
    job's record with its stored result, and a waiter in another thread is woken by the
    commit of a job pushed after it began waiting."""
    task = inline_task(lambda job: job.payload.upper(), store_results=True)
    job_id = task.push(b"hello")
    done = task.wait(job_id, timeout=5)
    assert (done.status, done.result) == (Status.DONE, b"HELLO")
    later = task.push(b"x", delay=3600)  # stays todo until run_due
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(task.wait(later, timeout=30)))
    waiter.start()
    wait_for(lambda: bool(task.transport.notices._watches), message="the waiter's watch")
    task.repush(later)  # due now: runs inline, and its commit wakes the waiter
    waiter.join(30)
    assert [r.status for r in got] == [Status.DONE]


def test_an_async_handler_runs_inline_even_from_a_running_loop(inline_task: Any) -> None:
    """An ``async def`` handler runs to its end before push returns, from plain code
    and from inside a coroutine (an async test); its failures are retried as any."""
    import asyncio

    runs: list[bytes] = []

    async def handler(job: Job) -> bytes:
        await asyncio.sleep(0)
        runs.append(job.payload)
        if job.payload == b"bad" and job.failed_times == 0:
            raise ValueError("first attempt")
        return job.payload * 2

    task = inline_task(handler, store_results=True, max_failed_times=2)
    plain = task.push(b"a")

    async def from_a_loop() -> int:
        return int(task.push(b"bad"))

    retried = asyncio.run(from_a_loop())
    assert runs == [b"a", b"bad", b"bad"]
    assert (rec(task, plain).status, task.wait(plain).result) == (Status.DONE, b"aa")
    r = rec(task, retried)
    assert (r.status, r.failed_times) == (Status.DONE, 1)


def test_a_failing_handler_is_retried_at_once_until_max_failed_times(inline_task: Any) -> None:
    runs: list[int] = []

    def handler(job: Job) -> None:
        runs.append(job.failed_times)
        raise ValueError(f"bad payload {job.payload!r}")

    # A backoff of an hour is not waited for: retries are due at once inline.
    task = inline_task(handler, max_failed_times=3, retry_backoff=lambda n: 3600.0)
    job_id = task.push(b"x")  # not raised: the job fails as in production
    assert runs == [0, 1, 2]
    r = rec(task, job_id)
    assert (r.status, r.failed_times) == (Status.FAILED, 3)
    assert r.last_error == "ValueError: bad payload b'x'"


def test_a_job_that_fails_once_is_done_after_its_retry(inline_task: Any) -> None:
    def handler(job: Job) -> None:
        if job.failed_times == 0:
            raise RuntimeError("flaky")

    task = inline_task(handler)
    r = rec(task, task.push(b"x"))
    assert (r.status, r.failed_times, r.last_error) == (Status.DONE, 1, "RuntimeError: flaky")


def test_raise_errors_raises_the_handler_exception_once_the_job_failed(
    db_url: str, dead_redis: str
) -> None:
    def handler(job: Job) -> None:
        if job.payload == b"flaky" and job.failed_times == 0:
            raise RuntimeError("once")
        if job.payload == b"bad":
            raise KeyError("missing")

    task = Task(unique_task_id("inl"), db=db_url, redis=dead_redis, job_func=handler)
    with meepo.testing.inline(task, raise_errors=True):
        assert rec(task, task.push(b"flaky")).status is Status.DONE  # retried: not raised
        with pytest.raises(KeyError, match="missing") as info:
            task.push(b"bad")
        assert info.traceback[-1].name == "handler"  # the handler's own traceback
        bad = task.ledger.find(task_id=task.task_id, status=Status.FAILED)
        assert len(bad) == 1  # committed failed before it was raised


def test_push_many_and_a_batch_run_every_job(inline_task: Any) -> None:
    seen: list[bytes] = []
    task = inline_task(lambda job: seen.append(job.payload))
    ids = task.push_many([b"a", b"b", b"c"])
    with task.batch() as b:
        b.push(b"d")
        b.push(b"e")
    assert seen == [b"a", b"b", b"c", b"d", b"e"]
    assert {rec(task, i).status for i in [*ids, *b.ids]} == {Status.DONE}


def test_a_push_from_a_handler_runs_after_the_current_job(inline_task: Any) -> None:
    order: list[str] = []

    def handler(job: Job) -> None:
        order.append(f"start {job.payload.decode()}")
        if job.payload == b"parent":
            child = task.push(b"child")
            order.append(f"pushed {child}: {rec(task, child).status.value}")
        order.append(f"end {job.payload.decode()}")

    task = inline_task(handler)
    parent = task.push(b"parent")
    child = parent + 1
    assert order == [
        "start parent",
        f"pushed {child}: todo",
        "end parent",
        *["start child", "end child"],
    ]
    assert rec(task, parent + 1).status is Status.DONE


def test_a_transactional_push_runs_when_the_session_commits(inline_task: Any, db_url: str) -> None:
    seen: list[bytes] = []
    task = inline_task(lambda job: seen.append(job.payload))
    with Session(task.engine) as session:
        job_id = task.push(b"in tx", connection=session)
        assert seen == []
        session.commit()
    assert seen == [b"in tx"]
    assert rec(task, job_id).status is Status.DONE


# -- manual commit ---------------------------------------------------------------------


def test_manual_commit_works_inline(inline_task: Any) -> None:
    def handler(job: Job) -> None:
        if job.payload == b"ok":
            task.commit(job.id, Status.DONE)
        elif job.payload == b"no":
            task.commit(job.id, Status.FAILED, error="refused by hand")
        elif job.failed_times == 0:
            task.commit(job.id, "todo")  # run it again, now
        else:
            task.commit(job.id, Status.DONE, commit_id=job.commit_id)

    task = inline_task(handler, auto_commit=False)
    ok, no, again = task.push(b"ok"), task.push(b"no"), task.push(b"again")
    assert rec(task, ok).status is Status.DONE
    r = rec(task, no)
    assert (r.status, r.last_error) == (Status.FAILED, "refused by hand")
    r = rec(task, again)
    assert (r.status, r.failed_times) == (Status.DONE, 1)


def test_a_delayed_manual_retry_waits_for_run_due(inline_task: Any) -> None:
    clock = Clock()
    runs: list[int] = []

    def handler(job: Job) -> None:
        runs.append(job.failed_times)
        task.commit(job.id, Status.TODO if job.failed_times == 0 else Status.DONE, delay=60)

    task = inline_task(handler, auto_commit=False, clock=clock)
    job_id = task.push(b"x")
    assert (runs, rec(task, job_id).status) == ([0], Status.TODO)
    assert meepo.testing.run_due(task) == []
    clock.advance(61)
    assert meepo.testing.run_due(task) == [job_id]
    assert (runs, rec(task, job_id).status) == ([0, 1], Status.DONE)


# -- delayed jobs ------------------------------------------------------------------------


def test_a_delayed_push_stays_todo_until_run_due_finds_it_due(inline_task: Any) -> None:
    clock = Clock()
    seen: list[bytes] = []
    task = inline_task(lambda job: seen.append(job.payload), clock=clock)
    later = task.push(b"later", delay=30)
    now = task.push(b"now")
    assert seen == [b"now"]
    assert rec(task, later).status is Status.TODO
    assert task.depths()["delayed"] == 1
    assert meepo.testing.run_due(task) == []  # not due yet
    clock.advance(31)
    assert meepo.testing.run_due(task) == [later]
    assert seen == [b"now", b"later"]
    assert {rec(task, i).status for i in (now, later)} == {Status.DONE}


def test_run_due_needs_an_inline_task(db_url: str, dead_redis: str) -> None:
    task = Task(unique_task_id("inl"), db=db_url, redis=dead_redis, job_func=lambda j: None)
    with pytest.raises(ConfigError, match="not inline"):
        meepo.testing.run_due(task)
    with pytest.raises(TypeError, match=r"meepo\.Task"):
        meepo.testing.run_due("a task")  # type: ignore[arg-type]


# -- middleware --------------------------------------------------------------------------


class Recorder(Middleware):
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_start(self, task: Any) -> None:
        self.calls.append(("on_start",))

    def before_push(self, task: Any, jobs: Any) -> None:
        self.calls.append(("before_push", len(jobs)))

    def after_push(self, task: Any, jobs: Any, ids: Any) -> None:
        self.calls.append(("after_push", list(ids)))

    def after_claim(self, task: Any, jobs: Any) -> None:
        self.calls.append(("after_claim", [j.id for j in jobs]))

    def before_run(self, task: Any, job: Job) -> None:
        self.calls.append(("before_run", job.id))

    def after_run(self, task: Any, job: Job, run: Any) -> None:
        self.calls.append(("after_run", job.id, run.error))

    def after_commit(self, task: Any, outcome: Outcome, accepted: bool) -> None:
        self.calls.append(("after_commit", outcome.job_id, outcome.status.value, accepted))

    def after_retry(self, task: Any, outcome: Outcome) -> None:
        self.calls.append(("after_retry", outcome.job_id))

    def on_stop(self, task: Any) -> None:
        self.calls.append(("on_stop",))


def test_middleware_hooks_run_inline_as_in_a_worker(inline_task: Any) -> None:
    def handler(job: Job) -> None:
        if job.failed_times == 0:
            raise ValueError("first try")

    m = Recorder()
    task = inline_task(handler, middleware=[m])
    job_id = task.push(b"x")
    # The job is pushed (after_push), then run before push returns.
    j = job_id
    assert m.calls == [
        ("before_push", 1),
        ("after_push", [j]),
        ("on_start",),
        ("after_claim", [j]),
        ("before_run", j),
        ("after_run", j, "ValueError: first try"),
        ("after_commit", j, "todo", True),
        ("after_retry", j),
        ("after_claim", [j]),
        ("before_run", j),
        ("after_run", j, None),
        ("after_commit", j, "done", True),
    ]
    task.stop()
    assert m.calls[-1] == ("on_stop",)


def test_a_refusing_before_run_fails_the_attempt_inline(inline_task: Any) -> None:
    class Refuse(Middleware):
        def before_run(self, task: Any, job: Job) -> None:
            raise PermissionError("no quota")

    ran: list[int] = []
    task = inline_task(lambda job: ran.append(job.id), middleware=[Refuse()], max_failed_times=2)
    r = rec(task, task.push(b"x"))
    assert ran == []
    assert (r.status, r.failed_times) == (Status.FAILED, 2)
    assert "Refuse.before_run raised PermissionError: no quota" in r.last_error


# -- a task built elsewhere ----------------------------------------------------------------


def test_inline_context_runs_a_task_built_elsewhere_and_restores_it(
    db_url: str, dead_redis: str, tmp_path: Path
) -> None:
    seen: list[bytes] = []
    task = Task(
        unique_task_id("app"),
        db=db_url,
        redis=dead_redis,
        job_func=lambda j: seen.append(j.payload),
    )
    transport, dispatcher = task.transport, task.dispatcher
    assert not task.inline
    with meepo.testing.inline(task) as same:
        assert same is task and task.inline
        job_id = task.push(b"on the app's ledger")
        assert rec(task, job_id).status is Status.DONE
    assert (task.transport, task.dispatcher) == (transport, dispatcher)
    assert not task.inline
    assert seen == [b"on the app's ledger"]
    # db=: another ledger for the block (migrated first); the task's own is untouched
    other = f"sqlite:///{tmp_path / 'other.sqlite3'}"
    with meepo.testing.inline(task, db=other):
        moved = task.push(b"elsewhere")
        assert rec(task, moved).status is Status.DONE
        assert str(task.engine.url) == other
    assert task.ledger.url == dispatcher.ledger.url
    got = task.get(moved)
    assert got is None or got.payload != b"elsewhere"


def test_inline_refuses_a_consuming_task(make_task: Any) -> None:
    task = make_task(job_func=lambda j: None)
    task.start()
    with pytest.raises(ConfigError, match="stop"), meepo.testing.inline(task):
        pass
    task.stop()
    with pytest.raises(TypeError, match=r"meepo\.Task"), meepo.testing.inline(object()):  # type: ignore[arg-type]
        pass


def test_an_inline_task_has_no_consumers_to_start(inline_task: Any) -> None:
    task = inline_task(lambda j: None)
    with pytest.raises(ConfigError, match="inline"):
        task.start()


def test_an_inline_producer_stores_todo_jobs(inline_task: Any) -> None:
    task = inline_task(None)
    job_id = task.push(b"for a worker")
    assert rec(task, job_id).status is Status.TODO


# -- no Redis at all -------------------------------------------------------------------


def test_inline_needs_no_redis_server_binary(tmp_path: Path) -> None:
    """The embedded default (no URLs), PATH without any redis-server: inline works and
    no Redis is started."""
    script = tmp_path / "app.py"
    script.write_text(
        textwrap.dedent(
            """
            from meepo import Status, Task
            seen = []
            task = Task("emails", job_func=lambda job: seen.append(job.payload),
                        inline=True, init_db=True)
            job_id = task.push(b"hi")
            assert seen == [b"hi"], seen
            assert task.get(job_id).status is Status.DONE
            task.stop()
            print("inline ok")
            """
        )
    )
    empty = tmp_path / "bin"
    empty.mkdir()
    env = child_env(MEEPO_HOME=str(tmp_path / ".meepo"), PATH=str(empty))
    for name in ("MEEPO_DB_URL", "MEEPO_REDIS_URL"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "inline ok" in proc.stdout
    assert not (tmp_path / ".meepo" / "redis").exists()  # no embedded Redis was started


def test_a_bad_redis_url_is_still_an_error_inline(db_url: str) -> None:
    with pytest.raises(ConfigError, match="Redis URL"):
        Task(unique_task_id("inl"), db=db_url, redis="http://nope", inline=True)


# -- stop() --------------------------------------------------------------------------------


def test_stop_of_an_idle_task_does_not_wait_out_the_blocking_pop(
    make_task: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fetcher's blocking pop watches a wake key: stop() ends it at once. With a pop
    timeout of a minute, a stop that waited for it would miss the deadline."""
    monkeypatch.setattr(fetcher_mod, "POP_TIMEOUT", 60.0)
    task = make_task(job_func=lambda j: None)
    task.start()
    consumer = task.consumer
    assert consumer is not None
    wait_for(lambda: consumer.fetcher._blocking, message="the fetcher's blocking pop")
    done: list[bool] = []
    stopper = threading.Thread(target=lambda: done.append(task.stop()), daemon=True)
    stopper.start()
    stopper.join(15.0)
    assert done == [True]
    # and the consumer still works after a restart
    task.start()
    job_id = task.push(b"after restart")
    wait_for(lambda: rec(task, job_id).status is Status.DONE, message="job done")


# -- the pytest plugin -------------------------------------------------------------------


def test_the_plugin_module_imports_nothing_heavy() -> None:
    code = (
        "import sys, meepo_pytest\n"
        "heavy = [m for m in ('meepo', 'sqlalchemy', 'redis') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


def test_the_pytest_plugin_gives_users_an_inline_ledger(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        app="""
        from meepo import Task

        sent = []

        def send(job):
            if job.payload == b"bad":
                raise ValueError("no such address")
            sent.append(job.payload)

        # built at import time, as an app does: a Redis URL nothing listens on
        emails = Task("emails", redis="redis://127.0.0.1:PORT/0", job_func=send)
        """.replace("PORT", str(closed_port())),
        test_user="""
        import pytest
        from meepo import Status, Task
        import app

        def test_inline_fixture(meepo_inline):
            task = meepo_inline(app.emails)
            ok = task.push(b"a@example.org")
            bad = task.push(b"bad")
            assert app.sent == [b"a@example.org"]
            assert task.get(ok).status is Status.DONE
            assert task.get(bad).status is Status.FAILED
            assert task.get(bad).last_error == "ValueError: no such address"

        def test_raise_errors(meepo_inline):
            task = meepo_inline(app.emails, raise_errors=True)
            with pytest.raises(ValueError):
                task.push(b"bad")

        def test_ledger_fixture(meepo_ledger):
            assert meepo_ledger.startswith("sqlite:///")
            task = Task("own", db=meepo_ledger, job_func=lambda job: None, inline=True)
            assert task.get(task.push(b"x")).status is Status.DONE

        def test_each_test_has_its_own_ledger(meepo_ledger):
            task = Task("own", db=meepo_ledger, inline=True)
            assert task.get(1) is None

        def test_the_app_task_is_itself_again():
            assert not app.emails.inline
        """,
    )
    monkeypatch.delenv("MEEPO_DB_URL", raising=False)
    monkeypatch.delenv("MEEPO_REDIS_URL", raising=False)
    monkeypatch.setenv("MEEPO_HOME", str(pytester.path / ".meepo"))
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)


def test_inline_on_an_inline_task_sets_raise_errors_for_the_block_only(inline_task: Any) -> None:
    def handler(job: Job) -> None:
        raise ValueError("always")

    task = inline_task(handler, max_failed_times=1)
    with meepo.testing.inline(task, raise_errors=True), pytest.raises(ValueError, match="always"):
        task.push(b"x")
    job_id = task.push(b"y")  # back to the task's own setting: not raised
    assert rec(task, job_id).status is Status.FAILED


def test_ctrl_c_in_an_inline_handler_is_raised_after_the_attempt_is_committed(
    inline_task: Any,
) -> None:
    def handler(job: Job) -> None:
        raise KeyboardInterrupt

    task = inline_task(handler, max_failed_times=1)
    with pytest.raises(KeyboardInterrupt):
        task.push(b"x")
    failed = task.ledger.find(task_id=task.task_id, status=Status.FAILED)
    assert len(failed) == 1
