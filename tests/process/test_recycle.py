"""``meepo worker --max-jobs/--max-memory`` recycles the worker process: a
real worker subprocess finishes and commits its jobs, replaces its process image (same
pid, next generation) and keeps consuming; no job is lost or run twice."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import TESTS
from support.backends import unique_task_id
from support.helpers import child_env, record, wait_for

from meepo import Status, Task

pytestmark = pytest.mark.timeout(180)

TaskFactory = Callable[..., Task]


class Worker:
    def __init__(self, tmp: Path, db_url: str, redis_url: str, task_id: str, *opts: str) -> None:
        self.log = tmp / "runs.log"
        self.log.touch()
        self.stderr = tmp / "worker.stderr"
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "meepo", "worker", "support.recycle_app:task",
                    "--db", db_url, "--redis", redis_url, "-v", *opts,
                ],
                cwd=TESTS,
                env=child_env(RECYCLE_LOG=str(self.log), RECYCLE_TASK=task_id),
                stderr=err,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip

    def runs(self) -> list[tuple[int, int, int, int]]:
        out = []
        for line in self.log.read_text().splitlines():
            job_id, commit_id, pid, gen = (int(x) for x in line.split())
            out.append((job_id, commit_id, pid, gen))
        return out

    def settled(self) -> bool:
        """Not in the middle of a recycle: every recycle was followed by a fresh start
        (a SIGTERM while the process image is being replaced would end it by default)."""
        text = self.stderr.read_text()
        return text.count("consumer(s) started") == text.count(": recycling after ") + 1

    def stop(self) -> int:
        if self.proc.poll() is None:
            wait_for(self.settled, timeout=30, message="the worker to finish recycling")
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


@pytest.fixture
def worker(
    tmp_path: Path, db_url: str, redis_url: str
) -> Iterator[Callable[..., tuple[Worker, str]]]:
    made: list[Worker] = []

    def start(*opts: str) -> tuple[Worker, str]:
        task_id = unique_task_id("recycle")
        w = Worker(tmp_path, db_url, redis_url, task_id, *opts)
        made.append(w)
        return w, task_id

    yield start
    for w in made:
        w.stop()


def all_done(task: Task, ids: list[int]) -> bool:
    return all(record(task, i).status is Status.DONE for i in ids)


def check_each_ran_once(task: Task, w: Worker, ids: list[int]) -> Counter[int]:
    runs = w.runs()
    assert Counter(r[0] for r in runs) == Counter(ids)  # every job ran exactly once
    for i in ids:
        rec = record(task, i)
        assert (rec.status, rec.failed_times) == (Status.DONE, 0)
    assert {r[2] for r in runs} == {w.proc.pid}  # execv: the same process
    return Counter(r[3] for r in runs)


def test_max_jobs_recycles_and_jobs_keep_flowing(
    make_task: TaskFactory, worker: Callable[..., tuple[Worker, str]]
) -> None:
    w, task_id = worker("--parallel", "1", "--max-jobs", "4")
    producer = make_task(task_id)
    ids = producer.push_many([b"job %d" % i for i in range(16)])
    wait_for(lambda: all_done(producer, ids), timeout=90, message="all jobs done")
    per_generation = check_each_ran_once(producer, w, ids)
    # Exactly 4 per generation with one thread: the 4th job's end closes the intake
    # before its executor takes another; claimed jobs that had not started are given
    # back, a running one (parallel_num > 1) would finish.
    assert len(per_generation) >= 3
    last = max(per_generation)
    assert all(n == 4 for g, n in per_generation.items() if g != last)
    later = producer.push(b"later")  # the recycled process still consumes
    wait_for(lambda: all_done(producer, [later]), timeout=60, message="a job after recycling")
    assert w.stop() == 0
    assert "recycling after 4 jobs (--max-jobs 4)" in w.stderr.read_text()


def test_max_memory_recycles_a_leaking_worker(
    make_task: TaskFactory, worker: Callable[..., tuple[Worker, str]]
) -> None:
    w, task_id = worker("--parallel", "1", "--max-memory", "150")
    producer = make_task(task_id)
    ids = producer.push_many([b"leak:200", b"leak:200", b"small"])
    wait_for(lambda: all_done(producer, ids), timeout=90, message="all jobs done")
    per_generation = check_each_ran_once(producer, w, ids)
    assert len(per_generation) >= 2  # each leak pushed the process over the limit
    assert w.stop() == 0
    assert "MB resident (--max-memory 150)" in w.stderr.read_text()
