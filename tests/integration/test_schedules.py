"""Cron and periodic schedules: declaration, exactly-once firing under racing schedulers,
misfire policies, start/until, and the scheduler inside real worker processes.

Every database test runs on SQLite, MariaDB and PostgreSQL with the real Redis. The
scheduler logic is driven with an injected clock (``Task(clock=...)``) and
``task.scheduler.run_once()``; only the worker-process test runs in real time."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from support.backends import TaskFactory, unique_task_id
from support.helpers import child_env, record, wait_for

from meepo import JobRecord, ScheduleNotFoundError, Status, Task
from meepo.ledger import make_engine

UTC = timezone.utc


class FakeClock:
    """A clock the test sets; shared by every Task of a test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def set(self, seconds: float, base: datetime | None = None) -> None:
        self.now = (base or self.now) + timedelta(seconds=seconds)


def base_time() -> datetime:
    """A whole second a little ahead of real time (the fake clock starts there)."""
    return datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)


def jobs(task: Task) -> list[JobRecord]:
    return [record(task, i) for i, _, _, _ in task.ledger.find(task_id=task.task_id)]


def run_ats(task: Task, payload: bytes | None = None) -> list[datetime]:
    return sorted(j.run_at for j in jobs(task) if payload is None or j.payload == payload)


def drain(task: Task) -> int:
    """Scheduler passes until nothing more is due at the clock's time."""
    made = 0
    for _ in range(100):
        n, more = task.scheduler.run_once()
        made += n
        if not more:
            return made
    raise AssertionError("the scheduler kept finding more to do")


def secs(base: datetime, *offsets: int) -> list[datetime]:
    return [base + timedelta(seconds=s) for s in offsets]


# -- declarations: pure validation --------------------------------------------------------


# -- the ledger: declaring, re-declaring, removing ---------------------------------------


def test_declare_again_changes_nothing_and_changes_take_effect(make_task: TaskFactory) -> None:
    base = base_time()
    clock = FakeClock(base)
    task = make_task(clock=clock)
    first = task.schedule_every("report", 10, b"v1")
    assert first.next_fire_at == base + timedelta(seconds=-base.timestamp() % 10)
    clock.set(3)
    again = task.schedule_every("report", 10.0, b"v1")
    assert again == first  # nothing written: not even updated_at
    assert [s.name for s in task.schedules()] == ["report"]

    # A changed payload keeps the timing; a changed interval recomputes it at once.
    task.schedule_every("report", 10, b"v2")
    assert task.schedules()[0].next_fire_at == first.next_fire_at
    changed = task.schedule_every("report", 2, b"v2")
    nxt = changed.next_fire_at
    assert nxt is not None and nxt - clock.now <= timedelta(seconds=2)
    clock.now = nxt
    assert drain(task) == 1
    assert [(j.run_at, j.payload) for j in jobs(task)] == [(nxt, b"v2")]

    changed_cron = task.schedule_cron("report", "* * * * * */5", b"v3")
    assert changed_cron.kind == "cron" and changed_cron.expr == "* * * * * */5"
    assert changed_cron.next_fire_at is not None
    assert changed_cron.next_fire_at.second % 5 == 0 and changed_cron.next_fire_at > nxt
    assert task.next_fires("report", 3) == [
        changed_cron.next_fire_at + timedelta(seconds=5 * i) for i in range(3)
    ]


def test_concurrent_first_declarations_make_one_row(db_url: str, make_task: TaskFactory) -> None:
    task_id = unique_task_id("decl")
    engines = [make_engine(db_url) for _ in range(4)]
    tasks = [make_task(task_id, db=e) for e in engines]
    barrier = threading.Barrier(len(tasks))
    errors: list[BaseException] = []

    def declare(t: Task) -> None:
        try:
            barrier.wait()
            for _ in range(5):
                t.schedule_every("race", 1, b"x")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=declare, args=(t,)) for t in tasks]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    try:
        assert not errors, errors
        assert [s.name for s in tasks[0].schedules()] == ["race"]
    finally:
        for e in engines:
            e.dispose()


def test_unschedule_and_lookups(make_task: TaskFactory) -> None:
    task = make_task()
    assert task.schedules() == []
    assert task.unschedule("nope") is False
    with pytest.raises(ScheduleNotFoundError, match="no schedule 'nope'"):
        task.next_fires("nope", 3)
    task.schedule_cron("c", "*/5 * * * *", b"x", priority="high", misfire="skip")
    rec = task.schedules()[0]
    assert (rec.kind, rec.priority, rec.misfire, rec.tz) == ("cron", "high", "skip", "UTC")
    with pytest.raises(ValueError, match="unknown priority 'urgent'"):
        task.schedule_cron("c", "*/5 * * * *", b"x", priority="urgent")
    with pytest.raises(TypeError, match="payload must be bytes"):
        task.schedule_every("e", 1, "text")
    with pytest.raises(ValueError, match="invalid cron expression"):
        task.schedule_cron("c", "*/5 * * *", b"x")
    assert task.schedules() == [rec]  # a bad re-declaration wrote nothing
    assert task.unschedule("c") is True
    assert task.schedules() == []


# -- firing ------------------------------------------------------------------------------


def test_jobs_carry_fire_times_and_priority(make_task: TaskFactory) -> None:
    base = base_time()
    clock = FakeClock(base)
    task = make_task(clock=clock)
    task.schedule_every("tick", 1, b"tick", priority="low", misfire="all")
    for i in range(1, 4):
        clock.set(i, base)
        drain(task)
    got = jobs(task)
    assert [j.run_at for j in got] == secs(base, 0, 1, 2, 3)
    assert {(j.status, j.priority, j.payload) for j in got} == {(Status.TODO, "low", b"tick")}
    assert task.depths()["low"] == 4  # dispatched to their queue, due now
    rec = task.schedules()[0]
    assert rec.last_fire_at == base + timedelta(seconds=3)
    assert rec.next_fire_at == base + timedelta(seconds=4)


def test_start_and_until_are_honoured(make_task: TaskFactory) -> None:
    base = base_time()
    clock = FakeClock(base)
    task = make_task(clock=clock)
    start, until = base + timedelta(seconds=5), base + timedelta(seconds=8)
    task.schedule_every("window", 1, b"w", start=start, until=until)
    task.schedule_cron("cron", "* * * * * *", b"c", start=start, until=until)
    assert task.next_fires("window", 10) == secs(base, 5, 6, 7, 8)
    for i in range(0, 12):
        clock.set(i, base)
        drain(task)
    assert run_ats(task, b"w") == secs(base, 5, 6, 7, 8)
    assert run_ats(task, b"c") == secs(base, 5, 6, 7, 8)
    assert {s.next_fire_at for s in task.schedules()} == {None}
    assert task.next_fires("window", 3) == []
    # Extending until revives it from now on.
    task.schedule_every("window", 1, b"w", start=start, until=until + timedelta(seconds=5))
    assert task.next_fires("window", 10) == secs(base, 11, 12, 13)


@pytest.mark.parametrize(
    "misfire, want",
    [
        # 60 s of downtime, grace 2.5 s: the fires 0..57 are missed, 58..60 on time.
        ("one", [57, 58, 59, 60]),
        ("all", list(range(61))),
        ("skip", [58, 59, 60]),
    ],
)
def test_misfire_policies_after_downtime(
    make_task: TaskFactory, misfire: str, want: list[int]
) -> None:
    base = base_time()
    clock = FakeClock(base)
    task = make_task(clock=clock)
    task.scheduler.grace = 2.5
    task.schedule_every("m", 1, b"m", misfire=misfire)
    task.schedule_cron("c", "* * * * * *", b"c", misfire=misfire)
    clock.set(60, base)  # nobody ran a scheduler for a minute
    drain(task)
    assert run_ats(task, b"m") == secs(base, *want)
    assert run_ats(task, b"c") == secs(base, *want)
    clock.set(61, base)  # back to normal: on-time fires, one job each
    drain(task)
    assert run_ats(task, b"m")[-1] == base + timedelta(seconds=61)
    assert len(run_ats(task, b"m")) == len(want) + 1


def test_catch_up_is_bounded_per_pass(make_task: TaskFactory) -> None:
    base = base_time()
    clock = FakeClock(base)
    task = make_task(clock=clock)
    task.schedule_every("all", 1, b"a", misfire="all")
    clock.set(250, base)
    made, more = task.scheduler.run_once()
    assert (made, more) == (100, True)
    assert drain(task) == 151
    assert run_ats(task) == secs(base, *range(251))


def test_a_bad_row_does_not_stop_the_others(make_task: TaskFactory) -> None:
    from sqlalchemy import update

    base = base_time()
    clock = FakeClock(base)
    task = make_task(clock=clock)
    task.schedule_every("good", 1, b"g")
    task.schedule_cron("bad", "* * * * * *", b"b")
    t = task.schedule_ledger.table
    with task.engine.begin() as conn:  # edited by hand into something invalid
        conn.execute(update(t).where(t.c.name == "bad").values(tz="Nowhere/Land"))
    clock.set(1, base)
    drain(task)
    assert run_ats(task) == secs(base, 0, 1)  # "good" only
    assert task.schedules()[0].next_fire_at == base  # "bad" left alone


# -- exactly once under racing schedulers ------------------------------------------------

ROUNDS = 40


def test_three_racing_schedulers_make_one_job_per_fire(db_url: str, redis_url: str) -> None:
    """Three Tasks on three engines (three connection pools) race every fire of a
    1-second every-schedule and a 1-second cron schedule: a barrier releases them
    together at each second of a shared clock."""
    base = base_time()
    clock = FakeClock(base)
    task_id = unique_task_id("race")
    engines = [make_engine(db_url) for _ in range(3)]
    tasks = [Task(task_id, db=e, redis=redis_url, clock=clock) for e in engines]
    tasks[0].schedule_every("every", 1, b"every")
    tasks[1].schedule_cron("cron", "* * * * * *", b"cron")
    barrier = threading.Barrier(3, action=lambda: clock.set(1))
    errors: list[BaseException] = []

    def scheduler(task: Task) -> None:
        try:
            for _ in range(ROUNDS):
                drain(task)
                barrier.wait(60)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=scheduler, args=(t,)) for t in tasks]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(300)
        assert not errors, errors
        expected = secs(base, *range(ROUNDS))
        assert run_ats(tasks[0], b"every") == expected
        assert run_ats(tasks[0], b"cron") == expected
        assert sum(t.scheduler.fired for t in tasks) == 2 * ROUNDS
    finally:
        for e in engines:
            e.dispose()


APP = """
import os
from meepo import Task

task = Task(os.environ["SCHED_TASK"], job_func=lambda job: None, parallel_num=2)
"""


@pytest.mark.slow
def test_three_worker_processes_in_real_time(
    make_task: TaskFactory, db_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Three `meepo worker` processes, each running its scheduler, for a few 1-second
    fires: one job per fire time, every fire time in between present (misfire=all)."""
    task = make_task()
    task.migrate()
    (tmp_path / "sched_app.py").write_text(APP)
    env = child_env(SCHED_TASK=task.task_id, MEEPO_DB_URL=db_url, MEEPO_REDIS_URL=redis_url)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "meepo", "worker", "sched_app:task"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    try:
        task.schedule_every("rt", 1, b"rt", misfire="all")
        wait_for(
            lambda: sum(j.status is Status.DONE for j in jobs(task)) >= 6,
            timeout=60,
            message="six scheduled jobs done",
        )
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
    for p in procs:
        err = p.stderr.read().decode(errors="replace") if p.stderr else ""
        assert p.returncode == 0, err
        assert "Traceback" not in err, err
    got = run_ats(task)
    assert len(got) == len(set(got)), got  # one job per fire time
    assert all(t.microsecond == 0 for t in got)
    assert got == secs(got[0], *range(len(got)))  # no fire lost in between
