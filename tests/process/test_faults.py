"""Real-process fault tests: workers are subprocesses (tests/support/fault_app.py) that get
killed, signalled, and have their Redis flushed or restarted under them.

Each worker appends ``start``/``end`` lines (job id, commit_id, pid, failed_times) to
an append-only execution log; the tests read that log and the ledger. Every wait is a
condition with a deadline; no assertion is about time.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from support import SUPPORT
from support.backends import TaskFactory
from support.helpers import RedisServer, child_env, wait_for

from meepo import Status, Task
from meepo.records import JobRecord

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

APP = SUPPORT / "fault_app.py"
T = TypeVar("T")


# -- the execution log ------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    kind: str  # "start" or "end"
    job_id: int
    commit_id: int
    pid: int
    failed_times: int


class ExecLog:
    """The workers' append-only log of handler runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def runs(self) -> list[Run]:
        if not self.path.exists():
            return []
        out: list[Run] = []
        for line in self.path.read_text().splitlines():
            parts = line.split()
            if len(parts) != 5:  # a line being written right now
                continue
            kind, job_id, commit_id, pid, failed = parts
            out.append(Run(kind, int(job_id), int(commit_id), int(pid), int(failed)))
        return out

    def starts(self, job_id: int | None = None) -> list[Run]:
        return [r for r in self.runs() if r.kind == "start" and job_id in (None, r.job_id)]

    def ends(self, job_id: int | None = None) -> list[Run]:
        return [r for r in self.runs() if r.kind == "end" and job_id in (None, r.job_id)]


# -- worker processes -------------------------------------------------------------------


class Worker:
    """One fault_app.py process; its stderr (meepo's INFO log) goes to a file."""

    def __init__(
        self, args: list[str], stderr_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.stderr_path = stderr_path
        with stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(APP), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=child_env(**(env or {})),
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.pid} did not exit within {timeout}s\n{self.stderr()}"
            ) from None

    def stderr(self, lines: int = 40) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


Spawn = Callable[..., Worker]

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")


def faketime_env(skew: str) -> dict[str, str]:
    """The environment of a worker whose wall clock is ``skew`` off (``"+5s"``), under
    Debian's faketime; monotonic time is left alone (timers keep working)."""
    if not FAKETIME_LIB.exists():
        pytest.skip(f"faketime is not installed ({FAKETIME_LIB})")
    return {
        "LD_PRELOAD": str(FAKETIME_LIB),
        "FAKETIME": skew,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }


@pytest.fixture
def spawn(db_url: str, tmp_path: Path) -> Iterator[Spawn]:
    """Start fault_app.py workers; every one is SIGKILLed (by pid) at teardown."""
    started: list[Worker] = []

    def factory(
        task: Task,
        log: ExecLog,
        *,
        redis_url: str,
        parallel: int = 2,
        prefetch: int | None = None,
        zombie_timeout: float = 2.0,
        zombie_period: float = 0.5,
        grace: float = 15.0,
        lease: float | None = None,
        skew: str | None = None,
        max_failed_times: int | None = None,
        zombie_dst: str | None = None,
    ) -> Worker:
        args = [
            "--db", db_url,
            "--redis", redis_url,
            "--task", task.task_id,
            "--log", str(log.path),
            "--parallel", str(parallel),
            "--zombie-timeout", str(zombie_timeout),
            "--zombie-period", str(zombie_period),
            "--poll-interval", "0.2",
            "--grace", str(grace),
        ]  # fmt: skip
        if prefetch is not None:
            args += ["--prefetch", str(prefetch)]
        if lease is not None:
            args += ["--lease", str(lease)]
        if max_failed_times is not None:
            args += ["--max-failed-times", str(max_failed_times)]
        if zombie_dst is not None:
            args += ["--zombie-dst", zombie_dst]
        env = None if skew is None else faketime_env(skew)
        worker = Worker(args, tmp_path / f"worker{len(started)}.stderr", env)
        started.append(worker)
        return worker

    try:
        yield factory
    finally:
        for worker in started:
            worker.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A throwaway redis-server this test may flush and restart."""
    server = RedisServer(tmp_path / "redis")
    try:
        server.start()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


def until(
    predicate: Callable[[], T],
    *,
    workers: list[Worker],
    timeout: float = 25.0,
    message: str = "condition",
    detail: Callable[[], str] | None = None,
) -> T:
    """``wait_for``, failing at once if one of ``workers`` died; a failure shows the
    workers' stderr (and ``detail()``)."""

    def check() -> T:
        for w in workers:
            if not w.alive():
                raise AssertionError(
                    f"worker {w.pid} exited ({w.proc.returncode}) while waiting for "
                    f"{message}\n{w.stderr()}"
                )
        return predicate()

    try:
        return wait_for(check, timeout=timeout, interval=0.05, message=message)
    except AssertionError as exc:
        extra = [detail()] if detail is not None else []
        extra += [f"--- worker {w.pid} (rc={w.proc.poll()})\n{w.stderr(15)}" for w in workers]
        raise AssertionError("\n".join([str(exc), *extra])) from None


def record(task: Task, job_id: int) -> JobRecord:
    rec = task.get(job_id)
    assert rec is not None, f"job {job_id} has no ledger row"
    return rec


def status_is(task: Task, job_id: int, status: Status) -> JobRecord | None:
    rec = task.get(job_id)
    return rec if rec is not None and rec.status is status else None


def all_done(task: Task, ids: list[int]) -> bool:
    want = set(ids)
    rows = task.ledger.find(task_id=task.task_id, ids=ids)
    return {i for i, _, _, s in rows if s is Status.DONE} == want


def counts(task: Task) -> dict[Status, int]:
    stats = task.ledger.stats(task.task_id)
    return dict(stats[0].counts) if stats else {}


def progress(task: Task, log: ExecLog) -> Callable[[], str]:
    return lambda: f"ledger counts: {counts(task)}; log lines: {len(log.runs())}"


# -- 1. SIGKILL mid-job -------------------------------------------------------------------


def test_sigkill_mid_job_is_recovered_by_another_worker(
    make_task: TaskFactory, redis_url: str, spawn: Spawn, tmp_path: Path
) -> None:
    producer = make_task()
    log = ExecLog(tmp_path / "exec.log")
    workers = [spawn(producer, log, redis_url=redis_url, parallel=1) for _ in range(2)]
    job_id = producer.push(b"hang:120")  # sleeps on its first run only

    first = until(lambda: log.starts(job_id), workers=workers, message="the job to start")[0]
    victim = next(w for w in workers if w.pid == first.pid)
    survivor = next(w for w in workers if w is not victim)
    assert record(producer, job_id).status is Status.DOING
    # mid-job: its start is recorded (a batched mark, a few ms after the handler began)
    until(
        lambda: record(producer, job_id).started_at is not None,
        workers=workers,
        message="the start mark",
    )
    victim.proc.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL

    until(
        lambda: status_is(producer, job_id, Status.DONE),
        workers=[survivor],
        message=f"job {job_id} to be reaped and finished by the surviving worker",
    )
    rec = record(producer, job_id)
    ends = log.ends(job_id)
    assert [r.pid for r in ends] == [survivor.pid]
    assert [r.pid for r in log.starts(job_id)] == [victim.pid, survivor.pid]
    assert ends[0].commit_id > first.commit_id  # a new claim, fenced past the dead one
    assert rec.failed_times == 1  # the expired lease counted as a failed attempt
    assert rec.last_error  # and the reaper said why


# -- 2. FLUSHALL with 1000 queued jobs ------------------------------------------------------


def test_flushall_with_1000_queued_jobs_loses_none_and_runs_none_twice(
    make_task: TaskFactory, own_redis: RedisServer, spawn: Spawn, tmp_path: Path
) -> None:
    producer = make_task(redis=own_redis.url)
    log = ExecLog(tmp_path / "exec.log")
    ids = producer.push_many([b"ms:3"] * 1000)
    assert len(set(ids)) == 1000
    # A zombie_timeout far beyond the test's deadlines: only the epoch check (Redis lost
    # its data) can bring the flushed jobs back in time, not the per-job sweep.
    worker = spawn(producer, log, redis_url=own_redis.url, parallel=2, zombie_timeout=120)

    until(lambda: len(log.ends()) >= 10, workers=[worker], message="the worker to get going")
    client = redis.Redis.from_url(own_redis.url)
    try:
        pipe = client.pipeline(transaction=True)
        pipe.llen(producer.transport.queue_key)
        pipe.flushall()
        queued, _ = pipe.execute()
    finally:
        client.close()
    assert queued > 0, "the queue had drained before FLUSHALL: nothing was tested"

    until(
        lambda: all_done(producer, ids),
        workers=[worker],
        timeout=60,
        message="all 1000 jobs done after FLUSHALL",
        detail=progress(producer, log),
    )
    rows = producer.ledger.find(task_id=producer.task_id)
    assert sorted(r[0] for r in rows) == sorted(ids)  # one row per pushed id, no more
    starts = Counter(r.job_id for r in log.starts())
    ends = Counter(r.job_id for r in log.ends())
    assert set(ends) == set(ids)
    assert {i: n for i, n in ends.items() if n != 1} == {}, "a job finished twice"
    assert {i: n for i, n in starts.items() if n != 1} == {}, "a job started twice"


# -- 3. Redis restart (all data lost) under a running worker ------------------------------


def test_worker_survives_redis_restart_and_recovers_queued_jobs(
    make_task: TaskFactory, own_redis: RedisServer, spawn: Spawn, tmp_path: Path
) -> None:
    producer = make_task(redis=own_redis.url)
    log = ExecLog(tmp_path / "exec.log")
    before = producer.push_many([b"ms:300"] * 8)
    worker = spawn(
        producer, log, redis_url=own_redis.url, parallel=1, prefetch=0, zombie_timeout=120
    )
    until(lambda: log.starts(), workers=[worker], message="the first job to start")
    queued = producer.depth()
    own_redis.restart()
    assert queued > 0, "the queue had drained before the restart: nothing was tested"
    assert producer.depth() == 0

    after = [producer.push(b"ms:1") for _ in range(4)]
    ids = before + after
    until(
        lambda: all_done(producer, ids),
        workers=[worker],
        timeout=40,
        message="all jobs done after the Redis restart",
        detail=progress(producer, log),
    )

    # again with the worker idle, blocked in BLPOP on the connection that goes away
    own_redis.restart()
    later = [producer.push(b"ms:1") for _ in range(3)]
    ids += later
    until(
        lambda: all_done(producer, later),
        workers=[worker],
        timeout=40,
        message="jobs pushed after a restart of an idle worker's Redis",
        detail=progress(producer, log),
    )
    assert worker.alive()
    ends = Counter(r.job_id for r in log.ends())
    assert {i: ends[i] for i in ids} == {i: 1 for i in ids}
    assert {r.pid for r in log.runs()} == {worker.pid}


# -- 4. graceful shutdown ---------------------------------------------------------------


def test_sigterm_finishes_the_running_job_and_releases_unstarted_ones(
    make_task: TaskFactory, redis_url: str, spawn: Spawn, tmp_path: Path
) -> None:
    producer = make_task()
    log = ExecLog(tmp_path / "exec.log")
    ids = producer.push_many([b"sleep:3"] * 2 + [b"x"] * 6)
    running, unstarted, queued = ids[:2], ids[2:4], ids[4:]
    # two executors and two prefetch slots: it claims the first four jobs, and its
    # executors take the two slow ones (a long lease: nothing here should be reaped)
    worker = spawn(producer, log, redis_url=redis_url, parallel=2, prefetch=2, zombie_timeout=120)
    until(
        lambda: all(log.starts(i) for i in running),
        workers=[worker],
        message="the slow jobs to start",
    )
    until(
        lambda: all(status_is(producer, i, Status.DOING) for i in unstarted),
        workers=[worker],
        message="two more jobs to be claimed (prefetched)",
    )
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.stderr()

    for i in running:
        assert record(producer, i).status is Status.DONE
        assert [r.pid for r in log.ends(i)] == [worker.pid]
    for i in unstarted:
        rec = record(producer, i)
        assert rec.status is Status.TODO  # released, not left doing for the reaper
        assert rec.failed_times == 0  # a release is not a failed attempt
        assert log.starts(i) == []
    for i in queued:
        assert record(producer, i).status is Status.TODO
    assert counts(producer).get(Status.DOING, 0) == 0

    # what the stopped worker gave back runs elsewhere
    other = spawn(producer, log, redis_url=redis_url, parallel=2)
    until(
        lambda: all_done(producer, unstarted + queued),
        workers=[other],
        message="the released and queued jobs to run on another worker",
    )
    for i in unstarted:
        assert [r.pid for r in log.starts(i)] == [other.pid]
    other.signal(signal.SIGINT)  # SIGINT too, on an idle worker
    assert other.wait() == 0, other.stderr()


def test_second_sigterm_exits_at_once_and_the_job_is_reaped(
    make_task: TaskFactory, redis_url: str, spawn: Spawn, tmp_path: Path
) -> None:
    producer = make_task()
    log = ExecLog(tmp_path / "exec.log")
    job_id = producer.push(b"hang:120")  # would outlast the grace period on its first run
    worker = spawn(producer, log, redis_url=redis_url, parallel=1, grace=60)
    first = until(lambda: log.starts(job_id), workers=[worker], message="the job to start")[0]
    # its start is recorded soon after it began (a batch of the starter): a worker gone
    # before that would have its job requeued uncharged, a case of its own (test_starts)
    until(
        lambda: record(producer, job_id).started_at is not None,
        workers=[worker],
        message="the job's start to be recorded",
    )

    worker.signal(signal.SIGTERM)
    wait_for(
        lambda: "SIGTERM received" in worker.stderr(200),
        timeout=15,
        message="the worker to handle the first SIGTERM",
    )
    assert worker.alive()  # still inside its grace period, waiting for the handler
    worker.signal(signal.SIGTERM)
    rc = worker.wait()
    assert rc != 0
    assert log.ends(job_id) == []
    assert record(producer, job_id).status is Status.DOING

    other = spawn(producer, log, redis_url=redis_url, parallel=1)
    until(
        lambda: status_is(producer, job_id, Status.DONE),
        workers=[other],
        message="the abandoned job to be reaped and finished by another worker",
    )
    rec = record(producer, job_id)
    assert [r.pid for r in log.ends(job_id)] == [other.pid]
    assert log.ends(job_id)[0].commit_id > first.commit_id
    assert rec.failed_times == 1


# -- 5. duplicate messages ----------------------------------------------------------------


def test_duplicate_messages_run_the_job_once(
    make_task: TaskFactory, redis_url: str, spawn: Spawn, tmp_path: Path
) -> None:
    producer = make_task()
    log = ExecLog(tmp_path / "exec.log")
    ids = producer.push_many([b"ms:5"] * 30)
    first_messages = [(i, 0) for i in ids]
    # every message three more times, before any worker runs: duplicates land in the
    # same pop batch and in different workers' batches
    for _ in range(3):
        producer.transport.send_pairs(first_messages)
    workers = [
        spawn(producer, log, redis_url=redis_url, parallel=3, zombie_timeout=120) for _ in range(2)
    ]
    until(lambda: all_done(producer, ids), workers=workers, message="all jobs done")

    # and again once they are finished: the old message, and one carrying the claim's id
    producer.transport.send_pairs(first_messages + [(i, 1) for i in ids])
    until(lambda: producer.depth() == 0, workers=workers, message="the duplicates popped")
    sentinel = producer.push(b"x")
    until(
        lambda: status_is(producer, sentinel, Status.DONE),
        workers=workers,
        message="a job pushed after the duplicates",
    )
    starts = Counter(r.job_id for r in log.starts())
    assert {i: starts[i] for i in ids} == {i: 1 for i in ids}
    claims = {r.job_id: r.commit_id for r in log.starts()}
    for i in ids:
        rec = record(producer, i)
        assert (rec.status, rec.commit_id) == (Status.DONE, claims[i] + 1)  # a claim, a commit


# -- 7. clock skew (docs/design.md invariant 8: the database's clock is the one clock) -------


def one_host_on_sqlite(db_url: str) -> None:
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite is embedded: its clock is the one host's (no skew to judge)")


def test_reaper_host_ahead_does_not_reap_a_healthy_job(
    make_task: TaskFactory, db_url: str, redis_url: str, spawn: Spawn, tmp_path: Path
) -> None:
    """A worker runs a healthy 10 s job under a 6 s lease (renewed every 2 s) while the
    reaper of another worker runs with its clock 5 s ahead: judged by the database's
    clock, the lease never expires, so the job runs once and ends done."""
    one_host_on_sqlite(db_url)
    producer = make_task()
    log = ExecLog(tmp_path / "exec.log")
    runner = spawn(producer, log, redis_url=redis_url, parallel=1, lease=6.0, zombie_timeout=6.0)
    job_id = producer.push(b"sleep:10")
    until(lambda: log.starts(job_id), workers=[runner], message="the job to start")
    ahead = spawn(
        producer, log, redis_url=redis_url, parallel=1, lease=6.0, zombie_timeout=6.0, skew="+5s"
    )
    workers = [runner, ahead]
    until(lambda: "off the database" in ahead.stderr(200), workers=workers, message="skew warning")
    rec = until(
        lambda: (
            status_is(producer, job_id, Status.DONE) or status_is(producer, job_id, Status.FAILED)
        ),
        workers=workers,
        message="the job to finish",
        detail=progress(producer, log),
    )
    starts = log.starts(job_id)
    assert len(starts) == 1, f"the job ran {len(starts)} times: {starts}"
    assert rec is not None and rec.status is Status.DONE and rec.failed_times == 0


def db_start_times(log: ExecLog) -> dict[int, datetime]:
    """The database's time at each ``when`` job's start (``dbtime`` lines)."""
    out: dict[int, datetime] = {}
    if log.path.exists():
        for line in log.path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "dbtime":
                out.setdefault(int(parts[1]), datetime.fromisoformat(parts[2]))
    return out


@pytest.mark.parametrize("skew", ["+5s", "-5s"])
def test_delayed_job_never_starts_before_its_run_at_under_skew(
    make_task: TaskFactory, db_url: str, redis_url: str, spawn: Spawn, tmp_path: Path, skew: str
) -> None:
    """A job delayed by 6 s, a worker whose clock is 5 s off: it starts at its run_at
    by the database's clock, never before (the promoter judges by the worker's estimate
    of the database's clock, and the claim refuses a job that is not due)."""
    one_host_on_sqlite(db_url)
    producer = make_task()
    log = ExecLog(tmp_path / "exec.log")
    worker = spawn(producer, log, redis_url=redis_url, parallel=1, skew=skew)
    until(lambda: "off the database" in worker.stderr(200), workers=[worker], message="warning")
    job_id = producer.push(b"when", delay=6.0)
    run_at = record(producer, job_id).run_at
    started = until(
        lambda: db_start_times(log).get(job_id),
        workers=[worker],
        message="the delayed job to start",
        detail=progress(producer, log),
    )
    assert started is not None and run_at is not None
    assert started >= run_at, f"started at {started}, before its run_at {run_at}"
    until(lambda: status_is(producer, job_id, Status.DONE), workers=[worker], message="done")
    assert len(log.starts(job_id)) == 1


# -- start marks: an attempt is a run, not a claim -------------------------------------------


@pytest.mark.parametrize("dst", ["todo", "done", "failed"])
def test_prefetched_jobs_of_a_killed_worker_are_not_charged(
    make_task: TaskFactory, redis_url: str, spawn: Spawn, tmp_path: Path, dst: str
) -> None:
    """One worker (parallel 1, prefetch 5) claims six jobs and is SIGKILLed while the
    first runs: the running one was started, its lost lease is charged (and, with
    max_failed_times=1, follows the zombie policy); the five prefetched ones never
    started, so they are requeued uncharged whatever the policy, and all run once."""
    producer = make_task()
    log = ExecLog(tmp_path / "exec.log")
    options = {"parallel": 1, "prefetch": 5, "max_failed_times": 1, "zombie_dst": dst}
    ids = producer.push_many([b"hangonce:120"] * 6)
    victim = spawn(producer, log, redis_url=redis_url, **options)
    first = until(lambda: log.starts(), workers=[victim], message="a job to start")[0]
    until(
        lambda: (
            all(record(producer, i).status is Status.DOING for i in ids)
            and record(producer, first.job_id).started_at is not None
        ),
        workers=[victim],
        message="every job claimed, the first one's start recorded",
    )
    victim.proc.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL

    survivor = spawn(producer, log, redis_url=redis_url, **options)
    until(
        lambda: all(record(producer, i).status.terminal for i in ids),
        workers=[survivor],
        message="every job to finish",
        detail=progress(producer, log),
    )
    killed = record(producer, first.job_id)
    assert killed.failed_times == 1  # the run that lost its worker was charged
    assert killed.status is (Status.FAILED if dst == "todo" else Status(dst))
    prefetched = [i for i in ids if i != first.job_id]
    for i in prefetched:
        rec = record(producer, i)
        assert (rec.status, rec.failed_times, rec.orphaned_claims) == (Status.DONE, 0, 1)
        assert [r.pid for r in log.starts(i)] == [survivor.pid]  # run once, by the survivor


def test_poison_job_that_kills_every_worker_ends(
    make_task: TaskFactory, redis_url: str, spawn: Spawn, tmp_path: Path
) -> None:
    """A job whose handler SIGKILLs its worker at once, every run: its first claim may
    expire before its start was recorded (uncharged); the next claims record the start
    before running it, so it is charged and fails after max_failed_times attempts, with
    at most max_failed_times + 1 runs."""
    producer = make_task()
    log = ExecLog(tmp_path / "exec.log")
    job_id = producer.push(b"kill")
    workers = [spawn(producer, log, redis_url=redis_url, parallel=1, max_failed_times=2)]

    def failed() -> JobRecord | None:
        if not workers[-1].alive():  # killed by the job: a fresh worker takes over
            assert workers[-1].wait() == -signal.SIGKILL, workers[-1].stderr()
            workers.append(
                spawn(producer, log, redis_url=redis_url, parallel=1, max_failed_times=2)
            )
        return status_is(producer, job_id, Status.FAILED)

    wait_for(failed, timeout=90, interval=0.1, message="the poison job to fail")
    rec = record(producer, job_id)
    assert rec.failed_times == 2
    assert 2 <= len(log.starts(job_id)) <= 3
    assert rec.orphaned_claims == len(log.starts(job_id)) - 2
